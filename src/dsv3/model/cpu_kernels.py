"""dsv3's C++ kernels for decoding on a CPU, built once per machine.

Two small kernels do what the libraries torch calls do not do at decode's sizes:
  * panel_gemm.cpp: GEMMs of a few rows that read each weight byte once, and the routed experts
    of a MoE layer in one call (model/panel_gemm.py);
  * paged_attention.cpp: absorbed MLA attention of a few queries per sequence straight from the
    paged latent cache's blocks (model/paged_attention.py);
and cpu_vectors.h, the vector types and helpers the two share.
Both are plain C++ (GCC vector extensions, AVX512-BF16's dot product where the CPU has it)
compiled for this machine (-march=native), into one library that registers the torch ops
`dsv3_panel::*` and `dsv3_mla::*`. They split their work with `at::parallel_for`, which runs on
torch's OpenMP threads only when the caller is compiled with OpenMP (`-fopenmp`; it then shares
torch's libgomp): without it, everything ran on one thread (small preset, 16 streams, 2 threads,
decode step: 21.3 ms without, 14.0 ms with; 16 streams of 512 positions: 32.4 vs 18.8 ms).

Building uses torch.utils.cpp_extension (a C++ compiler and ninja, which torch.compile's CPU
backend needs as well) and takes ~10-20 s once, with one line on stderr; the library is cached
under the dsv3 cache dir, in a folder keyed by CPU model, CPU flags and torch version (a cache
shared by machines never loads another CPU's build). Without a compiler `available()` is False,
with a warning, and callers keep their library paths.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).with_name(name) for name in ("panel_gemm.cpp", "paged_attention.cpp"))
BUILD_ERRORS = (
    OSError,
    RuntimeError,
    ImportError,
    subprocess.CalledProcessError,
)  # no compiler, no ninja, a failed build
STALE_LOCK_S = 300  # a build lock older than this was left by a killed build
# the ops' output shapes, for torch.compile's tracing (ops called only inside other ops need none)
FAKES = {
    "dsv3_panel::linear": lambda x, packed, n: x.new_empty(x.shape[0], n),
    "dsv3_panel::per_head": lambda x, packed, n: x.new_empty(x.shape[0], x.shape[1], n),
    "dsv3_panel::routed_experts": lambda x, indices, weights, gate_up, down, inter, *shared: x.new_empty(
        x.shape, dtype=torch.float32
    ),
    "dsv3_mla::paged_decode": lambda q, q_pe, kv, pe, table, start_pos, scale: q.new_empty(q.shape),
}


@functools.cache
def available() -> bool:
    """Build (once per machine, then load from the cache) the kernels; False if they cannot be built."""
    from torch.utils import cpp_extension

    flags = ["-O3", "-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native"]
    folder = build_folder()
    name = f"dsv3_{folder.name}"
    built = (folder / f"{name}.so").exists()  # then this loads it (ninja rebuilds if a source changed)
    lock = folder / "lock"  # held by a build; one left by a build that was killed would block forever
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        lock.unlink(missing_ok=True)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not built:
            print(
                f"building dsv3's CPU kernels for this CPU in {folder} (once, ~20 s) ...",
                file=sys.stderr,
                flush=True,
            )
        cpp_extension.load(
            name=name,
            sources=[str(source) for source in SOURCES],
            extra_cflags=[*flags, "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            is_python_module=False,
        )
    except BUILD_ERRORS as e:
        message = f"dsv3: the CPU kernels could not be built ({e}); oneDNN or aten runs instead"
        warnings.warn(message, stacklevel=2)
        return False
    for op, shape in FAKES.items():
        torch.library.register_fake(op)(shape)
    return True


def require() -> None:
    if not available():
        raise RuntimeError("dsv3's CPU kernels could not be built on this machine (see the warning above)")


def build_folder() -> Path:
    """Where the kernels are built and cached: under the dsv3 cache dir, one folder per CPU model,
    CPU flags and torch version."""
    from dsv3.device import cpu_model, default_cache_dir

    key = hashlib.sha256(f"{cpu_model()}|{_cpu_flags()}|{torch.__version__}".encode()).hexdigest()[:12]
    return Path(default_cache_dir()) / "kernels" / f"cpu_kernels_{key}"


def _cpu_flags() -> str:
    try:
        return next(
            (
                line
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith(("flags", "Features"))
            ),
            "",
        )
    except OSError:
        return platform.processor()
