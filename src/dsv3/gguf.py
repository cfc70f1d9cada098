"""GGUF export: a dsv3 or HF DeepSeek checkpoint as a llama.cpp `deepseek2` model file.

GGUF (llama.cpp's format, written here with the `gguf` package) is one file: a header, typed
key/value metadata (the architecture's hyper-parameters and the tokenizer), a table of tensor
infos (name, ggml type, dims) and the aligned tensor data. ggml lists dims fastest first, so a
torch [out, in] weight is ggml {in, out}; the `gguf` writer reverses the shapes for us and takes
tensors in torch layout.

Names (HF -> GGUF, `blk.{i}.` for `model.layers.{i}.`):

    model.embed_tokens / model.norm / lm_head          token_embd / output_norm / output
    input_layernorm / post_attention_layernorm         attn_norm / ffn_norm
    self_attn.q_proj | q_a_proj, q_a_layernorm, q_b_proj   attn_q | attn_q_a, attn_q_a_norm, attn_q_b
    self_attn.kv_a_proj_with_mqa, kv_a_layernorm       attn_kv_a_mqa, attn_kv_a_norm
    self_attn.kv_b_proj / o_proj                       attn_kv_b / attn_output
    mlp.{gate,up,down}_proj (dense layers)             ffn_{gate,up,down}
    mlp.gate.weight / mlp.gate.e_score_correction_bias ffn_gate_inp.weight / exp_probs_b.bias
    mlp.shared_experts.{gate,up,down}_proj             ffn_{gate,up,down}_shexp
    mlp.experts.{e}.{gate,up,down}_proj                ffn_{gate,up,down}_exps [E, out, in], stacked

kv_b_proj stays one tensor (attn_kv_b, with no `*_mla` key lengths): the layout every llama.cpp
loads; newer builds run such files as multi-head attention over expanded K/V (they absorb
W_UK/W_UV only for files with split attn_k_b/attn_v_b tensors and *_mla key lengths). The MTP
layers (model.layers.{L+k}) are left out: llama.cpp's deepseek2 has no multi-token prediction.

Types (`--gguf-type`): f32; bf16 (round to nearest even, as torch casts); q8_0, llama.cpp's
8-bit blocks: 32 consecutive values of a row share one FP16 scale d = amax/127 and store
q = round(x/d) as int8, so |x - q*d| <= d/2 plus the FP16 rounding of d. Norms, biases and the
router (ffn_gate_inp, which dsv3 also keeps in FP32) are F32 in every type, as llama.cpp's own
converter keeps them; a q8_0 matrix whose rows are not a multiple of 32 stays F32.

What llama.cpp cannot represent exactly is reported, with the reason, by `caveats` (the
conversion prints them as warnings): group-limited routing, which the file carries as
expert_group_count/expert_group_used_count but builds without expert-group routing (such as
c392e50 of 2025-02, the one the tests ran) ignore, routing over all experts; DeepSeek-V2's
max-score group rule (llama.cpp scores groups only by their top-2 sum, V3's rule); YaRN with
mscale != mscale_all_dim; a plain query projection (q_lora_rank null), which builds like c392e50
recognize only in 27-layer models. Configs it cannot load at all (attention biases) are refused.
Two gaps are bridged exactly: a model without shared experts gets one all-zero shared expert
(deepseek2 requires one; it adds 0), and `rope_interleave=False` weights have their rope rows
permuted to the interleaved pairs llama.cpp rotates (rope.py: a fixed permutation of the rope
dims of queries and keys leaves q.k unchanged). Everything else being representable, an F32 file
decodes dsv3's greedy tokens exactly when llama.cpp's KV cache is F32 too (`-ctk f32 -ctv f32`;
its default F16 cache rounds K and V, which can flip a close routing or argmax decision).

Memory: tensors stream from the checkpoint one shard at a time and spill to a temporary file as
they are encoded, but GGUF stores a layer's experts as one [E, out, in] tensor, so one stacked
projection of one layer is held at once (F32 when converting: 15 GB for V3-671B's 256 experts).

The tokenizer goes in as llama.cpp's "gpt2" BPE: tokens (padded with unused [PAD{i}] up to
vocab_size), token types, merges, bos/eos ids, add_bos_token (dsv3 prompts start with <|bos|>),
the chat template, and the "gpt-2" pre-tokenizer, which splits like our ByteLevel(use_regex=True)
pre-tokenizer. Only such tokenizers (dsv3's own) are accepted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv3.checkpoint import write_file_atomically
from dsv3.config import ModelConfig
from dsv3.errors import ConfigError

ARCH = "deepseek2"
GGUF_TYPES = ("f32", "bf16", "q8_0")
TOKENIZER_PRE = "gpt-2"
Q8_0_BLOCK = 32

# HF name inside a layer -> gguf MODEL_TENSOR member name (the GGUF name comes from the gguf package)
_LAYER_TENSORS = {
    "input_layernorm.weight": "ATTN_NORM",
    "self_attn.q_proj.weight": "ATTN_Q",
    "self_attn.q_a_proj.weight": "ATTN_Q_A",
    "self_attn.q_a_layernorm.weight": "ATTN_Q_A_NORM",
    "self_attn.q_b_proj.weight": "ATTN_Q_B",
    "self_attn.kv_a_proj_with_mqa.weight": "ATTN_KV_A_MQA",
    "self_attn.kv_a_layernorm.weight": "ATTN_KV_A_NORM",
    "self_attn.kv_b_proj.weight": "ATTN_KV_B",
    "self_attn.o_proj.weight": "ATTN_OUT",
    "post_attention_layernorm.weight": "FFN_NORM",
    "mlp.gate_proj.weight": "FFN_GATE",
    "mlp.up_proj.weight": "FFN_UP",
    "mlp.down_proj.weight": "FFN_DOWN",
    "mlp.gate.weight": "FFN_GATE_INP",
    "mlp.gate.e_score_correction_bias": "FFN_EXP_PROBS_B",
    "mlp.shared_experts.gate_proj.weight": "FFN_GATE_SHEXP",
    "mlp.shared_experts.up_proj.weight": "FFN_UP_SHEXP",
    "mlp.shared_experts.down_proj.weight": "FFN_DOWN_SHEXP",
}
_EXPERT_TENSORS = {"gate_proj": "FFN_GATE_EXP", "up_proj": "FFN_UP_EXP", "down_proj": "FFN_DOWN_EXP"}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "TOKEN_EMBD",
    "model.norm.weight": "OUTPUT_NORM",
    "lm_head.weight": "OUTPUT",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_ROUTER_SUFFIX = ".ffn_gate_inp.weight"  # kept in F32 in every type, like every 1-D tensor


def _name(member: str, layer: int | None = None) -> str:
    """GGUF tensor name of a gguf.MODEL_TENSOR member ('.bias' for the selection bias)."""
    import gguf

    base = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[member]].format(bid=layer)
    return base + (".bias" if member == "FFN_EXP_PROBS_B" else ".weight")


def gguf_name(hf_name: str, num_hidden_layers: int) -> str | None:
    """GGUF name of a (non-expert) HF tensor; None for the MTP layers, which are not exported.
    ConfigError for a tensor deepseek2 has no place for."""
    if hf_name in _GLOBAL_TENSORS:
        return _name(_GLOBAL_TENSORS[hf_name])
    m = _LAYER_RE.match(hf_name)
    if m and int(m.group(1)) >= num_hidden_layers:
        return None
    if m and m.group(2) in _LAYER_TENSORS:
        return _name(_LAYER_TENSORS[m.group(2)], int(m.group(1)))
    raise ConfigError(f"checkpoint tensor {hf_name!r} has no counterpart in llama.cpp's {ARCH} architecture")


# ---------------------------------------------------------------------- what llama.cpp can represent
def check_representable(cfg: ModelConfig) -> None:
    """Refuse, before any work, what cannot become a GGUF llama.cpp loads (ConfigError): a missing
    `gguf` package, attention biases."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConfigError("--to gguf needs the gguf package: pip install gguf (or dsv3[gguf])") from None
    if cfg.attention_bias:
        raise ConfigError(
            f"attention_bias=True: llama.cpp's {ARCH} has no attention biases; only models with attention_bias=false convert to GGUF"
        )


