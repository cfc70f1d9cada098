"""LogFMT-nBit: a log-domain codec for communication (ISCA 2025 sec. 3.2).

Per 1x128 tile of the last dimension, LogFMT stores the minimum and maximum of log2|x| over the
nonzero elements (two FP32 numbers) and one n-bit code per element: a sign bit and an (n-1)-bit
magnitude code. Code 0 is zero; codes 1 .. 2^(n-1)-1 are the levels

    2 ** (min + step * (code - 1)),   step = (max - min) / (2^(n-1) - 2),

evenly spaced in the log domain from 2**min (code 1) to 2**max (the top code). The minimum is
clamped to max - 32, an E5-like dynamic range, so a tiny element cannot stretch the grid.
Encoding rounds to the nearer of the two neighbouring levels *in linear space* (in log space
rounding would be biased towards the smaller level); values below the lowest level round to it
or to zero, whichever is nearer. Decoding is ``sign * 2 ** (min + step * (code - 1))``.
LogFMT-8 costs 8 bits plus 64 bits of metadata per 128 elements (1.0625 bytes per element),
about the same as E4M3 with an FP32 scale (1.03125), yet spends its levels uniformly in
relative precision over the tile's actual range. ``encode`` packs the codes into bytes so that
``nbytes`` is the real wire size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

TILE = 128
LOG2_RANGE = 32.0  # min is clamped to max - 32


@dataclass
class LogFmtTensor:
    packed: Tensor  # uint8, n bits per element, tiles of 128 along the last dim (zero padded)
    log_min: Tensor  # float32 [..., ceil(C / 128)]
    log_max: Tensor  # float32 [..., ceil(C / 128)]
    shape: torch.Size
    bits: int

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.log_min.nbytes + self.log_max.nbytes


def encode(x: Tensor, bits: int = 8) -> LogFmtTensor:
    """Encode ``x [..., C]`` as LogFMT-``bits`` with 1x128 tiles along the last dimension."""
    if not 3 <= bits <= 16:
        raise ValueError(f"LogFMT bits must be in [3, 16], got {bits}")
    if not x.isfinite().all():
        raise ValueError("LogFMT cannot encode inf or NaN")
    tiles = _tiles(x.float())  # [T, 128]
    mag = tiles.abs()
    nonzero = mag > 0
    log_mag = torch.where(nonzero, torch.log2(mag.clamp(min=torch.finfo(torch.float32).tiny)), torch.nan)
    log_max = torch.nan_to_num(log_mag.nan_to_num(-torch.inf).amax(-1), neginf=0.0)
    log_min = torch.maximum(
        torch.nan_to_num(log_mag.nan_to_num(torch.inf).amin(-1), posinf=0.0), log_max - LOG2_RANGE
    )
    top = 2 ** (bits - 1) - 1
    codes = _nearest_code(mag, log_min[:, None], log_max[:, None], top)
    codes = codes | ((tiles < 0).int() << (bits - 1))
    grid = (*x.shape[:-1], math.ceil(x.shape[-1] / TILE))
    return LogFmtTensor(_pack(codes, bits), log_min.view(grid), log_max.view(grid), x.shape, bits)


def decode(t: LogFmtTensor) -> Tensor:
    codes = _unpack(t.packed, t.bits).view(-1, TILE)
    top = 2 ** (t.bits - 1) - 1
    magnitude_code, negative = codes & top, (codes >> (t.bits - 1)) == 1
    log_min, log_max = t.log_min.reshape(-1, 1), t.log_max.reshape(-1, 1)
    values = _level(magnitude_code, log_min, log_max, top)
    values = torch.where(magnitude_code == 0, 0.0, torch.where(negative, -values, values))
    cols = t.shape[-1]
    return values.view(-1, math.ceil(cols / TILE) * TILE)[:, :cols].reshape(t.shape)


def _level(code: Tensor, log_min: Tensor, log_max: Tensor, top: int) -> Tensor:
    """2 ** (min + step * (code - 1)) for codes 1..top."""
    step = (log_max - log_min) / (top - 1)
    return torch.exp2(log_min + step * (code - 1))


def _nearest_code(mag: Tensor, log_min: Tensor, log_max: Tensor, top: int) -> Tensor:
    """The code whose level is nearest to ``mag`` in linear space (0 for zero)."""
    step = (log_max - log_min) / (top - 1)
    position = torch.where(step > 0, (torch.log2(mag) - log_min) / step, float(top - 1))  # one level: top
    lower = (torch.floor(position).nan_to_num(0.0).clamp(0, top - 1) + 1).int()  # level at or below mag
    upper = (lower + 1).clamp(max=top)
    lo, hi = _level(lower, log_min, log_max, top), _level(upper, log_min, log_max, top)
    code = torch.where(mag - lo > hi - mag, upper, lower)
    below = mag < lo  # only for mag under the lowest level: round to it or to zero
    code = torch.where(below & (mag < lo / 2), 0, code)
    return torch.where(mag > 0, code, 0)


def _tiles(x: Tensor) -> Tensor:
    """``[..., C] -> [T, 128]`` with the last dim zero-padded to whole tiles."""
    padded = F.pad(x.reshape(-1, x.shape[-1]), (0, -x.shape[-1] % TILE))
    return padded.reshape(-1, TILE)


def _pack(codes: Tensor, bits: int) -> Tensor:
    """n-bit codes -> bytes, little-endian bit order."""
    bit_planes = (codes.reshape(-1, 1) >> torch.arange(bits, device=codes.device)) & 1  # [N, bits]
    flat = F.pad(bit_planes.flatten(), (0, -bit_planes.numel() % 8)).view(-1, 8)
    return (flat << torch.arange(8, device=codes.device)).sum(-1).to(torch.uint8)


def _unpack(packed: Tensor, bits: int) -> Tensor:
    flat = ((packed.int().reshape(-1, 1) >> torch.arange(8, device=packed.device)) & 1).flatten()
    n = flat.numel() // bits
    return (flat[: n * bits].view(n, bits) << torch.arange(bits, device=packed.device)).sum(-1).int()
