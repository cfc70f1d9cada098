"""`dsv3` command line: one subcommand per module, each with `add_arguments(parser)` and
`run(args) -> int`. Modules import their heavy dependencies inside `run`, so `dsv3 --help`
stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# (command, module, one-line help)
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("info", "dsv3.info", "parameter counts and KV-cache bytes of a preset or config.json"),
    ("demo", "dsv3.demo", "the main job on the embedded default (what `make run` runs)"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name, help_text in COMMANDS:
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
