"""Shared helpers for benchmarks: machine description, measured GEMM peak, results files."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from dsv3.device import gemm_tflops  # noqa: F401  (re-exported for the benchmarks)

RESULTS = Path(__file__).parent / "results"
# The trained tiny model the benchmarks read (weights, validation data, MTP acceptance): the run
# `make run` writes. Its latest checkpoint holds config, weights, tokenizer and train_config.json.
TRAINED_RUN = Path(__file__).parents[1] / "runs" / "demo"


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def save_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
