"""Absorbed MLA decode attention read straight from a paged latent cache: a C++ kernel.

In a decode step each sequence has one query token per head (two with MTP's verify), and its
attention reads that sequence's whole latent cache: at 16 sequences of 512 positions on the small
preset, 4.7 MB per layer. Written in PyTorch, the cache is first gathered block by block into
[B, S, r] (a copy), then multiplied twice by a few query rows: batched GEMMs of a few rows, or in
a compiled step loops that Inductor generates, which reduce each score with one vector
accumulator and a horizontal sum and run at ~1 GB/s of cache (5 ms per layer in that case).

The kernel (paged_attention.cpp) walks each sequence's blocks in place. The queries of a sequence
(T x H of them, 16 at a time) are packed like a panel-GEMM weight, so each cache row is read once
and scored against all 16 queries in FP32 lanes (AVX512-BF16's dot product on BF16 caches); the
softmax runs on those lanes (exp by a degree-6 polynomial, relative error < 2e-7), the
probabilities are rounded to the cache dtype as torch rounds them, and the weighted sum of the
rows (the output latent, FP32 sums) reads the sequence's rows again while they are in cache.
Sequences (and groups of 16 queries) run in parallel on torch's threads. One core of an AMD EPYC
with AVX512-BF16, 16 sequences x 528 positions, r = 256 + 32, 8 heads, BF16: ~1.3 ms per layer
against the compiled loops' 5 ms.

A model with at most 8 heads in BF16 (as dsv3's presets have) would leave most of those 16 lanes
empty at one token per sequence; with AVX512-BF16 it takes another layout instead, in groups of
up to 8 queries: each cache row is scored along its r + dr values against one query at a time
(32 values per dot-product instruction, 16 rows summed across lanes at once by a transpose
tree), and the weighted sum reads two rows at a time, interleaved as BF16 pairs, against each
query's pair of probabilities. Same products, FP32 sums in another order. Which layout runs
follows the model's heads, never the step's tokens: each gives a query the same bits whatever
else its group holds, so a token attends alike in a one-token step and in MTP's verify of
1 + k tokens, as greedy MTP's identical output needs. (Picked by the step's T x H queries, it
once took the small preset's 8 heads one way at one token and the other at two, and greedy MTP
on the trained small model drifted from greedy decoding after a few hundred tokens.) One core
of the same EPYC, 528 positions, us per layer, query lanes vs this layout (`decode` on a random cache, median of 5 x 200 calls):
tiny preset (4 heads, r = 128 + 32) 16 sequences 273 vs 128, two tokens each (MTP) 308 vs 221,
one sequence 18.9 vs 9.5; small preset (8 heads, r = 256 + 32) 16 sequences 522 vs 372, one 33.2
vs 23.2.

Its result is the absorbed attention of `MLA._absorbed` up to FP32 summation order: scores
(c_kv . q_lat + k_pe . q_pe) x scale in FP32, positions past each query's own masked, softmax
in FP32, rounded to the cache dtype, weighted sum in FP32 rounded to the cache dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dsv3.model import cpu_kernels

MAX_TOKENS = 4  # query tokens per sequence (decode, MTP's verify); more go to batched GEMMs


class PagedLatents(NamedTuple):
    """One layer's latents as a paged cache holds them."""

    kv: torch.Tensor  # [blocks, block_size, r]
    pe: torch.Tensor  # [blocks, block_size, dr]
    table: (
        torch.Tensor
    )  # [B, W] int64: sequence b's position s is row s % block_size of block table[b, s // block_size]


def can_run(dtype: torch.dtype, device: torch.device | str, r: int, dr: int) -> bool:
    """Whether the kernel attends over a cache of this dtype, device and widths (and builds here)."""
    widths_ok = r % 16 == 0 and (dtype == torch.float32 or dr % 2 == 0)
    ok = torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16) and widths_ok
    return ok and cpu_kernels.available()


def decode(
    q_lat: torch.Tensor, q_pe: torch.Tensor, latents: PagedLatents, start_pos: torch.Tensor, scale: float
) -> torch.Tensor:
    """q_lat [B, T, H, r] (W_UK folded in) and q_pe [B, T, H, dr] of queries at positions
    start_pos [B] + t, over `latents` -> the attention-weighted latents [B, T, H, r]."""
    return torch.ops.dsv3_mla.paged_decode(
        q_lat, q_pe, latents.kv, latents.pe, latents.table, start_pos, scale
    )
