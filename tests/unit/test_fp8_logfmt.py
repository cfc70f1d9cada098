"""LogFMT-nBit codec: levels, linear-space rounding, zero and degenerate tiles, packing."""

import pytest
import torch

from dsv3.fp8.logfmt import decode, encode


def levels(tile: torch.Tensor, bits: int) -> torch.Tensor:
    """All representable magnitudes of one tile, straight from the definition."""
    log = tile[tile != 0].abs().log2()
    hi = log.max()
    lo = torch.maximum(log.min(), hi - 32)
    top = 2 ** (bits - 1) - 1
    return torch.exp2(lo + (hi - lo) / (top - 1) * torch.arange(top))


@pytest.mark.parametrize("bits", [8, 10])
def test_decoded_value_is_the_nearest_level_in_linear_space(bits) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 256) * torch.exp(2 * torch.randn(3, 256))
    y = decode(encode(x, bits))
    for row in range(3):
        for t in range(2):
            tile, got = x[row, t * 128 : (t + 1) * 128], y[row, t * 128 : (t + 1) * 128]
            grid = torch.cat([torch.zeros(1), levels(tile, bits)])
            nearest = grid[(tile.abs()[:, None] - grid[None]).abs().argmin(-1)]
            assert torch.allclose(got.abs(), nearest, rtol=1e-5, atol=0)
            assert torch.equal(got.sign(), tile.sign())


def test_extremes_are_exact_and_zero_is_code_zero() -> None:
    x = torch.randn(1, 128)
    x[0, 5] = 0.0
    y = decode(encode(x, 8))
    amax, amin = x.abs().argmax(), x[x != 0].abs().min()
    assert torch.allclose(y[0, amax], x[0, amax], rtol=1e-6) and y[0, 5] == 0
    assert torch.isclose(y.abs()[y != 0].min(), amin, rtol=1e-6)


def test_zero_tile_constant_tile_and_unaligned_tail() -> None:
    x = torch.zeros(2, 200)
    x[1] = -3.0
    y = decode(encode(x, 8))
    assert torch.equal(y, x)


def test_min_is_clamped_to_max_minus_32() -> None:
    x = torch.ones(1, 128)
    x[0, 0] = 2.0**-40  # below the 2**-32 floor: rounds to zero
    assert decode(encode(x, 8))[0, 0] == 0


@pytest.mark.parametrize("bits", [8, 10])
def test_packed_size_and_error_shrink_with_bits(bits) -> None:
    x = torch.randn(16, 1024)
    t = encode(x, bits)
    assert t.packed.numel() == x.numel() * bits // 8
    assert t.nbytes == x.numel() * bits // 8 + 2 * 4 * 16 * 8


def test_ten_bits_beat_eight_and_bad_input_is_rejected() -> None:
    x = torch.randn(8, 512)
    err = {b: (decode(encode(x, b)) - x).norm() for b in (8, 10)}
    assert err[10] < err[8] / 3
    with pytest.raises(ValueError, match="inf or NaN"):
        encode(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="bits"):
        encode(x, 2)
