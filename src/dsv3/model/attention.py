"""Multi-head Latent Attention (MLA), DeepSeek-V2/V3's answer to the KV-cache problem.

Per token, keys and values of all heads are generated from one small latent
    c_kv = RMSNorm(W_DKV h)                  [kv_lora_rank = 512 in V3]
plus one RoPE key shared by all heads
    k_pe = RoPE(W_KR h)                      [qk_rope_head_dim = 64],
(both come out of `kv_a_proj_with_mqa`), and per head i
    k_i = [W_UK_i c_kv ; k_pe],   v_i = W_UV_i c_kv     (W_UK, W_UV stacked in `kv_b_proj`).
Queries go through their own low-rank bottleneck with an RMSNorm (`q_a_proj`, `q_a_layernorm`,
`q_b_proj`), or through one plain projection `q_proj` when q_lora_rank is None (V2-Lite):
    q_i = [q_nope_i ; RoPE(q_pe_i)].
Only (c_kv, k_pe) need caching: 576 values per token per layer for V3, against
128 heads x (192 + 128) = 40,960 for the expanded per-head K/V.

Two ways to compute the same attention:
  * naive (training and prefill): expand the latent to per-head K/V with kv_b_proj and run
    `scaled_dot_product_attention`. Compute-friendly when queries and keys are the same tokens.
  * absorbed (decode): q_nope_i . (W_UK_i c) = (W_UK_i^T q_nope_i) . c, so W_UK is folded
    into the query and attention runs directly over the cached latents as multi-query
    attention with 576-wide keys and 512-wide values; W_UV is applied after the weighted sum.
    No per-head K/V is ever materialized: memory-bound decode reads only the latent cache.
Both use the softmax scale 1/sqrt(d_nope + d_rope), times mscale^2 under YaRN.

The cache is anything with `update` (`AttentionCache`): dsv3.infer.cache holds a contiguous one
and a paged one. A paged cache may also hand decode its blocks as they are (`update_paged`), and
absorbed attention then runs as one C++ kernel over them (model/paged_attention.py) instead of
gathering them first.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model import paged_attention, panel_gemm
from dsv3.model.linear import Linear, inline_rows, panel_rows
from dsv3.model.norm import RMSNorm
from dsv3.model.paged_attention import PagedLatents
from dsv3.model.rope import apply_rope


class AttentionCache(Protocol):
    """What MLA needs of a latent KV cache: one call per layer per forward."""

    @abstractmethod
    def update(
        self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor, start_pos: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer `layer_idx`'s new latents c_kv [B, T, r] and RoPE keys k_pe [B, T, dr] of
        positions start_pos.. (an int, or a LongTensor [B] of per-sequence starts) and return
        the latents the queries attend to, c_kv [B, S, r] and k_pe [B, S, dr] (key s sits at
        position s; keys after a query's own position are masked by MLA, so slots past a
        sequence's end may hold anything)."""

    def update_paged(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> PagedLatents | None:
        """`update` for absorbed decode attention on paged_attention's kernel: store the new
        latents and return the layer's blocks and each sequence's block table, nothing gathered;
        None (and nothing stored) where the cache has no blocks or the kernel does not run on them."""
        return None


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.rope_interleave = cfg.rope_interleave
        self.softmax_scale = cfg.softmax_scale
        h, bias = cfg.hidden_size, cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(h, self.n_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(h, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, self.n_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(
            cfg.kv_lora_rank, self.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False
        )
        self.o_proj = Linear(self.n_heads * cfg.v_head_dim, h, bias=bias)
        # contiguous W_UK, W_UV for the absorbed path (prepare_absorbed); buffers, not plain
        # attributes, so that a compiled step takes them as it takes the weights (static sizes,
        # no guard of their own), and the state dict leaves them out
        self.register_buffer("w_uk", None, persistent=False)
        self.register_buffer("w_uv", None, persistent=False)
        # W_UK^T [H, r, dn] and W_UV [H, dv, r] packed for the panel kernel (prepare_absorbed)
        self.register_buffer("w_uk_panels", None, persistent=False)
        self.register_buffer("w_uv_panels", None, persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: AttentionCache | None = None,
        layer_idx: int = 0,
        start_pos: int | torch.Tensor = 0,
        absorb: bool = False,
        mask: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, hidden]; cos/sin [T, d_rope/2] for positions start_pos..start_pos+T-1; mask: an
        explicit attention mask [B, 1, T, S] (packed documents) instead of the causal one; rows
        [B]: the one position of each sequence (0..T-1) whose output is wanted (all T are still
        written to the cache), for a draft or a prompt's last token: returns [B, 1, hidden].

        Without a cache, causal attention over the T tokens. With a cache (an `AttentionCache`,
        e.g. `dsv3.infer.cache.LatentCache`), the new latents are written at start_pos and the
        queries attend to everything cached up to their own position. For a batch of sequences
        of different lengths (a view of `dsv3.infer.cache.PagedLatentCache`), start_pos is a
        LongTensor [B] of per-sequence positions and cos/sin are [B, T, d_rope/2]."""
        B, T, _ = x.shape
        H, dn, dr = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, dr], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # [B, T, r]
        k_pe = apply_rope(k_pe, cos, sin, self.rope_interleave)  # [B, T, dr]
        paged = None
        if cache is not None and absorb and T <= paged_attention.MAX_TOKENS:
            paged = cache.update_paged(layer_idx, c_kv, k_pe)
        if cache is not None and paged is None:
            c_kv, k_pe = cache.update(layer_idx, c_kv, k_pe, start_pos)  # [B, S, r], [B, S, dr]
        if rows is not None:  # queries from one position per sequence
            x, cos, sin = pick_rows(x, rows), *pick_positions(cos, sin, rows)  # [B, 1, hidden]
            start_pos, T = start_pos + rows, 1

        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, H, dn + dr)
        q_nope, q_pe = q.split([dn, dr], dim=-1)
        q_pe = apply_rope(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2), self.rope_interleave)  # [B, T, H, dr]
        if absorb:
            out = self._absorbed(q_nope, q_pe, c_kv, k_pe, start_pos, paged)
        else:
            out = self._naive(q_nope, q_pe, c_kv, k_pe, start_pos, mask)
        return self.o_proj(out.reshape(B, T, H * self.v_head_dim))

    def _naive(self, q_nope, q_pe, c_kv, k_pe, start_pos, mask=None) -> torch.Tensor:
        """Per-head K/V from the latent, then SDPA. Returns [B, T, H, dv]."""
        B, T, H, _ = q_nope.shape
        S = c_kv.shape[1]
        kv = self.kv_b_proj(c_kv).view(B, S, H, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)  # [B, T, H, dqk]
        k = torch.cat((k_nope, k_pe[:, :, None].expand(B, S, H, self.qk_rope_head_dim)), dim=-1)
        if mask is None and not (S == T and isinstance(start_pos, int)):
            mask = _causal_mask(T, S, start_pos, q.device)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.softmax_scale,
        )
        return out.transpose(1, 2)  # [B, T, H, dv]

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, dn, r] and W_UV [H, dv, r]: views of kv_b_proj.weight, nothing copied."""
        w = self.kv_b_proj.weight.view(
            self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank
        )
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    def prepare_absorbed(
        self, dtype: torch.dtype | None = None, panels: bool = False, enabled: bool = True
    ) -> None:
        """Keep contiguous copies of W_UK and W_UV (in `dtype`) for the absorbed path, made once
        by the inference engine instead of slicing and casting kv_b_proj on every call, and with
        `panels` (where the panel kernel runs them) their per-head panels for the few-row
        compiled steps that run the model's Linears on the kernel (`panel_rows`). They are a
        snapshot: call again after the weights change. enabled=False drops them: the absorbed
        path then slices kv_b_proj's weight as it is at each call (a model updated in place)."""
        if not enabled:
            self.w_uk = self.w_uv = self.w_uk_panels = self.w_uv_panels = None
            return
        w_uk, w_uv = self.absorbed_weights()
        dtype = dtype or w_uk.dtype
        self.w_uk, self.w_uv = w_uk.to(dtype).contiguous(), w_uv.to(dtype).contiguous()
        w_uk_t = self.w_uk.transpose(1, 2)  # [H, r, dn]: each head's weight as [out, in]
        panels = panels and panel_gemm.can_pack(w_uk_t) and panel_gemm.can_pack(self.w_uv)
        self.w_uk_panels = panel_gemm.pack(w_uk_t) if panels else None
        self.w_uv_panels = panel_gemm.pack(self.w_uv) if panels else None

    def _absorbed(
        self, q_nope, q_pe, c_kv, k_pe, start_pos, paged: PagedLatents | None = None
    ) -> torch.Tensor:
        """Attention over the latent cache with W_UK folded into q and W_UV applied after: over a
        paged cache's blocks on paged_attention's kernel, or as batched matmuls that read the
        cache [B, S, .] in place, row-major (no copies of the S-long operands)."""
        B, T, H, _ = q_nope.shape
        w_uk, w_uv = (self.w_uk, self.w_uv) if self.w_uk is not None else self.absorbed_weights()
        if paged is not None:
            q_lat = _per_head(q_nope, w_uk, 1, self.w_uk_panels)  # [B, T, H, r]
            out_lat = paged_attention.decode(q_lat, q_pe, paged, start_pos, self.softmax_scale)
            return _per_head(out_lat, w_uv, 2, self.w_uv_panels)  # [B, T, H, dv]
        if inline_rows(T):
            return self._absorbed_inline(q_nope, q_pe, c_kv, k_pe, start_pos, w_uk, w_uv)
        S = c_kv.shape[1]
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk.to(q_nope.dtype))  # [B, T, H, r]
        # c_kv [B, S, r] as the row-major left operand: the cache is streamed once, in order
        scores = torch.bmm(c_kv, q_lat.reshape(B, T * H, -1).transpose(1, 2))  # [B, S, T*H]
        scores = scores + torch.bmm(k_pe, q_pe.reshape(B, T * H, -1).transpose(1, 2))
        scores = scores.view(B, S, T, H).permute(0, 3, 2, 1).contiguous()  # [B, H, T, S]
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * self.softmax_scale
        scores = scores.masked_fill(~_causal_mask(T, S, start_pos, scores.device), float("-inf"))
        probs = scores.softmax(dim=-1).to(c_kv.dtype).transpose(1, 2)  # [B, T, H, S]
        out_lat = torch.bmm(probs.reshape(B, T * H, S), c_kv).view(B, T, H, -1)  # [B, T, H, r]
        return torch.einsum("bthc,hdc->bthd", out_lat, w_uv.to(out_lat.dtype))  # [B, T, H, dv]

    def _absorbed_inline(self, q_nope, q_pe, c_kv, k_pe, start_pos, w_uk, w_uv) -> torch.Tensor:
        """`_absorbed` for a compiled decode step, its products written as broadcast products and
        FP32 sums that Inductor turns into loops fused with the cache reads and the softmax
        (model/linear.py explains why; at a few queries each batched GEMM call cost more than
        its arithmetic)."""
        B, T, H, _ = q_nope.shape
        S = c_kv.shape[1]
        dtype, acc = q_nope.dtype, torch.promote_types(q_nope.dtype, torch.float32)
        q_lat = _per_head_loop(q_nope, w_uk, 1)  # [B, T, H, r]
        scores = (c_kv.to(acc)[:, None, None] * q_lat.to(acc)[:, :, :, None]).sum(-1)  # [B, T, H, S]
        scores = scores + (k_pe.to(acc)[:, None, None] * q_pe.to(acc)[:, :, :, None]).sum(-1)
        scores = scores.transpose(1, 2) * self.softmax_scale  # [B, H, T, S]
        scores = scores.masked_fill(~_causal_mask(T, S, start_pos, scores.device), float("-inf"))
        probs = scores.softmax(dim=-1).to(c_kv.dtype).transpose(1, 2)  # [B, T, H, S]
        out_lat = (probs.to(acc)[..., None] * c_kv.to(acc)[:, None, None]).sum(-2).to(dtype)  # [B, T, H, r]
        return _per_head_loop(out_lat, w_uv, 2)  # [B, T, H, dv]


def _per_head(
    x: torch.Tensor, w: torch.Tensor, w_in_dim: int, panels: torch.Tensor | None = None
) -> torch.Tensor:
    """x [B, T, H, i] times each head's w [H, i, o] (w_in_dim=1) or [H, o, i] (w_in_dim=2) -> [B, T,
    H, o] in x's dtype: for a few rows of a compiled step a broadcast product with an FP32 sum (a
    loop Inductor fuses), for the panel kernel's rows one call of it on `panels` (w as [H, o, i]
    packed by panel_gemm.pack), else a batched GEMM."""
    B, T, H, _ = x.shape
    o = w.shape[2] if w_in_dim == 1 else w.shape[1]
    if panels is not None and panel_rows(B * T):
        return panel_gemm.per_head(x.reshape(B * T, H, -1), panels, o).view(B, T, H, o)
    if not inline_rows(B * T):
        return torch.einsum("bthi,hio->btho" if w_in_dim == 1 else "bthi,hoi->btho", x, w.to(x.dtype))
    return _per_head_loop(x, w, w_in_dim)


def _per_head_loop(x: torch.Tensor, w: torch.Tensor, w_in_dim: int) -> torch.Tensor:
    """`_per_head` as a broadcast product with an FP32 sum, the loop Inductor fuses."""
    acc = torch.promote_types(x.dtype, torch.float32)
    if w_in_dim == 1:
        return (x.to(acc)[..., None] * w.to(acc)).sum(-2).to(x.dtype)
    return (x.to(acc)[..., None, :] * w.to(acc)).sum(-1).to(x.dtype)


def pick_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] -> [B, 1, ...]: position rows[b] of each sequence b."""
    return x[torch.arange(x.shape[0], device=x.device), rows].unsqueeze(1)


def pick_positions(cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor):
    """cos/sin of T positions ([T, d/2], or per sequence [B, T, d/2]) -> those of position
    rows[b] for each sequence b, [B, 1, d/2]."""
    if cos.dim() == 2:
        return cos[rows].unsqueeze(1), sin[rows].unsqueeze(1)
    return pick_rows(cos, rows), pick_rows(sin, rows)


def _causal_mask(T: int, S: int, start_pos: int | torch.Tensor, device) -> torch.Tensor:
    """[T, S] bool, True where query start_pos+t may see key s (s <= start_pos + t); for
    per-sequence start positions [B], [B, 1, T, S] (keys past a sequence's end are hidden too)."""
    if isinstance(start_pos, torch.Tensor):
        q_pos = (start_pos[:, None] + torch.arange(T, device=device))[:, None, :, None]  # [B, 1, T, 1]
    else:
        q_pos = torch.arange(start_pos, start_pos + T, device=device)[:, None]  # [T, 1]
    return torch.arange(S, device=device) <= q_pos
