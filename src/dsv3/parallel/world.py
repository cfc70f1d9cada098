"""The process group every run has: torchrun's ranks, or one process as a world of size 1.

The trainer always runs inside a process group, so that one process is simply the world of size 1
and the torchrun path and the plain path are the same code (collectives over one rank cost
microseconds). `World.join()` uses the group that exists, else torchrun's environment (env://,
keyed by torchrun's restart count so a restarted worker never reads a dead attempt's addresses),
else a private in-memory store for a single process; NCCL on GPUs, gloo on CPUs. Collectives get a
timeout (DSV3_COLLECTIVE_TIMEOUT_S, default 600 s), so a rank that dies makes the others fail with
an error instead of hanging forever.

Rank 0 decides what all ranks must agree on (the checkpoint to resume, a tokenizer trained once,
the wall clock that ends a run): `on_rank0(fn)` runs fn there and shares its result, or its
exception, with every rank.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def restart_count(self) -> int:
        """How many times torchrun restarted this job (0 on the first attempt)."""
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    @staticmethod
    def expected_size() -> int:
        """The world size before joining it: torchrun's WORLD_SIZE, else the process group's, else 1
        (so that bad layouts fail before any process group exists)."""
        if "WORLD_SIZE" in os.environ:
            return int(os.environ["WORLD_SIZE"])
        return dist.get_world_size() if dist.is_initialized() else 1

    @classmethod
    def join(cls, device: torch.device) -> World:
        """This process's place in the world, initializing the default process group if needed."""
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            timeout = timedelta(seconds=float(os.environ.get("DSV3_COLLECTIVE_TIMEOUT_S", "600")))
            if device.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            if "MASTER_ADDR" in os.environ:  # env:// (torchrun)
                store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
                attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
                store = dist.PrefixStore(f"dsv3/attempt_{attempt}", store)
                dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
            else:  # one process
                dist.init_process_group(
                    backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
                )
            atexit.register(_leave)  # NCCL warns (and may leak) when a group outlives the program
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        return cls(dist.get_rank(), dist.get_world_size(), device)

    # ------------------------------------------------------------------ agreeing
    def on_rank0(self, fn: Callable[..., T], *args: Any, then_others: bool = False) -> T:
        """Run fn on rank 0 and share its result or its error with every rank (so all fail with the
        same message); with then_others, the other ranks then run fn too (caches built once)."""
        outcome: list[Any] = [None, None]
        if self.is_main:
            try:
                outcome[0] = fn(*args)
            except Exception as e:  # shared, then raised everywhere
                outcome[1] = e
        if self.size > 1:
            dist.broadcast_object_list(outcome, src=0)
        if outcome[1] is not None:
            raise outcome[1]
        return fn(*args) if then_others and not self.is_main else outcome[0]

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce(self, t: torch.Tensor, group=None) -> torch.Tensor:
        """Sum `t` over the ranks of `group` (default: all), in place."""
        if self.size > 1:
            dist.all_reduce(t, group=group)
        return t

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()
