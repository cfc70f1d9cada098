"""Speed on this machine: the fused bit-trick quantizer against torch's float8 cast, and an
Fp8Linear training step (forward + backward) against nn.Linear in BF16. Interleaved, best of N."""

import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import save_result  # noqa: E402
from dsv3.fp8.linear import Fp8Linear  # noqa: E402
from dsv3.fp8.quant import ACT, quantize  # noqa: E402


def best(fns: dict, repeat: int = 5) -> dict:
    for fn in fns.values():
        fn()  # warm up / compile
    times = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - t)
    return times


def torch_cast_quantize(x: torch.Tensor) -> torch.Tensor:
    """The same 1x128 quantization in eager torch, cast by torch."""
    tiles = x.view(x.shape[0], -1, 128)
    scale = tiles.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448.0
    return (tiles / scale).clamp(-448, 448).to(torch.float8_e4m3fn)


def main() -> None:
    x = torch.randn(4096, 4096)
    q = quantize(x, ACT)
    t = best(
        {
            "quantize 1x128 (fused, compiled)": lambda: quantize(x, ACT),
            "quantize 1x128 (eager torch cast)": lambda: torch_cast_quantize(x),
            "dequantize (fused bit decode)": lambda: q.dequantize(),
            "dequantize (torch cast)": lambda: q.data.float() * q.scale.repeat_interleave(128, 1),
        }
    )
    gb = x.numel() * 4 / 1e9
    print(f"{'op, 4096x4096 fp32':36s} {'ms':>8s} {'GB/s':>6s}")
    for name, s in t.items():
        print(f"{name:36s} {1e3 * s:8.1f} {gb / s:6.2f}")
    torch.manual_seed(0)
    linear = nn.Linear(1024, 1024, bias=False)  # FP32
    fp8 = Fp8Linear.from_linear(nn.Linear(1024, 1024, bias=False))
    bf16 = nn.Linear(1024, 1024, bias=False).bfloat16()
    xs = torch.randn(2048, 1024, dtype=torch.bfloat16, requires_grad=True)

    def step(module):
        return lambda: module(xs).sum().backward()

    s = best(
        {
            "Fp8Linear fwd+bwd": step(fp8),
            "nn.Linear bf16 fwd+bwd": step(bf16),
            "nn.Linear fp32 fwd+bwd": lambda: linear(xs.float()).sum().backward(),
        }
    )
    print(f"\n{'2048x1024 @ 1024x1024, fwd+bwd':36s} {'ms':>8s} {'vs bf16':>7s}")
    for name, sec in s.items():
        print(f"{name:36s} {1e3 * sec:8.1f} {sec / s['nn.Linear bf16 fwd+bwd']:7.2f}")
    save_result("fp8_speed", {"quantize_s": t, "linear_step_s": s})


if __name__ == "__main__":
    main()
