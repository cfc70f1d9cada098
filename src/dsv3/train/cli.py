"""`dsv3 train`: every TrainConfig option is a dotted flag (`--optim.lr 3e-4`, `--parallel.ep 4`,
`--no-logging.report`), the flat names users already rely on stay as aliases (`--lr`, `--ep`,
`--out`, `--data`, `--model-config`, ...), and `--config FILE` (TOML tables or JSON with the same
sections) sets many at once; flags win over the file.

    dsv3 train --preset tiny --steps 1000 --out runs/tiny
    dsv3 train --out runs/tiny --steps 1000 --resume           # continue exactly after a stop
    dsv3 train --config run.toml --stop-after 200              # a preemptible job's slice
    torchrun --nproc-per-node 4 -m dsv3 train --ep 4 ...       # the same trainer on 4 ranks

Bad input (unknown flag or key, invalid value, missing data, no checkpoint to resume) is reported
in one line and exits with status 2 before any work starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dsv3.train.config import ALIASES, FIELDS, HINTS  # light: config only, no model import

    parser.add_argument("--config", help="TOML or JSON file with the sections of TrainConfig")
    legacy = {dotted: alias for alias, dotted in ALIASES.items() if alias != dotted}
    for name, f in FIELDS.items():
        flags = ["--" + name.replace("_", "-")]
        if name in legacy:
            flags.append("--" + legacy[name].replace("_", "-"))
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": name, "help": f.metadata.get("help")}
        kind = HINTS[name]
        if bool in (typing.get_args(kind) or (kind,)):  # bool, or bool | None (unset: automatic)
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:
            kwargs.update(nargs="+", action="extend")  # `--data a b` and `--data a --data b` alike
        elif typing.get_origin(kind) is dict:
            kwargs["type"] = _json_object
        else:
            kwargs["type"] = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(*flags, **kwargs)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"num_hidden_layers\": 2}'")
    return value


def run(args: argparse.Namespace) -> int:
    from dsv3.errors import UserError
    from dsv3.train.config import TrainConfig
    from dsv3.train.faults import NonFiniteError, ReplicaMismatchError
    from dsv3.train.trainer import Trainer

    flags = {k: v for k, v in vars(args).items() if k not in ("config", "command", "_run")}
    try:
        cfg = TrainConfig.from_file(args.config, flags) if args.config else TrainConfig.from_dict(flags)
        trainer = Trainer(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if trainer.is_main:
        print(json.dumps(trainer.resolved_config()))
        print(
            f"world: {trainer.world.size} process(es), device {trainer.device}; dtype: "
            f"{trainer.dtype_choice.describe()}; compile: {trainer.compile_reason}",
            flush=True,
        )
        if trainer.dtype_choice.warning():
            print(f"warning: {trainer.dtype_choice.warning()}", flush=True)
    try:
        summary = trainer.fit()
    except (UserError, NonFiniteError, ReplicaMismatchError) as e:  # e.g. no space left for a checkpoint
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not trainer.is_main:
        return 0
    last = summary.get("last", {})
    print(
        f"done: step {trainer.step}/{cfg.optim.steps}, loss {last.get('loss', float('nan')):.4f}, "
        f"val_loss {last.get('val_loss', float('nan')):.4f} (unigram baseline {summary['unigram_loss']:.4f})"
    )
    return 0
