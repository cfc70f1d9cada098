"""Hardware catalog: built-in data, user files, validation, the measured CPU entry."""

import json

import pytest

from dsv3.analysis import hardware
from dsv3.analysis.hardware import HardwareError, load_catalog

REQUIRED = {"H800", "H100", "H200", "B200", "GB200-NVL72", "A100", "RTX4090", "MI300X", "M2-Ultra"}


def test_catalog_has_the_listed_accelerators_with_sources():
    cat = load_catalog()
    assert REQUIRED <= set(cat.accelerators)
    assert all(a.source for a in cat.accelerators.values())
    h800 = cat.accelerator("h800")  # case-insensitive
    assert h800.scaleout_gbps == 50 and h800.bf16_tflops == 989
    assert cat.accelerator("GB200-NVL72").scaleup_gbps == 900
    assert cat.links["InfiniBand cross leaf"].latency_us == 3.7


def test_unknown_hardware_lists_the_choices():
    with pytest.raises(HardwareError, match=r"unknown hardware 'B300'; choose one of \[.*'H800'"):
        load_catalog().accelerator("B300")


def test_fp8_on_hardware_without_it():
    with pytest.raises(HardwareError, match="A100 has no FP8"):
        load_catalog().accelerator("A100").peak_tflops("fp8")


def test_user_file_adds_and_overrides(tmp_path):
    entry = {
        "name": "MyChip",
        "bf16_tflops": 100,
        "fp8_tflops": None,
        "hbm_gb": 64,
        "hbm_gbps": 1000,
        "scaleup_gbps": 100,
        "scaleup_domain": 4,
        "nics_per_gpu": 1,
        "nic_gbps": 25,
    }
    path = tmp_path / "hw.json"
    path.write_text(json.dumps({"accelerators": [entry, {**entry, "name": "H800", "hbm_gb": 1}]}))
    cat = load_catalog(path)
    assert cat.accelerator("MyChip").source == str(path)
    assert cat.accelerator("H800").hbm_gb == 1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hbm_gbps": -1}, "hbm_gbps=-1 must be > 0"),
        ({"nic_gbps": -5}, "nic_gbps=-5 must be >= 0"),
        ({"bf16_tflops": 0}, "bf16_tflops=0"),
        ({"typo": 1}, r"unknown keys \['typo'\]"),
    ],
)
def test_user_file_validation(tmp_path, change, message):
    entry = {
        "name": "Bad",
        "bf16_tflops": 1,
        "fp8_tflops": None,
        "hbm_gb": 1,
        "hbm_gbps": 1,
        "scaleup_gbps": 0,
        "scaleup_domain": 1,
        "nics_per_gpu": 0,
        "nic_gbps": 0,
    }
    entry.update(change)
    path = tmp_path / "hw.json"
    path.write_text(json.dumps({"accelerators": [entry]}))
    with pytest.raises(HardwareError, match=message):
        load_catalog(path)


def test_missing_keys_and_missing_file(tmp_path):
    path = tmp_path / "hw.json"
    path.write_text(json.dumps({"accelerators": [{"name": "X", "bf16_tflops": 1}]}))
    with pytest.raises(HardwareError, match=r"missing keys \['fp8_tflops', 'hbm_gb'"):
        load_catalog(path)
    with pytest.raises(HardwareError, match="does not exist"):
        load_catalog(tmp_path / "none.json")


def test_measured_cpu_entry():
    cpu = hardware.measure_cpu(matmul_size=256, copy_mb=8, repeats=2)
    assert cpu.name == "cpu" and cpu.bf16_tflops > 0 and cpu.hbm_gbps > 0 and cpu.hbm_gb > 0
    assert "measured" in cpu.source
