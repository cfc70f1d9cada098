"""The MLA latent KV cache: per layer only the normalized latent c_kv [kv_lora_rank] and the
shared RoPE key k_pe [qk_rope_head_dim] of each token, i.e.
    bytes per token = layers x (kv_lora_rank + qk_rope_head_dim) x dtype bytes
(70,272 B for DeepSeek-V3 in BF16), instead of layers x heads x (d_qk + d_v) for expanded K/V.
This is the contiguous form: one [B, max_len, .] buffer per layer, preallocated.
"""

from __future__ import annotations

import torch

from dsv3.config import ModelConfig


class LatentCache:
    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        if max_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_len={max_len} exceeds max_position_embeddings={cfg.max_position_embeddings}"
            )
        n_layers = cfg.num_hidden_layers
        self.max_len = max_len
        self.kv = torch.zeros(n_layers, batch_size, max_len, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.pe = torch.zeros(n_layers, batch_size, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor, start_pos: int):
        """Write c_kv [B, T, r] and k_pe [B, T, dr] at start_pos; return all up to start_pos+T."""
        end = start_pos + c_kv.shape[1]
        if end > self.max_len:
            raise ValueError(f"cache overflow: positions up to {end} but max_len={self.max_len}")
        self.kv[layer_idx, :, start_pos:end] = c_kv
        self.pe[layer_idx, :, start_pos:end] = k_pe
        return self.kv[layer_idx, :, :end], self.pe[layer_idx, :, :end]

    @property
    def bytes_per_token(self) -> int:
        """Bytes held per cached token position (all layers), from the allocated tensors."""
        per_pos = lambda t: t[:, 0, 0].numel() * t.element_size()  # noqa: E731  [L, width] per position
        return per_pos(self.kv) + per_pos(self.pe)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size() + self.pe.numel() * self.pe.element_size()
