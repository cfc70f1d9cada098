"""Routed experts packed for the CPU's GEMM library, for inference.

Decoding multiplies a few rows by each chosen expert's weights: a GEMM whose cost is reading
the weight. aten's CPU GEMM (MKL) is poor at that size. It reads the weight again for each
further row, and on AMD CPUs MKL runs its generic code. oneDNN's linear on a weight reordered
once into its blocked layout ("packed", what Inductor's freezing does to every nn.Linear) reads
it once for a few rows. One core of an AMD EPYC, a 32768 x 512 FP32 weight not in cache, ms
for 1 / 2 / 16 rows: aten 4.7 / 9.4 / 17.5, packed oneDNN 2.2 / 2.7 / 5.1
(benchmarks/small_m_gemm.py).

The routed experts are inputs of the `expert_mlp` op, which Inductor does not pack, so
`pack_experts` packs each expert's two weights (gate and up stacked, as stored; down) once, and
`expert_mlp` runs the experts that have rows on them with `packed_linear`, one pair each. A
decode step's routed experts of the small preset (7 layers, 32 experts, 6 per token) then run
1.3-1.7x faster in FP32 and 1.4-1.6x faster in BF16 (a CPU with AVX512-BF16), from 1 to 16
tokens (same script). Prefill takes the same path, and so do compiled decode steps with more
tokens than `MoE` gathers (fewer run gathered: moe.py).

The packed copies sit beside the weights (the state dict and training use those) and are freed
with the module that owns them. They are a snapshot: `is_current` tells whether the weights are
still the ones packed (same storage, no in-place change since: an optimizer step or
load_state_dict bumps a tensor's version), and `expert_mlp` takes the unpacked path when not, so
a model trained after packing computes right, if slower, until packed again. They are held here,
under an integer handle: oneDNN's packed tensors are opaque to torch.compile, so a compiled
decode step passes `expert_mlp` the handle and the op finds them.
"""

from __future__ import annotations

import itertools
import weakref

import torch

__all__ = ["can_pack", "is_current", "pack_experts", "packed_linear", "packed_weights", "release"]

ROWS_HINT = 16  # the row count oneDNN chooses its packed layout for (1 to 16 rows run alike)

# handle -> (what was packed: (data_ptr, version) of gate_up_proj and down_proj, per expert (gate_up, down))
_packs: dict[int, tuple[tuple, list[tuple[torch.Tensor, torch.Tensor]]]] = {}
_handles = itertools.count()


def can_pack(weight: torch.Tensor) -> bool:
    """Whether this build packs `weight`'s kind: a CPU tensor in FP32, or in BF16 where oneDNN has
    BF16 kernels (x86 builds of torch have oneDNN; elsewhere the experts run on aten)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32


def pack_experts(owner: object, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> int:
    """Pack gate_up_proj [E, 2I, H] and down_proj [E, H, I] (nn.Linear layout per expert); the
    handle for `packed_weights`, valid while `owner` lives (or until `release`)."""
    reorder = torch.ops.mkldnn._reorder_linear_weight
    packed = [
        (reorder(gate_up.contiguous(), ROWS_HINT), reorder(down.contiguous(), ROWS_HINT))
        for gate_up, down in zip(gate_up_proj.detach(), down_proj.detach())
    ]
    handle = next(_handles)
    _packs[handle] = (_stamp(gate_up_proj, down_proj), packed)
    weakref.finalize(owner, _packs.pop, handle, None)
    return handle


def is_current(handle: int, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> bool:
    """Whether `handle` holds packed copies of these very weights, unchanged since packing."""
    return handle in _packs and _packs[handle][0] == _stamp(gate_up_proj, down_proj)


def _stamp(*weights: torch.Tensor) -> tuple:
    return tuple((w.data_ptr(), w._version) for w in weights)


def packed_weights(handle: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per expert, its packed (gate_up, down) weights, for `packed_linear`."""
    return _packs[handle][1]


def packed_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) for w a weight packed here."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def release(handle: int) -> None:
    """Drop the packed copies `handle` holds now (else they go with their owner)."""
    _packs.pop(handle, None)
