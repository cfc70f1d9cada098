"""Run a function in N local processes joined by a gloo process group (CPU distributed tests).

    def check(rank, world_size, n):        # module level, so that spawned children can import it
        ...                                  # torch.distributed is initialized here
    results = run_distributed(check, 2, 5)  # -> [check's return value on rank 0, on rank 1]

Each child gets OMP_NUM_THREADS=1 and torch.set_num_threads(1) (the tests share a few cores), a
gloo group on a free local port, and tears the group down at the end. A failure in any child
raises in the caller with that child's traceback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fixtures import free_port


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, env: dict[str, str] | None = None
) -> list[Any]:
    """Run fn(rank, world_size, *args) in world_size gloo processes; return the per-rank results
    (picklable values). env: extra environment variables for the children."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    child_env = {"OMP_NUM_THREADS": "1", **(env or {})}
    saved = {k: os.environ.get(k) for k in child_env}
    os.environ.update(child_env)  # spawned children inherit the parent's environment
    try:
        mp.start_processes(
            _child,
            args=(world_size, free_port(), fn, args, results),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    by_rank = dict(results.get() for _ in range(world_size))
    return [by_rank[r] for r in range(world_size)]


def _child(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results) -> None:
    torch.set_num_threads(1)
    timeout = timedelta(
        seconds=float(os.environ.get("DSV3_COLLECTIVE_TIMEOUT_S", "120"))
    )  # a hang fails fast
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timeout
    )
    try:  # an exception here reaches the caller as ProcessRaisedException with this traceback
        out = fn(rank, world_size, *args)
        dist.barrier()  # no rank tears its connections down while another still talks to it
    finally:
        dist.destroy_process_group()
    results.put((rank, out))
