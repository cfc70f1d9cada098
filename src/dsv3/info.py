"""`dsv3 info PRESET_OR_CONFIG`: parameter counts (built on the meta device, so even the 671B
model takes seconds and no memory) and the KV-cache bytes per token of both MLA paths.

An unknown name, a missing or malformed config.json, or an invalid config value is reported as
`error: <what is wrong>` on one line, with exit status 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", help="a preset (tiny, small, v2-lite, v3-671b) or a config.json / checkpoint folder"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def load_config(spec: str):
    """A preset name, a config.json, or a folder holding one."""
    from dsv3.config import PRESETS, ModelConfig
    from dsv3.errors import ConfigError

    if spec in PRESETS:
        return ModelConfig.from_preset(spec)
    if Path(spec).exists():
        return ModelConfig.from_hf(spec)
    raise ConfigError(
        f"{spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing config.json or folder"
    )


def model_info(cfg) -> dict:
    import torch

    from dsv3.model.transformer import Transformer

    with torch.device("meta"):
        counts = Transformer(cfg).num_params()
    bf16 = 2
    return {
        **counts,
        "kv_cache_bytes_per_token": cfg.latent_cache_values_per_token * bf16,
        "expanded_kv_bytes_per_token": cfg.expanded_kv_values_per_token * bf16,
        "kv_cache_dtype": "bf16",
    }


def run(args: argparse.Namespace) -> int:
    from dsv3.errors import UserError

    try:
        cfg = load_config(args.model)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = model_info(cfg)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dsv3 info: {args.model}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key, label in [
        ("total_params", "parameters, main model"),
        ("activated_params", "activated per token (with embedding)"),
        ("activated_params_without_embedding", "activated per token (without input embedding)"),
        ("mtp_params", "MTP modules (embedding/head shared)"),
    ]:
        table.add_row(label, f"{info[key]:,} ({info[key] / 1e9:.2f}B)")
    ratio = info["expanded_kv_bytes_per_token"] / info["kv_cache_bytes_per_token"]
    table.add_row("KV cache / token, latent (BF16)", f"{info['kv_cache_bytes_per_token']:,} B")
    table.add_row(
        "KV cache / token, expanded K/V (BF16)", f"{info['expanded_kv_bytes_per_token']:,} B ({ratio:.1f}x)"
    )
    Console().print(table)
    return 0
