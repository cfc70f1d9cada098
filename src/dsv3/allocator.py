"""Keep freed CPU memory for reuse instead of handing it back to the operating system.

CPU tensors come from the C library's malloc. glibc maps a large block (above its mmap
threshold: 128 KB, rising with the blocks freed to at most 32 MB) fresh from the kernel and unmaps
it when it is freed, and gives the top of its heap back once more than a threshold of it is free.
The next tensor of the same size then writes to pages the kernel has to supply again: one page
fault per 4 KB, a few microseconds each in a virtual machine, more than the copy that fills them.
A training step allocates and frees the same large tensors every step: autocast's BF16 copies of
the weights, the weight gradients in BF16 and FP32, the head's [vocab, hidden] buffers. Measured
on a 2-core AMD EPYC VM (torch 2.13, two threads), per call:

    FP32 -> BF16 copy of [32, 512, 512] (small's experts)   6.7 ms, 1,229 faults -> 0.5 ms, 0
    FP32 -> BF16 copy of [32768, 512] (small's head)       12.3 ms, 8,193 faults -> 1.3 ms, 0

and the small preset trains 10% faster (benchmarks/README.md, fourteenth session).

`retain_freed_memory()` has glibc serve every block from its heap (M_MMAP_MAX = 0) and never trim
the heap (M_TRIM_THRESHOLD), so a freed block is reused with its pages still mapped: the policy of
PyTorch's CUDA caching allocator, and what the jemalloc and tcmalloc settings that PyTorch's CPU
performance guide recommends amount to. The process then keeps its high-water mark of memory,
and a little more: a freed block falls just short of an aligned allocation of the same size until
it merges with a neighbour, so the heap grows by a few blocks before it settles (small's training:
peak RSS 4.89-4.93 -> 4.94-4.95 GB). The `dsv3` command calls it at start; a program using dsv3 as
a library may call it too. Elsewhere than glibc it does nothing and says so by returning False.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: free heap top kept up to 2 GiB


def retain_freed_memory() -> bool:
    """Make glibc keep freed blocks mapped for reuse; True where it took effect."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
