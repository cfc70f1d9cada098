"""Shared helpers for benchmarks: machine description, measured GEMM peak, results files."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from dsv3.allocator import retain_freed_memory
from dsv3.device import gemm_tflops  # noqa: F401  (re-exported for the benchmarks)

# as the `dsv3` command does (dsv3/allocator.py); a peer in the same process gets the same
retain_freed_memory()

RESULTS = Path(__file__).parent / "results"
# The trained tiny model the benchmarks read (weights, validation data, MTP acceptance): the run
# `make run` writes. Its latest checkpoint holds config, weights, tokenizer and train_config.json.
TRAINED_RUN = Path(__file__).parents[1] / "runs" / "demo"


def machine() -> dict:
    """What the numbers were measured on: CPU model and the SIMD flags that decide the kernels
    (AVX-512 BF16 / AMX make torch's BF16 GEMMs fast; AVX2 alone makes them ~100x slower than FP32)."""
    from dsv3.device import cpu_model

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next(
        (line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []
    )
    return {
        "cpu": cpu_model(),
        "simd_flags": sorted(f for f in flags if f.startswith(("avx", "fma", "f16c", "amx"))),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        **{f"{level}_cache": cache_size(index) for level, index in (("l2", 2), ("l3", 3))},
    }


def cache_size(index: int) -> str | None:
    """CPU 0's cache at sysfs index (2: L2, 3: L3), as the kernel says it ("32768K"), or None. A
    model whose weights fit in the L3 decodes from it; a VM's L3 is shared with its neighbours."""
    path = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size")
    return path.read_text().strip() if path.exists() else None


def save_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
