"""Turn a single-device Transformer built on `meta` into this rank's part of a parallel run.

    with torch.device("meta"):
        model = Transformer(cfg)
    pm = parallelize(model, dims, mesh, device=..., init=reference_weights(cfg, seed))

One fixed order, each step swapping or wrapping modules of the (still empty) model, each skipped
when its dimension is 1 (so one process gets the plain model):
    1. pipeline split   keep this pp rank's stages: the model with parts removed (parallel/pipeline.py)
    2. expert parallel  each MoE keeps E/ep experts and gets the all-to-all dispatcher (optionally
                        overlapped: the shared expert runs while the tokens travel, parallel/overlap.py)
    3. FP8 (optional)   linears and experts compute in FP8 (fp8/linear.py), same parameters
    4. activation checkpointing (optional)  recompute each block's attention in backward
    5. torch.compile (optional)  per block, in place (parameter names unchanged)
    6. FSDP2            shard experts, blocks and the root over the dp ranks (parallel/fsdp.py)
then the parameters are allocated on the device (`to_empty`) and filled.

Same start for every layout: `reference_weights` builds the full model on the CPU under the seed
(the weights one process would train), and every rank copies its slice of every tensor
(its experts' rows under EP, its FSDP shard via `distribute_tensor`). Cheap for models that fit
in host memory; beyond that the scaling path is a seed checkpoint: initialize once, save it with
parallel/checkpoint.py (DCP), and let every rank load only its shards.

Activation checkpointing covers the attention sub-layer (norm + MLA), the part V3 recomputes
(V3R section 3.2.3: RMSNorm and MLA up-projections); the MoE is not recomputed, because its
router counts expert loads as a side effect and its all-to-alls would run twice.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.parallel.mesh import ParallelDims


@dataclass
class ParallelModel:
    """What this rank runs: its modules (the whole model, or its pipeline stages) and the schedule."""

    modules: list[nn.Module]
    dims: ParallelDims
    mesh: object
    stage_ids: list[int] = field(default_factory=lambda: [0])
    schedule: object | None = None  # a torch.distributed.pipelining schedule when pp > 1
    loss: object | None = None  # its StageLoss, on the rank holding the last stage

    def parameters(self):
        for m in self.modules:
            yield from m.parameters()

    def named_parameters(self):
        for m in self.modules:
            yield from m.named_parameters()

    def reshard(self) -> None:
        """Free FSDP's gathered parameters (left gathered by a forward without backward)."""
        from torch.distributed.fsdp import FSDPModule

        for m in self.modules:
            for sub in m.modules():
                if isinstance(sub, FSDPModule):
                    sub.reshard()

    def train(self, mode: bool = True) -> None:
        for m in self.modules:
            m.train(mode)

    @property
    def has_last_stage(self) -> bool:
        return self.dims.pp == 1 or self.dims.num_stages - 1 in self.stage_ids


def reference_weights(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the single-process model initialized under `seed` (CPU)."""
    from dsv3.model.transformer import Transformer

    torch.manual_seed(seed)
    return weights_of(Transformer(cfg))


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a whole model by name: what `parallelize` fills a rank's part from."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def parallelize(
    model: nn.Module,
    dims: ParallelDims,
    mesh,
    *,
    device: torch.device,
    init: dict[str, torch.Tensor],
    param_dtype: torch.dtype = torch.float32,
    activation_checkpoint: bool = False,
    compile: bool = False,
    fp8: str | None = None,
    fp8_dispatch: bool = False,
    ep_overlap: bool = False,
    reshard: str = "default",
    microbatch: tuple[int, int] | None = None,
) -> ParallelModel:
    """Apply pp -> EP -> FP8 -> AC -> compile -> FSDP to `model` (on meta), then fill it from `init`.
    fp8: a scale format ("pow2", "fp32", "ue8m0") to run the linears and experts in FP8, or None.
    ep_overlap: the expert-parallel MoEs run their shared expert while the all-to-all is in flight.
    With pp > 1, `microbatch` = (sequences, seq_len) of one pipeline microbatch on one dp rank."""
    from dsv3.model.block import Block

    pm = ParallelModel([model], dims, mesh)
    if dims.pp > 1:  # 1. pipeline split
        from dsv3.parallel.pipeline import build_pipeline

        pm.stage_ids, pm.modules = build_pipeline(
            model, mesh["pp"].get_local_rank(), dims.pp, dims.pp_schedule
        )
    if dims.ep > 1:  # 2. expert parallelism
        from dsv3.parallel.expert_parallel import apply_expert_parallel

        for module in pm.modules:
            apply_expert_parallel(
                module, mesh["ep"], fp8_dispatch=fp8_dispatch, ranks_per_node=dims.ranks_per_node
            )
            if ep_overlap:
                from dsv3.parallel.overlap import apply_dispatch_overlap

                apply_dispatch_overlap(module)
    if fp8 is not None:  # 3. FP8 linears and experts (same Parameters and names)
        from dsv3.fp8.linear import convert_to_fp8

        for module in pm.modules:
            convert_to_fp8(module, fmt=fp8)
    blocks = [b for m in pm.modules for b in m.modules() if isinstance(b, Block)]
    if activation_checkpoint:  # 4.
        for block in blocks:
            _checkpoint_attention(block)
    if compile:  # 5.
        for block in blocks:
            block.compile()
    if dims.dp > 1:  # 6. FSDP2
        from dsv3.parallel.fsdp import apply_fsdp

        apply_fsdp(
            pm.modules, mesh, dp=dims.dp, param_dtype=param_dtype, reshard=reshard, pipelined=dims.pp > 1
        )
    for module in pm.modules:
        module.to_empty(device=device)
        load_full_state(module, init, dims, mesh)
    if dims.pp > 1:
        from dsv3.parallel.pipeline import StageLoss, build_schedule

        last = [m for m in pm.modules if m.lm_head is not None]
        pm.loss = StageLoss(last[0], model.cfg.num_nextn_predict_layers) if last else None
        act_dtype = param_dtype if dims.dp > 1 else torch.float32  # FSDP's mixed precision casts activations
        pm.schedule = build_schedule(
            pm.modules, pm.stage_ids, dims, microbatch, act_dtype, mesh["pp"].get_group(), device, pm.loss
        )
    return pm


@torch.no_grad()
def load_full_state(module: nn.Module, full: dict[str, torch.Tensor], dims: ParallelDims, mesh) -> None:
    """Copy this rank's part of the full (single-process) tensors into `module`'s parameters and
    buffers: rows of its experts under EP, then its FSDP shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in module.named_parameters():
        value = full[name]
        if dims.ep > 1 and p.shape[0] != value.shape[0]:  # EP: this rank's E/ep experts
            n = p.shape[0]
            first = mesh["ep"].get_local_rank() * n
            value = value[first : first + n]
        if isinstance(p, DTensor):
            value = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
        p.copy_(value)
    for name, b in module.named_buffers():
        b.copy_(full[name])


def _checkpoint_attention(block: nn.Module) -> None:
    """Recompute norm + MLA of `block` in backward (module names unchanged)."""
    from torch.utils.checkpoint import checkpoint

    attn, norm = block.self_attn, block.input_layernorm
    for module in (attn, norm):
        module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False)
