"""`dsv3 convert SRC DST --to {bf16,fp8,hf,gguf}`: move a checkpoint between formats, shard by shard.

    dsv3 convert runs/tiny            tiny-hf   --to hf     # training run/checkpoint -> HF folder
    dsv3 convert tiny-hf              tiny-fp8  --to fp8    # -> DeepSeek's FP8 release format
    dsv3 convert DeepSeek-V3          v3-bf16   --to bf16   # FP8 release -> BF16, on the CPU
    dsv3 convert runs/tiny  tiny.gguf --to gguf --gguf-type q8_0   # -> one llama.cpp file

Formats (see dsv3.hf for the FP8 layout):
  hf    the tensors as they are, in a plain HF-layout folder (a training checkpoint drops its
        optimizer and trainer state); FP8 stays FP8.
  bf16  FP8 weights dequantized with their 128x128 block scales, every float tensor in BF16 but
        the router's e_score_correction_bias (FP32, as in the release); no quantization_config.
  fp8   the release format: attention and MLP Linear weights as E4M3 + `weight_scale_inv`, the
        rest as for bf16; already-FP8 weights are copied untouched (codes and scales).
  gguf  one llama.cpp file (DST is a file), weights in --gguf-type f32 (default), bf16 or q8_0,
        tokenizer included; see dsv3.gguf for the layout and what llama.cpp cannot represent.

Streaming: each source shard is read, converted and written as the same-numbered output shard
before the next is opened, so memory holds one shard (plus its converted copy), never the model.
An FP8 scale stored in another shard than its weight is read alone through the index. Round
trips: fp8 -> bf16 -> fp8 gives back the same codes (BF16 keeps 8 fraction bits, E4M3 needs 3),
bf16 -> fp8 -> bf16 is within FP8 rounding. Output, index, config and tokenizer files are written
into a temporary folder that replaces DST only when complete.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3 import gguf as gguf_io
from dsv3 import hf as hf_io
from dsv3.checkpoint import write_folder_atomically
from dsv3.config import ModelConfig
from dsv3.errors import CheckpointError, ConfigError
from dsv3.fp8 import quant as fp8_quant

FORMATS = ("bf16", "fp8", "hf", "gguf")
COMPILE_ABOVE_BYTES = 2**30
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="run folder, training checkpoint, or HF-layout folder (bf16/fp32/FP8)")
    parser.add_argument("dst", help="output folder (HF layout), or file for --to gguf")
    parser.add_argument("--to", required=True, help=f"target format: one of {', '.join(FORMATS)}")
    parser.add_argument(
        "--gguf-type",
        default=None,
        help=f"weights of --to gguf: one of {', '.join(gguf_io.GGUF_TYPES)} (default f32)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def plan(
    src: str | Path, dst: str | Path, to: str, overwrite: bool = False, gguf_type: str | None = None
) -> tuple[Path, list[Path]]:
    """Check everything before any work: (model folder, its shard files). Raises ConfigError."""
    if to not in FORMATS:
        raise ConfigError(f"--to {to!r} is not a format; choose one of {', '.join(FORMATS)}")
    if gguf_type is not None and to != "gguf":
        raise ConfigError(f"--gguf-type {gguf_type} applies to --to gguf only, not --to {to}")
    if to == "gguf" and (gguf_type or "f32") not in gguf_io.GGUF_TYPES:
        raise ConfigError(f"--gguf-type {gguf_type!r}: choose one of {', '.join(gguf_io.GGUF_TYPES)}")
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConfigError(f"SRC {src} is not a folder")
    try:
        folder = hf_io.resolve_model_folder(src)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    cfg = ModelConfig.from_hf(folder)  # a readable DeepSeek config
    files = hf_io.checkpoint_files(folder)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"{folder}: the index lists shard files that do not exist: {missing[:3]}")
    if dst.exists() and not overwrite:
        raise ConfigError(f"DST {dst} exists; pass --overwrite to replace it")
    if dst.resolve() == folder.resolve() or folder.resolve() in dst.resolve().parents:
        raise ConfigError(f"DST {dst} must not be SRC's model folder or lie inside it")
    if to == "gguf":
        if dst.is_dir():
            raise ConfigError(f"DST {dst} is a folder; --to gguf writes one file (e.g. {dst / 'model.gguf'})")
        if not dst.parent.is_dir():
            raise ConfigError(f"DST {dst}: its folder {dst.parent} does not exist")
        gguf_io.check_representable(cfg)
        gguf_io.read_vocab(folder, cfg)
    return folder, files


def convert(
    src: str | Path,
    dst: str | Path,
    to: str,
    overwrite: bool = False,
    log=print,
    gguf_type: str | None = None,
) -> Path:
    """Convert SRC to format `to` in DST (see the module docstring); returns DST."""
    folder, files = plan(src, dst, to, overwrite, gguf_type)
    dst = Path(dst)
    if to == "gguf":
        return gguf_io.write_gguf(folder, hf_io.iter_checkpoint(folder), dst, gguf_type or "f32", log)

    def write(tmp: Path) -> None:
        weight_map, total = {}, 0
        for i, file in enumerate(files, start=1):
            started = time.perf_counter()
            out = dict(_convert_shard(folder, _load_shard(file), to))
            name = hf_io.shard_file_name(i, len(files))
            save_file(out, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(out, name))
            nbytes = sum(t.numel() * t.element_size() for t in out.values())
            total += nbytes
            del out
            log(
                f"[{i}/{len(files)}] {file.name} -> {name}: {nbytes / 1e6:,.1f} MB in {time.perf_counter() - started:.1f} s"
            )
        if len(files) > 1:
            hf_io.write_index(tmp, weight_map, total)
        config = json.loads((folder / "config.json").read_text())
        if to != "hf":
            config = hf_io.release_config(config, to)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _copy_tokenizer(folder, tmp)

    with _quantizer_mode(sum(f.stat().st_size for f in files)):
        write_folder_atomically(dst, write)
    return dst


def _quantizer_mode(nbytes: int):
    """dsv3.fp8.quant compiles its quantizer: ~5x the throughput, but ~30-60 s of compilation per
    process, which only pays off for checkpoints of COMPILE_ABOVE_BYTES and more; below that it runs
    eagerly (the same codes bit for bit)."""
    return nullcontext() if nbytes >= COMPILE_ABOVE_BYTES else fp8_quant.eager()


def _load_shard(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file (the unit of memory the conversion holds)."""
    with safe_open(str(file), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _convert_shard(
    folder: Path, shard: dict[str, torch.Tensor], to: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Converted (name, tensor) of one shard; a weight's scale is emitted right after it. The
    shard's tensors are popped as they are converted, so the source copy shrinks as we go."""
    for name in sorted(shard):
        if name.endswith(hf_io.SCALE_SUFFIX):
            continue
        t = shard.pop(name)
        if t.dtype in hf_io.FP8_DTYPES:
            sname = name + hf_io.SCALE_SUFFIX
            scale = shard.pop(sname) if sname in shard else hf_io.read_tensor(folder, sname)
            if to == "bf16":
                yield name, hf_io.dequantize_fp8_block(t, scale).to(torch.bfloat16)
            else:
                yield name, t
                yield sname, scale
        elif to == "hf":
            yield name, t
        elif to == "bf16":
            yield name, hf_io.release_dtype(name, t)
        else:
            yield from hf_io.to_fp8_tensors([(name, t)])


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files; store the default chat template with the tokenizer when the
    source has no tokenizer_config.json (our training checkpoints have only tokenizer.json)."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    if (dst / "tokenizer.json").is_file() and not (dst / "tokenizer_config.json").is_file():
        from dsv3.infer.chat import write_tokenizer_config

        write_tokenizer_config(dst)


def run(args: argparse.Namespace) -> int:
    try:
        dst = convert(args.src, args.dst, args.to, args.overwrite, gguf_type=args.gguf_type)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {dst} ({args.to}{'' if args.to != 'gguf' else ' ' + (args.gguf_type or 'f32')})")
    return 0
