"""dsv3.infer.autotune: Inductor's GEMM candidates are timed with their operands out of cache."""

import time

import torch
from torch._inductor.runtime.benchmarking import benchmarker

from dsv3.infer import autotune


def test_each_timed_call_follows_a_flush_and_the_timer_is_restored(monkeypatch):
    monkeypatch.setattr(autotune, "FLUSH_BYTES", 1 << 16)
    calls, original = [], benchmarker.benchmark_cpu
    with autotune.cold_cache_timing() as timed:
        ms = benchmarker.benchmark_cpu(lambda: calls.append(time.perf_counter()) or time.sleep(0.002))
    assert len(calls) == autotune.TIMED_CALLS + 1  # one untimed call first
    assert timed == [ms] and 2 <= ms < 100  # milliseconds, as Inductor's timer returns
    assert benchmarker.benchmark_cpu == original


def test_inductor_autotunes_a_decode_gemm_through_it(monkeypatch):
    """The seam is a torch internal: if Inductor stopped timing CPU candidates through
    `benchmarker.benchmark_cpu`, the engine's GEMM choice would silently go back to cached timings."""
    monkeypatch.setattr(autotune, "FLUSH_BYTES", 1 << 20)
    torch._dynamo.reset()
    linear = torch.nn.Linear(256, 1024, bias=False)
    x = torch.randn(1, 256)
    with (
        torch.no_grad(),
        torch._inductor.config.patch(freezing=True, force_disable_caches=True, **autotune.GEMM_TEMPLATES),
        autotune.cold_cache_timing() as timed,
    ):
        out = torch.compile(linear)(x)
    torch.testing.assert_close(out, linear(x))
    assert len(timed) >= 2  # the library call and the template, each timed here
