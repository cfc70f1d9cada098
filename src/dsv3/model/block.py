"""One Transformer block: pre-norm residual MLA, then pre-norm residual FFN (dense for the
first `first_k_dense_replace` layers, DeepSeekMoE after)."""

from __future__ import annotations

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.attention import MLA, AttentionCache, pick_rows
from dsv3.model.moe import MLP, MoE
from dsv3.model.norm import RMSNorm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        cos,
        sin,
        with_aux: bool = False,
        cache: AttentionCache | None = None,
        start_pos: int | torch.Tensor = 0,
        absorb: bool = False,
        mask: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, H] -> (x [B, T, H], balance loss of this layer or None). mask: an attention
        mask [B, 1, T, T] for packed documents (default: causal). rows [B]: only position rows[b]
        of each sequence goes past attention (the others are only written to the cache), and x
        comes back [B, 1, H]: MTP's draft needs one position, and its FFN is most of the block."""
        attn = self.self_attn(
            self.input_layernorm(x), cos, sin, cache, self.layer_idx, start_pos, absorb, mask, rows
        )
        x = (x if rows is None else pick_rows(x, rows)) + attn
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            y, aux = self.mlp(h, with_aux)
        else:
            y, aux = self.mlp(h), None
        return x + y, aux
