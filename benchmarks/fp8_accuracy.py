"""FP8 GEMM accuracy (SQNR vs FP64) and the Hopper accumulator: max relative error vs K.

SQNR of FP8 fine-grained (1x128 activations, 128x128 weights), FP8 per-tensor and BF16 GEMMs
against FP64, (1) on synthetic activations (random; outlier channels x100; outlier tokens x1e4,
as the massive activations of LLMs) and (2) on the inputs of every Linear and expert projection
of a trained dsv3 model, captured with forward hooks on its validation data, with the weights of
those layers (``--checkpoint``, default the trained tiny model; without one, a few training
steps first). The "outlier" column is the largest channel amax over the median channel amax.

    python benchmarks/fp8_accuracy.py [--checkpoint DIR] [--batches 2]
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import save_result  # noqa: E402
from dsv3.fp8.gemm import fp8_gemm, gemm_hopper  # noqa: E402
from dsv3.fp8.quant import ACT, WEIGHT, quantize, sqnr_db  # noqa: E402
from fp8_activations import TRAINED, capture, outlier_ratio, trained_model  # noqa: E402


def activations(kind: str, m: int, k: int) -> torch.Tensor:
    x = torch.randn(m, k)
    if kind in ("outlier channels", "both"):
        x[:, torch.randperm(k)[:4]] *= 100.0
    if kind in ("outlier tokens", "both"):
        x[torch.randperm(m)[:2]] *= 1e4
    return x


GEMMS = ("fp8 1x128/128x128", "fp8 per-tensor", "bf16")


def gemm_sqnr(x: torch.Tensor, w: torch.Tensor) -> dict[str, tuple[float, float]]:
    """{GEMM: (SQNR, mean per-token SQNR)} of x [T, K] @ w [N, K]^T against FP64."""
    exact = x.double() @ w.double().t()
    outs = {
        GEMMS[0]: fp8_gemm(quantize(x, ACT), quantize(w, WEIGHT), backend="reference"),
        GEMMS[1]: fp8_gemm(quantize(x, None), quantize(w, None), backend="reference"),
        GEMMS[2]: (x.bfloat16().float() @ w.bfloat16().float().t()).bfloat16().float(),
    }
    return {name: (sqnr_db(exact, out), sqnr_db(exact, out, per_row=True)) for name, out in outs.items()}


def sqnr_table() -> list[dict]:
    rows = []
    for kind in ("random", "outlier channels", "outlier tokens", "both"):
        x, w = activations(kind, 256, 2048), torch.randn(512, 2048) * 0.02
        for name, (s, t) in gemm_sqnr(x, w).items():
            rows.append(
                {"data": kind, "gemm": name, "sqnr_db": s, "token_sqnr_db": t, "outlier": outlier_ratio(x)}
            )
    _print_sqnr("synthetic activations", rows)
    return rows


def trained_sqnr_table(checkpoint: Path | None, batches: int) -> list[dict]:
    """Per projection kind (q_a_proj, ..., experts.down_proj), over all layers (experts: all
    experts) of the trained model: the median SQNR and the input with the strongest outliers."""
    model, data = trained_model(checkpoint, batches)
    inputs, _ = capture(model.float(), data)
    by_kind: dict[str, list] = {}
    for name, (x, w) in inputs.items():
        kind = ".".join(p for p in name.split(".") if not p.isdigit() and p != "layers")
        by_kind.setdefault(kind, []).append((outlier_ratio(x), gemm_sqnr(x, w), x.shape[0]))
    rows = []
    for kind, entries in sorted(by_kind.items()):
        for gemm in GEMMS:
            s = torch.tensor([e[1][gemm][0] for e in entries])
            t = torch.tensor([e[1][gemm][1] for e in entries])
            worst = max(entries, key=lambda e: e[0])  # the input with the strongest outlier channels
            rows.append(
                {
                    "data": kind,
                    "gemm": gemm,
                    "sqnr_db": s.median().item(),
                    "token_sqnr_db": t.median().item(),
                    "outlier": worst[0],
                    "sqnr_db_worst_outlier_input": worst[1][gemm][0],
                    "matrices": len(entries),
                }
            )
    _print_sqnr(f"trained model inputs ({checkpoint}), median over layers", rows)
    return rows


def _print_sqnr(title: str, rows: list[dict]) -> None:
    print(f"\nGEMM SQNR vs FP64, {title}")
    print(f"{'data':28s} {'GEMM':20s} {'SQNR dB':>8s} {'per-token dB':>12s} {'outlier':>8s}")
    for r in rows:
        print(
            f"{r['data']:28s} {r['gemm']:20s} {r['sqnr_db']:8.2f} {r['token_sqnr_db']:12.2f} {r['outlier']:8.1f}"
        )


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


def e5m2_1x128(x: torch.Tensor) -> torch.Tensor:
    """Fake-quantize along the last dim to E5M2 with the same 1x128 scaling (max 57344)."""
    tiles = x.reshape(x.shape[0], -1, 128)
    scale = tiles.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 57344.0
    return ((tiles / scale).to(torch.float8_e5m2).float() * scale).view_as(x)


def gradient_table(m: int = 2048, k: int = 1024, n: int = 1024) -> list[dict]:
    """Why Fp8Linear's gradients sit below 30 dB: SQNR against FP64 of a GEMM whose operands are
    rounded to E4M3 (1x128 / 128x128 tiles) one at a time, both, and the three GEMMs of a Linear,
    with E4M3 everywhere (the paper) and with E5M2 for the output gradient dY."""
    from torch import nn

    from dsv3.fp8.linear import Fp8Linear

    x, w, dy = torch.randn(m, k), torch.randn(n, k) * k**-0.5, torch.randn(m, n)
    e4 = lambda t, block: quantize(t, block).dequantize()  # noqa: E731
    exact = x.double() @ w.double().t()
    rows = [
        {"case": "Fprop, only X in E4M3", "sqnr_db": sqnr_db(exact, e4(x, ACT) @ w.t())},
        {"case": "Fprop, only W in E4M3", "sqnr_db": sqnr_db(exact, x @ e4(w, WEIGHT).t())},
        {"case": "Fprop, X and W in E4M3", "sqnr_db": sqnr_db(exact, e4(x, ACT) @ e4(w, WEIGHT).t())},
    ]
    dx_exact, dw_exact = dy.double() @ w.double(), dy.double().t() @ x.double()
    rows.append(
        {"case": "Dgrad, dY E5M2 + W E4M3", "sqnr_db": sqnr_db(dx_exact, e5m2_1x128(dy) @ e4(w, WEIGHT))}
    )
    dy_t = e5m2_1x128(dy.t().contiguous())  # 128 tokens per scale
    rows.append(
        {
            "case": "Wgrad, dY E5M2 + X E4M3 (128x1)",
            "sqnr_db": sqnr_db(dw_exact, dy_t @ e4(x.t().contiguous(), ACT).t()),
        }
    )
    linear = nn.Linear(k, n, bias=False)
    linear.weight.data.copy_(w)
    fp8 = Fp8Linear.from_linear(nn.Linear(k, n, bias=False))
    fp8.weight.data.copy_(w)
    for name, module in (("Fp8Linear (E4M3 everywhere)", fp8), ("BF16 nn.Linear", linear)):
        xi = x.bfloat16().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(xi)
        y.backward(dy.bfloat16())
        for what, ref, got in (
            ("Fprop", exact, y),
            ("Dgrad", dx_exact, xi.grad),
            ("Wgrad", dw_exact, module.weight.grad),
        ):
            rows.append({"case": f"{what}, {name}", "sqnr_db": sqnr_db(ref, got.float())})
    print("\nSQNR vs FP64 of one Linear (Gaussian X, W, dY): where the 30 dB gradient bound goes")
    for r in rows:
        print(f"{r['case']:40s} {r['sqnr_db']:7.2f} dB")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=TRAINED)
    parser.add_argument("--batches", type=int, default=2, help="validation batches of 8 x 256 tokens")
    args = parser.parse_args()
    torch.manual_seed(0)
    result = {"sqnr": sqnr_table(), "sqnr_trained": trained_sqnr_table(args.checkpoint, args.batches)}
    result["gradients"] = gradient_table()
    result["accumulation"] = accumulation_table()
    save_result("fp8_accuracy", result)
