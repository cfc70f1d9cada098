"""Hardware catalog: the few numbers per accelerator that bound an LLM's speed.

Every cost model in this package reduces a workload to three quantities and divides each by the
matching hardware rate; the slowest term is the limit (a roofline):

    compute time  = FLOPs        / (bf16_tflops or fp8_tflops x 1e12)
    memory time   = bytes read   / (hbm_gbps x 1e9)
    network time  = bytes sent   / (scaleup_gbps or nics_per_gpu x nic_gbps) x 1e9

Figures are dense (no 2:4 sparsity), per accelerator, and per direction for links (NVIDIA's
"NVLink 900 GB/s" is the bidirectional sum: 450 per direction). The built-in catalog is data
(`data/hardware.json`), each entry with its source; users add entries in a JSON file of the same
shape (`{"accelerators": [...]}`) and pass it with `--hardware-file`. `measure_cpu()` builds an
entry for the machine at hand from a timed matrix multiply and a timed copy.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv3.errors import UserError

DATA_DIR = Path(__file__).with_name("data")
CATALOG_FILE = DATA_DIR / "hardware.json"


class HardwareError(UserError):
    """An unknown accelerator name or an invalid hardware figure."""


@dataclass(frozen=True)
class Link:
    """A measured small-message latency (ISCA Table 5)."""

    name: str
    latency_us: float
    source: str


@dataclass(frozen=True)
class Accelerator:
    name: str
    bf16_tflops: float
    fp8_tflops: float | None  # None: no FP8 tensor cores
    hbm_gb: float
    hbm_gbps: float
    scaleup_gbps: float  # per direction, to the other accelerators of the scale-up domain
    scaleup_domain: int  # accelerators joined by the scale-up fabric (NVLink node, NVL72 rack)
    nics_per_gpu: float
    nic_gbps: float  # per NIC, line rate
    source: str

    def __post_init__(self) -> None:
        positive = ("bf16_tflops", "hbm_gb", "hbm_gbps", "scaleup_domain")
        for name in positive:
            if not getattr(self, name) > 0:
                raise HardwareError(f"{self.name}: {name}={getattr(self, name)!r} must be > 0")
        for name in ("scaleup_gbps", "nics_per_gpu", "nic_gbps"):
            if getattr(self, name) < 0:
                raise HardwareError(f"{self.name}: {name}={getattr(self, name)!r} must be >= 0")
        if self.fp8_tflops is not None and self.fp8_tflops <= 0:
            raise HardwareError(
                f"{self.name}: fp8_tflops={self.fp8_tflops!r} must be > 0, or null without FP8"
            )

    @property
    def scaleout_gbps(self) -> float:
        """Network bandwidth per accelerator out of its scale-up domain (all its NICs)."""
        return self.nics_per_gpu * self.nic_gbps

    def peak_tflops(self, dtype: str) -> float:
        if dtype == "bf16":
            return self.bf16_tflops
        if dtype == "fp8":
            if self.fp8_tflops is None:
                raise HardwareError(f"{self.name} has no FP8 tensor cores; use dtype 'bf16'")
            return self.fp8_tflops
        raise HardwareError(f"dtype={dtype!r}: expected 'bf16' or 'fp8'")


@dataclass(frozen=True)
class Catalog:
    accelerators: dict[str, Accelerator]
    links: dict[str, Link]

    def accelerator(self, name: str) -> Accelerator:
        for key, acc in self.accelerators.items():
            if key.lower() == name.lower():
                return acc
        raise HardwareError(f"unknown hardware {name!r}; choose one of {sorted(self.accelerators)} or 'cpu'")


def _accelerator_from_dict(d: dict[str, Any], where: str) -> Accelerator:
    names = {f.name for f in dataclasses.fields(Accelerator)}
    missing = sorted(names - set(d) - {"source"})
    unknown = sorted(set(d) - names)
    if missing or unknown:
        raise HardwareError(
            f"{where}: entry {d.get('name', '?')!r} has missing keys {missing}, unknown keys {unknown}"
        )
    return Accelerator(**{"source": where, **d})


def load_catalog(extra: str | Path | None = None) -> Catalog:
    """The built-in catalog, plus (overriding by name) the accelerators of a user JSON file."""
    data = json.loads(CATALOG_FILE.read_text())
    accs = {d["name"]: _accelerator_from_dict(d, str(CATALOG_FILE)) for d in data["accelerators"]}
    links = {d["name"]: Link(**d) for d in data["links"]}
    if extra is not None:
        path = Path(extra)
        if not path.is_file():
            raise HardwareError(f"hardware file {path} does not exist")
        user = json.loads(path.read_text())
        if not isinstance(user, dict) or not isinstance(user.get("accelerators"), list):
            raise HardwareError(f'{path}: expected {{"accelerators": [{{"name": ..., "bf16_tflops": ...}}]}}')
        for d in user["accelerators"]:
            acc = _accelerator_from_dict(d, str(path))
            accs[acc.name] = acc
    return Catalog(accs, links)


def measure_cpu(matmul_size: int = 1024, copy_mb: int = 256, repeats: int = 3) -> Accelerator:
    """An entry for this machine's CPU: measured BF16 GEMM TFLOPS and copy bandwidth (read +
    write of a `copy_mb` copy), best of `repeats`."""
    import torch

    from dsv3.device import _timed, gemm_tflops

    src = torch.empty(copy_mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    copy_s = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    gbps = 2 * src.numel() * 4 / copy_s / 1e9
    return Accelerator(
        name="cpu",
        bf16_tflops=gemm_tflops("bfloat16", matmul_size, repeats),
        fp8_tflops=None,
        hbm_gb=_memory_gb(),
        hbm_gbps=gbps,
        scaleup_gbps=0.0,
        scaleup_domain=1,
        nics_per_gpu=0,
        nic_gbps=0.0,
        source=f"measured: {matmul_size}^3 BF16 matmul, {copy_mb} MB copy, {torch.get_num_threads()} threads",
    )


def _memory_gb() -> float:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def resolve(name: str, catalog: Catalog) -> Accelerator:
    """A catalog entry by name (case-insensitive), or 'cpu' measured now."""
    return measure_cpu() if name.lower() == "cpu" else catalog.accelerator(name)