def caveats(cfg: ModelConfig) -> list[str]:
    """Why llama.cpp may produce other tokens than dsv3 for this config (empty: exact up to
    floating-point summation order)."""
    out = []
    if cfg.num_moe_layers and cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
        limited = f"group-limited routing (n_group={cfg.n_group}, topk_group={cfg.topk_group})"
        if cfg.topk_method == "noaux_tc":
            out.append(
                f"{limited}: written as expert_group_count/expert_group_used_count, which llama.cpp builds "
                "without expert-group routing (e.g. 2025-02's) ignore: they pick the top experts among all "
                f"groups, dsv3 only inside the best {cfg.topk_group}, so tokens can differ. Exact: n_group=1 "
                "or topk_group=n_group"
            )
        else:
            out.append(
                f"{limited} with topk_method={cfg.topk_method!r}: llama.cpp scores groups only by the sum of "
                "their top-2 experts (V3's rule), never by the best expert (V2's), and routes over all "
                "experts; tokens can differ. Exact: n_group=1 or topk_group=n_group"
            )
    rs = cfg.rope_scaling
    if rs is not None and (not rs["mscale_all_dim"] or rs["mscale"] != rs["mscale_all_dim"]):
        out.append(
            f"YaRN with mscale={rs['mscale']} and mscale_all_dim={rs['mscale_all_dim']}: llama.cpp's {ARCH} "
            "assumes mscale == mscale_all_dim (cos/sin unscaled, softmax scale mscale_all_dim's); logits differ"
        )
    if cfg.q_lora_rank is None and cfg.num_hidden_layers != 27:
        out.append(
            "q_lora_rank=null (plain query projection): llama.cpp builds that detect it by the layer count "
            "(e.g. 2025-02's) take it only for 27-layer models (V2-Lite) and refuse this file; builds that "
            "read it from the absent q_lora_rank key load it"
        )
    return out


