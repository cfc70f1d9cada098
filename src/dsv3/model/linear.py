"""Products of a few rows in a compiled decode step: which run as loops Inductor writes, which
as GEMM calls.

Decoding one token multiplies one row by every weight of the model. Written as a broadcast
product and a sum over the input dimension,

    y[m, n] = sum_k x[m, k] * W[n, k]      (x[..., None, :] * W).sum(-1)

the product becomes a loop that Inductor generates and fuses with its neighbours, with no call
in between. Such a loop is cheap to enter but slow to run: Inductor reduces each output with one
vector accumulator and a horizontal sum, so it is bound by that chain, not by memory (a hot and
a cold weight take the same time), and a second row costs as much again. The model's weights
therefore run as GEMMs: frozen into the compiled graph, packed once, each timed by Inductor's
autotuner between oneDNN and its own C++ template with the weight out of cache
(infer/autotune.py). A chain of d x d BF16 Linears, one core of an AMD EPYC, us per Linear, loop
vs GEMM, one row: d=128 13 vs 13, d=256 28 vs 17, d=512 66 vs 34, d=1024 204 vs 107; two rows
d=512 73 vs 41. On the small preset's decode step (batch 1, BF16) that took 114-119 tok/s to
138-144.

What still runs as such loops are products whose other operand is no model weight or a very
small one: the router's [experts, hidden] FP32 weight (`linear`, fused with the scoring and the
top-k), attention over the latent cache (model/attention.py) and the routed experts gathered by
index (model/moe.py), for at most `INLINE_MAX_ROWS` rows and only inside a compiled inference
step (`compiled_inference`): eagerly the product would be materialized [rows, out, in], and
training wants the GEMM. Products and sums are in FP32 (or wider): a BF16 x BF16 product is
exact there, as in a GEMM with FP32 accumulation; the result is rounded to the input dtype as a
GEMM's would be.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# rows (tokens) up to which a compiled inference step computes the products above as fused loops
INLINE_MAX_ROWS = 2


def compiled_inference() -> bool:
    """True while torch.compile traces code that runs without autograd (a decode step)."""
    return torch.compiler.is_compiling() and not torch.is_grad_enabled()


def inline_rows(rows: int) -> bool:
    """Whether a product with `rows` rows runs as a loop Inductor writes (see the module docstring)."""
    return compiled_inference() and rows <= INLINE_MAX_ROWS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x [..., in], weight [out, in], bias) -> [..., out]; for a few rows in a compiled
    inference step, a broadcast product and an FP32 sum that Inductor fuses with its neighbours."""
    if not inline_rows(math.prod(x.shape[:-1])):
        return F.linear(x, weight, bias)
    acc = torch.promote_types(x.dtype, torch.float32)
    y = (x.to(acc).unsqueeze(-2) * weight.to(acc)).sum(-1)  # [..., out]
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)
