"""dsv3: train, serve and analyze DeepSeek-V3-style models.

One subcommand per module, each with `add_arguments(parser)` and `run(args) -> int`; only the
module of the command being run is imported, so `dsv3 --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

from dsv3.allocator import retain_freed_memory

# (command, module, one-line help)
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("info", "dsv3.info", "parameter counts and KV-cache bytes of a preset or config.json"),
    ("demo", "dsv3.demo", "the main job on the embedded default (what `make run` runs)"),
    (
        "analyze",
        "dsv3.analysis.cli",
        "co-design analyzer: the paper's tables, KV cache, FLOPs, limits, network",
    ),
    ("train", "dsv3.train.cli", "train a model (tiny preset on the Python stdlib by default)"),
    ("generate", "dsv3.infer.cli", "generate text or chat with a checkpoint (streams to the terminal)"),
    ("eval", "dsv3.eval", "loss, perplexity and bits per byte of a checkpoint on held-out data"),
    ("serve", "dsv3.infer.server", "OpenAI-compatible HTTP server (completions, chat, streaming)"),
    (
        "convert",
        "dsv3.infer.convert",
        "convert a checkpoint: ours -> HF, BF16 <-> DeepSeek FP8 (shard by shard), -> GGUF (llama.cpp)",
    ),
)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the module of `command` is imported (its arguments are what parses)."""
    parser = argparse.ArgumentParser(prog="dsv3", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    retain_freed_memory()  # every step's large tensors reuse mapped pages (allocator.py)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
