"""EPLB applied live: redundant expert slots, routing to one replica, measured loads, re-placement
with the weights moved between ranks while serving.

`parallel/eplb.py` computes where P >= E physical expert slots go (DeepSeek's EPLB). This module
makes a model run that way on an expert-parallel group of ep ranks, rank r holding the P/ep
slots [r P/ep, (r+1) P/ep):

  * `apply_expert_placement(model, group, placement)` gives every MoE layer l the weights of its
    slots (slot s holds logical expert placement.physical_to_logical[l, s]; a hot expert may be in
    several slots) and a `ReplicatedDispatcher`.
  * The dispatcher takes the router's logical choices and routes each (token, expert) pair to one
    replica: the nearest first (a copy on this rank, then one on this node when ranks_per_node
    is set: no network or no cross-node traffic), and among the equally near copies round-robin
    by token index (`eplb.replica_indices`), which splits the expert's tokens evenly over them.
    Then it is the plain all-to-all dispatch over P "experts" (ExpertParallelDispatcher). The
    copies hold identical weights, so the outputs do not depend on which one a pair reaches.
  * Loads are counted as they happen, per layer: tokens per logical expert from this rank's
    routing (`expert_load`), and rows each of this rank's slots computed (`slot_load`, for
    everyone's tokens: the load that makes a rank slow).
  * `LiveBalancer.rebalance()` (collective, between two serving steps) sums the ranks' measured
    loads, re-plans with `rebalance_experts` (hierarchical when the expert groups divide the
    nodes, global otherwise), and moves the weights: every new slot takes its expert from this
    rank's old slots if one holds it, else from the lowest old slot that does, and all moves of a
    layer are one all-to-all (an expert's gate/up/down rows packed as one row). It returns the
    max/mean rank load of the measured window under the old and the new placement (each expert's
    tokens split evenly over its copies), the measured max/mean of rows computed per rank, and the
    bytes moved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dsv3.errors import ConfigError
from dsv3.model.moe import MoE
from dsv3.parallel.eplb import ExpertPlacement, gpu_loads, imbalance, rebalance_experts, replica_indices
from dsv3.parallel.expert_parallel import (
    ExpertParallelDispatcher,
    PendingDispatch,
    check_expert_parallel_layout,
)


def check_redundant_experts(n_experts: int, redundant: int, ep: int) -> None:
    """ConfigError unless the E + R slots split evenly over the ep ranks."""
    if not isinstance(redundant, int) or redundant < 0:
        raise ConfigError(f"redundant experts R={redundant!r}: must be an integer >= 0")
    if (n_experts + redundant) % ep:
        fits = [r for r in range(0, 2 * ep + 1) if (n_experts + r) % ep == 0]
        raise ConfigError(
            f"redundant experts R={redundant}: the {n_experts} experts + R slots must split evenly over the "
            f"ep={ep} ranks, but {n_experts} + {redundant} = {n_experts + redundant} does not; choose R in "
            f"{fits[:3]} (a multiple of {ep} away)"
        )


def initial_placement(
    n_layers: int, n_experts: int, redundant: int, n_groups: int, ep: int
) -> ExpertPlacement:
    """Before any load is measured: experts in order (rank r holds [r E/ep, (r+1) E/ep), the
    training layout) without copies; with R copies, EPLB's placement for equal loads."""
    if redundant == 0:
        phy2log = torch.arange(n_experts).repeat(n_layers, 1)  # [L, E]
        return ExpertPlacement(
            phy2log,
            phy2log[..., None].clone(),
            torch.ones(n_layers, n_experts, dtype=torch.long),
            torch.zeros(n_layers, n_experts, dtype=torch.long),
        )
    return rebalance_experts(torch.ones(n_layers, n_experts), n_experts + redundant, n_groups, 1, ep)


