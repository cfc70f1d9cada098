"""E4M3 quantization with fine-grained scales (DeepSeek-V3 report sec. 3.3; ISCA 2025 sec. 3.1).

FP8 E4M3 has 3 fraction bits and a range of +-448, far too little range for a whole tensor whose
activations carry outlier channels: one outlier sets the per-tensor scale and pushes every other
value into the subnormals. DeepSeek-V3 therefore scales *fine-grained* groups on the fly (online,
no delayed scaling):

* activations: one scale per 1x128 tile, i.e. per token per 128 channels (``ACT``);
* weights: one scale per 128x128 block (``WEIGHT``);
* for the weight-gradient GEMM the contraction runs over tokens, so activations and output
  gradients are re-tiled 128x1 (128 tokens of one channel, ``ACT_T``).

Each tile gets ``scale = max(amax, 1e-4) / 448`` and stores ``round_e4m3(x / scale)``; the value it
stands for is ``code * scale``. Optionally the scale is rounded *up* to a power of two (``pow2``,
exact rescaling; nothing overflows) or additionally stored as UE8M0, an 8-bit exponent
(``ue8m0``, the format of Blackwell MX scales). Unaligned tails are zero-padded to full tiles
before the amax is taken (which leaves the amax unchanged) and the data is cropped back, as in
the released checkpoints (weight ``[out, in]`` plus ``weight_scale_inv [ceil(out/128),
ceil(in/128)]``). ``block=None`` gives one scale per tensor, the baseline the paper improves on.

Non-finite input has a defined result: a tile holding inf or NaN gets a non-finite scale and
dequantizes to NaN as a whole, so the fault reaches the loss instead of being clipped away;
other tiles are unaffected.

Fast path. torch's float8 casts are slow on CPU in eager mode (~0.5 GB/s: one scalar
conversion per element, one kernel per op). Under ``torch.compile`` the same cast (the same
rounding: to nearest, ties to even, after clamping to +-448) is vectorized and fused with the
amax, the division and the dequantized copy into one pass over the tile, 2-5x faster than the
eager ops here (benchmarks/fp8_speed.py); static shapes, as a dynamic-shape graph ran ~10x slower. The
tests prove the compiled codec bit-exact against the eager torch cast on all 256 codes, all
midpoints between them and random data; ``quantize_reference`` (a plain loop over tiles with the
eager cast) is the reference that ``quantize`` must equal exactly, values and scales. (A
bit-trick encoder on the FP32 pattern is exact too, but Inductor does not vectorize the bitcasts
and it ran 3-9x slower than the compiled cast.)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

E4M3_MAX = 448.0
TILE = 128
AMAX_FLOOR = 1e-4
ScaleFormat = Literal["fp32", "pow2", "ue8m0"]
Block = tuple[int, int]

ACT: Block = (1, TILE)  # per token per 128 channels
ACT_T: Block = (TILE, 1)  # 128 tokens of one channel (weight-gradient GEMM)
WEIGHT: Block = (TILE, TILE)  # 128x128 weight blocks


@dataclass
class Fp8Tensor:
    """E4M3 codes ``data [..., R, C]`` with one scale per ``block`` tile of the last two dims:
    ``scale [..., ceil(R/br), ceil(C/bc)]``. ``values`` optionally holds ``dequantize()`` in a
    GEMM dtype, written by the same fused pass as the codes (see ``quantize(values=...)``)."""

    data: Tensor  # torch.float8_e4m3fn
    scale: Tensor  # float32, or float8_e8m0fnu for UE8M0 scales
    block: Block
    fmt: ScaleFormat = "fp32"
    values: Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scale.nbytes

    def t(self) -> Fp8Tensor:
        """Transpose: a 128x128 block grid stays valid, 1x128 tiles become 128x1."""
        values = None if self.values is None else self.values.transpose(-2, -1)
        t = self.data.transpose(-2, -1), self.scale.transpose(-2, -1), (self.block[1], self.block[0])
        return Fp8Tensor(*t, self.fmt, values)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        if self.values is not None and self.values.dtype == dtype:
            return self.values
        codes = _pad(self.data.view(torch.uint8), self.block).view(torch.float8_e4m3fn)
        return _crop(_compiled(_dequantize)(codes, self.scale.float(), self.block), self.shape).to(dtype)


def e4m3_encode(x: Tensor) -> Tensor:
    """FP32 -> E4M3 codes (uint8): ``x.clamp(-448, 448).to(torch.float8_e4m3fn)``, compiled."""
    return _compiled(_encode)(x)


def e4m3_decode(codes: Tensor) -> Tensor:
    """E4M3 codes (uint8) -> FP32, compiled."""
    return _compiled(_decode)(codes)


def _encode(x: Tensor) -> Tensor:
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def _decode(codes: Tensor) -> Tensor:
    return codes.view(torch.float8_e4m3fn).float()


def compute_scale(amax: Tensor, fmt: ScaleFormat = "fp32") -> Tensor:
    """FP32 scale per tile: max(amax, 1e-4) / 448, for pow2/UE8M0 rounded up to a power of two."""
    return _scale(amax, torch.tensor(fmt != "fp32", device=amax.device))


def _scale(amax: Tensor, pow2: Tensor) -> Tensor:
    """``compute_scale`` with the format as a bool tensor, so that compiled code does not branch.

    Rounding up to 2**k is an integer add on the FP32 pattern: any nonzero fraction carries into
    the exponent, then the fraction is cleared (inf stays inf; NaN is kept explicitly).
    """
    scale = amax.float().clamp(min=AMAX_FLOOR) / E4M3_MAX
    up = ((scale.view(torch.int32) + 0x7FFFFF) & 0x7F800000).view(torch.float32)
    return torch.where(pow2 & ~scale.isnan(), up, scale)


def quantize(
    x: Tensor, block: Block | None = ACT, fmt: ScaleFormat = "fp32", values: torch.dtype | None = None
) -> Fp8Tensor:
    """Quantize ``x [..., R, C]`` to E4M3 with one scale per ``block`` tile of the last two dims
    (``None``: one per matrix). ``values``: also return the dequantized tensor in that dtype from
    the same pass; BF16 is exact only with power-of-2 scales (an E4M3 value times 2**k has 4
    significant bits), so FP32 scales ask for FP32 values."""
    if x.dim() not in (2, 3):
        raise ValueError(f"quantize expects a 2-D (or batched 3-D) tensor, got shape {tuple(x.shape)}")
    if values not in (None, torch.float32) and fmt == "fp32":
        raise ValueError(
            f"values={values} is not exact with FP32 scales; use fmt='pow2' or values=torch.float32"
        )
    block = block or (x.shape[-2], x.shape[-1])
    pow2 = torch.tensor(fmt != "fp32", device=x.device)
    codes, scale, deq = _compiled(_quantize_tiles)(_pad(x, block), block, pow2, values or torch.float32)
    deq = _crop(deq, x.shape) if values else None
    return Fp8Tensor(_crop(codes, x.shape), _stored(scale, fmt), block, fmt, deq)


def fake_quantize_segments(
    x: Tensor, offs: Tensor, fmt: ScaleFormat = "pow2", dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """``dequantize(quantize(x, ACT_T))`` where the 128-row tiles restart at every segment:
    x [M, C] holds the rows of segment e in ``offs[e-1]:offs[e]`` (``offs`` [E] int cumulative ends,
    the grouped-experts layout). The weight-gradient GEMM of expert e contracts over its own
    tokens only, so its 128x1 tiles must not straddle two experts (DeepGEMM pads each expert's
    block to 128 rows for the same reason). Returns the dequantized values [M, C] in ``dtype``."""
    if fmt == "fp32" and dtype != torch.float32:
        raise ValueError(f"dtype={dtype} is not exact with FP32 scales; use fmt='pow2' or torch.float32")
    pow2 = torch.tensor(fmt != "fp32", device=x.device)
    return _compiled(_fake_quantize_segments)(x, offs, pow2, dtype)


def quantize_reference(x: Tensor, block: Block | None = ACT, fmt: ScaleFormat = "fp32") -> Fp8Tensor:
    """Plain reference for ``quantize``: a loop over tiles with torch's float8 cast."""
    rows, cols = x.shape
    br, bc = block or (rows, cols)
    data = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scales = []
    for i in range(0, rows, br):
        for j in range(0, cols, bc):
            tile = x[i : i + br, j : j + bc].float()
            scale = compute_scale(tile.abs().amax(), fmt)
            data[i : i + br, j : j + bc] = (tile / scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(data.dtype)
            scales.append(scale)
    grid = (math.ceil(rows / br), math.ceil(cols / bc))
    return Fp8Tensor(data, _stored(torch.stack(scales).view(grid), fmt), (br, bc), fmt)


def _stored(scale: Tensor, fmt: ScaleFormat) -> Tensor:
    """UE8M0 keeps only the exponent of the (power-of-2) scale: one byte per tile."""
    return scale.to(torch.float8_e8m0fnu) if fmt == "ue8m0" else scale


def _pad(x: Tensor, block: Block) -> Tensor:
    """Zero-pad the last two dims of ``x`` to whole tiles (eager: Inductor (torch 2.13) miscompiles
    a pad followed by a crop in one static-shape graph, so compiled code sees whole tiles only)."""
    (rows, cols), (br, bc) = x.shape[-2:], block
    return F.pad(x, (0, -cols % bc, 0, -rows % br)) if rows % br or cols % bc else x


def _crop(x: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of ``_pad`` (a no-op on aligned shapes)."""
    return x if x.shape == shape else x[..., : shape[-2], : shape[-1]].contiguous()


def _tiles(x: Tensor, block: Block) -> Tensor:
    """View ``x [..., R, C]`` (whole tiles) as ``[..., R/br, br, C/bc, bc]``."""
    (rows, cols), (br, bc) = x.shape[-2:], block
    return x.reshape(*x.shape[:-2], rows // br, br, cols // bc, bc)


def _untile(tiles: Tensor) -> Tensor:
    """Inverse of ``_tiles``: ``[..., RB, br, CB, bc] -> [..., R, C]``."""
    rb, br, cb, bc = tiles.shape[-4:]
    return tiles.reshape(*tiles.shape[:-4], rb * br, cb * bc)


def _quantize_tiles(
    x: Tensor, block: Block, pow2: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """One fused pass: amax per tile, scale, codes and their values.
    Returns (codes [..., R, C] float8_e4m3fn, scale [..., RB, CB], values [..., R, C] in dtype)."""
    tiles = _tiles(x.float(), block)
    scale = _scale(tiles.abs().amax(dim=(-3, -1)), pow2)[..., :, None, :, None]
    codes = (tiles / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    values = (codes.float() * scale).to(dtype)
    return _untile(codes), scale[..., :, 0, :, 0], _untile(values)


def _dequantize(codes: Tensor, scale: Tensor, block: Block) -> Tensor:
    tiles = _tiles(codes.float(), block)
    return _untile(tiles * scale[..., :, None, :, None])


def _fake_quantize_segments(x: Tensor, offs: Tensor, pow2: Tensor, dtype: torch.dtype) -> Tensor:
    rows, cols = x.shape
    offs = offs.long()
    row = torch.arange(rows, device=x.device)
    seg = torch.searchsorted(offs, row, right=True)  # segment of each row
    starts = offs - torch.diff(offs, prepend=offs.new_zeros(1))
    first_tile = torch.cumsum((offs - starts + TILE - 1) // TILE, 0) - (offs - starts + TILE - 1) // TILE
    tile = first_tile[seg] + (row - starts[seg]) // TILE  # [M] tile id, restarting per segment
    n_tiles = rows // TILE + offs.numel() + 1  # an upper bound: at most one partial tile per segment
    xf = x.float()
    amax = xf.new_zeros(n_tiles, cols).scatter_reduce(0, tile[:, None].expand(rows, cols), xf.abs(), "amax")
    scale = _scale(amax, pow2)[tile]  # [M, C]
    return (_encode(xf / scale).view(torch.float8_e4m3fn).float() * scale).to(dtype)


_eager_depth = 0  # > 0 inside `eager()`


@contextmanager
def eager() -> Iterator[None]:
    """Run the quantizers uncompiled inside this block: the same codes bit for bit, slower per
    byte, but without the seconds of compilation per shape that only pay off on large tensors
    (small conversions, tests). DSV3_FP8_COMPILE=0 does the same for a whole process."""
    global _eager_depth
    _eager_depth += 1
    try:
        yield
    finally:
        _eager_depth -= 1


def _compiled(fn: Callable) -> Callable:
    """``fn`` under ``torch.compile``, which fuses the cast and the scaling into one pass,
    unless inside `eager()` or DSV3_FP8_COMPILE=0 (read per call)."""
    if _eager_depth or os.environ.get("DSV3_FP8_COMPILE", "1") == "0":
        return fn
    return _compile(fn)


@cache
def _compile(fn: Callable) -> Callable:
    """Static shapes: a graph per tensor shape and block (a model has a few dozen), each much
    faster than one dynamic-shape graph (~10x here), hence the raised recompile limit."""
    compiled = torch.compile(fn, dynamic=False)

    def run(*args: object) -> object:
        with torch._dynamo.config.patch(recompile_limit=512, accumulated_recompile_limit=4096):
            return compiled(*args)

    return run


def sqnr_db(ref: Tensor, out: Tensor, per_row: bool = False) -> float:
    """Signal-to-quantization-noise ratio 10 log10(|ref|^2 / |ref - out|^2) in dB, in float64.
    per_row: the mean of each row's SQNR (a global one is ruled by the largest rows)."""
    ref, out = ref.double(), out.double()
    dims = -1 if per_row else None
    return (10 * torch.log10(ref.pow(2).sum(dims) / (ref - out).pow(2).sum(dims))).mean().item()
