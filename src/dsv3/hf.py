"""Hugging Face checkpoint interop: the one place where dsv3 names meet checkpoint names.

dsv3 modules already use the checkpoint's names inside a layer (self_attn.q_a_proj,
mlp.gate.e_score_correction_bias, ...). What differs is a table:

    dsv3                                  HF / DeepSeek checkpoint
    embed_tokens.weight                   model.embed_tokens.weight
    layers.{i}.<name>                     model.layers.{i}.<name>
    norm.weight                           model.norm.weight
    lm_head.weight                        lm_head.weight
    ...mlp.experts.gate_up_proj [E,2I,H]  ...mlp.experts.{e}.gate_proj.weight [I,H] + up_proj.weight
    ...mlp.experts.down_proj    [E,H,I]   ...mlp.experts.{e}.down_proj.weight [H,I]
    mtp.{k}.<name>                        model.layers.{num_hidden_layers + k}.<name>
    (shared with the main model)          model.layers.{L+k}.embed_tokens.weight, .shared_head.head.weight

The MTP layer is exported with its copies of embedding and head, as in the released
checkpoint (converters that drop `model.layers.61` lose it). A checkpoint without MTP weights
(transformers' save_pretrained omits them) loads with freshly initialized MTP modules.

DeepSeek's FP8 release stores the Linear weights of attention (q_a/q_b/kv_a/kv_b/o_proj) and
of every MLP (dense, shared and routed experts, the MTP layer's too) as float8_e4m3fn [out, in]
with a float32 `weight_scale_inv` [ceil(out/128), ceil(in/128)]: one scale per 128x128 block,
scale = amax/448 of the block (edge blocks zero-padded, which leaves the amax unchanged), and the
real weight is block * scale. Everything else is BF16 (embeddings, lm_head, norms, the router's
gate.weight, the MTP eh_proj) except the router's e_score_correction_bias (FP32); config.json
carries FP8_QUANTIZATION_CONFIG. Writing reuses the 128x128 quantizer of dsv3.fp8.quant; loading
dequantizes on the CPU, no GPU or Triton needed (the official converter needs a GPU). For
inference, `load_pretrained(weights="fp8")` instead streams the codes and scales as stored into
FP8-resident modules (dsv3.fp8.resident) that dequantize per GEMM.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3.checkpoint import latest_checkpoint, write_folder_atomically
from dsv3.config import ModelConfig
from dsv3.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

FP8_BLOCK = 128
FP8_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIX = "_scale_inv"  # weight name + suffix = its block scales
_FP8_WEIGHT_RE = re.compile(
    r"\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp(\.shared_experts|\.experts\.\d+)?\.(gate_proj|up_proj|down_proj))\.weight$"
)
_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


# ---------------------------------------------------------------------- names
def _hf_prefix(name: str, n_layers: int) -> str:
    """dsv3 name -> HF name (experts not split here)."""
    if name.startswith("mtp."):
        k, rest = name[4:].split(".", 1)
        return f"model.layers.{n_layers + int(k)}.{rest}"
    if name == "lm_head.weight":
        return name
    return "model." + name


def _dsv3_prefix(name: str, n_layers: int) -> str | None:
    """HF name -> dsv3 name, or None for entries dsv3 does not store (MTP copies of emb/head)."""
    if name == "lm_head.weight":
        return name
    if not name.startswith("model."):
        raise ConfigError(f"unexpected checkpoint key {name!r}: expected 'model.*' or 'lm_head.weight'")
    name = name[len("model.") :]
    m = re.match(r"layers\.(\d+)\.(.*)", name)
    if m and int(m.group(1)) >= n_layers:
        rest = m.group(2)
        if rest in ("embed_tokens.weight", "shared_head.head.weight"):
            return None
        return f"mtp.{int(m.group(1)) - n_layers}.{rest}"
    return name


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """dsv3 model -> HF-named tensors (experts split per expert, MTP copies added)."""
    cfg: ModelConfig = model.cfg
    L = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        hf = _hf_prefix(name, L)
        if hf.endswith("experts.gate_up_proj"):
            base = hf[: -len(".gate_up_proj")]
            for e, w in enumerate(t):
                gate, up = w.chunk(2, dim=0)
                out[f"{base}.{e}.gate_proj.weight"] = gate
                out[f"{base}.{e}.up_proj.weight"] = up
        elif hf.endswith("experts.down_proj"):
            base = hf[: -len(".down_proj")]
            for e, w in enumerate(t):
                out[f"{base}.{e}.down_proj.weight"] = w
        else:
            out[hf] = t
    for k in range(cfg.num_nextn_predict_layers):
        out[f"model.layers.{L + k}.embed_tokens.weight"] = model.embed_tokens.weight
        out[f"model.layers.{L + k}.shared_head.head.weight"] = model.lm_head.weight
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_tensors(cfg: ModelConfig, tensors: Iterator[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """HF-named tensors (streamed) -> dsv3 state dict; experts are stacked as they arrive."""
    L = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in tensors:
        m = _EXPERT_RE.match(name)
        if m:
            base = _dsv3_prefix(m.group(1), L)
            experts.setdefault(base, {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
            continue
        ours = _dsv3_prefix(name, L)
        if ours is not None:
            out[ours] = t
    for base, by_expert in experts.items():
        if sorted(by_expert) != list(range(cfg.n_routed_experts)):
            raise ConfigError(
                f"{base}: checkpoint has experts {sorted(by_expert)[:8]}..., expected 0..{cfg.n_routed_experts - 1}"
            )
        try:
            out[f"{base}.gate_up_proj"] = torch.stack(
                [
                    torch.cat((by_expert[e]["gate_proj"], by_expert[e]["up_proj"]))
                    for e in range(cfg.n_routed_experts)
                ]
            )
            out[f"{base}.down_proj"] = torch.stack(
                [by_expert[e]["down_proj"] for e in range(cfg.n_routed_experts)]
            )
        except KeyError as missing:
            raise ConfigError(f"{base}: an expert lacks its {missing} weight") from None
    if cfg.tie_word_embeddings and "lm_head.weight" not in out:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


# ---------------------------------------------------------------------- FP8 block scales
def is_fp8_weight(name: str) -> bool:
    """Whether DeepSeek's FP8 release stores the HF tensor `name` as E4M3 128x128 blocks."""
    return _FP8_WEIGHT_RE.search(name) is not None


