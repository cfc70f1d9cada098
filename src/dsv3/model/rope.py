"""Rotary position embedding (RoPE) with YaRN context extension, as DeepSeek-V3 uses it.

MLA applies RoPE only to a small decoupled part of each query and to one key shared by all
heads (`qk_rope_head_dim` = 64 wide in V3), so the compressed latent stays position-free and
can be cached and absorbed (see attention.py).

YaRN (arXiv 2309.00071) stretches the low frequencies by `factor` (40 for V3: 4K -> 160K
context) and keeps the high ones: with d = rope dim and base theta, frequency i is
    inv_freq_i = interp_i * (1 - keep_i) + extrap_i * keep_i,
    extrap_i = theta^(-2i/d),  interp_i = extrap_i / factor,
where keep_i goes linearly from 1 (high frequencies, kept) to 0 (low ones, interpolated) between
the dimensions that make beta_fast and beta_slow rotations over the original context. YaRN also sharpens attention: the softmax
scale is multiplied by mscale^2 with mscale = 0.1 * mscale_all_dim * ln(factor) + 1 (see
`ModelConfig.softmax_scale`), and cos/sin by mscale(factor, mscale) / mscale(factor,
mscale_all_dim) (1.0 for the published configs).

Layout: the published weights rotate interleaved pairs (x0, x1), (x2, x3), ...
(`rope_interleave=True`); `rope_interleave=False` rotates (x_i, x_{i+d/2}). Either way the
rotated output is written as [first elements of the pairs ; second elements], a fixed
permutation of the rope dims applied to queries and keys alike, which leaves every q.k dot
product unchanged and avoids a copy back into the interleaved order.
"""

import math

import torch

from dsv3.config import ModelConfig, yarn_get_mscale


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [d/2] (float32) and the cos/sin attention factor."""
    d, base = cfg.qk_rope_head_dim, cfg.rope_theta
    extrap = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    rs = cfg.rope_scaling
    if rs is None:
        return extrap, 1.0
    factor, orig = rs["factor"], rs["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rs["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(rs["beta_slow"])), d - 1)
    if low == high:
        high += 0.001  # avoid a zero-width transition
    keep = 1.0 - ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = (extrap / factor) * (1.0 - keep) + extrap * keep
    if rs["mscale"] and rs["mscale_all_dim"]:
        attn_factor = yarn_get_mscale(factor, rs["mscale"]) / yarn_get_mscale(factor, rs["mscale_all_dim"])
    else:
        attn_factor = yarn_get_mscale(factor)
    return inv_freq, attn_factor


def rope_cos_sin(inv_freq: torch.Tensor, attn_factor: float, positions: torch.Tensor):
    """cos, sin of shape [*positions.shape, d/2] in float32."""
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos() * attn_factor, angles.sin() * attn_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate the last dim of x [..., T, (heads,) d] by cos/sin [T, d/2] (broadcast over the rest).

    Returns [x1*cos - x2*sin ; x2*cos + x1*sin] where (x1, x2) are the pair elements."""
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
