"""Training-step throughput: dsv3 against Hugging Face transformers' DeepseekV3ForCausalLM.

Both models get the same config and the same weights (dsv3 saves, transformers loads); each
step is forward + loss + backward + AdamW update on the same batch. The two run interleaved,
step by step, so that machine noise hits both alike; we report medians, the ratio
dsv3 / HF in tokens per second, and MFU against this machine's measured GEMM throughput.

MTP: transformers does not train the MTP module, so the comparison runs without it
(num_nextn_predict_layers = 0); a third column times dsv3 with MTP on.

    python benchmarks/train_step.py [--preset tiny] [--batch 8] [--seq 256] [--steps 10]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import gemm_tflops, save_result  # noqa: E402
from dsv3 import ModelConfig, Transformer  # noqa: E402


def make_step(model, ids, labels, autocast_dtype, is_hf: bool):
    # fused, as dsv3's trainer runs it (dsv3.train.optim), on both sides
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()

    def step():
        with ctx:
            if is_hf:
                loss = model(input_ids=ids, labels=ids).loss
            else:
                out = model(ids, labels=labels)
                loss = out.loss + (0.3 * out.mtp_loss if out.mtp_loss is not None else 0) + out.balance_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--compile", action="store_true", help="torch.compile the dsv3 model")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset, num_nextn_predict_layers=0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    tokens = args.batch * args.seq
    peaks = {"fp32": gemm_tflops("float32"), "bf16": gemm_tflops("bfloat16")}
    rows = []
    for dt in args.dtypes.split(","):
        autocast = {"fp32": None, "bf16": torch.bfloat16}[dt]
        ours = Transformer(cfg).train()
        with tempfile.TemporaryDirectory() as d:
            ours.save_pretrained(d)
            hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).train()
        ours_mtp = Transformer(ModelConfig.from_preset(args.preset)).train()
        fpt = ours.training_flops_per_token(args.seq)
        runs = {
            "dsv3": make_step(torch.compile(ours) if args.compile else ours, ids, labels, autocast, False),
            "hf": make_step(hf, ids, labels, autocast, True),
            "dsv3+mtp": make_step(ours_mtp, ids, labels, autocast, False),
        }
        times = {k: [] for k in runs}
        for step in runs.values():  # warm-up
            step(), step()
        for _ in range(args.steps):
            for name, step in runs.items():
                t = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        tps = {k: tokens / v for k, v in med.items()}
        mfu = fpt * tps["dsv3"] / (peaks[dt] * 1e12)
        row = {
            "dtype": dt,
            "tokens_per_step": tokens,
            "median_s": med,
            "tokens_per_s": tps,
            "ratio_dsv3_over_hf": tps["dsv3"] / tps["hf"],
            "flops_per_token": fpt,
            "gemm_peak_tflops": peaks[dt],
            "mfu_dsv3": mfu,
            "mfu_hf": fpt * tps["hf"] / (peaks[dt] * 1e12),
        }
        rows.append(row)
        print(
            f"{dt}: dsv3 {tps['dsv3']:,.0f} tok/s | HF {tps['hf']:,.0f} tok/s | ratio {row['ratio_dsv3_over_hf']:.2f}x"
            f" | dsv3+MTP {tps['dsv3+mtp']:,.0f} tok/s | MFU dsv3 {mfu:.1%} HF {row['mfu_hf']:.1%}"
            f" (peak {peaks[dt]:.3f} TFLOP/s, {fpt / 1e6:.1f} MFLOP/token)",
            flush=True,
        )
    path = save_result(
        f"train_step_{args.preset}{'_compile' if args.compile else ''}", {"args": vars(args), "rows": rows}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
