"""Decode-sized GEMMs: aten (MKL), oneDNN on a packed weight and dsv3's panel kernel, FP32 and BF16.

Decoding multiplies 1 to a few dozen rows by each weight, so its speed is how fast a GEMM streams
a weight it reads once. This times `F.linear` (aten: MKL for FP32, oneDNN on the plain weight for
BF16), `torch.ops.mkldnn._linear_pointwise` on the weight reordered once into oneDNN's blocked
layout (what Inductor's freezing does to nn.Linear weights) and the panel kernel on its panels
(model/panel_gemm.py: a compiled decode step's packed Linears and the routed experts), on the shapes of the small preset's head (32768 x 512) and one routed expert
(gate and up stacked, 512 x 512), at 1, 2, 4 and 16 rows, one thread. Each call reads a weight
not in cache (a ring of copies larger than the L3); medians of interleaved calls; GB/s is weight
bytes over time. Then the same question for what decoding runs: the small preset's routed
experts (7 MoE layers of 32 experts, 6 per row, random routing) through `expert_mlp`, unpacked
(aten), on oneDNN-packed weights (one call per expert and weight), on the panel kernel (all the
experts of a layer in one call: `GroupedExperts.pack`), and gathered (`GroupedExperts.forward_gathered`
compiled by Inductor, as a compiled decode step of few tokens runs them; it also does the
weighted combine the other two leave out). Results go to benchmarks/results/small_m_gemm.json
(small_m_gemm_experts.json with --experts-only).

    python benchmarks/small_m_gemm.py [--repeats 30] [--experts-only]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from dsv3 import ModelConfig
from dsv3.model import panel_gemm
from dsv3.model.moe import GroupedExperts
from dsv3.model.packed_experts import expert_loop, packed_linear

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save_result  # noqa: E402

SHAPES = {"head 32768x512": (32768, 512), "expert 512x512": (512, 512)}
ROWS = (1, 2, 4, 16)
RING_BYTES = 256 << 20  # copies of the weight cycled through, so none is in cache when read


def interleaved_medians(calls: dict[str, Callable[[int], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each call(i), the calls taking turns, after 3 rounds that warm up."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(repeats + 3):
        for name, call in calls.items():
            started = time.perf_counter()
            call(i)
            if i >= 3:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def speed_row(keys: dict, seconds: dict[str, float], unit: str, scale: float) -> dict:
    """A results row: `keys`, then each kernel's time in `unit`, and the panel kernel's speedup
    over oneDNN's packed weight."""
    return {
        **keys,
        **{f"{name}_{unit}": round(t * scale, 2) for name, t in seconds.items()},
        "panel_vs_onednn": round(seconds["onednn_packed"] / seconds["panel"], 2),
    }