class ReplicatedDispatcher(ExpertParallelDispatcher):
    """All-to-all dispatch to P physical slots holding copies of the E logical experts (one
    layer's placement row), each pair to its nearest copy; counts the live loads."""

    def __init__(self, group: dist.ProcessGroup, physical_to_logical: Tensor, n_logical: int, **kwargs):
        super().__init__(group, len(physical_to_logical), **kwargs)
        self.n_logical = n_logical
        self.expert_load = torch.zeros(n_logical, dtype=torch.long)  # this rank's tokens per logical expert
        self.slot_load = torch.zeros(self.n_local, dtype=torch.long)  # rows this rank's slots computed
        self.candidates = torch.empty(0, dtype=torch.long, device=physical_to_logical.device)
        self.set_placement(physical_to_logical)

    def set_placement(self, physical_to_logical: Tensor) -> None:
        """physical_to_logical [P]: build, per logical expert, its nearest copies from this rank."""
        P = len(physical_to_logical)
        rank_of = torch.arange(P) // self.n_local  # [P]
        near = [rank_of == self.rank]
        if self.ranks_per_node is not None:
            near.append(rank_of // self.ranks_per_node == self.rank // self.ranks_per_node)
        near.append(torch.ones(P, dtype=torch.bool))
        choices = []
        for e in range(self.n_logical):
            holds = physical_to_logical == e
            level = next(mask for mask in near if (holds & mask).any())
            choices.append((holds & level).nonzero().squeeze(1))
        width = max(len(c) for c in choices)
        device = self.candidates.device  # where the tokens were last routed
        self.physical_to_logical = physical_to_logical.clone()
        padded = [torch.cat((c, c.new_full((width - len(c),), -1))) for c in choices]
        self.candidates = torch.stack(padded).to(device)  # [E, width] its nearest copies, -1 padded
        self.n_candidates = torch.tensor([len(c) for c in choices], device=device)  # [E]

    def dispatch_begin(self, x: Tensor, indices: Tensor, n_experts: int) -> PendingDispatch:
        """x [N, H], indices [N, K] logical expert ids -> the pairs for this rank's slots, in flight."""
        if n_experts != self.n_logical:
            raise ValueError(f"dispatcher built for {self.n_logical} experts, called with {n_experts}")
        if self.candidates.device != indices.device:  # once: the tables and counters where the tokens are
            for name in ("candidates", "n_candidates", "expert_load", "slot_load"):
                setattr(self, name, getattr(self, name).to(indices.device))
        self.expert_load += torch.bincount(indices.flatten(), minlength=self.n_logical)
        physical = replica_indices(indices, self.candidates, self.n_candidates)  # [N, K] slot ids
        pending = super().dispatch_begin(x, physical, self.n_experts)
        self.slot_load += torch.diff(pending.offs, prepend=pending.offs.new_zeros(1))
        return pending


def moe_layers(model: nn.Module) -> list[MoE]:
    """The MoE layers in module order (main layers, then MTP): the rows of a placement."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def apply_expert_placement(
    model: nn.Module, group: dist.ProcessGroup, placement: ExpertPlacement, **dispatcher_kwargs
) -> list[ReplicatedDispatcher]:
    """In place: each MoE layer keeps the weights of this rank's slots (copied from its full
    experts) and routes through a ReplicatedDispatcher. Returns the dispatchers, layer order."""
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    moes = moe_layers(model)
    L, P = placement.physical_to_logical.shape
    if L != len(moes):
        raise ValueError(f"placement has {L} layers, the model {len(moes)} MoE layers")
    for moe in moes:
        check_expert_parallel_layout(
            P, moe.gate.method.n_group, ep, dispatcher_kwargs.get("ranks_per_node"), False
        )
    dispatchers = []
    for moe, row in zip(moes, placement.physical_to_logical):
        n_local = P // ep
        mine = row[rank * n_local : (rank + 1) * n_local]
        experts = moe.experts
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            setattr(experts, name, nn.Parameter(full.detach()[mine].clone(), requires_grad=False))
        experts.n_experts, experts.first_expert = n_local, rank * n_local  # slot ids from here on
        moe.dispatcher = ReplicatedDispatcher(group, row, moe.n_routed_experts, **dispatcher_kwargs)
        dispatchers.append(moe.dispatcher)
    return dispatchers


@dataclass
class Rebalance:
    """What one re-placement did (all layers; balance = max/mean over ranks, mean over layers)."""

    pairs: int  # (token, expert) pairs the first MoE layer routed in the measured window, all ranks
    predicted_before: float  # the window's loads under the old placement
    predicted_after: float  # ... under the new one
    measured_before: float  # rows the ranks' slots actually computed in the window
    bytes_moved: int  # expert weights sent between ranks (all ranks)
    experts_moved: int


def _mean_balance(rank_loads: Tensor) -> float:
    """max/mean over ranks, averaged over the layers that had tokens (an unused MTP layer has none)."""
    return torch.nanmean(imbalance(rank_loads)).item()


class LiveBalancer:
    """Measured loads and re-placement for the MoE layers of a model under apply_expert_placement.
    All methods but `loads` are collective over the group."""

    def __init__(
        self, model: nn.Module, group: dist.ProcessGroup, placement: ExpertPlacement, n_nodes: int = 1
    ):
        self.moes, self.group, self.placement, self.n_nodes = moe_layers(model), group, placement, n_nodes
        self.ep, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.n_groups = self.moes[0].gate.method.n_group
        self.device = self.moes[0].experts.gate_up_proj.device  # where the group's collectives run
        self.history: list[Rebalance] = []

    def loads(self) -> Tensor:
        """This rank's measured tokens per logical expert since the last rebalance [L, E]."""
        return torch.stack([m.dispatcher.expert_load.cpu() for m in self.moes])

    def rank_loads(self) -> Tensor:
        """Rows computed per rank since the last rebalance [L, ep] (collective)."""
        mine = torch.stack([m.dispatcher.slot_load.sum().cpu() for m in self.moes]).long()  # [L]
        every = [torch.zeros_like(mine, device=self.device) for _ in range(self.ep)]
        dist.all_gather(every, mine.to(self.device), group=self.group)
        return torch.stack(every, dim=1).cpu()

    @torch.no_grad()
    def rebalance(self) -> Rebalance:
        """Re-place the experts from the loads measured since the last call and move the weights."""
        loads = self.loads().to(self.device)
        dist.all_reduce(loads, group=self.group)  # [L, E] every rank's tokens
        loads = loads.cpu()
        measured = _mean_balance(self.rank_loads().double())
        old = self.placement
        P = old.physical_to_logical.shape[1]
        new = rebalance_experts(loads, P, self.n_groups, self.n_nodes, self.ep)
        before = _mean_balance(gpu_loads(loads, old.physical_to_logical, old.replica_counts, self.ep))
        after = _mean_balance(gpu_loads(loads, new.physical_to_logical, new.replica_counts, self.ep))
        moved = sent = 0
        for layer, moe in enumerate(self.moes):
            if not torch.equal(old.physical_to_logical[layer], new.physical_to_logical[layer]):
                # every rank computed the same placement, so every rank skips the same layers
                n, b = self._move(moe, old.physical_to_logical[layer], new.physical_to_logical[layer])
                moved, sent = moved + n, sent + b
            moe.dispatcher.set_placement(new.physical_to_logical[layer])
            moe.dispatcher.expert_load.zero_()
            moe.dispatcher.slot_load.zero_()
        totals = torch.tensor([moved, sent], device=self.device)
        dist.all_reduce(totals, group=self.group)
        self.placement = new
        result = Rebalance(int(loads[0].sum()), before, after, measured, int(totals[1]), int(totals[0]))
        self.history.append(result)
        return result

    def _move(self, moe: MoE, old: Tensor, new: Tensor) -> tuple[int, int]:
        """Give this rank's slots the experts of `new` [P], taking each from old slots [P]: this
        rank's own if it holds the expert, else the lowest slot that does. One all-to-all of
        packed expert rows. Returns (experts received, bytes sent) by this rank."""
        S, ep, rank = len(old) // self.ep, self.ep, self.rank
        experts = moe.experts
        gate_up, down = experts.gate_up_proj, experts.down_proj  # [S, 2I, H], [S, H, I]
        packed = torch.cat((gate_up.flatten(1), down.flatten(1)), dim=1)  # [S, row]
        sends: list[list[int]] = [[] for _ in range(ep)]  # this rank's old local slots, to each rank
        plan: list[
            tuple[int, int, int]
        ] = []  # this rank's new local slot <- (source rank, its old local slot)
        for slot in range(len(new)):
            dst, e = slot // S, int(new[slot])
            held = (old == e).nonzero().squeeze(1)
            own = held[held // S == dst]
            src_slot = int(own[0] if len(own) else held[0])
            src = src_slot // S
            if src == rank and dst != rank:
                sends[dst].append(src_slot % S)
            if dst == rank:
                plan.append((slot % S, src, src_slot % S))
        send_rows = torch.cat([packed[idx] for idx in sends]) if any(sends) else packed[:0]
        send_splits = [len(idx) for idx in sends]
        recv_splits = [sum(1 for _, src, _ in plan if src == r) if r != rank else 0 for r in range(ep)]
        recv = packed.new_empty(sum(recv_splits), packed.shape[1])
        dist.all_to_all_single(recv, send_rows, recv_splits, send_splits, group=self.group)
        offset = {r: sum(recv_splits[:r]) for r in range(ep)}
        rows = []
        for _, src, src_local in sorted(plan):
            if src == rank:
                rows.append(packed[src_local])
            else:
                rows.append(recv[offset[src]])
                offset[src] += 1
        new_packed = torch.stack(rows)  # [S, row]
        n_gate_up = gate_up[0].numel()
        experts.gate_up_proj = nn.Parameter(
            new_packed[:, :n_gate_up].reshape(gate_up.shape).clone(), requires_grad=False
        )
        experts.down_proj = nn.Parameter(
            new_packed[:, n_gate_up:].reshape(down.shape).clone(), requires_grad=False
        )
        if experts.packed >= 0:  # the copies packed for inference: of the new slots' weights
            experts.pack()
        return len(recv), send_rows.numel() * send_rows.element_size()
