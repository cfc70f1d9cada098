"""FP8 GEMM accuracy (SQNR vs FP64) and the Hopper accumulator: max relative error vs K.

Activations with outliers are synthetic (outlier channels x100, outlier tokens x1e4, as the
massive activations of LLMs); a trained dsv3 checkpoint was not available when this was written.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import save_result  # noqa: E402
from dsv3.fp8.gemm import fp8_gemm, gemm_hopper  # noqa: E402
from dsv3.fp8.quant import ACT, WEIGHT, quantize, sqnr_db  # noqa: E402


def activations(kind: str, m: int, k: int) -> torch.Tensor:
    x = torch.randn(m, k)
    if kind in ("outlier channels", "both"):
        x[:, torch.randperm(k)[:4]] *= 100.0
    if kind in ("outlier tokens", "both"):
        x[torch.randperm(m)[:2]] *= 1e4
    return x


def sqnr_table() -> list[dict]:
    rows = []
    for kind in ("random", "outlier channels", "outlier tokens", "both"):
        x, w = activations(kind, 256, 2048), torch.randn(512, 2048) * 0.02
        exact = x.double() @ w.double().t()
        outs = {
            "fp8 1x128/128x128": fp8_gemm(quantize(x, ACT), quantize(w, WEIGHT)),
            "fp8 per-tensor": fp8_gemm(quantize(x, None), quantize(w, None)),
            "bf16": x.bfloat16().float() @ w.bfloat16().float().t(),
        }
        for name, out in outs.items():
            rows.append(
                {
                    "data": kind,
                    "gemm": name,
                    "sqnr_db": sqnr_db(exact, out),
                    "token_sqnr_db": sqnr_db(exact, out, per_row=True),
                }
            )
    print(f"{'data':18s} {'GEMM':20s} {'SQNR dB':>8s} {'per-token dB':>12s}")
    for r in rows:
        print(f"{r['data']:18s} {r['gemm']:20s} {r['sqnr_db']:8.2f} {r['token_sqnr_db']:12.2f}")
    return rows


def accumulation_table(groups: tuple[int, ...] = (32, 4)) -> list[dict]:
    """Max |C - C*| / max |C*| over a 32x32 output, C* = FP64 product of the same FP8 inputs."""
    rows = []
    for dist, gen in (("N(0,1)", torch.randn), ("U(0,1)", torch.rand)):
        for k in (512, 1024, 4096, 16384):
            a, b = gen(32, k), gen(32, k)
            row = {"dist": dist, "K": k}
            for group in groups:
                for promote in (False, True):
                    qa, qb = (
                        (quantize(a, ACT), quantize(b, ACT))
                        if promote
                        else (quantize(a, None), quantize(b, None))
                    )
                    exact = qa.dequantize().double() @ qb.dequantize().double().t()
                    out = gemm_hopper(qa, qb, promote=promote, group=group).double()
                    row[f"g{group}{'_promoted' if promote else ''}"] = (
                        (out - exact).abs().max() / exact.abs().max()
                    ).item()
            rows.append(row)
    cols = [c for c in rows[0] if c not in ("dist", "K")]
    print("\nmax relative error of the FP22 accumulator (13 fraction bits, truncation), g = products per add")
    print(f"{'dist':7s} {'K':>6s} " + " ".join(f"{c:>14s}" for c in cols))
    for r in rows:
        print(f"{r['dist']:7s} {r['K']:6d} " + " ".join(f"{100 * r[c]:13.3f}%" for c in cols))
    return rows


if __name__ == "__main__":
    torch.manual_seed(0)
    save_result("fp8_accuracy", {"sqnr": sqnr_table(), "accumulation": accumulation_table()})
