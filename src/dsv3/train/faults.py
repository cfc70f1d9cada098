"""What goes wrong in a long run, and how the trainer notices: non-finite steps, replicas that stopped
agreeing (silent data corruption), and the hooks the tests use to cause both and to kill a rank.

* Non-finite steps: after the backward, the step's losses and the global gradient norm must be
  finite; `nonfinite` names what is not (a loss, or the first parameter with a NaN/Inf gradient),
  and the trainer applies `--on-nonfinite`: stop with that message, skip the step (no optimizer
  update, no bias update), or roll back to the last checkpoint and go on with the batches after
  the bad one.
* Silent data corruption (ISCA sec. 6.1: errors ECC does not catch): data-parallel replicas hold
  bit-equal weights, so every `--sdc-check-every` steps `check_replicas` compares an integer
  checksum of each rank's local weights over the ranks that must agree (the dp_replicate ranks for
  FSDP shards, every dp rank for unsharded weights and the routers' biases) and names the rank(s)
  that differ from the majority (all of them when there is none).
* Test hooks (environment): DSV3_FAULT_AT_STEP=K (and DSV3_FAULT_RANK=R, default the last rank)
  kills rank R with SIGKILL after step K on torchrun's first attempt; DSV3_FAULT_BITFLIP_AT_STEP=K
  flips a bit of a weight on the last rank after step K.
"""

from __future__ import annotations

import math
import os
import signal

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN or Inf; the message names the step and the tensor."""


class ReplicaMismatchError(RuntimeError):
    """Data-parallel replicas hold different weights (silent data corruption); names the rank."""


def nonfinite(losses: dict[str, float], grad_norm: float, modules) -> str | None:
    """None if the step is finite, else what was not: a loss, or the first parameter whose
    gradient is NaN/Inf on this rank."""
    for name, value in losses.items():
        if not math.isfinite(value):
            return f"{name}={value}"
    if math.isfinite(grad_norm):
        return None
    for module in modules:
        for name, p in module.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad.detach()).all():
                return f"the gradient of {name}"
    return f"grad_norm={grad_norm}"


@torch.no_grad()
def check_replicas(pm, mesh, step: int) -> None:
    """Raise ReplicaMismatchError unless every replica of every weight is bit-equal (collective)."""
    sharded = [p.to_local() for p in pm.parameters() if isinstance(p, DTensor)]
    replicated = [p for p in pm.parameters() if not isinstance(p, DTensor)]
    replicated += [b for m in pm.modules for n, b in m.named_buffers() if "e_score_correction_bias" in n]
    for what, tensors, dim in (("sharded weights", sharded, "dp_replicate"), ("weights", replicated, "dp")):
        group = mesh[dim]
        if group.size() == 1 or not tensors:
            continue
        sums = [None] * group.size()
        dist.all_gather_object(sums, _checksum(tensors), group=group.get_group())
        majority = max(set(sums), key=sums.count)
        bad = [i for i, s in enumerate(sums) if s != majority]
        if bad and 2 * sums.count(majority) <= len(sums):  # no majority: every replica is suspect
            bad = list(range(len(sums)))
        if bad:
            ranks = [dist.get_global_rank(group.get_group(), i) for i in bad]
            raise ReplicaMismatchError(
                f"step {step}: the {what} of rank(s) {ranks} differ from their replicas "
                f"(checksums {sums}): silent data corruption or a diverged replica"
            )


def _checksum(tensors: list[torch.Tensor]) -> int:
    """The sum of the tensors' bits read as integers: any flipped bit changes it."""
    total = 0
    for t in tensors:
        ints = (
            t.detach()
            .contiguous()
            .view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
        )
        total += int(ints.to(torch.int64).sum())
    return total


def inject_faults(step: int, world, pm) -> None:
    """The test hooks of the module docstring, after optimizer step `step`."""
    rank, last = world.rank, world.size - 1
    at = os.environ.get("DSV3_FAULT_AT_STEP")
    if at is not None and int(at) == step and world.restart_count == 0:
        if rank == int(os.environ.get("DSV3_FAULT_RANK", last)):
            print(f"DSV3_FAULT_AT_STEP={at}: rank {rank} kills itself (test hook)", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    flip = os.environ.get("DSV3_FAULT_BITFLIP_AT_STEP")
    if flip is not None and int(flip) == step and rank == last:
        with torch.no_grad():
            p = next(iter(pm.parameters()))
            p = p.to_local() if isinstance(p, DTensor) else p
            p.view(-1).view(torch.int32)[0] ^= 1 << 20
        print(f"DSV3_FAULT_BITFLIP_AT_STEP={flip}: rank {rank} flipped a weight bit (test hook)", flush=True)
