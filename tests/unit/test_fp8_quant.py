"""E4M3 quantizers: the bit-trick codec against torch's cast, and ``quantize`` against the tile loop."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3.fp8.quant import (
    ACT,
    ACT_T,
    AMAX_FLOOR,
    E4M3_MAX,
    WEIGHT,
    compute_scale,
    e4m3_decode,
    e4m3_encode,
    fake_quantize_segments,
    quantize,
    quantize_reference,
)


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    """The tile-by-tile checks run the codec eagerly; test_compiled_path_* covers torch.compile."""
    monkeypatch.setenv("DSV3_FP8_COMPILE", "0")


ALL_CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8)
BLOCKS = [ACT, ACT_T, WEIGHT, None]
FORMATS = ["fp32", "pow2", "ue8m0"]


def torch_encode(x: torch.Tensor) -> torch.Tensor:
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise equal, except that any NaN equals any NaN."""
    nan = a.isnan()
    assert torch.equal(nan, b.isnan())
    assert torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


def assert_same_codes(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal E4M3 codes, except that the NaN codes 0x7F and 0xFF count as one (the sign of a NaN
    is not defined: the compiled cast writes 0xFF where the eager one writes 0x7F)."""
    nan = (a & 0x7F) == 0x7F
    assert torch.equal(nan, (b & 0x7F) == 0x7F)
    assert torch.equal(a[~nan], b[~nan])


def wide_random(n: int, seed: int = 0) -> torch.Tensor:
    """Random FP32 spanning 2**-20 .. 2**12 in magnitude, both signs."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.rand(n, generator=g) * 32 - 20)
    return torch.where(torch.rand(n, generator=g) < 0.5, -mag, mag)


@pytest.fixture
def compiled(monkeypatch):
    """The codec tests run the compiled codec (the fast path); eagerly it *is* torch's cast."""
    monkeypatch.setenv("DSV3_FP8_COMPILE", "1")


@pytest.mark.usefixtures("compiled")
def test_decode_matches_torch_on_all_256_codes() -> None:
    assert_same_bits(e4m3_decode(ALL_CODES), ALL_CODES.view(torch.float8_e4m3fn).float())


@pytest.mark.usefixtures("compiled")
def test_encode_roundtrips_all_256_codes() -> None:
    values = ALL_CODES.view(torch.float8_e4m3fn).float()
    assert_same_codes(e4m3_encode(values), torch_encode(values))
    finite = ~values.isnan()
    assert torch.equal(e4m3_encode(values)[finite], ALL_CODES[finite])


@pytest.mark.usefixtures("compiled")
def test_encode_matches_torch_on_midpoints_and_neighbours() -> None:
    """Ties to even and the carry into the next binade are decided exactly at the midpoints."""
    values = ALL_CODES[:0x7F].view(torch.float8_e4m3fn).float()  # 0 .. 448, increasing
    mid = (values[1:] + values[:-1]) / 2
    probes = torch.cat([mid, torch.nextafter(mid, values[1:]), torch.nextafter(mid, values[:-1])])
    probes = torch.cat([probes, -probes, torch.tensor([464.0, 480.0, 1e30, 2.0**-10, 2.0**-10 * 3])])
    assert_same_codes(e4m3_encode(probes), torch_encode(probes))


@pytest.mark.usefixtures("compiled")
def test_encode_matches_torch_on_random_and_special_values() -> None:
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"), 1e-45])
    x = torch.cat([wide_random(200_000), specials])
    assert_same_codes(e4m3_encode(x), torch_encode(x))
    assert_same_codes(e4m3_encode(x.bfloat16()), torch_encode(x.bfloat16()))


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_equals_reference_with_tails_and_zero_tiles(block, fmt) -> None:
    x = torch.randn(260, 300) * torch.exp2(torch.randint(-12, 12, (1, 300)).float())
    x[:, 128:256] = 0.0  # all-zero tiles (amax floor)
    x[130:140, 5] = 3e4  # outliers
    a, b = quantize(x, block, fmt), quantize_reference(x, block, fmt)
    assert a.block == b.block and a.scale.dtype == b.scale.dtype and a.scale.shape == b.scale.shape
    assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
    assert torch.equal(a.scale.float(), b.scale.float())
    assert_same_bits(a.dequantize(), b.dequantize())


def test_quantize_bf16_input_equals_reference() -> None:
    x = torch.randn(64, 200).bfloat16()
    a, b = quantize(x), quantize_reference(x)
    assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
    assert torch.equal(a.scale, b.scale)


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(1, 300),
    cols=st.integers(1, 300),
    log_scale=st.integers(-30, 30),
    seed=st.integers(0, 999),
)
def test_quantize_equals_reference_fuzzed(rows, cols, log_scale, seed) -> None:
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 2.0**log_scale
    for block in (ACT, WEIGHT):
        a, b = quantize(x, block), quantize_reference(x, block)
        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
        assert torch.equal(a.scale, b.scale)


