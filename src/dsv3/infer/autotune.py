"""How a compiled decode step chooses its GEMM kernels: measured as decode runs them.

With max-autotune, Inductor times each GEMM of a graph two ways, the library call (oneDNN on the
packed weight) and its own C++ GEMM template, and keeps the faster. Its CPU timer calls each
candidate over and over on the same operands, so from the second call on the weight sits in the
CPU's caches. A decode step reads each weight once, from memory: the model does not fit in the
caches. Which kernel streams a weight from memory faster is a different question from which one
multiplies a cached one faster. Measured on one core of an AMD EPYC with AVX512-BF16 (one row,
BF16 weights):

| weight | cached, library / template | in a decode step, library / template |
|---|---|---|
| 8192 x 256 (tiny's head) | 99 / 98 us: a tie | 314-330 / 142 us |
| 32768 x 512 (small's head) | | template-only steps: 68 tok/s against 110 with the library |

So `cold_cache_timing` times every candidate the way decode runs it: each timed call comes after
a write over FLUSH_BYTES, more than the last-level cache, which evicts the operands.
`GEMM_TEMPLATES` is the Inductor configuration the engine compiles its steps with.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from unittest import mock

import torch

# Inductor's GEMM choice for a compiled step: its C++ template as well as the library call
GEMM_TEMPLATES = {
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    "autotune_num_choices_displayed": 0,  # else each GEMM's timings go to stderr
    "max_autotune_report_choices_stats": False,
}
FLUSH_BYTES = 64 << 20  # written before each timed call: more than a CPU's last-level cache
TIMED_CALLS = 9  # per candidate, after one untimed call (oneDNN builds its kernel there)


@contextlib.contextmanager
def cold_cache_timing() -> Iterator[list[float]]:
    """Inside, Inductor's CPU autotuning times each candidate with its operands out of cache:
    the median of TIMED_CALLS calls, each after a write over FLUSH_BYTES. Yields the list the
    candidates' times (ms) are appended to."""
    from torch._inductor.runtime.benchmarking import benchmarker

    flush, timed = [], []  # the flush buffer is made at the first timing: most calls compile nothing

    def benchmark_cpu(call, warmup: int = 0, rep: int = 0) -> float:  # milliseconds, as Inductor's
        flush[:] = flush or [torch.empty(FLUSH_BYTES // 4)]
        call()
        times = []
        for i in range(TIMED_CALLS):
            flush[0].fill_(i)
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        timed.append(1e3 * statistics.median(times))
        return timed[-1]

    with mock.patch.object(benchmarker, "benchmark_cpu", benchmark_cpu):
        yield timed
