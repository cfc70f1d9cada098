"""FP8 GEMM with fine-grained scales, and a model of the Hopper accumulator (DeepSeek-V3 sec. 3.3.2).

``fp8_gemm(a, b)`` computes ``C[M, N] = A[M, K] @ B[N, K]^T`` from two ``Fp8Tensor`` operands
quantized along K (1x128 tiles or 128x128 blocks). With fine-grained scales a K-block of 128 has
its own pair of scales, so the hardware must add each block's partial sum, times
``scale_a[m, kb] * scale_b[n, kb]``, into an FP32 accumulator: the scales are applied at the
*promotion* points, every N_C = 128 elements of K.

Backends behind one seam (``BACKENDS``, chosen by device unless named):

* ``reference``: literally that - an FP32 GEMM of the unscaled E4M3 values per K-block, scaled
  and summed in FP32. Plain and slow; the yardstick for the others.
* ``emulate`` (CPU default): products of E4M3 values are exact in FP32 (4 x 4 significant bits),
  so dequantizing both operands and running one GEMM with FP32 accumulation equals ``reference``
  up to FP32 summation order (~1e-7 relative, far below the 2**-4 of E4M3). With power-of-2
  (or UE8M0) scales, ``code * 2**k`` has 4 significant bits and is *exact in BF16*, and a scale
  pair applied to every product of a K-block instead of to the block's sum changes nothing
  (multiplying by 2**k is exact). So the fast path dequantizes to BF16 and runs oneDNN's BF16
  GEMM (FP32 accumulation, one rounding to BF16 at the end): bit-faithful to an FP8 GEMM with
  FP32 accumulation and BF16 output, at BF16 GEMM speed. Where this CPU's BF16 GEMM is slow (no
  AVX-512 BF16 / AMX: dsv3.device measures it and the run computes in FP32), the same exact
  values run as an FP32 GEMM instead (`emulation_dtype`). FP32 scales (the V3 paper's recipe)
  cannot be folded into BF16 operands exactly (code * scale needs up to 28 bits), so they run the
  same GEMM in FP32, ~2x slower on this CPU. Either way the output is what the GEMM returns:
  the BF16 path rounds to BF16 even where the hardware would write FP32 (torch's CPU mm has no
  FP32 output for BF16 inputs), the same rounding a BF16 autocast step applies.
* ``hopper``: the limited-precision accumulator below, for the accuracy study (slow, small M, N).
* ``cuda``: ``torch.nn.functional.scaled_mm`` with blockwise 1x128 / 128x128 recipes (cuBLAS on
  SM90+); shapes or GPUs it rejects fall back to dequantize + BF16 GEMM, with a warning.

The accumulator model (ISCA sec. 3.1: "FP22", 1 sign + 8 exponent + 13 fraction bits). The tensor
core multiplies E4M3 pairs exactly, then adds a group of ``group`` products: they are aligned to
the largest exponent in the group and every bit below 2**(e_max - 13) is dropped (truncation
toward zero, no rounding), the aligned terms are summed exactly, and the sum is added to the
FP22 accumulator, whose result is again truncated to 13 fraction bits. Truncation is biased: on
positive data every add loses on average half an accumulator ulp, ~2**-14 of the running sum, so
the relative error grows like K / group * 2**-14; on zero-mean data the losses partly cancel.
With promotion the limited accumulator restarts from zero every N_C elements, so its ulp stays
that of a 128-term sum and the error stops growing with K. ``group = 32`` is the K depth of one
Hopper FP8 MMA instruction (wgmma m64nNk32); it is not fitted to the paper's 2%.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from dsv3.fp8.quant import TILE, Fp8Tensor

N_C = 128  # promotion interval along K (one 1x128 / 128x128 scale block)
FRAC_BITS = 13  # fraction bits the Hopper FP8 accumulator keeps ("FP22")
MMA_K = 32  # products per Hopper FP8 MMA instruction and output element


def fp8_gemm(
    a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype = torch.float32, backend: str | None = None
) -> Tensor:
    """``A[M, K] @ B[N, K]^T`` with the scales of both operands applied per K-block."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"inner dimensions differ: A {tuple(a.shape)}, B {tuple(b.shape)}")
    return BACKENDS[resolve_backend(a.data.device, backend)](a, b).to(out_dtype)


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The named backend (checked), else the device's default: ``cuda`` on GPUs, ``emulate`` on CPU."""
    name = backend or ("cuda" if device.type == "cuda" else "emulate")
    if name not in BACKENDS:
        raise ValueError(f"unknown FP8 GEMM backend {name!r}; known: {sorted(BACKENDS)}")
    return name


def gemm_emulate(a: Fp8Tensor, b: Fp8Tensor) -> Tensor:
    dtype = a.values.dtype if a.values is not None else emulation_dtype(a.fmt, b.fmt)
    return a.dequantize(dtype) @ b.dequantize(dtype).t()