# ---------------------------------------------------------------------- tokenizer
@dataclass(frozen=True)
class Vocab:
    tokens: list[str]  # [vocab_size], padded with [PAD{i}]
    types: list[int]  # gguf.TokenType per token
    merges: list[str]  # "left right"
    bos_id: int | None
    eos_id: int
    chat_template: str | None


def read_vocab(folder: Path, cfg: ModelConfig) -> Vocab:
    """The tokenizer of `folder` in llama.cpp's terms; ConfigError if it has none or one that
    llama.cpp's gpt2 BPE with the gpt-2 pre-tokenizer would split differently."""
    import gguf

    from dsv3.errors import DataError
    from dsv3.tokenizer import load_tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(
            f"{folder} has no tokenizer.json; a GGUF file carries its tokenizer, so the checkpoint needs one"
        )
    try:
        info = load_tokenizer(path, cfg.vocab_size)
    except DataError as e:
        raise ConfigError(str(e)) from None
    spec = json.loads(info.tokenizer.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    byte_level = (
        pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
    )
    if model.get("type") != "BPE" or spec.get("normalizer") is not None or not byte_level:
        raise ConfigError(
            f"{path}: GGUF export takes byte-level BPE tokenizers (dsv3's own: model BPE, no normalizer, "
            f"pre_tokenizer ByteLevel with use_regex and without add_prefix_space); this one has model "
            f"{model.get('type')!r}, normalizer {(spec.get('normalizer') or {}).get('type')!r}, pre_tokenizer {pre!r:.120}"
        )
    by_id = {i: t for t, i in model["vocab"].items()}
    types = dict.fromkeys(by_id, int(gguf.TokenType.NORMAL))
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = int(gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(cfg.vocab_size)]
    token_types = [types.get(i, int(gguf.TokenType.UNUSED)) for i in range(cfg.vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    config = folder / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    if template is None:
        from dsv3.infer.chat import DEFAULT_CHAT_TEMPLATE

        template = DEFAULT_CHAT_TEMPLATE
    return Vocab(tokens, token_types, merges, info.bos_id, info.eos_id, template)


# ---------------------------------------------------------------------- metadata
def add_metadata(writer, cfg: ModelConfig, vocab: Vocab, name: str, gguf_type: str) -> None:
    """The deepseek2 hyper-parameters and the tokenizer, as llama.cpp reads them."""
    import gguf

    writer.add_name(name)
    writer.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[gguf_type]
    )
    if gguf_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    hyper = {  # the deepseek2 key (GGUFWriter.add_<key>) -> its value in our config
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size,
        "block_count": cfg.num_hidden_layers,
        "feed_forward_length": cfg.intermediate_size,
        "leading_dense_block_count": cfg.first_k_dense_replace,
        "head_count": cfg.num_attention_heads,
        "head_count_kv": cfg.num_attention_heads,
        "layer_norm_rms_eps": cfg.rms_norm_eps,
        "kv_lora_rank": cfg.kv_lora_rank,
        "key_length": cfg.qk_head_dim,
        "value_length": cfg.v_head_dim,
        "rope_dimension_count": cfg.qk_rope_head_dim,
        "rope_freq_base": cfg.rope_theta,
        "expert_count": cfg.n_routed_experts,
        "expert_used_count": cfg.num_experts_per_tok,
        "expert_shared_count": max(cfg.n_shared_experts, 1),  # 0: one all-zero shared expert
        "expert_feed_forward_length": cfg.moe_intermediate_size,
        "expert_weights_scale": cfg.routed_scaling_factor,
        "expert_weights_norm": cfg.norm_topk_prob and cfg.num_experts_per_tok > 1,  # as dsv3's Router
    }
    if cfg.q_lora_rank is not None:
        hyper["q_lora_rank"] = cfg.q_lora_rank
    for key, value in hyper.items():
        getattr(writer, f"add_{key}")(value)
    rs = cfg.rope_scaling
    # 2025-02's llama.cpp requires the key even without YaRN; 0.1 x mscale_all_dim, the softmax-scale factor
    writer.add_rope_scaling_yarn_log_mul(0.0 if rs is None else 0.1 * rs["mscale_all_dim"])
    if rs is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rs["factor"])
        writer.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_beta_fast(rs["beta_fast"])
        writer.add_rope_scaling_yarn_beta_slow(rs["beta_slow"])
    writer.add_expert_gating_func(
        gguf.ExpertGatingFuncType.SIGMOID
        if cfg.scoring_func == "sigmoid"
        else gguf.ExpertGatingFuncType.SOFTMAX
    )
    if cfg.topk_method == "noaux_tc" and 1 < cfg.n_group and cfg.topk_group < cfg.n_group:
        writer.add_expert_group_count(cfg.n_group)
        writer.add_expert_group_used_count(cfg.topk_group)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    if vocab.bos_id is not None:
        writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_add_bos_token(vocab.bos_id is not None)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# ---------------------------------------------------------------------- tensors
def rope_rows_to_interleaved(weight: torch.Tensor, rope_dim: int, head_dim: int) -> torch.Tensor:
    """Reorder the output rows of a projection whose every `head_dim` rows end in `rope_dim` rope
    rows from rotate-half order (x_i pairs x_{i+d/2}) to interleaved order (x_2i pairs x_2i+1):
    new rope row 2i = old row i, new row 2i+1 = old row i + d/2."""
    half = rope_dim // 2
    perm = torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).flatten()  # [d]
    order = torch.arange(head_dim)
    order[head_dim - rope_dim :] = head_dim - rope_dim + perm
    heads = weight.shape[0] // head_dim
    return weight.view(heads, head_dim, -1)[:, order].reshape(weight.shape)


