"""Multi-token prediction (V3R section 2.2).

Module k (k = 1..D) keeps the causal chain of predictions: for position i it combines the
previous depth's representation with the embedding of token t_{i+k},
    h'_i^k = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_i^{k-1})])        (eq. 21)
runs one Transformer block on it (eq. 22), and predicts t_{i+k+1} with the output head shared
with the main model after its own norm (`shared_head.norm`, eq. 23). h^0 is the main model's
last hidden state (before the final norm). The embedding and head are the main model's.

The concatenation order (embedding first) is the one of the released checkpoint, whose
inference engines read `eh_proj` that way; the paper writes the two halves the other way round.
In the checkpoint module k is layer `num_hidden_layers + k - 1`, with copies of the embedding
and head (`embed_tokens`, `shared_head.head`) that dsv3 shares instead of storing twice.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.block import Block
from dsv3.model.linear import Linear
from dsv3.model.norm import RMSNorm


class SharedHead(nn.Module):
    """Holds only the norm; the projection is the main model's lm_head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(Block):
    """A Block plus the MTP input projection; parameter names are the checkpoint's."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    # at inference, how many of lm_head's first rows MTP drafts among
    # (dsv3.infer.speculative.restrict_drafts); None: all of them
    draft_vocab: int | None = None

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos, sin, with_aux: bool = False, **kw):
        """h_prev, emb_next [B, T', H] -> (h [B, T', H] before shared_head.norm, balance loss)."""
        x = self.eh_proj(torch.cat((self.enorm(emb_next), self.hnorm(h_prev)), dim=-1))
        return super().forward(x, cos, sin, with_aux=with_aux, **kw)
