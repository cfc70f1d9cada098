"""GEMMs of a few rows at the speed of reading the weight: a small C++ kernel, built once per machine.

Decoding multiplies a few rows (one per sequence, or the few tokens routed to an expert) by a
weight it reads from memory, so the GEMM's cost is the weight's bytes. oneDNN, even on its packed
layout, streams such weights at about half the speed the core reads memory. One core of an AMD
EPYC with AVX512-BF16, GB/s of weight, uncached, panel kernel vs packed oneDNN
(benchmarks/small_m_gemm.py):

| weight, dtype | 1 row | 2 rows | 4 rows | 16 rows |
|---|---|---|---|---|
| 512 x 512 (an expert's gate/up), BF16 | 16.9 vs 8.6 | 18.1 vs 8.7 | 16.8 vs 10.9 | 8.7 vs 6.9 |
| 32768 x 512 (small's head), BF16 | 23.4 vs 15.1 | 22.9 vs 13.2 | 21.3 vs 19.3 | 9.8 vs 10.0 |
| 512 x 512, FP32 | 24.1 vs 11.0 | 23.4 vs 10.2 | 21.1 vs 14.3 | 9.2 vs 8.8 |

At 16 rows both are bound by the multiply-adds, not the bytes.

The kernel (panel_gemm.cpp) packs a weight W [N, K] into panels of 16 output columns, each
contiguous: [K/2][16][2] in BF16 (two inputs per 32-bit lane, the operand layout of AVX512-BF16's
dot-product instruction), [K][16] in FP32. One vector load then brings 16 columns' next inputs; each
row broadcasts its input and accumulates 16 columns in FP32 lanes, so there is no horizontal sum,
and a tile of up to 4 rows x 4 panels reads each weight byte once for all its rows. The code is
written with GCC vector extensions and compiled for this machine (-march=native), so it uses
whatever vector width the CPU has; with AVX512-BF16 the BF16 product is one `vdpbf16ps` (the
instruction oneDNN uses too). Accumulation is in FP32 and the result is rounded to the input dtype,
as a GEMM does.

`per_head` runs a product per attention head (MLA's absorbed W_UK and W_UV, [heads, out, in]) in
one call, in parallel over (head, panel group) pieces; a batched GEMM per weight cost 88 us per
call at 16 rows on the small preset, 1.4 ms of its 16-sequence decode step.

`expert_mlp` runs the routed experts of a MoE layer in one call: rows sorted by expert, for each
expert with rows its gate/up panels, SwiGLU (rounded as eager BF16 rounds each op), its down
panels; the (expert, panel group) pieces run in parallel on torch's threads. That replaces one
oneDNN call per expert and weight (453 per decode step of the small preset at 16 streams).
`routed_experts` does the same from the router's output (indices and gate weights per token):
it sorts the (token, expert) pairs by expert itself, runs the shared experts in the same passes
and returns the weighted sum, so a compiled decode step's MoE layer is one call with no
dispatch or combine around it (routed experts alone, small preset, one token, weights out of
cache: 134 vs 155-164 us per layer for Inductor's gathered loop).

The kernel is built once per machine with dsv3's other CPU kernels (model/cpu_kernels.py); where it
cannot be built `can_pack` is False and callers keep their library path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.model import cpu_kernels

LANES = 16  # output columns of a panel (panel_gemm.cpp)


def can_pack(weight: torch.Tensor) -> bool:
    """Whether the kernel runs `weight` [..., N, K]: a CPU FP32 tensor, or BF16 with an even K,
    and the kernels build here."""
    dtype_ok = weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and weight.shape[-1] % 2 == 0)
    return weight.device.type == "cpu" and dtype_ok and cpu_kernels.available()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """W [..., N, K] (nn.Linear layout) -> its panels [..., ceil(N/16), K/2, 16, 2] (BF16) or
    [..., ceil(N/16), K, 16] (FP32), columns past N zero. Builds the kernel if need be (what runs
    the packed weight), so `linear` and `expert_mlp` need not check."""
    cpu_kernels.require()
    *batch, n, k = weight.shape
    panels = -(-n // LANES)
    w = F.pad(weight.detach(), (0, 0, 0, panels * LANES - n)).view(*batch, panels, LANES, k)
    if weight.dtype == torch.bfloat16:
        return w.view(*batch, panels, LANES, k // 2, 2).transpose(-3, -2).contiguous()
    return w.transpose(-2, -1).contiguous()


def linear(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """F.linear(x [M, K], W) for W [n, K] packed by `pack` -> [M, n] in x's dtype."""
    return torch.ops.dsv3_panel.linear(x, packed, n)


def per_head(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """Each head's product x[:, g] @ W_g.T for x [M, G, K] and W [G, n, K] packed by `pack` ->
    [M, G, n] in x's dtype: one call for every head (MLA's absorbed W_UK and W_UV)."""
    return torch.ops.dsv3_panel.per_head(x, packed, n)


def expert_mlp(
    x: torch.Tensor, offs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, inter: int
) -> torch.Tensor:
    """Every expert's SwiGLU on its rows of x [M, H] (sorted by expert; offs [E] int32 cumulative
    ends), gate_up [E, 2I, H] and down [E, H, I] packed by `pack` -> [M, H] in x's dtype."""
    return torch.ops.dsv3_panel.expert_mlp(x, offs, gate_up, down, inter)


def routed_experts(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    inter: int,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A MoE layer's experts straight from the router's choice: x [N, H], indices [N, K] int64,
    gate weights [N, K] FP32, the routed experts gate_up [E, 2I, H] and down [E, H, I] packed by
    `pack`, and optionally the shared experts' MLP (its gate, up and down weights, each packed)
    -> sum_k weights[:, k] * FFN_{indices[:, k]}(x) + FFN_shared(x) [N, H] in FP32. One call:
    the (token, expert) pairs are sorted by expert inside, each chosen expert is read once."""
    return torch.ops.dsv3_panel.routed_experts(
        x, indices, weights, gate_up, down, inter, *(shared or (None,) * 3)
    )
