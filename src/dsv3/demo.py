"""`dsv3 demo` (what `make run` runs): train the tiny DeepSeek-V3 on the Python standard library for a
few minutes, show that it learned, and let it write. Every phase prints progress.

Steps:
  1. Tokenizer and token cache for the embedded corpus (the stdlib sources that ship with Python:
     no download). Both are cached, so only the first run pays for them (~30 s on 2 cores).
  2. Choose the dtype by measurement (dsv3.device: BF16 only where this CPU's BF16 GEMMs are
     faster, FP32 on AVX2-only machines where torch's BF16 matmul is a naive loop).
  3. Calibrate: time a few training steps and pick the number of steps that fits the training
     budget (default 3.5 minutes), so the run is about as long on a laptop as on a busy server;
     if the machine slows down later, training stops at 1.1x the budget with a checkpoint.
  4. Train with the full recipe: MLA + DeepSeekMoE with auxiliary-loss-free balancing, MTP depth 1,
     AdamW, warm-up + cosine, evaluation on held-out stdlib modules, checkpoints. A few hundred
     steps are ~1000x fewer than V3's, so the learning rate is the tiny model's (3e-3, not
     2.2e-4: after 175 FP32 steps it reaches 5.19 nats against 5.54 at 2e-3 and 5.35 at 4e-3)
     and the router biases move 10x faster (gamma 0.01, not 0.001).
  5. Print the learning evidence (loss before and after, validation loss against the unigram
     baseline, which it must beat by 1 nat, expert-load MaxVio before and after balancing), write
     report.png, and sample text.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dsv3.train.config import TrainConfig

from dsv3.device import DTYPE_CHOICES

LEARNED_MARGIN = 1.0  # nats below the unigram baseline that show the model learned context


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="run folder (replaced if it exists)")
    parser.add_argument("--minutes", type=float, default=3.5, help="training time budget")
    parser.add_argument("--prompt", default="def __init__(self", help="prompt for the sample at the end")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto", help="compute dtype (auto: measured)"
    )


def demo_config(
    out: str, seed: int, steps: int, max_minutes: float | None = None, dtype: str = "auto"
) -> TrainConfig:
    from dsv3.train.config import TrainConfig

    return TrainConfig.from_dict(
        {
            "out": out,
            "model": {"preset": "tiny"},
            "data": {"sources": ["stdlib"], "seq_len": 256, "batch_size": 8},
            "optim": {
                "steps": steps,
                "lr": 3e-3,
                "schedule": "cosine",
                "warmup_steps": max(1, steps // 20),
                "bias_gamma": 0.01,
            },
            # compile off: minutes of training would not repay its first compile (~1 minute)
            "run": {"seed": seed, "max_minutes": max_minutes, "dtype": dtype, "compile": False},
            "logging": {"log_every": 10, "eval_every": max(10, steps // 6), "eval_batches": 8},
            "checkpoint": {"save_every": max(10, steps // 3)},
        }
    )


def calibrate_steps(out: str, seed: int, budget_s: float, dtype: str = "auto") -> int:
    """Training steps that fit `budget_s` on this machine, measured over a few real steps."""
    from dsv3.train.trainer import Trainer

    probe = Trainer(demo_config(out, seed, steps=1000, dtype=dtype))
    print(f"dtype: {probe.dtype_choice.describe()}", flush=True)
    probe.train_step()  # warm-up: first-call allocations
    times = []
    for i in range(3):
        start = time.perf_counter()
        probe.train_step()
        times.append(time.perf_counter() - start)
        print(f"calibrating: step {i + 1}/3 took {times[-1]:.2f} s", flush=True)
    # evaluation (~8 forward passes, 6 times) and checkpoints cost ~15% on top of the steps
    return max(30, min(2000, int(budget_s / (sorted(times)[1] * 1.15))))


def run(args: argparse.Namespace) -> int:
    from dsv3.hf import resolve_model_folder
    from dsv3.infer.cli import sample
    from dsv3.train.trainer import Trainer

    out = Path(args.out)
    if out.exists():
        print(f"replacing the previous demo run in {out}")
        shutil.rmtree(out)
    started = time.perf_counter()
    print(
        f"dsv3 demo: the tiny preset on the Python standard library, {args.minutes:g} min of training",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as probe_dir:
        steps = calibrate_steps(probe_dir, args.seed, args.minutes * 60, args.dtype)
    print(f"training the tiny preset for {steps} steps (~{args.minutes:g} min on this machine)", flush=True)
    trainer = Trainer(
        demo_config(str(out), args.seed, steps, max_minutes=1.1 * args.minutes, dtype=args.dtype)
    )
    train_start = time.perf_counter()
    summary = trainer.fit()
    train_s = time.perf_counter() - train_start
    first, last = summary["first"], summary["last"]
    steps = trainer.step
    tokens = trainer.cfg.data.batch_size * trainer.cfg.data.seq_len
    margin = summary["unigram_loss"] - last["val_loss"]
    print(
        f"\ntrained {steps} steps x {tokens} tokens in {train_s:.0f} s ({steps * tokens / train_s:,.0f} tokens/s)"
    )
    print(f"train loss      {first['loss']:.3f} -> {last['loss']:.3f} nats/token")
    print(
        f"validation loss {last['val_loss']:.3f} (unigram baseline {summary['unigram_loss']:.3f}, "
        f"uniform over {trainer.tok.vocab_size} tokens {math.log(trainer.tok.vocab_size):.3f})"
    )
    verdict = (
        "learned"
        if margin >= LEARNED_MARGIN
        else "NOT yet learned (the machine was too slow for the budget?)"
    )
    print(f"{verdict}: {margin:.2f} nats below the unigram baseline (the bar: {LEARNED_MARGIN:g})")
    print(
        f"expert-load MaxVio {first.get('maxvio', 0):.2f} (step 1) -> {last.get('maxvio', 0):.2f} (last step)"
    )
    print(f"report: {summary.get('report')}   checkpoints: {out / 'checkpoints'}")
    text = sample(
        resolve_model_folder(out), args.prompt, max_new_tokens=120, temperature=0.7, top_k=50, seed=args.seed
    )
    print(f"\nsample (prompt {args.prompt!r}, temperature 0.7):\n{'-' * 60}\n{text}\n{'-' * 60}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0