def release_dtype(name: str, t: torch.Tensor) -> torch.Tensor:
    """A tensor the release keeps unquantized, in its release dtype: BF16, but the router's
    e_score_correction_bias in FP32 (integer and FP8 tensors unchanged)."""
    if not t.is_floating_point() or t.dtype in FP8_DTYPES:
        return t
    return t.float() if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16)


def quantize_fp8_block(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (float8_e4m3fn codes [out, in], float32 weight_scale_inv
    [ceil(out/128), ceil(in/128)]) in the release format (dsv3.fp8.quant's WEIGHT tiles)."""
    from dsv3.fp8.quant import WEIGHT, quantize

    q = quantize(weight, WEIGHT)
    return q.data.contiguous(), q.scale.contiguous()


def to_fp8_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors -> the FP8 release format: quantized weights followed by their
    `_scale_inv`, every other tensor in its release dtype (already-FP8 tensors pass unchanged)."""
    for name, t in tensors:
        if is_fp8_weight(name) and t.dtype not in FP8_DTYPES:
            codes, scale = quantize_fp8_block(t)
            yield name, codes
            yield name + SCALE_SUFFIX, scale
        else:
            yield name, release_dtype(name, t)


def dequantize_fp8_block(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK
) -> torch.Tensor:
    """float8 weight [out, in] * per-128x128-block scale [ceil(out/128), ceil(in/128)] -> float32.
    Edge blocks are partial: the scale grid is expanded to whole blocks and cropped to the weight."""
    if weight.dim() != 2 or scale_inv.dim() != 2:
        raise ConfigError(
            f"FP8 block dequantization needs a 2-D weight and 2-D scales, got {tuple(weight.shape)} and {tuple(scale_inv.shape)}"
        )
    rows, cols = weight.shape
    if scale_inv.shape != (-(-rows // block), -(-cols // block)):
        raise ConfigError(
            f"weight_scale_inv shape {tuple(scale_inv.shape)} does not tile weight {tuple(weight.shape)} in {block}x{block} blocks"
        )
    scale = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return weight.float() * scale


# ---------------------------------------------------------------------- files
def resolve_model_folder(path: str | Path) -> Path:
    """The HF-layout folder (config.json + safetensors) that `path` designates: the folder
    itself, else a run folder's latest training checkpoint, else its hf/ export."""
    path = Path(path)
    if (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    ):
        return path
    latest = latest_checkpoint(path / "checkpoints") if (path / "checkpoints").is_dir() else None
    if latest is not None:
        return latest
    if (path / "hf" / "config.json").is_file():
        return path / "hf"
    raise CheckpointError(
        f"{path} holds no model: expected config.json + model.safetensors (or model.safetensors.index.json), "
        "or a run folder with checkpoints/ or hf/"
    )


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors checkpoint in {path}")
    return files


def iter_checkpoint(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (HF name, tensor) from a checkpoint folder, one shard open at a time. An FP8
    weight is dequantized to float32 with its `weight_scale_inv`."""
    for name, t, scale in iter_checkpoint_blocks(path):
        yield name, t if scale is None else dequantize_fp8_block(t, scale)


def iter_checkpoint_blocks(path: str | Path) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """Stream (HF name, tensor, its weight_scale_inv or None) from a checkpoint folder, one shard
    open at a time: FP8 weights as stored, with their block scales (looked up in another shard
    through the index if they live there)."""
    path = Path(path)
    for file in checkpoint_files(path):
        with open_safetensors(file) as f:
            keys = set(f.keys())
            for name in sorted(keys):
                if name.endswith(".weight" + SCALE_SUFFIX):
                    continue
                t = f.get_tensor(name)
                scale = None
                if t.dtype in FP8_DTYPES:
                    sname = name + SCALE_SUFFIX
                    scale = f.get_tensor(sname) if sname in keys else read_tensor(path, sname)
                yield name, t, scale


def checkpoint_dtypes(path: str | Path) -> dict[str, str]:
    """HF name -> safetensors dtype ("BF16", "F8_E4M3", ...) of every tensor, from the shards'
    headers only."""
    dtypes = {}
    for file in checkpoint_files(Path(path)):
        with open_safetensors(file) as f:
            dtypes.update((name, f.get_slice(name).get_dtype()) for name in f.keys())
    return dtypes


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """Read one tensor through the index (an FP8 scale stored apart from its weight)."""
    index = path / "model.safetensors.index.json"
    file = json.loads(index.read_text())["weight_map"].get(name) if index.is_file() else None
    if file is None:
        raise ConfigError(f"{path}: FP8 tensor {name.removesuffix(SCALE_SUFFIX)} has no {name}")
    with open_safetensors(path / file) as f:
        return f.get_tensor(name)


def open_safetensors(file: Path):
    """safe_open(file), with a CheckpointError naming the file if it is truncated or not safetensors."""
    from safetensors import SafetensorError

    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({e}): truncated or corrupt"
        ) from None


def release_config(config: dict, weights: str) -> dict:
    """A config.json dict for BF16 weights (weights="bf16") or DeepSeek's FP8 release format ("fp8")."""
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    config["torch_dtype"] = "bfloat16"
    if weights == "fp8":
        config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    return config


def shard_file_name(i: int, n: int) -> str:
    """Name of shard i (1-based) of n, as transformers writes them."""
    return "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_pretrained(model, path: str | Path, max_shard_bytes: int | None = None, fp8: bool = False) -> None:
    """Write config.json + safetensors into a new folder `path`, atomically (dsv3.checkpoint)."""
    write_folder_atomically(path, lambda tmp: write_pretrained(model, tmp, max_shard_bytes, fp8))


def write_pretrained(model, folder: Path, max_shard_bytes: int | None = None, fp8: bool = False) -> None:
    """Write config.json + safetensors (sharded with an index above max_shard_bytes) into the
    existing `folder`. fp8=True writes DeepSeek's FP8 release format (see the module docstring)."""
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    config = model.cfg.to_hf(dtype)
    tensors = to_hf_state_dict(model)
    if any(name.endswith(SCALE_SUFFIX) for name in tensors):
        raise ConfigError(
            "this model holds FP8-resident weights (dsv3.fp8.resident), which are for inference: "
            "save the checkpoint it was loaded from, or convert it with `dsv3 convert --to fp8`"
        )
    if fp8:
        config = release_config(config, "fp8")
        tensors = dict(to_fp8_tensors(tensors.items()))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards = _shard(tensors, max_shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = shard_file_name(i, len(shards))
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    if len(shards) > 1:
        write_index(folder, weight_map, sum(t.numel() * t.element_size() for t in tensors.values()))


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    """Split into shards of at most max_bytes (a tensor larger than that gets its own shard; an
    FP8 scale stays with its weight). Tensors that share storage (the MTP copies of emb/head)
    are cloned: safetensors refuses aliases."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, seen = 0, set()
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        t = t.clone() if key in seen else t
        seen.add(key)
        nbytes = t.numel() * t.element_size()
        new_shard = max_bytes is not None and shards[-1] and size + nbytes > max_bytes
        if new_shard and not name.endswith(SCALE_SUFFIX):
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def load_pretrained(
    path: str | Path,
    device="cpu",
    dtype: torch.dtype | None = None,
    weights: str | None = None,
    scale_format: str = "pow2",
):
    """Build a Transformer from a HF-layout folder (ours or transformers'), on `device`.

    weights=None dequantizes FP8 weights at load. For inference, "fp8" keeps them FP8-resident
    (`load_fp8_resident`, quantizing at load with `scale_format` what is not FP8), "auto" does
    so when the checkpoint holds FP8 data, "bf16"/"fp32" dequantize to that dtype
    (`resolve_weights`)."""
    from dsv3.model.transformer import Transformer

    path = resolve_model_folder(path)  # a run folder means its latest checkpoint
    if weights is not None:
        from dsv3.fp8.resident import check_scale_format

        check_scale_format(scale_format)
        resident, dtype = resolve_weights(path, weights, dtype)
        if resident:
            return load_fp8_resident(path, device, dtype, scale_format)
    cfg = ModelConfig.from_hf(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.init_weights()
    state = from_hf_tensors(cfg, iter_checkpoint(path))
    check_complete(path, set(model.state_dict()), set(state))
    model.load_state_dict(state, strict=False)
    if dtype is not None:
        model.cast_(dtype)
    return model


def check_complete(path: Path, expected: set[str], loaded: set[str]) -> None:
    """ConfigError when the checkpoint has tensors the model does not, or lacks some it has; a
    checkpoint without any MTP weights is fine (the MTP modules keep their fresh initialization)."""
    unexpected = sorted(loaded - expected)
    missing = sorted(expected - loaded)
    if unexpected:
        raise ConfigError(f"{path}: checkpoint has tensors the config does not describe: {unexpected[:5]}")
    mtp_missing = [k for k in missing if k.startswith("mtp.")]
    if mtp_missing and len(mtp_missing) == sum(k.startswith("mtp.") for k in expected):
        log.warning("%s has no MTP weights; the MTP modules keep their fresh initialization", path)
        missing = [k for k in missing if not k.startswith("mtp.")]
    if missing:
        raise ConfigError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")


# ---------------------------------------------------------------------- FP8-resident loading
WEIGHT_MODES = ("auto", "fp8", "bf16", "fp32")
_WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_weights(
    path: str | Path, weights: str, dtype: torch.dtype | None
) -> tuple[bool, torch.dtype | None]:
    """(keep FP8-resident?, dtype of everything else) for a weights mode: "fp8" resident; "auto"
    resident when the checkpoint holds FP8 data, else `dtype`; "bf16"/"fp32" dequantized to that
    dtype (another `dtype` alongside is an error)."""
    if weights not in WEIGHT_MODES:
        raise ConfigError(f"weights={weights!r}: must be one of {list(WEIGHT_MODES)}")
    if weights in _WEIGHT_DTYPES:
        wanted = _WEIGHT_DTYPES[weights]
        if dtype is not None and dtype != wanted:
            raise ConfigError(
                f"weights={weights!r} and dtype={dtype} disagree: give one of them, or the same dtype"
            )
        return False, wanted
    if weights == "fp8":
        return True, dtype
    return any(d.startswith("F8") for d in checkpoint_dtypes(path).values()), dtype


def load_fp8_resident(path: str | Path, device="cpu", dtype: torch.dtype | None = None, fmt: str = "pow2"):
    """A Transformer whose attention and MLP weights stay FP8 (dsv3.fp8.resident), streamed from
    the checkpoint: FP8 codes and scales are copied as stored, other weights of those modules
    quantized at load with `fmt` scales (a warning says so), everything else (kv_b_proj too)
    loaded in `dtype` (default FP32). The model is built on the meta device and filled tensor
    by tensor, so memory peaks near the FP8 model, never the dequantized one."""
    from dsv3.fp8.resident import Fp8ResidentExperts, Fp8ResidentLinear, check_scale_format, to_fp8_resident
    from dsv3.model.transformer import Transformer

    check_scale_format(fmt)
    path = Path(path)
    cfg = ModelConfig.from_hf(path)
    L = cfg.num_hidden_layers
    has_mtp = any((_dsv3_prefix(k, L) or "").startswith("mtp.") for k in checkpoint_dtypes(path))
    with torch.device("meta"):
        model = Transformer(cfg)
    if dtype is not None:
        model.cast_(dtype)
    to_fp8_resident(model, fmt, keep=() if has_mtp else ("mtp",))  # no MTP weights: fresh, unquantized
    model.to_empty(device=device)
    model.init_weights()  # what the checkpoint holds is overwritten below
    targets = model.state_dict()
    loaded: set[str] = set()
    expert_parts: dict[str, set[tuple[int, str]]] = {}
    quantized = 0
    with torch.no_grad():
        for name, t, scale in iter_checkpoint_blocks(path):
            m = _EXPERT_RE.match(name)
            if m:
                base, e, proj = _dsv3_prefix(m.group(1), L), int(m.group(2)), m.group(3)
                experts = model.get_submodule(base) if f"{base}.down_proj" in targets else None
                if not isinstance(experts, Fp8ResidentExperts) or e >= experts.n_experts:
                    loaded.add(f"{base}.{e}.{proj}")  # reported as unexpected
                    continue
                quantized += _fill_fp8(*_expert_slots(experts, e, proj), t, scale, fmt, name)
                expert_parts.setdefault(base, set()).add((e, proj))
                continue
            ours = _dsv3_prefix(name, L)
            if ours is None:
                continue
            owner = model.get_submodule(ours.rpartition(".")[0]) if ours in targets else None
            if isinstance(owner, Fp8ResidentLinear) and ours.endswith(".weight"):
                quantized += _fill_fp8(owner.weight, owner.weight_scale_inv, t, scale, fmt, name)
                loaded.add(ours + SCALE_SUFFIX)
            elif ours in targets:
                _copy(targets[ours], t if scale is None else dequantize_fp8_block(t, scale), name)
            loaded.add(ours)
    projections = ("gate_proj", "up_proj", "down_proj")
    for base, parts in expert_parts.items():
        want = {(e, p) for e in range(cfg.n_routed_experts) for p in projections}
        if parts != want:
            raise ConfigError(f"{base}: checkpoint lacks expert weights, e.g. {sorted(want - parts)[:3]}")
        loaded.update(f"{base}.{n}{s}" for n in ("gate_up_proj", "down_proj") for s in ("", SCALE_SUFFIX))
    if cfg.tie_word_embeddings and "embed_tokens.weight" in loaded:
        loaded.add("lm_head.weight")
    check_complete(path, set(targets), loaded)
    if quantized:
        log.warning(
            "%s: %d weights had no FP8 data; quantized them to E4M3 at load (128x128 blocks, %s scales)",
            path,
            quantized,
            fmt,
        )
    return model


def _expert_slots(experts, e: int, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) views of expert e's `proj` in an Fp8ResidentExperts."""
    if proj == "down_proj":
        return experts.down_proj[e], experts.down_proj_scale_inv[e]
    half = int(proj == "up_proj")  # gate rows first, then up, each with its own block grid
    rows = slice(half * experts.inter_dim, (half + 1) * experts.inter_dim)
    return experts.gate_up_proj[e, rows], experts.gate_up_proj_scale_inv[e, half]


def _fill_fp8(
    codes: torch.Tensor,
    scales: torch.Tensor,
    t: torch.Tensor,
    scale: torch.Tensor | None,
    fmt: str,
    name: str,
) -> bool:
    """Write a checkpoint weight into FP8 codes [R, C] and scales [ceil(R/128), ceil(C/128)]: E4M3
    codes and their scales as stored, anything else quantized with `fmt` scales. Returns whether
    it quantized."""
    from dsv3.fp8.quant import WEIGHT, quantize

    quantizing = t.dtype != torch.float8_e4m3fn  # high precision, or E5M2 codes
    if quantizing:
        q = quantize(t if scale is None else dequantize_fp8_block(t, scale), WEIGHT, fmt)
        t, scale = q.data, q.scale
    _copy(codes, t, name)
    _copy(scales, scale, name + SCALE_SUFFIX)
    return quantizing


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ConfigError(f"{name}: shape {tuple(src.shape)} here, {tuple(dst.shape)} in the config")
    dst.copy_(src)
