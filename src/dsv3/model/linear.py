"""Linear layers that decode a few tokens as loops Inductor writes, not as GEMM calls.

Decoding one token multiplies one row by every weight of the model: a GEMV per projection, a
few hundred KB of weights each in a small model. On a CPU each such call to a GEMM library
(oneDNN, MKL) costs a fixed 15-30 us whatever the size (one core of an AMD EPYC: a hot 256x256
FP32 GEMV takes 8 us in aten, 19 us in oneDNN), and it is opaque to the compiler, which must
write its input to memory before and read its output after. Written instead as a broadcast
product and a sum over the input dimension,

    y[m, n] = sum_k x[m, k] * W[n, k]      (x[..., None, :] * W).sum(-1)

the product becomes a loop that Inductor generates and fuses with its neighbours: the RMSNorm
before, the SiLU-and-multiply or the residual add after, the weight streamed once per row at
memory speed with no call in between. Products and sums are in FP32 (or wider): a BF16 x BF16
product is exact there, as in a GEMM with FP32 accumulation; the result is rounded to the input
dtype as a GEMM's would be.

A row re-reads the weight, so the loop is taken only for at most `INLINE_MAX_ROWS` rows, and
only inside a compiled inference step (`compiled_inference`): eagerly the product would be
materialized [rows, out, in], and training wants the GEMM. `Linear` is nn.Linear with that
switch (same parameters and checkpoint names); `linear` is the function for weights held
elsewhere (the router's). MoE (routed experts gathered by index) and MLA (attention over the
latent cache) decide the same way with their own products.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# rows (tokens) up to which a compiled inference step computes a Linear as a fused loop
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


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint names) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