def gguf_tensors(
    cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors (streamed) -> GGUF-named tensors in torch layout. Experts are stacked per
    layer as soon as all of a layer's have arrived; the MTP layers are dropped."""
    L = cfg.num_hidden_layers
    pending: dict[int, dict[tuple[str, int], torch.Tensor]] = {}
    rope_fix = not cfg.rope_interleave
    for hf_name, t in tensors:
        m = _LAYER_RE.match(hf_name)
        expert = _EXPERT_RE.match(m.group(2)) if m else None
        if expert:
            layer = int(m.group(1))
            if layer >= L:
                continue
            got = pending.setdefault(layer, {})
            got[(expert.group(2), int(expert.group(1)))] = t
            if len(got) == 3 * cfg.n_routed_experts:
                yield from _stack_experts(cfg, layer, pending.pop(layer))
            continue
        name = gguf_name(hf_name, L)
        if name is None:
            continue
        if rope_fix and hf_name.endswith(("self_attn.q_b_proj.weight", "self_attn.q_proj.weight")):
            t = rope_rows_to_interleaved(t, cfg.qk_rope_head_dim, cfg.qk_head_dim)
        elif rope_fix and hf_name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
            t = rope_rows_to_interleaved(t, cfg.qk_rope_head_dim, t.shape[0])
        yield name, t
        if hf_name == "model.embed_tokens.weight" and cfg.tie_word_embeddings:
            yield _name("OUTPUT"), t
        if (
            hf_name.endswith("post_attention_layernorm.weight")
            and cfg.is_moe_layer(int(m.group(1)))
            and cfg.n_shared_experts == 0
        ):
            yield from _zero_shared_expert(cfg, int(m.group(1)))
    if pending:
        layer, got = next(iter(pending.items()))
        raise ConfigError(
            f"layer {layer}: the checkpoint has {len(got)} expert weights, expected 3 x n_routed_experts={3 * cfg.n_routed_experts}"
        )


def _stack_experts(cfg, layer: int, got: dict) -> Iterator[tuple[str, torch.Tensor]]:
    for proj, member in _EXPERT_TENSORS.items():
        try:
            stacked = torch.stack([got[(proj, e)] for e in range(cfg.n_routed_experts)])  # [E, out, in]
        except KeyError as missing:
            raise ConfigError(
                f"layer {layer}: the checkpoint lacks expert weight {missing.args[0]}"
            ) from None
        yield _name(member, layer), stacked


def _zero_shared_expert(cfg, layer: int) -> Iterator[tuple[str, torch.Tensor]]:
    hidden, inter = cfg.hidden_size, cfg.moe_intermediate_size
    yield _name("FFN_GATE_SHEXP", layer), torch.zeros(inter, hidden)
    yield _name("FFN_UP_SHEXP", layer), torch.zeros(inter, hidden)
    yield _name("FFN_DOWN_SHEXP", layer), torch.zeros(hidden, inter)


def encode(name: str, t: torch.Tensor, gguf_type: str):
    """(numpy data, gguf raw type or None for plain F32) of one tensor in `gguf_type`."""
    import gguf

    keep_f32 = t.dim() == 1 or name.endswith(_ROUTER_SUFFIX)
    if gguf_type == "f32" or keep_f32 or (gguf_type == "q8_0" and t.shape[-1] % Q8_0_BLOCK):
        return t.detach().float().contiguous().numpy(), None
    if gguf_type == "bf16":
        return t.detach().to(torch.bfloat16).contiguous().view(
            torch.int16
        ).numpy(), gguf.GGMLQuantizationType.BF16
    q8 = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(t.detach().float().contiguous().numpy(), q8), q8


# ---------------------------------------------------------------------- the file
def write_gguf(
    folder: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    dst: Path,
    gguf_type: str,
    log: Callable[[str], None] = print,
) -> Path:
    """Write the GGUF file `dst` (atomically: a temporary sibling renamed at the end) from the
    HF-named `tensors` of the checkpoint `folder` (its config.json and tokenizer)."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--gguf-type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    cfg = ModelConfig.from_hf(folder)
    check_representable(cfg)
    vocab = read_vocab(folder, cfg)
    for reason in caveats(cfg):
        log(f"warning: llama.cpp may not reproduce dsv3's tokens: {reason}")
    if cfg.num_nextn_predict_layers:
        log(
            f"note: the {cfg.num_nextn_predict_layers} MTP layer(s) are not exported (llama.cpp's {ARCH} has no MTP)"
        )
    writer = gguf.GGUFWriter(None, ARCH, use_temp_file=True)  # tensors spill to a temp file: one in memory
    add_metadata(writer, cfg, vocab, dst.stem, gguf_type)
    count = 0
    for name, t in gguf_tensors(cfg, tensors):
        data, raw = encode(name, t, gguf_type)
        writer.add_tensor(name, data, raw_dtype=raw)
        count += 1

    def write(tmp: Path) -> None:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    write_file_atomically(dst, write)
    log(f"{count} tensors, {dst.stat().st_size / 1e6:,.1f} MB ({gguf_type})")
    return dst
