"""Training checkpoints of model and optimizer state, for any layout.

`save(pm, optimizer, folder, model_config)` / `load(pm, optimizer, folder)` are what the trainer
calls. When one process holds the whole model (every parallel dimension 1) the state is written
in the Hugging Face layout (config.json + model.safetensors, readable by `dsv3 generate` and
transformers) plus optimizer.pt; otherwise as distributed checkpoint shards (below). `load` reads
either: DCP shards into any layout, the HF layout into one process.

Distributed checkpoints (torch.distributed.checkpoint, DCP) load into any layout.

Every rank writes only its shards, in parallel, into one folder (`__<rank>_0.distcp` files plus
DCP's `.metadata`); the names are the *single-process model's* parameter names and the global
shapes are the full model's, so a checkpoint saved with one layout (ep=4, FSDP, pp=2 ...) loads
into any other, including one process: DCP reads, for each tensor a rank asks for, just the
overlapping pieces of the saved shards.

The layout-free view (`_layout_free`), per parameter (and each Adam moment, stored as
`optim.<name>.exp_avg` / `.exp_avg_sq` / `.step`):
  * dense parameters: FSDP2's own DTensors (Shard(0) over dp_shard, replicated over dp_replicate),
    or plain tensors without FSDP;
  * routed experts under EP: each rank's E/ep rows are first gathered over the experts' FSDP ranks
    (efsdp), then described as a DTensor sharded on dim 0 over the 1-D `ep` mesh, whose global
    shape is the full [E, ...]. (FSDP's efsdp shards sit *inside* each ep slice, which a single
    DTensor placement cannot express as rows of [E, ...] without a strided shard, so the
    gather keeps the description to one plain Shard(0) that DCP and gloo handle.) The gather
    costs one expert-weight all-gather over efsdp per save; replicas are de-duplicated by DCP.
On load the same view is built for the current layout, DCP fills it, and each rank copies its
part back into its parameters and optimizer state.

Atomic like every checkpoint (dsv3/checkpoint.py, whose folder logic is reused):
rank 0 creates the temporary folder and shares its name, all ranks write their shards into it,
and after DCP's final barrier rank 0 adds the trainer state and the manifest and renames the
folder; `latest` moves last. The folder must be on a file system all ranks see (one node, or a
shared mount across nodes).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dsv3.parallel.parallelize import ParallelModel


def _is_expert(name: str) -> bool:
    return ".experts." in name


def _layout_free(pm: ParallelModel, optimizer: torch.optim.Optimizer | None, init_state: bool = False):
    """{name: tensor in a layout-free description} and, for the experts, the (param/state, view)
    pairs to copy back after a load."""
    from torch.distributed.tensor import DTensor, Shard

    def view(name: str, t: torch.Tensor) -> torch.Tensor:
        if pm.dims.ep > 1 and _is_expert(name):
            local = t.full_tensor() if isinstance(t, DTensor) else t  # [E/ep, ...] over efsdp
            return DTensor.from_local(local.detach().clone(), pm.mesh["ep"], [Shard(0)], run_check=False)
        return t.detach() if isinstance(t, nn.Parameter) else t

    pm.reshard()  # the sharded parameters are the optimizer's keys
    sd, copies = {}, []
    for name, p in pm.named_parameters():
        sd[name] = view(name, p)
        if pm.dims.ep > 1 and _is_expert(name):
            copies.append((p, sd[name]))
        if optimizer is None:
            continue
        state = optimizer.state[p]
        if init_state and not state:  # a fresh optimizer: give DCP tensors to fill (AdamW's format)
            state.update(
                step=torch.zeros((), dtype=torch.float32),
                exp_avg=torch.zeros_like(p),
                exp_avg_sq=torch.zeros_like(p),
            )
        for key, value in state.items():
            sd[f"optim.{name}.{key}"] = view(name, value) if value.ndim else value
            if _is_expert(name) and value.ndim and pm.dims.ep > 1:
                copies.append((value, sd[f"optim.{name}.{key}"]))
    for module in pm.modules:
        sd.update(_persistent(module))
    return sd, copies


def _persistent(module: nn.Module):
    """Persistent buffers (the routers' e_score_correction_bias), by full-model name."""
    skip = {
        f"{prefix}.{b}".lstrip(".")
        for prefix, m in module.named_modules()
        for b in m._non_persistent_buffers_set
    }
    return [(n, b) for n, b in module.named_buffers() if n not in skip]


def save(pm: ParallelModel, optimizer: torch.optim.Optimizer, folder: Path, model_config) -> None:
    """All ranks: write this rank's part of model and optimizer into `folder` (collective)."""
    if pm.dims.world_size == 1:
        from dsv3.hf import write_pretrained

        write_pretrained(pm.modules[0], folder)
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        return
    import torch.distributed.checkpoint as dcp

    sd, _ = _layout_free(pm, optimizer)
    dcp.save(sd, checkpoint_id=str(folder))
    if dist.get_rank() == 0:
        model_config.save(folder / "config.json")


@torch.no_grad()
def load(pm: ParallelModel, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """All ranks: fill model and optimizer from a checkpoint (collective): DCP shards saved with
    any layout, or a one-process checkpoint into one process."""
    if not (folder / ".metadata").is_file():
        _load_whole(pm, optimizer, folder)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor, distribute_tensor

    sd, copies = _layout_free(pm, optimizer, init_state=True)
    dcp.load(sd, checkpoint_id=str(folder))
    for target, loaded in copies:  # experts: this rank's [E/ep] rows -> its efsdp shard
        local = loaded.to_local()
        if isinstance(target, DTensor):
            local = distribute_tensor(local, target.device_mesh, target.placements)
        target.copy_(local)


def _load_whole(pm: ParallelModel, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    from dsv3.errors import CheckpointError
    from dsv3.model.transformer import Transformer

    if pm.dims.world_size != 1:
        raise CheckpointError(
            f"{folder} is a one-process checkpoint; resume it with one process (without "
            "torchrun and parallel flags), or from a checkpoint saved under torchrun"
        )
    model = pm.modules[0]
    saved = Transformer.from_pretrained(folder, device=next(model.parameters()).device)
    model.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(
        torch.load(folder / "optimizer.pt", map_location=next(model.parameters()).device)
    )


@torch.no_grad()
def full_state_dict(pm: ParallelModel) -> dict[str, torch.Tensor] | None:
    """The full single-process state dict (CPU) on global rank 0, None elsewhere (collective)."""
    from torch.distributed.tensor import DTensor

    sd = {}
    for name, p in pm.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        if pm.dims.ep > 1 and _is_expert(name):
            parts = [torch.empty_like(t) for _ in range(pm.dims.ep)]
            dist.all_gather(parts, t.contiguous(), group=pm.mesh["ep"].get_group())
            t = torch.cat(parts)
        sd[name] = t.cpu()
    for module in pm.modules:
        sd.update((n, b.cpu()) for n, b in _persistent(module))
    if pm.dims.pp == 1:
        return sd if dist.get_rank() == 0 else None
    if pm.mesh["dp"].get_local_rank() != 0:  # one copy per pp stage group: the dp-rank-0 ranks
        return None
    group = pm.mesh["pp"].get_group()
    gathered = [None] * pm.dims.pp if dist.get_rank() == 0 else None
    dist.gather_object(sd, gathered, dst=0, group=group)
    if gathered is None:
        return None
    return {k: v for part in gathered for k, v in part.items()}
