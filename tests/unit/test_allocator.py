"""dsv3.allocator: with freed memory retained, a large tensor allocated again every step reuses
mapped pages (no page faults); without it, glibc maps a block above 32 MB afresh each time."""

import platform
import subprocess
import sys

import pytest

from dsv3.allocator import retain_freed_memory

# faults per allocation of a 64 MB tensor, once the heap has grown to hold it (the first few
# allocations extend it: each freed block is a little short of an aligned allocation's needs until
# two of them merge)
PROBE = """
import resource, sys, torch
from dsv3.allocator import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
for _ in range(16):
    torch.zeros(16 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.zeros(16 << 20)  # 64 MB of FP32, freed at once
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt"
)


def faults_per_allocation(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return float(out.stdout)


@glibc_only
def test_retained_memory_is_reused_without_page_faults():
    pages = (64 << 20) // 4096
    assert faults_per_allocation("default") >= pages / 2  # mapped afresh: the test can fail
    assert faults_per_allocation("retain") < pages / 100


def test_retain_says_whether_it_took_effect():
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert retain_freed_memory() is expected
