"""dsv3.device: the dtype is chosen by measurement (injected here, so no test depends on the CPU)."""

import shutil

import pytest
import torch

from dsv3 import device
from dsv3.errors import ConfigError

SHAPES = [(512, 256, 768)]


def fake(rates: dict[str, float], calls: list):
    def measure(shapes, dtype, dev):
        calls.append(dtype)
        return rates[str(dtype).removeprefix("torch.")]

    return measure


@pytest.mark.parametrize(
    "rates, chosen",
    [
        ({"float32": 0.1, "bfloat16": 0.6}, "bfloat16"),  # AVX-512 BF16 / AMX: BF16 ~6x faster
        ({"float32": 0.1, "bfloat16": 0.0006}, "float32"),  # AVX2: torch's naive BF16 kernel
        ({"float32": 0.1, "bfloat16": 0.105}, "float32"),  # a tie keeps FP32's precision
    ],
)
def test_auto_picks_bf16_only_where_it_is_faster(tmp_path, rates, chosen):
    calls = []
    choice = device.choose_dtype("auto", SHAPES, "cpu", tmp_path, fake(rates, calls))
    assert choice.name == chosen and choice.dtype == getattr(torch, chosen)
    assert choice.peak_tflops == rates[chosen]  # MFU is computed against the dtype actually used
    assert len(calls) == 2 and not choice.cached and choice.warning() is None
    assert "GEMMs of this model" in choice.describe() and "measured" in choice.describe()


def test_measured_once_per_machine_then_cached(tmp_path):
    calls = []
    first = device.choose_dtype(
        "auto", SHAPES, "cpu", tmp_path, fake({"float32": 0.1, "bfloat16": 0.6}, calls)
    )
    again = device.choose_dtype(
        "auto", SHAPES, "cpu", tmp_path, fake({"float32": 9.0, "bfloat16": 0.0}, calls)
    )
    assert len(calls) == 2 and again.cached and again.rates == first.rates
    other_shapes = device.choose_dtype(
        "auto", [(1, 256, 768)], "cpu", tmp_path, fake({"float32": 0.1, "bfloat16": 0.01}, calls)
    )
    assert len(calls) == 4 and other_shapes.name == "float32"  # decode shapes are measured on their own


def test_forced_slow_dtype_works_and_warns_with_the_factor(tmp_path):
    choice = device.choose_dtype(
        "bfloat16", SHAPES, "cpu", tmp_path, fake({"float32": 0.1, "bfloat16": 0.001}, [])
    )
    assert choice.name == "bfloat16" and "100.0x slower than float32" in choice.warning()
    with pytest.raises(ConfigError, match="dtype='float16'"):
        device.choose_dtype("float16", SHAPES, "cpu", tmp_path)


def test_mfu_above_100_percent_says_the_peak_was_mismeasured():
    assert device.format_mfu(0.531) == "MFU 53.1%"
    assert "peak mis-measured" in device.format_mfu(5.7)


def test_decode_measurement_is_cached_apart_from_the_dense_one(tmp_path):
    """Inference asks with measure_decode_gemms: the same shapes timed in cache by measure_gemms
    (or by an older dsv3) must not answer for it."""
    calls = []
    dense = device.choose_dtype(
        "auto", SHAPES, "cpu", tmp_path, fake({"float32": 0.2, "bfloat16": 0.1}, calls)
    )

    def measure_decode_gemms(shapes, dtype, dev):  # the name is what keys the cache
        calls.append(dtype)
        return {torch.float32: 0.1, torch.bfloat16: 0.2}[dtype]

    decode = device.choose_dtype("auto", SHAPES, "cpu", tmp_path, measure_decode_gemms)
    assert (dense.name, decode.name) == ("float32", "bfloat16") and len(calls) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_measurement_streams_copies_of_the_weights(monkeypatch, dtype):
    """Each shape cycles through enough weight copies to make STREAM_BYTES of FP32, packed where
    oneDNN packs the dtype; the rate counts every copy's FLOPs."""
    monkeypatch.setattr(device, "STREAM_BYTES", 1 << 20)
    made = []
    reorder = torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(
        torch.ops.mkldnn, "_reorder_linear_weight", lambda w, m: made.append(w.shape) or reorder(w, m)
    )
    rate = device.measure_decode_gemms([(1, 256, 512)], dtype, torch.device("cpu"))
    from dsv3.model.packed_experts import can_pack

    assert rate > 0
    assert len(made) == (2 if can_pack(torch.zeros(1, dtype=dtype)) else 0)  # 1 MiB / (256 x 512 x 4 B)


def test_real_measurement_is_positive_and_short():
    rate = device.measure_gemms([(64, 64, 64)], torch.float32, torch.device("cpu"))
    assert rate > 0


def test_can_compile_needs_a_cpp_compiler_on_a_cpu():
    """Inductor builds C++ for a CPU: without a compiler torch.compile would fail at the first step,
    so the trainer does not compile unasked."""
    from torch._inductor import config as inductor_config

    from dsv3.device import can_compile

    if shutil.which("g++"):  # Inductor's default compiler
        assert can_compile(torch.device("cpu"))
    with inductor_config.patch({"cpp.cxx": ("no-such-c++-compiler",)}):
        assert not can_compile(torch.device("cpu"))
