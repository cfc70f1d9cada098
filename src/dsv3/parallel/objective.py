"""The single-process objective, split over data-parallel ranks and pipeline microbatches.

One process computes, for a batch of B sequences,
    L = CE_sum / N  +  lambda * MTP_sum / M  +  mean over sequences of the balance loss
with N (M) the targets of the next-token (MTP depth-1) loss in the whole batch. Split into C
chunks (dp ranks x microbatches), each chunk's model returns its own means ce_c, mtp_c, bal_c over
its n_c (m_c) targets, and the means of unequal chunks do not average to L (packed documents
put -100 targets anywhere). The exact split is
    L = sum_c  ce_c * n_c / N  +  lambda * mtp_c * m_c / M  +  bal_c / C
once N and M are summed over the dp ranks (one tiny all-reduce per step). FSDP averages gradients
over the dp ranks and the pipeline sums them over microbatches (scale_grads=False), so each chunk
backpropagates dp x its term: then every parameter receives exactly dL/dw.

Exact for MTP depth 1 (DeepSeek-V3's); for depth D > 1 the model returns only the mean over depths,
so the chunk is weighted by its depth-1 targets (a close approximation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.model.loss import IGNORE_INDEX


def target_counts(labels: torch.Tensor, mtp_depth: int) -> torch.Tensor:
    """[n, m]: next-token targets, and depth-1 MTP targets (positions t with labels t and t+1 set)."""
    valid = labels != IGNORE_INDEX  # [B, T]
    mtp = (valid[:, :-1] & valid[:, 1:]).sum() if mtp_depth and labels.shape[1] > 1 else valid.new_zeros(())
    return torch.stack([valid.sum(), mtp]).to(torch.float64)


@dataclass
class Split:
    """This step's global sizes: totals [N, M] over the whole batch, chunks C, dp ranks."""

    totals: torch.Tensor  # [2] float64
    chunks: int
    dp: int

    def terms(self, counts: torch.Tensor, ce, mtp, balance) -> list[torch.Tensor | None]:
        """This chunk's shares of the three losses (their sum over chunks is the global value)."""
        share = (counts / self.totals.clamp(min=1)).tolist()
        return [
            ce * share[0],
            None if mtp is None else mtp * share[1],
            None if balance is None else balance / self.chunks,
        ]

    def objective(self, terms: list[torch.Tensor | None], mtp_lambda: float) -> torch.Tensor:
        """dp x (this chunk's share of L): what the chunk backpropagates."""
        ce, mtp, balance = terms
        total = ce
        if mtp is not None:
            total = total + mtp_lambda * mtp
        if balance is not None:
            total = total + balance
        return total * self.dp


def global_split(labels_chunks: list[torch.Tensor], mtp_depth: int, dp: int, dp_group) -> tuple[Split, list]:
    """Sum this rank's chunk counts over the dp group; returns the Split and the per-chunk counts."""
    import torch.distributed as dist

    counts = [target_counts(y, mtp_depth) for y in labels_chunks]
    totals = torch.stack(counts).sum(0)
    if dp > 1:
        dist.all_reduce(totals, group=dp_group)
    return Split(totals, dp * len(labels_chunks), dp), counts
