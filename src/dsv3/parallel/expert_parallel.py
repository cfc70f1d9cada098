"""Expert parallelism: each rank holds E/ep routed experts; tokens travel to them by all-to-all.

DeepSeek-V3 trains with 64-way expert parallelism over 8 nodes and no tensor parallelism (V3R
sec. 3.2; ISCA sec. 4). Rank r of the ep group owns the contiguous experts [r E/ep, (r+1) E/ep).
A MoE layer then runs, on every rank at once:

    route     the router picks K experts per token (global ids), as on one device
    dispatch  sort the N*K (token, k) pairs by expert, hence by owning rank; exchange the counts
              per (rank, local expert) with an all-to-all of ints; send each pair's hidden state
              to its expert's rank with `all_to_all_single` (uneven splits); on arrival sort the
              rows from all source ranks by local expert -> x_sorted [M, H] and offs [E/ep]
    experts   the same grouped GEMMs as on one device, over the local experts only
    combine   send the outputs back with the reverse all-to-all, un-permute to (token, k) order and
              take the gate-weighted sum: exactly `LocalDispatcher.combine`

Both all-to-alls carry autograd (the backward of an all-to-all is the reverse all-to-all), so
a loss on any rank reaches the experts on every rank.

FP8 dispatch (V3R sec. 3.3.2): the dispatched activations are quantized to E4M3 with one FP32
scale per 1x128 tile (`dsv3.fp8.quant.quantize`, the same format the FP8 expert GEMMs consume)
and sent as one uint8 row per pair: H code bytes + 4 bytes per 128 channels of scale, i.e.
(1 + 1/32) / 2 = 0.516 of a BF16 row. They are dequantized on arrival to the compute dtype. The
combine and every gradient stay in the compute dtype (BF16 under autocast): the backward of the
FP8 dispatch is the reverse all-to-all of the incoming gradient, the quantizer treated as the
identity (straight-through), as the paper keeps backward communication in BF16.

Node-limited routing (V3R sec. 2.1.2, ISCA sec. 4.3): with `ranks_per_node` R the ranks form
ep/R nodes, and the router's n_group expert groups map onto them (groups aligned with nodes:
n_group a multiple of the number of nodes, so a group never straddles two nodes). topk_group = M
then caps the nodes a token reaches. DeepSeek's kernels send a token's hidden state over
InfiniBand once per target node and fan it out to the experts there over NVLink, cutting
scale-out traffic from K copies per token to at most M. With `node_dedup` (the default when
there are several nodes) the dispatcher does the same in two all-to-alls over the ep group:

    hop 1  each token once to every node it targets, to the rank with the same local index
           there, with its expert ids on that node (int32) -- the only traffic between nodes
    hop 2  that rank fans the rows out to the experts' ranks inside its node
    combine  hop 2 back; the forwarding rank sums the gate-weighted outputs of its node's
           experts (the gate weights reach it by a small all-to-all); hop 1 back carries one
           partial sum per (token, node), and the token's rank adds them up

Overlap: `dispatch` and `combine` are each two calls, `*_begin` (the rows go on the wire through
asynchronous functional collectives) and `*_end` (the first use of the received rows waits for
them). Whatever runs between the two, the shared expert or another micro-batch's attention
(parallel/overlap.py), computes while the tokens are in flight. Only the small count exchange
blocks. (The node-limited two hops and FP8 dispatch finish inside `*_begin`.)

With FP8 dispatch both hops send E4M3 (hop 2 re-quantizes the dequantized rows of hop 1).
`stats` holds the bytes that cross nodes both ways: once per remote expert (counted from the
routing) and once per remote node (measured on hop 1's buffers, or counted without node_dedup).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh

from dsv3.device import compute_dtype
from dsv3.fp8.quant import ACT, TILE, Fp8Tensor, quantize
from dsv3.model.moe import Dispatcher, MoE, named_routers

COUNTS_EVENT = "ep::count_exchange"  # trace ranges where the compute thread waits for the wire
DISPATCH_WAIT_EVENT = "ep::dispatch_end"
COMBINE_WAIT_EVENT = "ep::combine_end"


@dataclass
class TrafficStats:
    """Dispatch/combine traffic of one rank, summed over calls since `reset()`. Bytes are those
    of the buffers handed to the all-to-all (the wire format), counted for rows that leave the
    rank; the two cross-node counts are zero unless `ranks_per_node` is set."""

    calls: int = 0
    pairs_sent: int = 0  # rows sent to other ranks (hops 1 and 2 with node_dedup)
    dispatch_bytes: int = 0  # their bytes in the dispatch format (BF16/FP32, or FP8 codes + scales)
    combine_bytes: int = 0  # the rows going back, in the compute dtype
    cross_node_bytes: int = 0  # dispatch bytes to other nodes, one copy per expert
    cross_node_bytes_dedup: int = 0  # one copy per (token, remote node), then NVLink fan-out
    metadata_bytes: int = 0  # node_dedup: expert ids and gate weights sent along with hop 1

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)


@dataclass
class _PairState:
    pos: Tensor  # [P] (token, k) position of each sent row, in send order (grouped by destination)
    arrival: Tensor  # [M] received row -> its position sorted by local expert
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    shape: tuple[int, int]  # (N, K) of the indices dispatched


@dataclass
class _NodeState:
    token: Tensor  # [P1] token of each (token, target node) row sent in hop 1, in send order
    send_splits: list[int]
    recv_splits: list[int]
    pairs: _PairState  # hop 2, inside the node
    n_tokens: int


@dataclass
class PendingDispatch:
    """A dispatch between dispatch_begin and dispatch_end: the received rows (still in flight
    until first used), their order by local expert (None: already in order), offs, state."""

    rows: Tensor
    offs: Tensor
    state: _PairState | _NodeState
    by_expert: Tensor | None = None


@dataclass
class PendingCombine:
    """A combine between combine_begin and combine_end: the rows coming back (in flight), and
    the gate weights and state to sum them (None: `rows` is already the combined [N, H])."""

    rows: Tensor
    weights: Tensor | None
    state: _PairState | None


class ExpertParallelDispatcher(Dispatcher[_PairState | _NodeState]):
    """All-to-all dispatch to the experts' ranks: the `Dispatcher` contract, as `LocalDispatcher`.
    One row per (token, expert), or with node_dedup (needs ranks_per_node and > 1 node) once per
    (token, node) and a fan-out inside the node (the two hops of the module docstring)."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        n_experts: int,
        *,
        fp8_dispatch: bool = False,
        ranks_per_node: int | None = None,
        node_dedup: bool = True,
    ):
        self.group = group
        self.ep, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.n_experts, self.n_local = n_experts, n_experts // self.ep
        self.fp8_dispatch = fp8_dispatch
        self.ranks_per_node = ranks_per_node
        self.n_nodes = 1 if ranks_per_node is None else self.ep // ranks_per_node
        self.node_dedup = node_dedup and self.n_nodes > 1
        self.stats = TrafficStats()

    def dispatch(
        self, x: Tensor, indices: Tensor, n_experts: int
    ) -> tuple[Tensor, Tensor, _PairState | _NodeState]:
        """x [N, H], indices [N, K] global expert ids -> x_sorted [M, H] (the pairs routed to this
        rank's experts, by local expert), offs int32 [E/ep], state for combine."""
        return self.dispatch_end(self.dispatch_begin(x, indices, n_experts))

    def combine(self, y_sorted: Tensor, weights: Tensor, state: _PairState | _NodeState) -> Tensor:
        """y_sorted [M, H] expert outputs by local expert, weights [N, K] -> [N, H]."""
        return self.combine_end(self.combine_begin(y_sorted, weights, state))

    # --------------------------------------------------------- split phases (overlap)
    def dispatch_begin(self, x: Tensor, indices: Tensor, n_experts: int) -> PendingDispatch:
        """The first half of `dispatch`: exchange the counts (a small blocking all-to-all) and
        put the rows on the wire without waiting for them; compute may run until dispatch_end.
        (Node-limited two-hop and FP8 dispatch complete here: no overlap for them.)"""
        if n_experts != self.n_experts:
            raise ValueError(f"dispatcher built for {self.n_experts} experts, called with {n_experts}")
        self.stats.calls += 1
        self._count_cross_node(indices, x)
        x = x.to(compute_dtype(x))
        if self.node_dedup:
            return PendingDispatch(*self._dispatch_via_nodes(x, indices))
        return self._dispatch_pairs_begin(x, indices)

    def dispatch_end(self, pending: PendingDispatch) -> tuple[Tensor, Tensor, _PairState | _NodeState]:
        """Receive the rows (waits for the all-to-all) -> x_sorted, offs, state."""
        with torch.profiler.record_function(DISPATCH_WAIT_EVENT):
            x = pending.rows if pending.by_expert is None else pending.rows[pending.by_expert]
        return x, pending.offs, pending.state

    def combine_begin(
        self, y_sorted: Tensor, weights: Tensor, state: _PairState | _NodeState
    ) -> PendingCombine:
        """Put the expert outputs on the wire back to their tokens' ranks, without waiting."""
        if isinstance(state, _NodeState):
            return PendingCombine(self._combine_via_nodes(y_sorted, weights, state), None, None)
        y_back = self._send_back(y_sorted[state.arrival], state.send_splits, state.recv_splits)  # [P, H]
        return PendingCombine(y_back, weights, state)

    def combine_end(self, pending: PendingCombine) -> Tensor:
        """Receive the outputs (waits for the all-to-all) and take the gate-weighted sums -> [N, H]."""
        if pending.state is None:
            return pending.rows
        with torch.profiler.record_function(COMBINE_WAIT_EVENT):
            y = self._unpermute(pending.rows, pending.state)  # [N, K, H]
        return (y * pending.weights.to(y.dtype).unsqueeze(-1)).sum(dim=1)

    # --------------------------------------------------------- one row per (token, expert)
    def _dispatch_pairs_begin(self, x: Tensor, indices: Tensor) -> PendingDispatch:
        """x [N, H], indices [N, K] with -1 for no expert -> the rows in flight, and how to
        regroup them by local expert (PendingDispatch with a _PairState)."""
        flat = indices.flatten()  # [N*K]
        pos = (flat >= 0).nonzero().squeeze(1)  # [P]
        pos = pos[flat[pos].argsort(stable=True)]  # by expert, hence by destination rank
        send_counts = torch.bincount(flat[pos], minlength=self.n_experts)  # [E] = [ep, E/ep]
        recv_counts = self._exchange(send_counts)  # [ep, E/ep]: from each source, per local expert
        send_splits = send_counts.view(self.ep, self.n_local).sum(1).tolist()
        recv_splits = recv_counts.view(self.ep, self.n_local).sum(1).tolist()
        x_recv = self._send_rows(x, pos // indices.shape[1], recv_splits, send_splits)  # [M, H], in flight

        # rows arrive grouped by source rank, each block by local expert: regroup by local expert
        local_expert = torch.arange(self.n_local, device=x.device).repeat(self.ep)  # [ep * E/ep]
        by_expert = local_expert.repeat_interleave(recv_counts).argsort(stable=True)  # [M]
        arrival = torch.empty_like(by_expert)
        arrival[by_expert] = torch.arange(len(by_expert), device=x.device)
        offs = recv_counts.view(self.ep, self.n_local).sum(0).cumsum(0).to(torch.int32)  # [E/ep]
        state = _PairState(pos, arrival, send_splits, recv_splits, tuple(indices.shape))
        return PendingDispatch(x_recv, offs, state, by_expert)

    def _dispatch_pairs(self, x: Tensor, indices: Tensor) -> tuple[Tensor, Tensor, _PairState]:
        """x [N, H], indices [N, K] with -1 for no expert -> x_sorted, offs, _PairState."""
        return self.dispatch_end(self._dispatch_pairs_begin(x, indices))

    def _combine_pairs(self, y_sorted: Tensor, state: _PairState) -> Tensor:
        """-> y [N, K, H], zeros where indices were -1."""
        y_back = self._send_back(y_sorted[state.arrival], state.send_splits, state.recv_splits)  # [P, H]
        return self._unpermute(y_back, state)

    @staticmethod
    def _unpermute(y_back: Tensor, state: _PairState) -> Tensor:
        """y_back [P, H] in send order -> [N, K, H] in (token, k) order, zeros where no expert."""
        N, K = state.shape
        y = y_back.new_zeros(N * K, y_back.shape[1]).index_copy(0, state.pos, y_back)
        return y.view(N, K, y_back.shape[1])  # H spelled out: N may be 0 (an idle rank)

    # --------------------------------------------------------- once per (token, node), then fan-out
    def _dispatch_via_nodes(self, x: Tensor, indices: Tensor) -> tuple[Tensor, Tensor, _NodeState]:
        R, N = self.ranks_per_node, len(indices)
        node = indices // (self.n_experts // self.n_nodes)  # [N, K] node of each chosen expert
        reached = torch.zeros(N, self.n_nodes, dtype=torch.bool, device=x.device).scatter_(1, node, True)
        token, target = reached.nonzero(as_tuple=True)  # [P1] (token, node) pairs
        order = target.argsort(stable=True)  # by target node = by destination rank
        token, target = token[order], target[order]
        dest = target * R + self.rank % R  # the same local index on the target node
        send_splits = torch.bincount(dest, minlength=self.ep)  # [ep]
        recv_splits = self._exchange(send_splits).tolist()
        send_splits = send_splits.tolist()
        node_indices = indices[token].masked_fill(node[token] != target[:, None], -1)  # [P1, K]
        x1 = self._send_rows(x, token, recv_splits, send_splits, across_nodes=True)  # [P1r, H] hop 1
        idx1 = node_indices.new_empty(sum(recv_splits), indices.shape[1], dtype=torch.int32)
        dist.all_to_all_single(idx1, node_indices.int(), recv_splits, send_splits, group=self.group)
        self.stats.metadata_bytes += _remote(send_splits, self.rank) * idx1.shape[1] * idx1.element_size()
        x_sorted, offs, pairs = self._dispatch_pairs(x1, idx1)  # hop 2, inside the node
        return x_sorted, offs, _NodeState(token, send_splits, recv_splits, pairs, N)

    def _combine_via_nodes(self, y_sorted: Tensor, weights: Tensor, state: _NodeState) -> Tensor:
        w1 = all_to_all_single_autograd(  # [P1r, K] the gate weights, to the forwarding rank
            weights[state.token], state.recv_splits, state.send_splits, self.group
        )
        self.stats.metadata_bytes += _remote(state.send_splits, self.rank) * w1.shape[1] * w1.element_size()
        y = self._combine_pairs(y_sorted, state.pairs)  # [P1r, K, H]: this node's experts, else 0
        partial = (y * w1.to(y.dtype).unsqueeze(-1)).sum(dim=1)  # [P1r, H]
        partial = self._send_back(partial, state.send_splits, state.recv_splits)  # [P1, H], hop 1 back
        out = partial.new_zeros(state.n_tokens, partial.shape[1])
        return out.index_add(0, state.token, partial)  # [N, H]: sum over the token's nodes

    # --------------------------------------------------------- wire
    def _exchange(self, send_counts: Tensor) -> Tensor:
        """All-to-all of equal-length int counts (one block per rank)."""
        recv_counts = torch.empty_like(send_counts)
        with torch.profiler.record_function(COUNTS_EVENT):  # the blocking part of a dispatch, in traces
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        return recv_counts

    def _send_rows(
        self,
        x: Tensor,
        rows: Tensor,
        recv_splits: list[int],
        send_splits: list[int],
        across_nodes: bool = False,
    ) -> Tensor:
        """Dispatch-direction all-to-all of x[rows] (x [N, H], rows [P] grouped by destination), in
        FP8 or the compute dtype; across_nodes: the deduplicated hop 1, whose rows to other nodes
        are the cross-node bytes."""
        if self.fp8_dispatch:
            out = _Fp8AllToAll.apply(x, rows, recv_splits, send_splits, self.group)
            row_bytes = _fp8_row_bytes(x.shape[1])
        else:
            out = all_to_all_single_autograd(x[rows], recv_splits, send_splits, self.group)
            row_bytes = x.element_size() * x.shape[1]
        remote = _remote(send_splits, self.rank)
        self.stats.pairs_sent += remote
        self.stats.dispatch_bytes += remote * row_bytes
        if across_nodes:
            own = self.rank // self.ranks_per_node
            off_node = sum(n for r, n in enumerate(send_splits) if r // self.ranks_per_node != own)
            self.stats.cross_node_bytes_dedup += off_node * row_bytes
        return out

    def _send_back(self, rows: Tensor, send_splits: list[int], recv_splits: list[int]) -> Tensor:
        """Combine-direction all-to-all (the reverse of a dispatch), in the compute dtype."""
        self.stats.combine_bytes += _remote(send_splits, self.rank) * rows.element_size() * rows.shape[1]
        return all_to_all_single_autograd(rows, send_splits, recv_splits, self.group)

    @torch.no_grad()
    def _count_cross_node(self, indices: Tensor, x: Tensor) -> None:
        """What crosses nodes: one row per remote expert, and one per (token, remote node) (the
        latter measured on the wire by hop 1 when node_dedup is on)."""
        if self.ranks_per_node is None:
            return
        row_bytes = (
            _fp8_row_bytes(x.shape[1]) if self.fp8_dispatch else compute_dtype(x).itemsize * x.shape[1]
        )
        node = indices // (self.n_experts // self.n_nodes)  # [N, K]
        own = self.rank // self.ranks_per_node
        self.stats.cross_node_bytes += int((node != own).sum()) * row_bytes
        if not self.node_dedup:
            reached = torch.zeros(len(node), self.n_nodes, dtype=torch.bool, device=node.device)
            reached.scatter_(1, node, True)  # [N, nodes]
            self.stats.cross_node_bytes_dedup += (int(reached.sum()) - int(reached[:, own].sum())) * row_bytes


def _remote(splits: list[int], rank: int) -> int:
    return sum(splits) - splits[rank]


def _fp8_row_bytes(hidden: int) -> int:
    """E4M3 codes plus one FP32 scale per 1x128 tile."""
    return hidden + 4 * -(-hidden // TILE)


class _Fp8AllToAll(torch.autograd.Function):
    """all_to_all_single of x[rows] as E4M3 codes + 1x128 scales, dequantized on arrival. Each
    token is quantized once (its copies share the codes). The backward sends the gradient back in
    its own dtype (BF16/FP32), the quantizer passed straight through."""

    @staticmethod
    def forward(ctx, x: Tensor, rows: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.save_for_backward(rows)
        ctx.splits, ctx.group, ctx.n_tokens = (out_splits, in_splits), group, x.shape[0]
        H = x.shape[1]
        q = quantize(x, ACT)  # codes [N, H], scale fp32 [N, ceil(H/128)]
        packed = torch.cat([q.data.view(torch.uint8), q.scale.view(torch.uint8)], dim=1)  # [N, row bytes]
        send = packed[rows]  # [P, row bytes]
        recv = send.new_empty(sum(out_splits), send.shape[1])
        dist.all_to_all_single(recv, send, out_splits, in_splits, group=group)
        codes, scale = recv[:, :H], recv[:, H:].contiguous().view(torch.float32)
        return Fp8Tensor(codes.view(torch.float8_e4m3fn), scale, ACT).dequantize(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        (rows,) = ctx.saved_tensors
        grad = grad.contiguous()
        grad_rows = grad.new_empty(sum(in_splits), grad.shape[1])  # [P, H]
        dist.all_to_all_single(grad_rows, grad, in_splits, out_splits, group=ctx.group)
        grad_x = grad.new_zeros(ctx.n_tokens, grad.shape[1]).index_add_(0, rows, grad_rows)
        return grad_x, None, None, None, None


# ------------------------------------------------------------------------------ applying EP
def check_expert_parallel_layout(
    n_experts: int, n_group: int, ep: int, ranks_per_node: int | None, group_limited: bool = True
) -> None:
    """Raise ValueError unless E/ep experts per rank and (with ranks_per_node) nodes of whole
    ranks holding whole expert groups; group_limited=False (plain top-k) skips the group rule."""
    if ep < 1 or n_experts % ep:
        raise ValueError(
            f"expert parallelism ep={ep} must divide n_routed_experts={n_experts}; "
            f"choose ep in {[d for d in range(1, n_experts + 1) if n_experts % d == 0]}"
        )
    if ranks_per_node is None:
        return
    if ranks_per_node < 1 or ep % ranks_per_node:
        raise ValueError(f"ranks_per_node={ranks_per_node} must divide the expert-parallel size ep={ep}")
    n_nodes = ep // ranks_per_node
    if group_limited and n_group % n_nodes:
        raise ValueError(
            f"node-limited routing needs expert groups aligned with nodes: n_group={n_group} must be a "
            f"multiple of the number of nodes ep/ranks_per_node = {ep}/{ranks_per_node} = {n_nodes}"
        )


def apply_expert_parallel(
    model: nn.Module,
    ep_group: dist.ProcessGroup | DeviceMesh,
    *,
    fp8_dispatch: bool = False,
    ranks_per_node: int | None = None,
    node_dedup: bool = True,
) -> None:
    """In place: every MoE keeps only this rank's E/ep experts (rank r: [r E/ep, (r+1) E/ep)),
    sliced from its full parameters so that all ranks start from the single-process weights
    (works on `meta` too), and gets an ExpertParallelDispatcher. The layout is checked for every
    MoE before any is changed. ranks_per_node: consecutive ep ranks per node, for node-limited
    routing (sends once per target node unless node_dedup=False) and cross-node byte counts."""
    group = _process_group(ep_group)
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in moes:
        if isinstance(moe.dispatcher, ExpertParallelDispatcher):
            raise ValueError("apply_expert_parallel: the model already has expert parallelism applied")
        method = moe.gate.method
        check_expert_parallel_layout(
            moe.n_routed_experts, method.n_group, ep, ranks_per_node, method.group_limited
        )
    for moe in moes:
        n_local = moe.n_routed_experts // ep
        lo = rank * n_local
        experts = moe.experts
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            local = nn.Parameter(full.detach()[lo : lo + n_local].clone(), requires_grad=full.requires_grad)
            setattr(experts, name, local)
        experts.n_experts, experts.first_expert = n_local, lo
        moe.dispatcher = ExpertParallelDispatcher(
            group,
            moe.n_routed_experts,
            fp8_dispatch=fp8_dispatch,
            ranks_per_node=ranks_per_node,
            node_dedup=node_dedup,
        )


def _process_group(ep_group: dist.ProcessGroup | DeviceMesh) -> dist.ProcessGroup:
    if isinstance(ep_group, DeviceMesh):
        if ep_group.ndim != 1:
            raise ValueError(f"expert parallelism needs a 1-D mesh, got mesh dims {ep_group.mesh_dim_names}")
        return ep_group.get_group()
    return ep_group


def traffic_stats(model: nn.Module) -> list[TrafficStats]:
    """The stats of every expert-parallel MoE layer, in module order."""
    return [
        m.dispatcher.stats
        for m in model.modules()
        if isinstance(m, MoE) and isinstance(m.dispatcher, ExpertParallelDispatcher)
    ]


@torch.no_grad()
def all_reduce_expert_loads(model: nn.Module, group: dist.ProcessGroup | DeviceMesh | None = None) -> None:
    """Sum every Router.tokens_per_expert over `group` (the ranks that see different tokens: the
    data- and expert-parallel ranks), in place, in one all-reduce.

    Each rank's router counts the loads of *its own* tokens over all E experts (global ids), so
    after this every rank holds the global loads and `update_router_bias` moves all copies of
    the bias identically. Call it right before `update_router_bias`."""
    routers = [r for _, r in named_routers(model)]
    if not routers:
        return
    pg = _process_group(group) if group is not None else None
    loads = torch.stack([r.tokens_per_expert for r in routers])  # [n_routers, E]
    dist.all_reduce(loads, group=pg)
    for r, load in zip(routers, loads):
        r.tokens_per_expert.copy_(load)
