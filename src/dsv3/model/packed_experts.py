"""Routed experts packed for a CPU's small-M GEMM kernels, for inference.

Decoding multiplies a few rows by each chosen expert's weights: a GEMM whose cost is reading
the weight. aten's CPU GEMM (MKL) is poor at that size: it reads the weight again for each
further row, and on AMD CPUs MKL runs its generic code. Two kernels read it once for a few rows,
on a copy of the weight laid out for them ("packed"):

- dsv3's panel kernel (model/panel_gemm.py), built for this machine: all the experts of a layer in
  one call, streaming each weight at close to memory speed. Used wherever it builds.
- oneDNN's linear on its blocked layout (what Inductor's freezing does to every nn.Linear), one
  call per expert and weight: where the panel kernel cannot be built (no C++ compiler).

One core of an AMD EPYC with AVX512-BF16, the routed experts of a decode step of the small preset
(7 layers, 32 experts, 6 per token), ms, panel / oneDNN / unpacked aten
(benchmarks/small_m_gemm.py): BF16 1 token 2.30 / 4.88 / 7.66, 16 tokens 10.97 / 23.45 / 32.18;
FP32 16 tokens 17.26 / 35.51 / 56.62. Prefill takes the same path up to PANEL_MAX_ROWS_PER_EXPERT
rows per expert; compiled decode steps up to that many run the same panels through one call from
the router's choice instead (`panel_gemm.routed_experts`, moe.py), with no dispatch around it.

The packed copies sit beside the weights (the state dict and training use those) and are freed
with the module that owns them. They are a snapshot: `is_current` tells whether the weights are
still the ones packed (the same storage object, no in-place change since: an optimizer step or
load_state_dict bumps a tensor's version), and `expert_mlp` takes the unpacked path when not, so
a model trained after packing computes right, if slower, until packed again. The weights packed
are kept alive with their copies: new weights swapped in (EPLB's re-placement) can then never be
allocated where the packed ones were and pass for them; pack again after swapping. They are held here,
under an integer handle: a compiled decode step passes `expert_mlp` the handle (an int the graph
carries) and `run_packed` finds them.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from dsv3.device import tensor_stamp
from dsv3.model import panel_gemm

__all__ = [
    "PANEL_MAX_ROWS_PER_EXPERT",
    "can_pack",
    "expert_loop",
    "is_current",
    "pack_experts",
    "packed_linear",
    "release",
    "run_packed",
    "runs_packed",
]

ROWS_HINT = 16  # the row count oneDNN chooses its packed layout for (1 to 16 rows run alike)

# the panel kernel runs the experts while rows <= this x experts; past it, the grouped GEMMs are
# faster (one core of an AMD EPYC, small preset's experts, BF16, ms, panel vs grouped_mm: 12 rows
# per expert 3.7 vs 6.1, 24: 8.3 vs 7.7, 96: 21.8 vs 16.6)
PANEL_MAX_ROWS_PER_EXPERT = 16

# handle -> (the weights packed, held alive; their stamp at packing; the packed experts; the most
# rows they run)
_packs: dict[
    int, tuple[tuple[torch.Tensor, ...], tuple, Callable[[torch.Tensor, torch.Tensor], torch.Tensor], float]
] = {}
_handles = itertools.count()


def can_pack(weight: torch.Tensor) -> bool:
    """Whether experts of `weight`'s kind can be packed: the panel kernel runs it, or oneDNN does (a
    CPU tensor in FP32, or in BF16 where oneDNN has BF16 kernels; x86 builds of torch have oneDNN)."""
    return panel_gemm.can_pack(weight) or _onednn_packs(weight)


def _onednn_packs(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32


def pack_experts(
    owner: object,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up_panels: torch.Tensor | None = None,
    down_panels: torch.Tensor | None = None,
) -> int:
    """Pack gate_up_proj [E, 2I, H] and down_proj [E, H, I] (nn.Linear layout per expert); the
    handle for `run_packed`, valid while `owner` lives (or until `release`). Given the weights
    packed by panel_gemm.pack (the owner keeps them), the panel kernel runs them; else oneDNN's."""
    if gate_up_panels is not None and down_panels is not None:
        run, most_rows = (
            _panel_experts(gate_up_panels, down_panels, down_proj.shape[-1]),
            PANEL_MAX_ROWS_PER_EXPERT * len(gate_up_proj),
        )
    else:
        run, most_rows = _onednn_experts(gate_up_proj, down_proj), math.inf
    handle = next(_handles)
    held = (gate_up_proj.detach(), down_proj.detach())  # their memory, even if a Parameter's .data is swapped
    _packs[handle] = (held, _stamp(gate_up_proj, down_proj), run, most_rows)
    weakref.finalize(owner, _packs.pop, handle, None)
    return handle


def _panel_experts(gate_up: torch.Tensor, down: torch.Tensor, inter: int) -> Callable:
    return lambda x, offs: panel_gemm.expert_mlp(x, offs, gate_up, down, inter)


def _onednn_experts(gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> Callable:
    reorder = torch.ops.mkldnn._reorder_linear_weight
    packed = [
        (reorder(gate_up.contiguous(), ROWS_HINT), reorder(down.contiguous(), ROWS_HINT))
        for gate_up, down in zip(gate_up_proj.detach(), down_proj.detach())
    ]

    return lambda x, offs: expert_loop(x, offs, packed, packed_linear, down_proj.shape[1])


def expert_loop(
    x: torch.Tensor,
    offs: torch.Tensor,
    weights: Iterable[tuple[torch.Tensor, torch.Tensor]],
    linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    dim: int,
) -> torch.Tensor:
    """Every expert's SwiGLU on its rows of x [M, H] (sorted by expert, offs [E] int32 cumulative
    ends) as one `linear` pair per expert that has rows, given each expert's (gate_up, down)
    weights -> [M, dim]."""
    out = x.new_empty(x.shape[0], dim)
    ends = offs.tolist()
    for (gate_up, down), start, end in zip(weights, [0, *ends[:-1]], ends):
        if end > start:
            gate, up = linear(x[start:end], gate_up).chunk(2, dim=-1)
            out[start:end] = linear(F.silu(gate) * up, down)
    return out


def is_current(handle: int, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> bool:
    """Whether `handle` holds packed copies of these very weights, unchanged since packing."""
    return handle in _packs and _packs[handle][1] == _stamp(gate_up_proj, down_proj)


def runs_packed(handle: int, rows: int) -> bool:
    """Whether the packed experts `handle` holds are the faster way for `rows` rows (is_current first)."""
    return rows <= _packs[handle][3]


def _stamp(*weights: torch.Tensor) -> tuple:
    return tuple(tensor_stamp(w) for w in weights)


def run_packed(handle: int, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Every expert's SwiGLU on its rows of x [M, H] (sorted by expert, offs [E] int32 cumulative
    ends) on the packed copies `handle` holds -> [M, H]."""
    return _packs[handle][2](x, offs)


def packed_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) for w a weight packed by oneDNN (`torch.ops.mkldnn._reorder_linear_weight`)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def release(handle: int) -> None:
    """Drop the packed copies `handle` holds now (else they go with their owner)."""
    _packs.pop(handle, None)
