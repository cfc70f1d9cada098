"""FP8 speed on this machine: a whole training step of the tiny preset (8 x 256 tokens, BF16
autocast, forward + backward incl. MTP) with ``convert_to_fp8`` against the same model in BF16,
interleaved, median of repeats; then a torch.profiler breakdown of both steps (where the time
goes); then the quantizer against torch's eager float8 cast.

    python benchmarks/fp8_speed.py [--repeats 7] [--threads 1] [--fmt pow2]
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import save_result  # noqa: E402
from dsv3 import ModelConfig, Transformer  # noqa: E402
from dsv3.fp8.linear import convert_to_fp8  # noqa: E402
from dsv3.fp8.quant import ACT, quantize  # noqa: E402

# profiler op -> category (the rest is "other": attention softmax, norms, router, optimizer-free glue)
CATEGORIES = {
    "GEMM (mm, bmm, grouped_mm)": (
        "aten::mm",
        "aten::bmm",
        "aten::addmm",
        "aten::_grouped_mm",
        "aten::linear",
    ),
    "FP8 quantize/dequantize (compiled)": (
        "CompiledFxGraph",
        "Torch-Compiled Region",
        "TorchDynamo",
        "Pregraph",
    ),
}


def make_step(fp8: bool, fmt: str, batch: int, seq: int):
    cfg = ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = Transformer(cfg)
    if fp8:
        convert_to_fp8(model, fmt=fmt)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, cfg.vocab_size, (batch, seq), generator=g) for _ in range(2))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, labels=y)
        (out.loss + 0.3 * out.mtp_loss + out.balance_loss).backward()
        model.zero_grad(set_to_none=True)

    return step


def breakdown(step) -> dict[str, float]:
    """Self CPU seconds of one step per category."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    out = {name: 0.0 for name in [*CATEGORIES, "other"]}
    for event in prof.key_averages():
        name = next((c for c, keys in CATEGORIES.items() if any(k in event.key for k in keys)), "other")
        out[name] += event.self_cpu_time_total / 1e6
    return out


def torch_cast_quantize(x: torch.Tensor) -> torch.Tensor:
    """The same 1x128 quantization in eager torch, cast by torch."""
    tiles = x.view(x.shape[0], -1, 128)
    scale = tiles.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448.0
    return (tiles / scale).clamp(-448, 448).to(torch.float8_e4m3fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fmt", default="pow2", choices=["pow2", "ue8m0", "fp32"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = {"bf16": make_step(False, args.fmt, 8, 256), "fp8": make_step(True, args.fmt, 8, 256)}
    for step in steps.values():  # warm up: compiles the quantizers, primes oneDNN
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():  # interleaved, so load changes hit both
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    ratio = med["fp8"] / med["bf16"]
    print(f"tiny preset, 8x256 tokens, fwd+bwd, {torch.get_num_threads()} threads, fmt={args.fmt}")
    print(
        f"BF16 step {med['bf16']:.3f} s   FP8 step {med['fp8']:.3f} s   FP8/BF16 {ratio:.2f}x (median of {args.repeats})"
    )
    parts = {name: breakdown(step) for name, step in steps.items()}
    print(f"\n{'self CPU seconds of one step':38s} {'BF16':>7s} {'FP8':>7s}")
    for cat in parts["bf16"]:
        print(f"{cat:38s} {parts['bf16'][cat]:7.3f} {parts['fp8'][cat]:7.3f}")

    x = torch.randn(4096, 4096)
    q = quantize(x, ACT)
    cases = {
        "quantize 1x128 (compiled, fused)": lambda: quantize(x, ACT),
        "quantize 1x128 (eager torch cast)": lambda: torch_cast_quantize(x),
        "dequantize (compiled)": lambda: q.dequantize(),
        "dequantize (eager torch cast)": lambda: q.data.float() * q.scale.repeat_interleave(128, 1),
    }
    for fn in cases.values():
        fn()
    quant_s = {name: min(_timed(fn) for _ in range(3)) for name, fn in cases.items()}
    print(f"\n{'op, 4096x4096 fp32':36s} {'ms':>8s} {'GB/s':>6s}")
    for name, s in quant_s.items():
        print(f"{name:36s} {1e3 * s:8.1f} {x.numel() * 4 / 1e9 / s:6.2f}")
    save_result(
        "fp8_speed",
        {
            "fmt": args.fmt,
            "step_s": times,
            "median_s": med,
            "ratio": ratio,
            "breakdown_s": parts,
            "quantize_s": quant_s,
        },
    )


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
