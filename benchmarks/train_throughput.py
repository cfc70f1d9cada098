"""Training throughput of `dsv3 train` (tokens/s, MFU) against Hugging Face's DeepseekV3ForCausalLM.

What runs on each side, per optimizer step:
  dsv3: the real trainer loop, `Trainer.train_step()` built from a `TrainConfig` (stdlib corpus,
        packed seeded loader, bf16 autocast, main + lambda * MTP + balance loss, clip 1.0, AdamW
        with the V3 parameter groups and the scheduled lr, router-bias update after the step).
  HF:   transformers' DeepseekV3ForCausalLM in a plain PyTorch loop: bf16 autocast, forward with
        the same next-token targets, backward, clip 1.0, torch's fused AdamW (the trainer's
        optimizer) at the trainer's lr of that step. It starts from the same weights (dsv3 `save_pretrained`, HF `from_pretrained` in fp32)
        and sees the same batches: each one is read from the trainer's loader before the dsv3
        step and the loader is rewound, so both models train on identical data.

transformers does not train the MTP module: dsv3 runs with MTP as the preset builds it (more work
per token), HF without it. MFU = FLOPs per token x tokens/s / measured bf16 GEMM peak
(`gemm_tflops("bfloat16")`), with each model's own FLOPs per token in the paper's convention
(`Transformer.training_flops_per_token`: dsv3 counts its MTP depth, HF's count leaves it out).
The first-step losses of both are printed as a check that they train the same model on the same
data. The two run interleaved, step by step, after warm-up steps, so that machine noise hits both
alike; we report medians and the ratios dsv3 / HF in tokens per second (dsv3 does the MTP work on
top) and in MFU (work-normalized).

    python benchmarks/train_throughput.py [--presets tiny,small] [--steps 4] [--warmup 1]
        [--batch 8] [--small-batch 2] [--seq 256] [--compile] [--name train_throughput]

With --compile both sides are compiled as `dsv3 train` compiles a long run: each dsv3 block and
each HF decoder layer (give it --warmup 3: the first steps compile).

The results go to benchmarks/results/train_throughput.json. benchmarks/train_step.py is the
model-only comparison (random tokens, no trainer); this one measures the trainer as users run it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Interleaved step by step, each side's GEMM shapes would evict the other's from oneDNN's kernel
# cache (1,024 kernels by default; transformers' grouped experts add new shapes every step), a
# cost neither pays when it runs alone: small compiled, dsv3 883 vs 1,046 tok/s, HF 815 vs 860.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import gemm_tflops, save_result  # noqa: E402
from dsv3 import ModelConfig, Transformer  # noqa: E402
from dsv3.train.config import TrainConfig  # noqa: E402
from dsv3.train.trainer import Trainer  # noqa: E402


def hf_step_fn(hf, device: torch.device, grad_clip: float, lr: float):
    """One plain-PyTorch training step of the HF model on (x, y) at the given lr; returns the loss."""
    opt = torch.optim.AdamW(hf.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step(x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16):
            # y is already shifted (and -100 after each <|eos|>): pass it as HF's shift_labels
            loss = hf(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def hf_flops_per_token(model_cfg: ModelConfig, seq_len: int) -> float:
    """FLOPs per token of the same model without MTP (what HF trains), counted on the meta device."""
    import dataclasses

    with torch.device("meta"):
        return Transformer(
            dataclasses.replace(model_cfg, num_nextn_predict_layers=0)
        ).training_flops_per_token(seq_len)


def bench_preset(
    preset: str, batch: int, seq: int, steps: int, warmup: int, peak: float, out: Path, compile: bool
) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    cfg = TrainConfig.from_dict(
        {
            "out": str(out / preset),
            "preset": preset,
            "seq_len": seq,
            "batch_size": batch,
            "steps": warmup + steps,
            "dtype": "bfloat16",
            "report": False,
            "peak_tflops": peak,
            "seed": 0,
            "compile": compile,
        }
    )
    trainer = Trainer(cfg)
    device = trainer.device
    with tempfile.TemporaryDirectory() as d:
        trainer.model.save_pretrained(d)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # HF drops the MTP layer's weights (unexpected keys): expected
        hf_logging.disable_progress_bar()
        try:
            hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(device).train()
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
    if compile:  # as the trainer does: each decoder layer
        for layer in hf.model.layers:
            layer.compile()
    hf_step = hf_step_fn(hf, device, cfg.optim.grad_clip, cfg.optim.lr)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    times: dict[str, list[float]] = {"dsv3": [], "hf": []}
    first_loss: dict[str, float] = {}
    for i in range(warmup + steps):
        state = trainer.loader.state_dict()  # read the batch the trainer is about to take, then rewind
        data = trainer.loader.next_batch().to(device)
        x, y = data.input_ids, data.labels
        trainer.loader.load_state_dict(state)
        sync()
        t0 = time.perf_counter()
        record = trainer.train_step()
        sync()
        t1 = time.perf_counter()
        hf_loss = hf_step(x, y, record["lr"])
        sync()
        t2 = time.perf_counter()
        if i == 0:
            first_loss = {"dsv3": record["loss"], "hf": hf_loss}
        if i >= warmup:
            times["dsv3"].append(t1 - t0)
            times["hf"].append(t2 - t1)

    tokens = batch * seq
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: tokens / v for k, v in med.items()}
    fpt = {
        "dsv3": trainer.model.training_flops_per_token(seq),
        "hf": hf_flops_per_token(trainer.model_config, seq),
    }
    mfu = {k: fpt[k] * tps[k] / (peak * 1e12) for k in tps}
    row = {
        "preset": preset,
        "batch": batch,
        "seq": seq,
        "tokens_per_step": tokens,
        "steps": steps,
        "warmup": warmup,
        "device": device.type,
        "median_s": med,
        "tokens_per_s": tps,
        "ratio_dsv3_over_hf": tps["dsv3"] / tps["hf"],
        "mfu_ratio_dsv3_over_hf": mfu["dsv3"] / mfu["hf"],
        "flops_per_token": fpt,
        "mfu": mfu,
        "first_step_loss": first_loss,
        "mtp_depth_dsv3": trainer.model_config.num_nextn_predict_layers,
        "compiled": compile,
    }
    print(
        f"{preset} (batch {batch} x seq {seq}, median of {steps} steps after {warmup} warm-up):\n"
        f"  dsv3 train (MTP {row['mtp_depth_dsv3']}) {tps['dsv3']:,.0f} tok/s  MFU {mfu['dsv3']:.1%}"
        f"  ({fpt['dsv3'] / 1e6:.1f} MFLOP/token counted, MTP included)\n"
        f"  HF plain loop (no MTP)   {tps['hf']:,.0f} tok/s  MFU {mfu['hf']:.1%}"
        f"  ({fpt['hf'] / 1e6:.1f} MFLOP/token)\n"
        f"  ratio dsv3/HF {row['ratio_dsv3_over_hf']:.2f}x tokens/s, {mfu['dsv3'] / mfu['hf']:.2f}x MFU"
        f"  | first-step loss dsv3 {first_loss['dsv3']:.4f} HF {first_loss['hf']:.4f}",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--small-batch", type=int, default=2, help="batch of the small preset (keeps it short)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument(
        "--compile", action="store_true", help="torch.compile each block of dsv3 and each decoder layer of HF"
    )
    ap.add_argument("--name", default="train_throughput", help="results/<name>.json")
    args = ap.parse_args()

    peak = gemm_tflops("bfloat16", device="cuda" if torch.cuda.is_available() else "cpu")
    print(f"bf16 GEMM peak {peak:.3f} TFLOP/s, {torch.get_num_threads()} threads", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for preset in args.presets.split(","):
            batch = args.small_batch if preset == "small" else args.batch
            rows.append(
                bench_preset(preset, batch, args.seq, args.steps, args.warmup, peak, Path(out), args.compile)
            )
    path = save_result(args.name, {"args": vars(args), "gemm_peak_tflops_bf16": peak, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