def emulation_dtype(*fmts: str, compute: torch.dtype = torch.bfloat16) -> torch.dtype:
    """The dtype the emulated FP8 GEMMs run in. E4M3 values times power-of-2 scales are exact in
    BF16 and in FP32, so they run in the run's compute dtype, which dsv3.device chose by measuring
    both (FP32 where this CPU's BF16 GEMM is slow); FP32 scales need FP32."""
    return torch.float32 if "fp32" in fmts or compute == torch.float32 else torch.bfloat16


def gemm_reference(a: Fp8Tensor, b: Fp8Tensor) -> Tensor:
    a_val, b_val = _values(a), _values(b)
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32, device=a.data.device)
    for k0 in range(0, a.shape[1], TILE):
        partial = a_val[:, k0 : k0 + TILE] @ b_val[:, k0 : k0 + TILE].t()  # FP32 accumulation
        out += partial * _row_scales(a, k0)[:, None] * _row_scales(b, k0)[None, :]
    return out


def gemm_hopper(
    a: Fp8Tensor, b: Fp8Tensor, promote: bool = True, group: int = MMA_K, frac_bits: int = FRAC_BITS
) -> Tensor:
    """The limited accumulator of the module docstring, promoted to FP32 every N_C (or never).

    Without promotion a single scale pair must cover all of K, i.e. per-tensor (or per-row) scales.
    """
    K = a.shape[1]
    if not promote and (a.block[1] < K or b.block[1] < K):
        raise ValueError("fine-grained K scales are applied at promotion; use promote=True or K-wide blocks")
    if N_C % group:
        raise ValueError(f"group={group} must divide N_C={N_C}")
    a_val, b_val = _values(a).double(), _values(b).double()
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32, device=a.data.device)
    acc = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.data.device)
    for k0 in range(0, K, group):
        products = a_val[:, None, k0 : k0 + group] * b_val[None, :, k0 : k0 + group]  # [M, N, g], exact
        aligned = _truncate(products, _exponent(products).amax(dim=-1, keepdim=True), frac_bits).sum(-1)
        acc = _truncate(acc + aligned, _exponent(acc + aligned), frac_bits)
        k1 = k0 + group
        if k1 == K or (promote and k1 % N_C == 0):
            block_start = k1 - 1  # any index inside the K-block just finished
            out += acc.float() * _row_scales(a, block_start)[:, None] * _row_scales(b, block_start)[None, :]
            acc.zero_()
    return out


def gemm_cuda(a: Fp8Tensor, b: Fp8Tensor) -> Tensor:
    """cuBLAS blockwise scaled GEMM; what it rejects runs as dequantize + BF16 GEMM."""
    import torch.nn.functional as F
    from torch.nn.functional import ScalingType

    recipes = {(1, TILE): ScalingType.BlockWise1x128, (TILE, TILE): ScalingType.BlockWise128x128}
    try:
        return F.scaled_mm(
            a.data.contiguous(),
            b.data.contiguous().t(),  # column-major [K, N]
            scale_a=_outer_major(a),
            scale_recipe_a=recipes[a.block],
            scale_b=_outer_major(b) if b.block[0] == 1 else _k_major_blocks(b),
            scale_recipe_b=recipes[b.block],
            output_dtype=torch.bfloat16,
        )
    except (KeyError, RuntimeError, NotImplementedError) as err:
        _warn_once(f"FP8 scaled_mm unavailable for blocks {a.block} x {b.block} ({err}); using BF16 GEMM")
        return a.dequantize(torch.bfloat16) @ b.dequantize(torch.bfloat16).t()


BACKENDS: dict[str, Callable[[Fp8Tensor, Fp8Tensor], Tensor]] = {
    "emulate": gemm_emulate,
    "reference": gemm_reference,
    "hopper": gemm_hopper,
    "cuda": gemm_cuda,
}


def _values(t: Fp8Tensor) -> Tensor:
    """The unscaled E4M3 values as FP32."""
    return t.data.float()


def _row_scales(t: Fp8Tensor, k: int) -> Tensor:
    """Scale of every row of ``t`` for the K-block that holds column ``k``: ``[R]``."""
    br, bc = t.block
    return t.scale.float()[:, k // bc].repeat_interleave(br)[: t.shape[0]]


def _exponent(x: Tensor) -> Tensor:
    """floor(log2|x|) (0 maps to -1, harmless: truncating 0 gives 0)."""
    return torch.frexp(x)[1] - 1


def _truncate(x: Tensor, exp: Tensor, frac_bits: int) -> Tensor:
    """Round toward zero to a multiple of 2**(exp - frac_bits)."""
    ulp = torch.ldexp(torch.ones_like(x), exp - frac_bits)
    return torch.trunc(x / ulp) * ulp


def _outer_major(t: Fp8Tensor) -> Tensor:
    """cuBLAS wants blockwise scales in FP32, stored outer-dimension major."""
    return t.scale.float().t().contiguous().t()


def _k_major_blocks(b: Fp8Tensor) -> Tensor:
    """128x128 scales of B = [K, N] as cuBLAS reads them: [K/128 padded to a multiple of 4,
    N/128] in FP32, K-major (torch checks that shape and strides (1, padded K/128))."""
    scale = b.scale.float()  # [N/128, K/128]
    return torch.nn.functional.pad(scale, (0, -scale.shape[1] % 4)).contiguous().t()


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)