def test_scale_formula() -> None:
    amax = torch.tensor([0.0, 1e-6, 1e-4, 0.3, 448.0, 1000.0, 3e38])
    raw = amax.clamp(min=AMAX_FLOOR) / E4M3_MAX
    assert torch.equal(compute_scale(amax, "fp32"), raw)
    pow2 = compute_scale(amax, "pow2")
    assert torch.equal(torch.frexp(pow2)[0], torch.full_like(pow2, 0.5))  # exact powers of two
    assert (pow2 >= raw).all() and (pow2 < 2 * raw).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantized_error_is_within_half_an_e4m3_step(fmt) -> None:
    x = torch.randn(128, 512)
    q = quantize(x, ACT, fmt)
    scale = q.scale.float().repeat_interleave(128, dim=1)
    step = torch.exp2(torch.floor(torch.log2((x / scale).abs().clamp(min=2.0**-6))) - 3) * scale
    assert ((q.dequantize() - x).abs() <= step / 2).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_finite_tile_dequantizes_to_nan_and_leaves_other_tiles(fmt) -> None:
    x = torch.randn(4, 384)
    x[1, 10], x[2, 200] = float("inf"), float("nan")
    deq = quantize(x, ACT, fmt).dequantize()
    assert deq[1, :128].isnan().all() and deq[2, 128:256].isnan().all()
    clean = torch.ones_like(x, dtype=torch.bool)
    clean[1, :128] = clean[2, 128:256] = False
    assert torch.equal(deq[clean], quantize_reference(x, ACT, fmt).dequantize()[clean])
    assert deq[clean].isfinite().all()


def test_all_zero_tensor() -> None:
    q = quantize(torch.zeros(3, 130), WEIGHT)
    assert torch.equal(q.scale, torch.full((1, 2), AMAX_FLOOR / E4M3_MAX))
    assert torch.equal(q.dequantize(), torch.zeros(3, 130))


def test_rejects_non_matrix_input() -> None:
    for shape in [(5,), (2, 3, 4, 5)]:
        with pytest.raises(ValueError, match="2-D"):
            quantize(torch.zeros(shape))


def test_batched_weights_equal_per_matrix_reference() -> None:
    """Stacked expert weights [E, N, K]: 128x128 blocks per expert, tails padded per expert."""
    w = torch.randn(3, 200, 136)
    q = quantize(w, WEIGHT, "pow2")
    assert q.scale.shape == (3, 2, 2)
    for e in range(3):
        ref = quantize_reference(w[e], WEIGHT, "pow2")
        assert torch.equal(q.data[e].view(torch.uint8), ref.data.view(torch.uint8))
        assert torch.equal(q.scale[e], ref.scale)


@pytest.mark.parametrize("block", [ACT, WEIGHT])
def test_values_from_the_same_pass_equal_dequantize(block) -> None:
    """With power-of-2 scales the dequantized values are exact in BF16 (4 significant bits x 2**k)."""
    x = torch.randn(130, 300) * torch.exp2(torch.randint(-20, 20, (1, 300)).float())
    q = quantize(x, block, "pow2", values=torch.bfloat16)
    ref = quantize_reference(x, block, "pow2").dequantize()
    assert q.values.dtype == torch.bfloat16 and torch.equal(q.values.float(), ref)
    assert torch.equal(q.t().values, q.values.t())
    with pytest.raises(ValueError, match="not exact with FP32 scales"):
        quantize(x, block, "fp32", values=torch.bfloat16)


def test_fake_quantize_segments_restarts_tiles_per_segment() -> None:
    """128x1 tiles within each segment (an expert's tokens), including empty and short segments."""
    x = torch.randn(700, 200) * torch.exp2(torch.randint(-8, 8, (700, 1)).float())
    offs = torch.tensor([130, 130, 390, 395, 700], dtype=torch.int32)
    out = fake_quantize_segments(x, offs, "pow2", torch.bfloat16)
    start = 0
    for end in offs.tolist():
        if end > start:
            ref = quantize_reference(x[start:end], ACT_T, "pow2").dequantize()
            assert torch.equal(out[start:end].float(), ref), (start, end)
        start = end
    fp32 = fake_quantize_segments(x, offs, "fp32", torch.float32)
    assert torch.equal(fp32[:130], quantize_reference(x[:130], ACT_T, "fp32").dequantize())
    with pytest.raises(ValueError, match="not exact"):
        fake_quantize_segments(x, offs, "fp32", torch.bfloat16)


def test_compiled_path_equals_reference(monkeypatch) -> None:
    """The fused torch.compile path (the fast one) against the reference, tails and specials included."""
    monkeypatch.setenv("DSV3_FP8_COMPILE", "1")
    x = torch.cat([wide_random(260 * 300).view(260, 300), torch.zeros(2, 300)])
    x[5, 7], x[200, 290] = float("inf"), float("nan")
    for block, fmt in [(ACT, "fp32"), (WEIGHT, "pow2")]:
        a, b = quantize(x, block, fmt, values=torch.float32), quantize_reference(x, block, fmt)
        assert_same_bits(a.values, b.dequantize())
        # x / NaN-scale has no defined sign, so the codes of a NaN tile may be 0x7F or 0xFF
        assert_same_bits(e4m3_decode(a.data.view(torch.uint8)), e4m3_decode(b.data.view(torch.uint8)))
        assert_same_bits(a.scale, b.scale)
        assert_same_bits(a.dequantize(), b.dequantize())
