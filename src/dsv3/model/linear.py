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

A compiled decode step (PANEL_ROWS: 1 to 16 rows, one per sequence, two with MTP's verify) is
where Inductor's GEMMs stream worst: its template, compiled for any row count, read a small-preset
weight at 2-4 GB/s with 16 rows, and specialized for one row it still loses to the kernel (below).
There the model's `Linear`s, once packed by the engine (`pack_linears`), run on dsv3's panel
kernel (model/panel_gemm.py), which reads each weight once for all its rows at close to memory
speed; larger steps (prefill) keep Inductor's GEMMs. Whole
decode steps, one core of an AMD EPYC with AVX512-BF16, medians of 3 x 64 steps, panel kernel vs
Inductor's GEMMs: small preset BF16 1 / 2 / 4 sequences 3.37 / 5.6 / 7.65 vs 5.12 / 6.75 / 9.95 ms,
FP32 one sequence 5.41 vs 6.14 ms, two threads 2.55 vs 3.43 ms; tiny BF16 one sequence 0.35 vs
0.39-0.42 ms, with MTP (two rows) 0.55 vs 0.67 ms. (An earlier session measured one and two
rows the other way, when the same tiny MTP step took 1.2-1.6 ms; benchmarks/README.md.) Reading
each weight byte once, the kernel streams small's 32768 x 512 BF16 head at 33 GB/s at one and two
rows on that core, which sums a tensor at 37 GB/s.

What still runs as such loops are products whose other operand is no model weight or a very
small one: the router's [experts, hidden] FP32 weight (`linear`, fused with the scoring and the
top-k), attention over the latent cache (model/attention.py) and, where the panel kernel is not
built, the routed experts gathered by index (model/moe.py), for at most `INLINE_MAX_ROWS` rows and only inside a compiled inference
step (`compiled_inference`): eagerly the product would be materialized [rows, out, in], and
training wants the GEMM. Products and sums are in FP32 (or wider): a BF16 x BF16 product is
exact there, as in a GEMM with FP32 accumulation; the result is rounded to the input dtype as a
GEMM's would be.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model import panel_gemm

# rows (tokens) up to which a compiled inference step computes the products above as fused loops
INLINE_MAX_ROWS = 2
# fewest and most rows for which a compiled inference step runs a packed `Linear` on the panel
# kernel (see `Linear` and the module docstring for the measurements); more rows run Inductor's GEMMs
PANEL_ROWS = (1, 16)


_tracing_prefill = False  # set by `compiled_prefill`


def compiled_inference() -> bool:
    """True while torch.compile traces code that runs without autograd (a decode step), outside
    `compiled_prefill`."""
    return torch.compiler.is_compiling() and not torch.is_grad_enabled() and not _tracing_prefill


@contextlib.contextmanager
def compiled_prefill() -> Iterator[None]:
    """Around a compiled prefill's calls: it is traced as eager code runs (GEMMs, the experts
    dispatched), not with the few-row paths above. Those branch on the row count, so a step
    compiled for any prompt length would be a graph per regime (up to 2, 16, 64 tokens, more),
    each ~15-25 s of compile on a CPU; a prompt's rows are many, where the library paths are the
    fast ones anyway. The flag is part of the compiled graphs' guards, so prefill and decode
    graphs of one function never mix."""
    global _tracing_prefill
    _tracing_prefill, before = True, _tracing_prefill
    try:
        yield
    finally:
        _tracing_prefill = before


def inline_rows(rows: int) -> bool:
    """Whether a product with `rows` rows runs as a loop Inductor writes (see the module docstring)."""
    return compiled_inference() and rows <= INLINE_MAX_ROWS


def panel_rows(rows: int) -> bool:
    """Whether a product with `rows` rows runs on the panel kernel, where its weight is packed."""
    return compiled_inference() and PANEL_ROWS[0] <= rows <= PANEL_ROWS[1]


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
    """The model's nn.Linear (same parameters, same state dict). Once packed (`pack_linears`), a
    compiled inference step of PANEL_ROWS rows runs it on the panel kernel
    (model/panel_gemm.py), which reads the weight once at close to memory speed; everything else
    (training, eager inference, more rows) is F.linear."""

    panels: torch.Tensor | None  # the weight packed by panel_gemm.pack, a snapshot

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # a buffer, not a plain attribute: a compiled step takes it as it takes the weight (a plain
        # tensor attribute costs a guard of its own on every call), and the state dict leaves it out
        self.register_buffer("panels", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _product(x, self.weight, self.bias, self.panels, self.out_features)

    def first_outputs(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """forward's first n outputs only [..., n], reading only their weights: a view of the
        weight's first n rows or, where forward runs on the panel kernel, of the panels holding
        them (MTP drafts among the head's first rows: infer/speculative.py)."""
        bias = None if self.bias is None else self.bias[:n]
        panels = None if self.panels is None else self.panels[: -(-n // panel_gemm.LANES)]
        return _product(x, self.weight[:n], bias, panels, n)


def _product(x: torch.Tensor, weight, bias, panels: torch.Tensor | None, n: int) -> torch.Tensor:
    """F.linear(x, weight, bias) [..., n]; on `panels` (the weight packed) in a compiled inference
    step of PANEL_ROWS rows."""
    rows = math.prod(x.shape[:-1])
    if panels is None or not panel_rows(rows):
        return F.linear(x, weight, bias)
    y = panel_gemm.linear(x.reshape(rows, x.shape[-1]), panels, n)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*x.shape[:-1], n)


def pack_linears(model: nn.Module, enabled: bool = True) -> int:
    """Pack (or with enabled=False, drop the packed copies of) every `Linear` of `model` whose
    weight the panel kernel runs; the number packed. The copies are a snapshot, as a frozen
    compiled graph's weights are: pack again after the weights change."""
    packed = 0
    for module in model.modules():
        if isinstance(module, Linear):
            module.panels = (
                panel_gemm.pack(module.weight) if enabled and panel_gemm.can_pack(module.weight) else None
            )
            packed += module.panels is not None
    return packed
