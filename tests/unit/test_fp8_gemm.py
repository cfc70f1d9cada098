"""FP8 GEMM backends: emulation against the per-K-block reference, the Hopper accumulator model."""

import pytest
import torch

from dsv3.fp8.gemm import N_C, fp8_gemm, gemm_hopper
from dsv3.fp8.quant import ACT, WEIGHT, quantize, sqnr_db


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    monkeypatch.setenv("DSV3_FP8_COMPILE", "0")


def test_emulate_equals_per_k_block_reference() -> None:
    a, b = quantize(torch.randn(70, 300), ACT), quantize(torch.randn(130, 300), WEIGHT)
    emulated, reference = fp8_gemm(a, b, backend="emulate"), fp8_gemm(a, b, backend="reference")
    assert sqnr_db(reference, emulated) > 120  # FP32 summation order only


@pytest.mark.parametrize("b_block", [WEIGHT, ACT, None])
def test_fp8_gemm_accuracy_against_fp64(b_block) -> None:
    x, w = torch.randn(64, 512), torch.randn(96, 512)
    out = fp8_gemm(quantize(x, ACT), quantize(w, b_block))
    assert sqnr_db(x.double() @ w.double().t(), out) > 25  # E4M3 inputs: ~31 dB each


def test_fine_grained_beats_per_tensor_on_outliers() -> None:
    x, w = torch.randn(64, 1024), torch.randn(96, 1024) * 0.02
    x[[0, 9]] *= 1e4  # outlier tokens: massive activations reach 1e4 x the median in LLMs
    exact = x.double() @ w.double().t()
    fine = sqnr_db(exact, fp8_gemm(quantize(x, ACT), quantize(w, WEIGHT)), per_row=True)
    coarse = sqnr_db(exact, fp8_gemm(quantize(x, None), quantize(w, None)), per_row=True)
    assert fine > 28 and fine > coarse + 3  # at least half the error power


def test_hopper_accumulator_with_promotion_is_close_to_fp32() -> None:
    a, b = quantize(torch.rand(8, 2048), ACT), quantize(torch.rand(8, 2048), ACT)
    ref = fp8_gemm(a, b, backend="reference")
    promoted = gemm_hopper(a, b, promote=True)
    assert ((promoted - ref).abs().max() / ref.abs().max()).item() < 1e-3


def test_hopper_accumulator_without_promotion_loses_precision_on_positive_data() -> None:
    """Truncation at 13 fraction bits is biased: the sum comes out too small, and more so than promoted."""
    a, b = quantize(torch.rand(8, 4096), None), quantize(torch.rand(8, 4096), None)
    ref = fp8_gemm(a, b, backend="reference")
    limited = gemm_hopper(a, b, promote=False)
    assert (limited < ref).all()
    rel = ((ref - limited) / ref).max().item()
    assert 1e-3 < rel < 5e-2
    with pytest.raises(ValueError, match="promotion"):
        gemm_hopper(quantize(torch.rand(2, 256), ACT), quantize(torch.rand(2, 256), ACT), promote=False)


def test_hopper_model_is_exact_with_enough_fraction_bits() -> None:
    a, b = quantize(torch.randn(4, 2 * N_C), ACT), quantize(torch.randn(6, 2 * N_C), ACT)
    exact = gemm_hopper(a, b, frac_bits=40)
    assert sqnr_db(fp8_gemm(a, b, backend="reference"), exact) > 120


def test_unknown_backend_and_shape_mismatch() -> None:
    a = quantize(torch.randn(4, 128))
    with pytest.raises(ValueError, match="backend"):
        fp8_gemm(a, a, backend="nope")
    with pytest.raises(ValueError, match="inner"):
        fp8_gemm(a, quantize(torch.randn(4, 64)))


@pytest.mark.parametrize("fmt", ["pow2", "ue8m0"])
def test_bf16_fast_path_equals_reference_with_power_of_two_scales(fmt) -> None:
    """Dequantized E4M3 x 2**k is exact in BF16, so oneDNN's BF16 GEMM (FP32 accumulation, one
    rounding to BF16) equals the per-K-block FP32 reference rounded once to BF16, up to FP32
    summation order: almost every element bit-equal, none off by more than one BF16 ulp."""
    x = torch.randn(96, 640) * torch.exp2(torch.randint(-6, 6, (1, 640)).float())
    a, b = quantize(x, ACT, fmt, values=torch.bfloat16), quantize(torch.randn(200, 640), WEIGHT, fmt)
    assert a.values.dtype == torch.bfloat16
    fast = fp8_gemm(a, b, torch.bfloat16, backend="emulate")
    ref = fp8_gemm(a, b, torch.float32, backend="reference")
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs())) - 7)
    assert ((fast.float() - ref).abs() <= ulp).all()
    assert (fast == ref.bfloat16()).float().mean() > 0.99


def test_fp32_scales_emulate_in_fp32() -> None:
    a, b = quantize(torch.randn(8, 256), ACT, "fp32"), quantize(torch.randn(8, 256), WEIGHT, "pow2")
    assert a.dequantize(torch.float32).dtype == torch.float32
    assert sqnr_db(fp8_gemm(a, b, backend="reference"), fp8_gemm(a, b)) > 120


@pytest.mark.parametrize("transposed", [False, True], ids=["weight", "dgrad"])
@pytest.mark.parametrize("k", [256, 384, 1024])
def test_cuda_weight_scales_are_laid_out_as_cublas_reads_them(k, transposed) -> None:
    """torch's blockwise 128x128 scaled_mm takes B = [K, N]'s scales as [K/128 padded to 4, N/128]
    with strides (1, padded); the H200 run of tests/gpu rejected every other layout, and Dgrad's B
    (the weight transposed: its scale a strided view) with no padding to add."""
    from dsv3.fp8.gemm import _k_major_blocks

    w = torch.randn(k, 384) if transposed else torch.randn(384, k)
    b = quantize(w, WEIGHT).t() if transposed else quantize(w, WEIGHT)  # B = [N = 384, K = k]
    scales = _k_major_blocks(b)
    padded = -(-k // 128 // 4) * 4
    assert scales.shape == (padded, 3) and scales.stride() == (1, padded)
    assert torch.equal(scales[: k // 128], b.scale.float().t())  # block (n, k) at [k, n]
