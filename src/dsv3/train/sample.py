"""`dsv3 generate`: sample text from a trained model (the simple sampler; the serving engine is in
dsv3.infer).

    dsv3 generate --checkpoint runs/tiny --prompt "def fibonacci(n):" --max-tokens 80

`--checkpoint` may be a run folder (its latest checkpoint, else its hf/ export), a checkpoint
folder, or any Hugging Face-layout folder with config.json, model.safetensors and tokenizer.json.
The prompt is encoded with the checkpoint's tokenizer, prefixed with <|bos|> as in training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or HF folder")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--max-tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")


def resolve_model_folder(path: Path) -> Path:
    """The folder holding config.json + model.safetensors that `path` designates."""
    from dsv3.train.checkpoint import CheckpointError, latest_checkpoint

    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    latest = latest_checkpoint(path / "checkpoints") if (path / "checkpoints").is_dir() else None
    if latest is not None:
        return latest
    if (path / "hf" / "config.json").is_file():
        return path / "hf"
    raise CheckpointError(f"{path} holds no model: expected config.json + model.safetensors, or a run folder")


def sample(folder: Path, prompt: str, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = None,
           top_p: float | None = None, seed: int = 0, tokenizer: Path | None = None) -> str:  # fmt: skip
    """Load the model in `folder` and return the prompt followed by its sampled continuation."""
    import torch

    from dsv3.infer.generate import generate
    from dsv3.model.transformer import Transformer
    from dsv3.train.data import load_tokenizer

    model = Transformer.from_pretrained(folder).eval()
    tok = load_tokenizer(tokenizer or folder / "tokenizer.json", model.cfg.vocab_size)
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.tokenizer.encode(
        prompt, add_special_tokens=False
    ).ids
    with torch.no_grad():
        out = generate(model, torch.tensor([ids]), max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed, eos_token_id=tok.eos_id)  # fmt: skip
    new = [i for i in out[0, len(ids) :].tolist() if i != tok.eos_id]
    return prompt + tok.tokenizer.decode(new)


def run(args: argparse.Namespace) -> int:
    from dsv3.train.checkpoint import CheckpointError
    from dsv3.train.data import DataError

    if args.max_new_tokens < 1 or args.temperature < 0:
        print("error: --max-tokens must be >= 1 and --temperature >= 0", file=sys.stderr)
        return 2
    try:
        folder = resolve_model_folder(Path(args.checkpoint))
        text = sample(folder, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                      args.seed, Path(args.tokenizer) if args.tokenizer else None)  # fmt: skip
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0
