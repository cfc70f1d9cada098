"""FSDP2 (`fully_shard`) over the dense parts and the experts: ZeRO-3-style data parallelism.

Each parameter becomes a DTensor sharded on dim 0 over the data-parallel ranks; a module's
parameters are all-gathered just before its forward (and again before backward when resharded
after forward), and gradients are reduce-scattered back to the shards. The units are:

    each Block's routed experts   over the experts' data-parallel ranks: (dp_replicate, efsdp)
    each MTP module's shared_head.norm over (dp_replicate, dp_shard) (it runs outside the block's forward)
    each Block (the rest of it)    over (dp_replicate, dp_shard)
    the root (embedding, final norm, head, MTP's own parameters when not in a unit)

With dp_replicate > 1 a 2-D mesh makes it HSDP (shard inside, all-reduce across replicas).

Routed experts under EP are different tensors on each ep rank, so their gradient reduction runs
over efsdp only, where FSDP would divide by efsdp x dp_replicate; but each rank's objective is its
share of a loss averaged over all dp ranks (parallel/objective.py), so the experts' gradients are
divided by the whole dp size like every other parameter (`set_gradient_divide_factor`), as
torchtitan does.

Mixed precision (`MixedPrecisionPolicy`): training in bf16 gathers parameters in bf16 and reduces
gradients in fp32; the sharded master weights and the optimizer stay fp32. In fp32 nothing is cast.

reshard_after_forward: "default" frees gathered parameters after forward (ZeRO-3) except for the
root and when pipelining (a stage runs forward once per microbatch: resharding would all-gather
again for every one); "always" / "never" force it.
"""

from __future__ import annotations

import torch
from torch import nn

RESHARD_CHOICES = ("default", "always", "never")


def apply_fsdp(
    modules: list[nn.Module],
    mesh,
    *,
    dp: int,
    param_dtype: torch.dtype = torch.float32,
    reshard: str = "default",
    pipelined: bool = False,
) -> None:
    """fully_shard each Block's experts, each Block, then each (stage) module in `modules`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from dsv3.model.block import Block
    from dsv3.model.moe import MoE
    from dsv3.model.mtp import MTPModule

    if reshard not in RESHARD_CHOICES:
        raise ValueError(f"reshard={reshard!r}: must be one of {RESHARD_CHOICES}")
    replicate = mesh["dp_replicate"].size() > 1
    dense_mesh = mesh["dp_replicate", "dp_shard"] if replicate else mesh["dp_shard"]
    expert_mesh = mesh["dp_replicate", "efsdp"] if replicate else mesh["efsdp"]
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    per_block = {"default": not pipelined, "always": True, "never": False}[reshard]
    for module in modules:
        for block in (m for m in module.modules() if isinstance(m, Block)):
            if isinstance(block, MTPModule):  # its head norm runs after the block's forward
                fully_shard(
                    block.shared_head.norm, mesh=dense_mesh, mp_policy=policy, reshard_after_forward=per_block
                )
            if isinstance(block.mlp, MoE):
                experts = fully_shard(
                    block.mlp.experts, mesh=expert_mesh, mp_policy=policy, reshard_after_forward=per_block
                )
                experts.set_gradient_divide_factor(float(dp))
            fully_shard(block, mesh=dense_mesh, mp_policy=policy, reshard_after_forward=per_block)
        fully_shard(module, mesh=dense_mesh, mp_policy=policy, reshard_after_forward=reshard == "always")
