"""DeepSeekMoE: fine-grained routed experts plus always-on shared experts (V3R section 2.1.2).

    h' = h + sum_{shared} FFN_s(h) + sum_{i in TopK} g_i FFN_i(h)

Routing (`Router`, module name `gate` as in the checkpoint), in FP32:
    s_i = sigmoid(u . e_i)  (V3)  or  softmax_i(u . e)  (V2)
    choice_i = s_i + b_i    b = e_score_correction_bias, used for *selection only*
    the top-k choice_i, within the best topk_group of n_group expert groups (node-limited)
What differs between DeepSeek versions (score function, bias or not, how a group is scored) is
a `RoutingMethod`, one class each in model/routing.py, which also explains the group limit.
The gate weights are the *unbiased* s_i of the chosen experts, normalized to sum 1
(norm_topk_prob) and multiplied by routed_scaling_factor (2.5 in V3).

Balancing without an auxiliary loss: after each optimizer step the trainer calls
`update_router_bias(model, gamma)`, which moves b_i down by gamma for overloaded experts and up
for underloaded ones (V3R eq. 16). A small sequence-wise balance loss remains (eq. 17-20):
    L_bal = alpha * sum_i f_i P_i,  f_i = N_r/(K_r T) * #{t: i in TopK(t)},  P_i = mean_t s'_{i,t}
with s' the affinities normalized over all experts, computed per sequence and averaged.

Execution is split as router -> dispatcher -> experts -> combine. The single-device
`LocalDispatcher` sorts the N*K (token, expert) pairs by expert so `GroupedExperts` runs all
experts as two grouped GEMMs (`torch.nn.functional.grouped_mm`) with no Python loop over
experts and no host sync; expert parallelism replaces only the dispatcher, which is anything
implementing the `Dispatcher` protocol.

Inference takes other roads. A compiled step with few tokens skips dispatch and combine: where
dsv3's panel kernel is built (model/panel_gemm.py), the experts, shared ones included, run as one
call from the router's indices and weights (`panel_gemm.routed_experts`, which sorts the pairs
and reads each chosen expert once); elsewhere each token reads its chosen experts by index
(`GroupedExperts.forward_gathered`, which Inductor turns into one fused gather-and-reduce loop:
model/linear.py). Otherwise the experts run as one opaque op (`expert_mlp`) on packed copies of
their weights (model/packed_experts.py).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.device import compute_dtype
from dsv3.model import panel_gemm
from dsv3.model.linear import Linear, compiled_inference, linear
from dsv3.model.packed_experts import (
    PANEL_MAX_ROWS_PER_EXPERT,
    can_pack,
    expert_loop,
    is_current,
    pack_experts,
    release,
    run_packed,
    runs_packed,
)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense FFN layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = Linear(dim, inter_dim, bias=False)
        self.up_proj = Linear(dim, inter_dim, bias=False)
        self.down_proj = Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Top-k expert selection. forward(x [N, H]) -> RouterOutput (all FP32)."""

    e_score_correction_bias: torch.Tensor  # [E] buffer, only if the routing method has a selection bias
    tokens_per_expert: torch.Tensor  # [E] buffer

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k, self.method = (
            cfg.n_routed_experts,
            cfg.num_experts_per_tok,
            cfg.routing_method,
        )
        self.norm_topk_prob, self.routed_scaling_factor = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
        if self.method.selection_bias:  # V2 checkpoints have no selection bias
            self.register_buffer(
                "e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32)
            )
        # tokens routed to each expert since the last update_router_bias() (training only)
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        dtype = torch.promote_types(x.dtype, torch.float32)  # FP32, or FP64 in exactness tests
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = linear(x.to(dtype), self.weight.to(dtype))  # [N, E]
        scores = self.method.score(logits)  # [N, E]
        choice = scores + self.e_score_correction_bias if self.method.selection_bias else scores
        indices = self.method.select(choice, self.top_k)  # [N, K]
        weights = scores.gather(1, indices)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (_sum_in_order(weights) + 1e-20)
        weights = weights * self.routed_scaling_factor
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += torch.bincount(indices.flatten(), minlength=self.n_experts)
        return RouterOutput(weights, indices, scores)

    @torch.no_grad()
    def reset_parameters(self, std: float, generator: torch.Generator | None = None) -> None:
        """Normal(0, std) gate weight, zero selection bias, zero load counters."""
        nn.init.normal_(self.weight, 0.0, std, generator=generator)
        if self.method.selection_bias:
            self.e_score_correction_bias.zero_()
        self.tokens_per_expert.zero_()


