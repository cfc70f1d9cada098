"""Shared by the fp8_* benchmarks: the machine description and the results file."""

import json
import platform
from pathlib import Path

import torch


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def save(name: str, results: dict) -> None:
    path = Path(__file__).parent / "results" / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **results}, indent=2))
    print(f"-> {path}")


def sqnr_db(ref: torch.Tensor, out: torch.Tensor, per_row: bool = False) -> float:
    ref, out = ref.double(), out.double()
    dims = -1 if per_row else None
    ratio = ref.pow(2).sum(dims) / (ref - out).pow(2).sum(dims)
    return (10 * torch.log10(ratio)).mean().item()
