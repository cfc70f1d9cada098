"""Expert-parallel load balancing (EPLB): redundant copies of hot experts, placed by measured load.

With expert parallelism a GPU is as slow as the sum of its experts' loads, and routing is never
perfectly even. DeepSeek-V3 deploys *redundant experts* (V3R sec. 3.4: 32 extra copies of the
most loaded experts for prefill) and re-places them from the loads it observes. This is the
algorithm DeepSeek published as EPLB, from loads [layers, E] (tokens per logical expert) to a
placement of P >= E physical expert slots on G GPUs (P/G slots each, GPU g holding slots
[g P/G, (g+1) P/G)):

Hierarchical policy (the expert groups divide the nodes; V3 prefill: 8 groups on 4 nodes):
  1. pack the expert groups onto the nodes, the same number per node, balancing group loads
     (node-limited routing keeps working: a group's experts stay on one node);
  2. inside each node, give its P/N slots to its E/N experts: one each, then each extra slot to
     the expert with the largest load per replica (load / replicas so far);
  3. pack the node's replicas onto its GPUs (P/G each), each replica carrying load / replicas.
Global policy (groups don't divide nodes; V3 decode): steps 2-3 over all experts and GPUs at once,
as if there were one group and one node.

Packing is greedy: heaviest item first, into the lightest pack that still has room (ties: the
lowest index; sorts are stable, so results are deterministic); one item per pack stays in place.

A token routed to logical expert e then goes to one of its replicas: `replica_indices` picks
replica (token index mod replica count), which splits every expert's tokens evenly over its copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ExpertPlacement:
    physical_to_logical: Tensor  # [L, P] logical expert held by each physical slot
    logical_to_physical: Tensor  # [L, E, max replicas] its physical slots, -1 padded
    replica_counts: Tensor  # [L, E] copies of each logical expert (>= 1)
    replica_rank: Tensor  # [L, P] which copy of its expert each slot holds (0 .. count-1)


def balanced_packing(weights: Tensor, n_packs: int) -> tuple[Tensor, Tensor]:
    """Per row, pack the n items into n_packs packs of n/n_packs items, balancing their weight.

    weights [R, n] -> pack [R, n] (pack of each item), slot [R, n] (its position in the pack)."""
    rows, n = weights.shape
    per_pack = n // n_packs
    if per_pack == 1:  # nothing to balance: keep every item where it is
        return torch.arange(n).repeat(rows, 1), torch.zeros(rows, n, dtype=torch.int64)
    pack = torch.empty(rows, n, dtype=torch.int64)
    slot = torch.empty(rows, n, dtype=torch.int64)
    for r in range(rows):
        totals, sizes = [0.0] * n_packs, [0] * n_packs
        for item in weights[r].argsort(descending=True, stable=True).tolist():
            p = min((q for q in range(n_packs) if sizes[q] < per_pack), key=totals.__getitem__)
            pack[r, item], slot[r, item] = p, sizes[p]
            totals[p] += weights[r, item].item()
            sizes[p] += 1
    return pack, slot


def replicate_experts(loads: Tensor, n_physical: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per row, n_physical slots for the n logical experts: one each, then every extra slot to
    the expert with the most load per replica.

    loads [R, n] -> physical_to_logical [R, P] (the first n slots are experts 0..n-1),
    replica_rank [R, P], replica_counts [R, n]."""
    rows, n = loads.shape
    phy2log = torch.arange(n_physical).remainder(n).repeat(rows, 1)  # extra slots are set below
    rank = torch.zeros(rows, n_physical, dtype=torch.int64)
    counts = torch.ones(rows, n, dtype=torch.int64)
    row = torch.arange(rows)
    for p in range(n, n_physical):
        hot = (loads / counts).argmax(dim=-1)  # [R], the first on ties
        phy2log[:, p], rank[:, p] = hot, counts[row, hot]
        counts[row, hot] += 1
    return phy2log, rank, counts


def _inverse(perm: Tensor) -> Tensor:
    """Inverse of each row's permutation [R, n]."""
    inv = torch.empty_like(perm)
    return inv.scatter_(1, perm, torch.arange(perm.shape[1]).expand_as(perm))