def _sum_in_order(x: torch.Tensor) -> torch.Tensor:
    """x [N, K] -> [N, 1]: ((x[:, 0] + x[:, 1]) + x[:, 2]) + ..., in that order whatever runs it.
    A reduction's order is the compiler's choice, and Inductor picks it per graph: MTP's 2-token
    verify and the 1-token step summed a token's gate weights in different orders, an FP32 ulp
    apart, enough to round an expert's output to another BF16 value now and then, so greedy MTP
    on the trained small preset drifted from greedy decoding. Adds in a chain are elementwise
    ops, which no compiler reorders."""
    total = x[:, :1]
    for k in range(1, x.shape[1]):
        total = total + x[:, k : k + 1]
    return total


@dataclass
class RouterOutput:
    weights: torch.Tensor  # [N, K] gate weights of the chosen experts
    indices: torch.Tensor  # [N, K] chosen experts
    scores: torch.Tensor  # [N, E] unbiased affinities s_i


class GroupedExperts(nn.Module):
    """All routed experts as stacked weights, computed with grouped GEMMs.

    gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I], each expert laid out like
    an nn.Linear weight. forward(x [M, H] sorted by expert, offs int32 [E] cumulative ends)."""

    gate_up_panels: torch.Tensor | None  # the weights packed by panel_gemm.pack (`pack`), a snapshot
    down_panels: torch.Tensor | None

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.n_experts, self.dim, self.inter_dim = n_experts, dim, inter_dim
        self.first_expert = 0  # global id of expert 0 here (expert parallelism keeps a slice)
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        # buffers, as Linear.panels: a compiled step takes them as inputs; the state dict leaves them out
        self.register_buffer("gate_up_panels", None, persistent=False)
        self.register_buffer("down_panels", None, persistent=False)

    packed: int = -1  # handle of the packed copies of the weights (`pack`), -1: none

    def pack(self, enabled: bool = True) -> bool:
        """For inference on a CPU: run the experts on copies of the weights packed for oneDNN
        (model/packed_experts.py), made now (enabled=False drops them); True if packed (this
        build and dtype can). Once the weights change, the experts run unpacked until packed again."""
        enabled = enabled and can_pack(self.down_proj)
        release(self.packed)
        panels = enabled and panel_gemm.can_pack(self.gate_up_proj) and panel_gemm.can_pack(self.down_proj)
        self.gate_up_panels = panel_gemm.pack(self.gate_up_proj) if panels else None
        self.down_panels = panel_gemm.pack(self.down_proj) if panels else None
        self.packed = (
            pack_experts(self, self.gate_up_proj, self.down_proj, self.gate_up_panels, self.down_panels)
            if enabled
            else -1
        )
        return enabled

    def forward(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        if dtype not in GROUPED_MM_DTYPES:  # e.g. float64 for exactness tests
            return self.forward_reference(x, offs)
        x, gate_up_proj, down_proj = x.to(dtype), self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
        if not torch.is_grad_enabled():  # inference: one opaque op, no graph break in a compiled step
            packed = self.packed if dtype == self.down_proj.dtype else -1
            return expert_mlp(x, gate_up_proj, down_proj, offs, packed)
        return grouped_swiglu(x, gate_up_proj, down_proj, offs)

    def forward_gathered(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Decoding a few tokens in a compiled step where the panel kernel is not built (or the
        experts are not packed): x [N, H], indices and gate weights [N, K] ->
        sum_k weights[n, k] * FFN_{indices[n, k]}(x[n]) [N, H], in FP32 (or wider).

        Written as an indexed product and a sum, Inductor fuses the weight gather into the
        reduction: each token reads its chosen experts' rows straight from the stacked weights
        (gpt-fast's MoE, llama.cpp's mul_mat_id), with no sort, no copy and no call per expert,
        which at a few tokens cost more than the bytes (one core of an AMD EPYC, a decode step's
        routed experts, ms, per-expert oneDNN calls vs gathered; small preset 1 / 4 / 8 tokens:
        BF16 3.0 / 11.6 / 13.5 vs 1.7 / 6.9 / 11.3, FP32 4.6 / 13.8 / 19.3 vs 2.6 / 9.5 / 17.1;
        tiny FP32 1 / 8 tokens: 0.72 / 2.6 vs 0.28 / 1.2). An expert chosen by several tokens is
        read once per token, so `MoE` takes this path only while (token, expert) pairs are at
        most GATHER_MAX_PAIRS_PER_EXPERT times the experts. Products and sums are in FP32: a
        BF16 x BF16 product is exact there, as in a GEMM with FP32 accumulation. Eagerly the
        gather would copy the weights, so only compiled steps take this path."""
        dtype = compute_dtype(x)
        acc = torch.promote_types(dtype, torch.float32)

        def gathered(w: torch.Tensor) -> torch.Tensor:  # the chosen experts' weights [N, K, out, in]
            return w[indices].to(dtype).to(acc)

        gate, up = (x.to(dtype).to(acc)[:, None, None, :] * gathered(self.gate_up_proj)).sum(-1).chunk(2, -1)
        h = (F.silu(gate) * up).to(dtype).to(acc)  # [N, K, I], rounded as a GEMM's input would be
        y = (h[:, :, None, :] * gathered(self.down_proj)).sum(-1)  # [N, K, H]
        return (y * weights.to(acc).unsqueeze(-1)).sum(dim=1)  # [N, H]

    def forward_reference(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """Plain loop over experts, one F.linear each: the reference for `forward`."""
        out, start = [], 0
        for e, end in enumerate(offs.tolist()):
            gate, up = F.linear(x[start:end], self.gate_up_proj[e]).chunk(2, dim=-1)
            out.append(F.linear(F.silu(gate) * up, self.down_proj[e]))
            start = end
        return torch.cat(out)


GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# MoE runs the experts gathered while (token, expert) pairs <= this x experts: at twice the experts
# (small preset, 11 tokens) gathering still beat the per-expert calls, at three times (16) it lost
GATHER_MAX_PAIRS_PER_EXPERT = 2
# On a CPU, `grouped_swiglu` pads each expert's rows with zero rows to a multiple of this. torch runs a
# grouped GEMM there as one oneDNN GEMM per expert, and oneDNN generates a kernel for each new
# shape, keeping 1,024 of them. An expert's row count changes every step, so nearly every call
# generated its kernels anew: in a training step the grouped GEMMs of the small preset took
# 2.0-2.5x as long as the same calls replayed. Rounded, the counts take a few values, whose
# kernels are all cached after the first steps; the zero rows add ~4% of rows per multiple of 16
# and contribute nothing to any gradient. Small preset, BF16, 2 cores: 782 -> 965 tok/s, and peak
# memory 4.96 -> 3.77 GB, the cached kernels' (16 and 64 did as well as 32). Inference over many
# rows (evaluation, long prefills) takes the same path: `dsv3 eval` of small on 100K tokens of
# text, 30.7-33.9 -> 27.6-30.8 s, the same loss.
ROW_BUCKET = 32


@torch.compiler.disable
def pad_groups(x: torch.Tensor, offs: torch.Tensor, bucket: int):
    """x [M, H] grouped by offs -> (x' [M', H] with each group padded by zero rows to a multiple
    of `bucket`, its offs', slots [M]: the row of x' holding each row of x). Eager under
    torch.compile: the padded row count is data, known only once the offsets are."""
    counts = torch.diff(offs, prepend=offs.new_zeros(1)).long()  # [E]
    padded = (counts + bucket - 1) // bucket * bucket
    offs_padded = padded.cumsum(0)
    shift = (offs_padded - padded) - (offs.long() - counts)  # [E] where each group moves
    group = torch.repeat_interleave(
        torch.arange(len(counts), device=x.device), counts, output_size=x.shape[0]
    )
    slots = torch.arange(x.shape[0], device=x.device) + shift[group]  # [M]
    x_padded = x.new_zeros(int(offs_padded[-1]), x.shape[1]).index_copy(0, slots, x)
    return x_padded, offs_padded.to(offs.dtype), slots


class TakeRows(torch.autograd.Function):
    """y [M', H] -> y[slots] [M, H] for distinct slots; the backward places the gradient back
    (zeros elsewhere) with a copy, where index_select's backward would accumulate."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(slots)
        ctx.rows = y.shape[0]
        return y.index_select(0, slots)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (slots,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, grad.shape[1]).index_copy_(0, slots, grad), None


def grouped_swiglu(
    x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, offs: torch.Tensor
) -> torch.Tensor:
    """Every expert's SwiGLU on its rows of x [M, H] (sorted by expert, offs [E]) as two grouped
    GEMMs; on a CPU with each expert's rows padded to a multiple of ROW_BUCKET (few GEMM shapes,
    so oneDNN's kernels stay cached)."""
    slots = None
    if x.device.type == "cpu":
        x, offs, slots = pad_groups(x, offs, ROW_BUCKET)
    gate, up = _grouped_mm(x, gate_up_proj.transpose(-2, -1), offs).chunk(2, dim=-1)  # [M', I] each
    y = _grouped_mm(F.silu(gate) * up, down_proj.transpose(-2, -1), offs)  # [M', H]
    return y if slots is None else TakeRows.apply(y, slots)  # [M, H]


@torch.compiler.disable
def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """F.grouped_mm, run eagerly under torch.compile: its meta function (torch 2.13) accepts
    only BF16, and on CPU the kernel is a loop of aten::mm that compiling cannot improve."""
    return F.grouped_mm(a, b, offs=offs)


@torch.library.custom_op("dsv3::expert_mlp", mutates_args=())
def expert_mlp(
    x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, offs: torch.Tensor, packed: int
) -> torch.Tensor:
    """Inference: every expert's SwiGLU on its rows of x [M, H] (sorted by expert, offs [E]). With
    packed >= 0, on the packed copies that handle names (`GroupedExperts.pack`, model/packed_experts.py)
    for as many rows as they are the faster way. Otherwise, with fewer rows than experts (decoding) only the chosen experts run, one GEMM pair
    each on views of their weights (llama.cpp's mul_mat_id: nothing else is read), and with more,
    two grouped GEMMs. A torch.library op: torch.compile calls it as one node (grouped_mm would
    break the graph); no autograd (training takes the `_grouped_mm` path)."""
    if packed >= 0 and is_current(packed, gate_up_proj, down_proj) and runs_packed(packed, x.shape[0]):
        return run_packed(packed, x, offs)
    if x.shape[0] >= offs.shape[0]:
        return grouped_swiglu(x, gate_up_proj, down_proj, offs)
    return expert_loop(x, offs, zip(gate_up_proj, down_proj), F.linear, down_proj.shape[1])


@expert_mlp.register_fake
def _(x, gate_up_proj, down_proj, offs, packed):
    return x.new_empty(x.shape[0], down_proj.shape[1])


DispatchState = TypeVar("DispatchState")


class Dispatcher(Protocol[DispatchState]):
    """The seam between the router and the experts: where each (token, expert) pair's hidden
    state goes, and how the experts' outputs come back. MoE calls, per forward,

        x_sorted, offs, state = dispatch(x, indices, n_experts)
        y = combine(experts(x_sorted, offs), weights, state)

    dispatch: x [N, H], indices [N, K] global expert ids -> x_sorted [M, H], the rows for the
    experts held here grouped by expert, offs int32 [E_here] their cumulative ends (what
    `GroupedExperts` takes), and whatever `combine` needs to undo it (opaque to MoE).
    combine: y_sorted [M, H] the experts' outputs in x_sorted's order, weights [N, K] ->
    y [N, H] = sum_k weights[n, k] * (output of expert indices[n, k] for token n).
    Implementations: `LocalDispatcher` (one device) and
    `dsv3.parallel.expert_parallel.ExpertParallelDispatcher` (all-to-all over the ep group)."""

    @abstractmethod
    def dispatch(
        self, x: torch.Tensor, indices: torch.Tensor, n_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]: ...

    @abstractmethod
    def combine(
        self, y_sorted: torch.Tensor, weights: torch.Tensor, state: DispatchState
    ) -> torch.Tensor: ...


class LocalDispatcher(Dispatcher[tuple[torch.Tensor, torch.Tensor]]):
    """Single-device dispatch: sort (token, expert) pairs by expert; combine by weighted sum.
    The state is the sorting permutation and its inverse."""

    def dispatch(
        self, x: torch.Tensor, indices: torch.Tensor, n_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x [N, H], indices [N, K] -> x_sorted [N*K, H], offs [E], (order, inverse) [N*K] each."""
        flat = indices.flatten()  # [N*K]
        order = flat.argsort(stable=True)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
        counts = torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat)
        )
        offs = counts.cumsum(0).to(torch.int32)  # [E] (a fixed shape, unlike bincount's)
        return PermuteRows.apply(x, order, inverse, indices.shape[1]), offs, (order, inverse)

    def combine(
        self, y_sorted: torch.Tensor, weights: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """y_sorted [N*K, H] in dispatch order, weights [N, K] -> [N, H] = sum_k w_k y_k."""
        N, K = weights.shape
        order, inverse = state
        y = PermuteRows.apply(y_sorted, inverse, order, 1)  # back to (token, k) order
        return (y.view(N, K, y.shape[-1]) * weights.to(y.dtype).unsqueeze(-1)).sum(dim=1)  # N may be 0


class PermuteRows(torch.autograd.Function):
    """x [N, H] -> x[index // repeats] [N * repeats, H] for a permutation `index` of N * repeats
    rows with its `inverse`: each row of x goes to `repeats` places (a token to its K experts). The
    backward is a gather too, grad[inverse] summed over each row's `repeats` copies, where indexing's
    own backward scatters with accumulation, which runs on one thread on a CPU (MoE dispatch of
    1,024 tokens x 6 experts x 512 channels, BF16, 2 cores: 5 vs 1 ms forward and backward)."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, repeats: int
    ) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.repeats = repeats
        return x.index_select(0, index // repeats if repeats > 1 else index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        grad = grad.index_select(0, inverse)  # back to (row, copy) order
        if ctx.repeats > 1:
            grad = grad.view(-1, ctx.repeats, grad.shape[-1]).sum(dim=1)
        return grad, None, None, None


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_routed_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.aux_loss_alpha = cfg.aux_loss_alpha if cfg.seq_aux else 0.0
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
            if cfg.n_shared_experts
            else None
        )
        self.dispatcher: Dispatcher[Any] = LocalDispatcher()

    def forward(self, x: torch.Tensor, with_aux: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, H] -> (y [B, T, H], sequence-wise balance loss or None)."""
        B, T, H = x.shape
        flat = x.reshape(B * T, H)
        route = self.gate(flat)
        shared = self.shared_experts
        if self._on_panels(flat):
            shared_panels = self._shared_panels()
            experts = self.experts
            y = panel_gemm.routed_experts(
                flat,
                route.indices,
                route.weights,
                experts.gate_up_panels,
                experts.down_panels,
                experts.inter_dim,
                shared_panels,
            ).view(B, T, H)
            if shared_panels is not None:  # the shared experts ran in the same call
                shared = None
        elif self._gathers(B * T):
            y = self.experts.forward_gathered(flat, route.indices, route.weights).view(B, T, H)
        else:
            x_sorted, offs, state = self.dispatcher.dispatch(flat, route.indices, self.n_routed_experts)
            y = self.dispatcher.combine(self.experts(x_sorted, offs), route.weights, state).view(B, T, H)
        if shared is not None:
            y = y + shared(x)
        aux = None
        if with_aux and self.aux_loss_alpha > 0:
            aux = self.aux_loss_alpha * sequence_balance_loss(
                route.scores.view(B, T, -1), route.indices.view(B, T, -1)
            )
        return y.to(x.dtype), aux

    def _on_panels(self, x: torch.Tensor) -> bool:
        """Whether the experts run as one `panel_gemm.routed_experts` call: a compiled inference
        step, all experts here, packed for the panel kernel in x's dtype, and at most
        PANEL_MAX_ROWS_PER_EXPERT (token, expert) pairs per expert."""
        panels = self.experts.down_panels if self._fuses_here() else None
        return (
            panels is not None
            and panels.dtype == x.dtype
            and x.shape[0] <= max_fused_tokens(self.n_routed_experts, self.top_k, panels=True)
        )

    def _gathers(self, n_tokens: int) -> bool:
        """Whether the routed experts run gathered (`GroupedExperts.forward_gathered`): inference in
        a compiled step, all experts here, and few (token, expert) pairs."""
        return self._fuses_here() and n_tokens <= max_fused_tokens(
            self.n_routed_experts, self.top_k, panels=False
        )

    def _fuses_here(self) -> bool:
        """A compiled inference step with all the experts here: they may run without dispatch."""
        return (
            compiled_inference()
            and isinstance(self.dispatcher, LocalDispatcher)
            and isinstance(self.experts, GroupedExperts)
        )

    def _shared_panels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The shared experts' gate, up and down weights packed for the panel kernel, if all are."""
        if self.shared_experts is None:
            return None
        mlp = self.shared_experts
        panels = (mlp.gate_proj.panels, mlp.up_proj.panels, mlp.down_proj.panels)
        return panels if all(p is not None for p in panels) else None


def max_fused_tokens(n_routed_experts: int, top_k: int, panels: bool) -> int:
    """The most tokens a compiled inference step runs through the experts with no dispatch: as
    one panel-kernel call (panels=True) or gathered."""
    per_expert = PANEL_MAX_ROWS_PER_EXPERT if panels else GATHER_MAX_PAIRS_PER_EXPERT
    return per_expert * n_routed_experts // top_k


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """sum_i f_i P_i averaged over sequences (V3R eq. 17-20), without alpha.

    scores [B, T, E] affinities, indices [B, T, K] chosen experts."""
    B, T, E = scores.shape
    K = indices.shape[-1]
    counts = torch.zeros(B, E, device=scores.device).scatter_add_(
        1, indices.reshape(B, T * K), torch.ones(B, T * K, device=scores.device)
    )
    f = counts * (E / (K * T))  # [B, E]
    P = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # [B, E]
    return (f * P).sum(dim=-1).mean()


def named_routers(model: nn.Module) -> list[tuple[str, Router]]:
    """Every Router of `model` with its module name, in module order (main layers by index, then
    the MTP modules): the one way the trainer, EP and the metrics find routers."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Router)]


@torch.no_grad()
def update_router_bias(model: nn.Module, gamma: float) -> dict[str, torch.Tensor]:
    """Auxiliary-loss-free balancing step (V3R eq. 16), called after each optimizer step.

    For every router with a selection bias: b_i += gamma * sign(mean load - load_i), over the
    tokens counted since the last call; every router's counters are reset. Returns each router's
    loads [E] by module name (module order). gamma = 0 only reads and resets."""
    loads = {}
    for name, router in named_routers(model):
        load = router.tokens_per_expert.clone()
        if gamma and router.method.selection_bias:
            router.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
        router.tokens_per_expert.zero_()
        loads[name] = load
    return loads
