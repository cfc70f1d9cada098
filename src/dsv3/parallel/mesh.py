"""Parallel dimensions and the device mesh they build (DeepSeek-V3's layout: no tensor parallelism).

    world = pp x dp_replicate x dp_shard          dp_shard = efsdp x ep

* pp: pipeline stages (parallel/pipeline.py). With DualPipeV each pp rank holds two stages.
* dp_replicate x dp_shard: data parallelism. Every dp rank reads its own slice of the global batch;
  dense parameters are sharded by FSDP2 over dp_shard and replicated over dp_replicate (HSDP when
  both are > 1, plain FSDP / ZeRO-3 when dp_replicate = 1).
* ep: expert parallelism is carved out of dp_shard, as in torchtitan: the ep ranks are dp ranks
  (each has its own tokens) that additionally split the routed experts, E/ep contiguous experts
  each, and exchange tokens with all-to-all. The experts' own data-parallel group is what remains,
  efsdp = dp_shard / ep (FSDP2 shards each rank's E/ep experts over it), times dp_replicate.

Mesh dims, outermost first: ("pp", "dp_replicate", "efsdp", "ep"). ep is innermost so that an EP
group is a run of consecutive ranks, i.e. it spans ep / ranks_per_node whole nodes with torchrun's
usual rank order; flattened views "dp_shard" (efsdp x ep) and "dp" (dp_replicate x dp_shard)
serve FSDP and the data loader. Example, 8 ranks as pp=2, dp_shard=4, ep=2:
    pp 0: ranks 0-3 (dp ranks 0-3; EP pairs {0,1} {2,3}; efsdp pairs {0,2} {1,3}), pp 1: ranks 4-7.

Node-limited routing (V3R section 2.1.2) needs the expert groups aligned with nodes: ranks_per_node
must divide ep (the EP group covers whole nodes) and n_group must be a multiple of the nodes in an
EP group, so that each node holds whole groups and "at most topk_group groups" means "at most
topk_group nodes". `ParallelDims.validate` checks all of it (the EP rules with
expert_parallel.check_expert_parallel_layout) before any process group is touched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from dsv3.config import ModelConfig
from dsv3.errors import ConfigError

MESH_DIMS = ("pp", "dp_replicate", "efsdp", "ep")
PP_SCHEDULES = ("1f1b", "dualpipev")


@dataclass
class ParallelDims:
    """Sizes of the parallel dimensions; -1 = automatic: dp_shard takes the ranks left after pp and
    dp_replicate (dp_replicate = 1 when both are automatic), dp_replicate those left after dp_shard."""

    dp_replicate: int = field(
        default=-1,
        metadata={"help": "data-parallel replicas (HSDP; -1: 1, or the ranks left after dp_shard)"},
    )
    dp_shard: int = field(
        default=-1,
        metadata={"help": "data-parallel FSDP shards (-1: the ranks left after pp and dp_replicate)"},
    )
    ep: int = field(
        default=1,
        metadata={
            "help": "expert-parallel ranks, carved from dp_shard (must divide it and n_routed_experts)"
        },
    )
    pp: int = field(
        default=1, metadata={"help": "pipeline stages (ranks); dualpipev puts two stages on each"}
    )
    pp_schedule: str = field(default="1f1b", metadata={"help": "pipeline schedule", "choices": PP_SCHEDULES})
    pp_microbatches: int | None = field(
        default=None, metadata={"help": "microbatches per pipeline step (default: the number of stages)"}
    )
    ranks_per_node: int | None = field(
        default=None,
        metadata={"help": "EP ranks per node, for node-limited routing and cross-node byte counts"},
    )

    def resolve(self, world_size: int) -> ParallelDims:
        """A copy with the -1 sizes filled from the world size; raises ConfigError on a mismatch."""
        for name in ("ep", "pp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be a positive integer")
        dims = {"dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard}
        if dims["dp_replicate"] == -1 and dims["dp_shard"] == -1:
            dims["dp_replicate"] = 1
        for name, value in dims.items():
            if value == 0 or value < -1:
                raise ConfigError(f"{name}={value}: must be a positive integer or -1 (automatic)")
        known = self.pp * max(1, dims["dp_replicate"]) * max(1, dims["dp_shard"])
        if world_size % known:
            raise ConfigError(
                f"world size {world_size} is not divisible by pp x dp_replicate x dp_shard = {known} "
                f"(pp={self.pp}, dp_replicate={dims['dp_replicate']}, dp_shard={dims['dp_shard']})"
            )
        for name, value in dims.items():
            if value == -1:
                dims[name] = world_size // known
        out = dataclasses.replace(self, **dims)
        if out.world_size != world_size:
            raise ConfigError(
                f"pp={out.pp} x dp_replicate={out.dp_replicate} x dp_shard={out.dp_shard} = "
                f"{out.world_size} ranks, but the world size is {world_size} "
                f"(launch with --nproc-per-node x --nnodes = {out.world_size}, or change the sizes)"
            )
        return out

    # ---------------------------------------------------------------- derived sizes
    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def efsdp(self) -> int:
        return self.dp_shard // self.ep

    @property
    def num_stages(self) -> int:
        return self.pp * (2 if self.pp_schedule == "dualpipev" else 1) if self.pp > 1 else 1

    @property
    def microbatches(self) -> int:
        return self.pp_microbatches or self.num_stages

    def validate(self, model: ModelConfig, batch_size: int | None = None) -> None:
        """Check the (resolved) dims against the model and the global batch; ConfigError names the rule."""
        if self.dp_shard % self.ep:
            raise ConfigError(
                f"ep={self.ep} must divide dp_shard={self.dp_shard}: expert-parallel ranks are carved "
                f"from the data-parallel shard ranks (world = pp x dp_replicate x dp_shard)"
            )
        if self.ep > 1 or self.ranks_per_node is not None:
            from dsv3.parallel.expert_parallel import check_expert_parallel_layout

            if not model.num_moe_layers:
                raise ConfigError(f"ep={self.ep}: the model has no MoE layers to split")
            group_limited = model.routing_method.group_limited
            try:
                check_expert_parallel_layout(
                    model.n_routed_experts, model.n_group, self.ep, self.ranks_per_node, group_limited
                )
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.pp_schedule not in PP_SCHEDULES:
            raise ConfigError(f"pp_schedule={self.pp_schedule!r}: must be one of {PP_SCHEDULES}")
        if self.pp > 1:
            if model.num_hidden_layers < self.num_stages:
                raise ConfigError(
                    f"pp={self.pp} with {self.pp_schedule} needs {self.num_stages} stages but the model "
                    f"has only num_hidden_layers={model.num_hidden_layers}"
                )
            if model.tie_word_embeddings:
                raise ConfigError(
                    "pp > 1 with tie_word_embeddings: the embedding and head sit on different stages"
                )
            if self.microbatches < self.num_stages:
                raise ConfigError(
                    f"pp_microbatches={self.microbatches}: {self.pp_schedule} needs at least "
                    f"{self.num_stages} microbatches (one per stage)"
                )
        if batch_size is not None:
            per_rank, rest = divmod(batch_size, self.dp)
            if rest or per_rank % self.microbatches:
                raise ConfigError(
                    f"batch_size={batch_size} must split into dp={self.dp} ranks x "
                    f"{self.microbatches} pipeline microbatches of whole sequences"
                )


def build_mesh(dims: ParallelDims, device_type: str = "cpu"):
    """The DeviceMesh over all ranks (process group must be initialized), with flattened views
    "dp_shard" (efsdp x ep) and "dp" (dp_replicate x efsdp x ep)."""
    import warnings

    from torch.distributed.device_mesh import init_device_mesh

    # torch 2.13 announces that slicing flattened dims ("dp", "dp_shard") from the root mesh will
    # be deprecated; it is still the documented way FSDP2 takes a (replicate, shard) mesh
    warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh", category=UserWarning)

    mesh = init_device_mesh(
        device_type, (dims.pp, dims.dp_replicate, dims.efsdp, dims.ep), mesh_dim_names=MESH_DIMS
    )
    mesh["efsdp", "ep"]._flatten("dp_shard")
    mesh["dp_replicate", "efsdp", "ep"]._flatten("dp")
    return mesh


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" and torch.cuda.is_available() else "gloo"