def _hierarchical(loads: Tensor, n_physical: int, n_groups: int, n_nodes: int, n_gpus: int):
    L, E = loads.shape
    group_size, groups_per_node = E // n_groups, n_groups // n_nodes
    log_per_node, phy_per_node, phy_per_gpu = E // n_nodes, n_physical // n_nodes, n_physical // n_gpus

    # 1. groups -> nodes; renumber experts node-major ("mlog"): node n holds [n E/N, (n+1) E/N)
    node, slot = balanced_packing(loads.view(L, n_groups, group_size).sum(-1), n_nodes)  # [L, groups]
    group_start = (node * groups_per_node + slot) * group_size  # [L, groups]
    log2mlog = (group_start[..., None] + torch.arange(group_size)).view(L, E)
    mlog2log = _inverse(log2mlog)

    # 2. replicas inside each node (one row per (layer, node))
    node_loads = loads.gather(1, mlog2log).view(L * n_nodes, log_per_node)
    phy2mlog, phy_rank, counts = replicate_experts(node_loads, phy_per_node)  # [L*N, P/N], [L*N, E/N]

    # 3. the node's replicas -> its GPUs; slot = position among the node's P/N slots
    replica_loads = (node_loads / counts).gather(1, phy2mlog)  # [L*N, P/N]
    gpu, gpu_slot = balanced_packing(replica_loads, n_gpus // n_nodes)
    slot2phy = _inverse(gpu * phy_per_gpu + gpu_slot)  # [L*N, P/N]
    node_base = (torch.arange(n_nodes) * log_per_node).repeat(L)[:, None]  # [L*N, 1]
    slot2mlog = (phy2mlog.gather(1, slot2phy) + node_base).view(L, n_physical)
    physical_to_logical = mlog2log.gather(1, slot2mlog)
    replica_rank = phy_rank.gather(1, slot2phy).view(L, n_physical)
    replica_counts = counts.view(L, E).gather(1, log2mlog)
    return physical_to_logical, replica_rank, replica_counts


def rebalance_experts(
    loads: Tensor, n_physical: int, n_groups: int, n_nodes: int, n_gpus: int
) -> ExpertPlacement:
    """Place n_physical expert slots on n_gpus GPUs in n_nodes nodes from loads [L, E]:
    hierarchical when n_groups is a multiple of n_nodes, global otherwise."""
    if loads.dim() != 2:
        raise ValueError(f"loads must be [layers, experts], got shape {tuple(loads.shape)}")
    L, E = loads.shape
    rules = [
        (n_groups >= 1 and E % n_groups == 0, f"n_groups={n_groups} must divide the {E} experts"),
        (n_nodes >= 1 and n_gpus % n_nodes == 0, f"n_nodes={n_nodes} must divide n_gpus={n_gpus}"),
        (n_physical >= E, f"n_physical={n_physical} must be >= the {E} logical experts"),
        (n_physical % n_gpus == 0, f"n_physical={n_physical} must be a multiple of n_gpus={n_gpus}"),
    ]
    for ok, message in rules:
        if not ok:
            raise ValueError(f"rebalance_experts: {message}")
    loads = loads.double().cpu()
    if n_groups % n_nodes == 0:
        phy2log, rank, counts = _hierarchical(loads, n_physical, n_groups, n_nodes, n_gpus)
    else:
        phy2log, rank, counts = _hierarchical(loads, n_physical, 1, 1, n_gpus)
    width = int(counts.max())
    log2phy = torch.full((L, E * width), -1, dtype=torch.int64)
    log2phy.scatter_(1, phy2log * width + rank, torch.arange(n_physical).expand(L, -1))
    return ExpertPlacement(phy2log, log2phy.view(L, E, width), counts, rank)


def gpu_loads(loads: Tensor, physical_to_logical: Tensor, replica_counts: Tensor, n_gpus: int) -> Tensor:
    """Load per GPU [L, G] when every expert's tokens split evenly over its replicas."""
    per_replica = loads.double() / replica_counts  # [L, E]
    return per_replica.gather(1, physical_to_logical).view(loads.shape[0], n_gpus, -1).sum(-1)


def imbalance(gpu_load: Tensor) -> Tensor:
    """max / mean load over the GPUs, per layer [L] (1 = perfectly balanced)."""
    return gpu_load.amax(-1) / gpu_load.mean(-1)


def replica_indices(indices: Tensor, logical_to_physical: Tensor, replica_counts: Tensor) -> Tensor:
    """One layer: route token n's choice of logical expert e to physical slot
    logical_to_physical[e, n mod count_e] (round-robin over the replicas by token index).

    indices [N, K] logical ids, logical_to_physical [E, max replicas], replica_counts [E]
    -> [N, K] physical slot ids."""
    token = torch.arange(indices.shape[0], device=indices.device)[:, None]  # [N, 1]
    replica = token % replica_counts[indices]  # [N, K]
    return logical_to_physical[indices, replica]
