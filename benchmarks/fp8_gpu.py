"""FP8 on a GPU: GEMM TFLOP/s of torch's scaled_mm against BF16 on DeepSeek-V3's shapes, with
DeepGEMM's published 1550 TFLOPS (H800, FP8 dense GEMM) as the reference point; then an
Fp8Linear training step (Fprop + Dgrad + Wgrad, quantization included) against nn.Linear in BF16.
Without CUDA it prints why and exits 0.

Scaling: blockwise 1x128 activations x 128x128 weights (the DeepSeek-V3 recipe) where this torch
build and GPU support it (cuBLAS on SM90+), else rowwise, else tensorwise; the recipe used is
printed per shape. Shapes: M in {4096, 8192} tokens, (N, K) of V3's projections (q_a / kv_a
fused 2112 x 7168, q_b 24576 x 1536, kv_b 32768 x 512, o 7168 x 16384) and experts (gate_up
4096 x 7168, down 7168 x 2048), the shapes DeepGEMM reports.

    python benchmarks/fp8_gpu.py [--iters 50]
"""

import argparse
import os
import statistics
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import save_result  # noqa: E402

DEEPGEMM_H800_TFLOPS = 1550.0  # DeepGEMM README, normal dense FP8 GEMM, best shape on H800
SHAPES_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
TOKENS = (4096, 8192)


def cuda_time(fn, iters: int) -> float:
    """Median seconds per call, CUDA events, after a warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def fp8_gemm_fn(m: int, n: int, k: int):
    """(callable, recipe name) for the best scaled_mm recipe this build accepts at this shape."""

    from dsv3.fp8.gemm import gemm_cuda
    from dsv3.fp8.quant import ACT, WEIGHT, quantize

    a = quantize(torch.randn(m, k, device="cuda"), ACT)
    b = quantize(torch.randn(n, k, device="cuda"), WEIGHT)
    a_data, b_data = a.data.contiguous(), b.data.contiguous().t()  # B column-major [K, N]
    candidates = [("blockwise 1x128 x 128x128", lambda: gemm_cuda(a, b))]
    row_a = a.data.float().abs().amax(1, keepdim=True).clamp(min=1e-4) / 448  # [M, 1]
    row_b = b.data.float().abs().amax(1, keepdim=True).clamp(min=1e-4).t() / 448  # [1, N]
    candidates.append(
        ("rowwise", lambda: torch._scaled_mm(a_data, b_data, row_a, row_b, out_dtype=torch.bfloat16))
    )
    one = torch.ones((), device="cuda")
    candidates.append(
        ("tensorwise", lambda: torch._scaled_mm(a_data, b_data, one, one, out_dtype=torch.bfloat16))
    )
    errors = []
    for name, fn in candidates:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # gemm_cuda's BF16 fallback is not an FP8 recipe
                fn()
            torch.cuda.synchronize()
            return fn, name
        except (RuntimeError, NotImplementedError, TypeError, UserWarning) as err:
            errors.append(f"{name}: {str(err).splitlines()[0]}")
    raise RuntimeError("no scaled_mm recipe works here: " + "; ".join(errors))


def gemm_table(iters: int) -> list[dict]:
    rows = []
    for m in TOKENS:
        for n, k in SHAPES_NK:
            flops = 2 * m * n * k
            x, w = (
                torch.randn(m, k, device="cuda", dtype=torch.bfloat16),
                torch.randn(n, k, device="cuda", dtype=torch.bfloat16),
            )
            bf16 = flops / cuda_time(lambda: x @ w.t(), iters) / 1e12  # noqa: B023
            fn, recipe = fp8_gemm_fn(m, n, k)
            fp8 = flops / cuda_time(fn, iters) / 1e12
            rows.append(
                {
                    "M": m,
                    "N": n,
                    "K": k,
                    "recipe": recipe,
                    "fp8_tflops": fp8,
                    "bf16_tflops": bf16,
                    "speedup": fp8 / bf16,
                    "vs_deepgemm_h800": fp8 / DEEPGEMM_H800_TFLOPS,
                }
            )
    print(
        f"{'M':>5s} {'N':>6s} {'K':>6s} {'FP8 TFLOP/s':>11s} {'BF16':>7s} {'FP8/BF16':>8s} {'vs 1550':>7s}  recipe"
    )
    for r in rows:
        print(
            f"{r['M']:5d} {r['N']:6d} {r['K']:6d} {r['fp8_tflops']:11.0f} {r['bf16_tflops']:7.0f} "
            f"{r['speedup']:8.2f} {r['vs_deepgemm_h800']:7.2f}  {r['recipe']}"
        )
    return rows


def linear_table(iters: int) -> list[dict]:
    """Fp8Linear fwd + bwd (three FP8 GEMMs, quantization and the weight cache included)
    against nn.Linear in BF16, same shapes."""
    from torch import nn

    from dsv3.fp8.linear import Fp8Linear

    rows = []
    for m, (n, k) in [(8192, (7168, 16384)), (8192, (4096, 7168)), (8192, (7168, 2048))]:
        bf16 = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        fp8 = Fp8Linear.from_linear(nn.Linear(k, n, bias=False, device="cuda"))
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        times = {
            name: cuda_time(lambda mod=mod, x=x, dy=dy: mod(x).backward(dy), iters)
            for name, mod in (("bf16", bf16), ("fp8", fp8))
        }
        rows.append(
            {
                "M": m,
                "N": n,
                "K": k,
                "bf16_ms": 1e3 * times["bf16"],
                "fp8_ms": 1e3 * times["fp8"],
                "speedup": times["bf16"] / times["fp8"],
                "fp8_tflops": 6 * m * n * k / times["fp8"] / 1e12,
            }
        )
    print(f"\n{'Linear fwd+bwd':>20s} {'BF16 ms':>8s} {'FP8 ms':>8s} {'speedup':>7s} {'FP8 TFLOP/s':>11s}")
    for r in rows:
        print(
            f"{r['M']:5d} x {r['N']:5d} x {r['K']:5d} {r['bf16_ms']:8.2f} {r['fp8_ms']:8.2f} {r['speedup']:7.2f} {r['fp8_tflops']:11.0f}"
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("fp8_gpu: no CUDA device here; run this on a GPU (SM89+ for FP8, SM90+ for blockwise scales)")
        return 0
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; DeepGEMM reference: {DEEPGEMM_H800_TFLOPS:.0f} TFLOPS on H800"
    )
    result = {
        "gemm": gemm_table(args.iters),
        "linear": linear_table(args.iters),
        "deepgemm_h800_tflops": DEEPGEMM_H800_TFLOPS,
    }
    save_result("fp8_gpu", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