def measure(n: int, k: int, dtype: torch.dtype, rows: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of aten's linear and oneDNN's packed linear."""
    copies = max(2, RING_BYTES // (n * k * dtype.itemsize))
    plain = [torch.randn(n, k).to(dtype) for _ in range(copies)]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in plain]
    panels = [panel_gemm.pack(w) for w in plain]
    x = torch.randn(rows, k).to(dtype)
    pointwise = torch.ops.mkldnn._linear_pointwise
    for got in (pointwise(x, packed[0], None, "none", [], ""), panel_gemm.linear(x, panels[0], n)):
        torch.testing.assert_close(got.float(), F.linear(x, plain[0]).float(), rtol=2e-2, atol=2e-2)
    calls = {
        "aten": lambda i: F.linear(x, plain[i % copies]),
        "onednn_packed": lambda i: pointwise(x, packed[i % copies], None, "none", [], ""),
        "panel": lambda i: panel_gemm.linear(x, panels[i % copies], n),
    }
    return interleaved_medians(calls, repeats)


def measure_experts(dtype: torch.dtype, tokens: int, repeats: int) -> dict[str, float]:
    """Median seconds of one decode step's routed experts of the small preset: unpacked, on
    oneDNN-packed weights, on the panel kernel, and gathered (compiled)."""
    cfg = ModelConfig.from_preset("small")
    layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    E, H, k = cfg.n_routed_experts, cfg.hidden_size, cfg.num_experts_per_tok
    experts = [GroupedExperts(E, H, cfg.moe_intermediate_size) for _ in range(layers)]
    packed = [GroupedExperts(E, H, cfg.moe_intermediate_size) for _ in range(layers)]
    for plain, pack in zip(experts, packed):
        for w in (plain.gate_up_proj, plain.down_proj):
            torch.nn.init.normal_(w, std=0.02)
        pack.load_state_dict(plain.state_dict())
        plain.to(dtype)
        assert pack.to(dtype).pack()
    reorder = torch.ops.mkldnn._reorder_linear_weight
    onednn = [
        [
            (reorder(g.contiguous(), 16), reorder(d.contiguous(), 16))
            for g, d in zip(e.gate_up_proj, e.down_proj)
        ]
        for e in experts
    ]
    indices = torch.stack([torch.randperm(E)[:k] for _ in range(tokens)])  # [tokens, k]
    order = indices.flatten().argsort(stable=True)
    offs = torch.bincount(indices.flatten(), minlength=E).cumsum(0).to(torch.int32)
    x_tokens = torch.randn(tokens, H).to(dtype)
    x = x_tokens[order // k]  # [tokens * k, H] sorted by expert, as dispatch gives the op
    gate_weights = torch.rand(tokens, k)
    gathered = torch.compile(
        lambda: [layer.forward_gathered(x_tokens, indices, gate_weights) for layer in experts], dynamic=False
    )
    with torch.no_grad():
        y = torch.zeros(tokens * k, H)
        y[order] = experts[0](x, offs).float()
        combined = (y.view(tokens, k, H) * gate_weights.unsqueeze(-1)).sum(1)
        torch.testing.assert_close(gathered()[0], combined, rtol=2e-2, atol=2e-3)
        calls = {
            "aten": lambda i: [layer(x, offs) for layer in experts],
            "onednn_packed": lambda i: [expert_loop(x, offs, w, packed_linear, H) for w in onednn],
            "panel": lambda i: [layer(x, offs) for layer in packed],
            "gathered": lambda i: gathered(),
        }
        return interleaved_medians(calls, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--experts-only", action="store_true", help="only the routed experts of a decode step")
    args = p.parse_args()
    if not torch.backends.mkldnn.is_available():
        sys.exit("error: this torch build has no oneDNN (mkldnn); nothing to compare")
    if not panel_gemm.available():
        sys.exit("error: the panel kernel cannot be built here (see the warning above)")
    torch.set_num_threads(1)
    dtypes = [torch.float32] + ([torch.bfloat16] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else [])
    print(f"{machine()['cpu']}, torch {torch.__version__}, 1 thread")
    print(
        f"{'weight':16s} {'dtype':9s} {'rows':>4s}   GB/s: {'aten':>6s} {'oneDNN':>7s} {'panel':>6s}  panel/oneDNN"
    )
    rows = []
    for shape, (n, k) in {} if args.experts_only else SHAPES.items():
        for dtype in dtypes:
            for m in ROWS:
                seconds = measure(n, k, dtype, m, args.repeats)
                row = speed_row(
                    {"weight": shape, "dtype": str(dtype).removeprefix("torch."), "rows": m},
                    seconds,
                    "us",
                    1e6,
                )
                rows.append(row)
                gb = n * k * dtype.itemsize / 1e9
                rates = " ".join(f"{gb / seconds[name]:6.1f}" for name in ("aten", "onednn_packed", "panel"))
                print(f"{shape:16s} {row['dtype']:9s} {m:4d}         {rates}  {row['panel_vs_onednn']:6.2f}x")
    print(f"\nsmall preset's routed experts, one decode step ({machine()['cpu']}, 1 thread)")
    print(
        f"{'dtype':9s} {'tokens':>6s}   ms: {'aten':>6s} {'oneDNN':>7s} {'panel':>6s} {'gathered':>8s}  panel/oneDNN"
    )
    expert_rows = []
    for dtype in dtypes:
        for tokens in ROWS:
            seconds = measure_experts(dtype, tokens, args.repeats)
            row = speed_row(
                {"dtype": str(dtype).removeprefix("torch."), "tokens": tokens}, seconds, "ms", 1e3
            )
            expert_rows.append(row)
            times = " ".join(f"{seconds[name] * 1e3:6.2f}" for name in ("aten", "onednn_packed", "panel"))
            print(
                f"{row['dtype']:9s} {tokens:6d}       {times} {row['gathered_ms']:8.2f}  {row['panel_vs_onednn']:6.2f}x"
            )
    payload = {"threads": 1, "repeats": args.repeats, "rows": rows, "small_preset_experts": expert_rows}
    name = "small_m_gemm_experts" if args.experts_only else "small_m_gemm"
    print(f"\nwrote {save_result(name, payload)}")


if __name__ == "__main__":
    main()
