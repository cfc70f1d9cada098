"""`dsv3 train`: every TrainConfig field is a flag (`--seq-len 256`, `--no-compile`, ...), and
`--config FILE` (JSON or TOML with the same names) sets many at once; flags win over the file.

    dsv3 train --preset tiny --steps 1000 --out runs/tiny
    dsv3 train --out runs/tiny --steps 1000 --resume           # continue exactly after a stop
    dsv3 train --config run.json --stop-after 200              # a preemptible job's slice

Bad input (unknown flag or key, invalid value, missing data, no checkpoint to resume) is reported
in one line and exits with status 2 before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from typing import Any

HELP = {
    "out": "run folder: metrics.jsonl, checkpoints/, hf/, report.png",
    "preset": "model preset (tiny, small, v2-lite, v3-671b)",
    "model_config": "a config.json (ours or Hugging Face's) instead of --preset",
    "model_overrides": "JSON object of ModelConfig fields to override, e.g. '{\"num_hidden_layers\": 2}'",
    "data": "sources: 'stdlib', files or folders of text, 'hf:NAME[:CONFIG]' (cached datasets)",
    "tokenizer": "a tokenizer.json (default: byte-level BPE trained on the corpus, cached)",
    "cache_dir": "where tokenizers and token caches live (env DSV3_CACHE)",
    "max_corpus_mb": "use only the first N MB of files",
    "steps": "optimizer steps of the whole schedule",
    "stop_after": "end this invocation after K more steps, with a checkpoint",
    "max_minutes": "end this invocation after M minutes of wall time, with a checkpoint",
    "lr": "peak learning rate",
    "schedule": "v3 (warm-up, constant, cosine, tail) or cosine",
    "warmup_steps": "default min(2000, steps // 20)",
    "bias_gamma": "router-bias update speed (0 disables auxiliary-loss-free balancing)",
    "dtype": "bfloat16 (autocast) or float32",
    "threads": "torch CPU threads",
    "peak_tflops": "device peak for MFU (default: measured with a GEMM)",
    "resume": "continue from the latest checkpoint in --out",
    "dp_replicate": "data-parallel replicas (HSDP; default -1: 1, or the ranks left after --dp-shard)",
    "dp_shard": "data-parallel FSDP shards (default -1: the ranks left after --pp and --dp-replicate)",
    "ep": "expert-parallel ranks, carved from --dp-shard (must divide it and n_routed_experts)",
    "pp": "pipeline stages (ranks); dualpipev puts two stages on each",
    "pp_schedule": "pipeline schedule: 1f1b or dualpipev",
    "pp_microbatches": "microbatches per pipeline step (default: the number of stages)",
    "ranks_per_node": "EP ranks per node, for node-limited routing and cross-node byte counts",
    "fp8": "FP8 GEMMs (1x128 activation tiles, 128x128 weight blocks) in attention, dense and expert projections",
    "fp8_scales": "FP8 scale format: pow2 (exact fast BF16 path on CPU), fp32 (the V3 paper's), ue8m0",
    "fp8_dispatch": "send EP dispatch in FP8 with 1x128 scales (combine stays BF16)",
    "activation_checkpoint": "recompute attention (norm + MLA) in backward",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dsv3.train.trainer import FP8_SCALES, TrainConfig  # light: config only, no model import

    parser.add_argument("--config", help="JSON or TOML file with TrainConfig keys")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": HELP.get(f.name)}
        kind = hints[f.name]
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name == "data":
            kwargs["nargs"] = "+"
        elif f.name == "model_overrides":
            kwargs["type"] = json.loads
        else:
            kwargs["type"] = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            choices = {"schedule": ("v3", "cosine"), "dtype": ("bfloat16", "float32"),
                       "pp_schedule": ("1f1b", "dualpipev"), "fp8_scales": FP8_SCALES}  # fmt: skip
            if f.name in choices:
                kwargs["choices"] = choices[f.name]
        parser.add_argument(flag, **kwargs)


def run(args: argparse.Namespace) -> int:
    from dsv3.errors import CheckpointError, ConfigError, DataError
    from dsv3.train.distributed import build_trainer
    from dsv3.train.trainer import TrainConfig

    flags = {k: v for k, v in vars(args).items() if k not in ("config", "command", "_run")}
    try:
        cfg = TrainConfig.from_file(args.config, **flags) if args.config else TrainConfig(**flags)
        trainer = build_trainer(cfg)  # a DistributedTrainer under torchrun or with parallel flags
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if trainer.is_main:
        print(json.dumps(trainer.resolved_config()))
    summary = trainer.fit()
    if not trainer.is_main:
        return 0
    last = summary.get("last", {})
    print(f"done: step {trainer.step}/{cfg.steps}, loss {last.get('loss', float('nan')):.4f}, "
          f"val_loss {last.get('val_loss', float('nan')):.4f} (unigram baseline {summary['unigram_loss']:.4f})")  # fmt: skip
    return 0
