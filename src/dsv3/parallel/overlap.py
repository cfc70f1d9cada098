"""Hiding the expert-parallel all-to-alls behind compute.

With expert parallelism every MoE layer sends each token's hidden state to its experts' ranks
and the outputs back. DeepSeek-V3 hides that traffic instead of waiting for it (V3R sec. 3.2,
3.4; ISCA sec. 4): in training, computation of one chunk overlaps the communication of another
(DualPipe) and the shared expert runs while the routed tokens travel; in decoding, the batch is
split into two micro-batches and "the attention of one micro-batch overlaps with the dispatch +
MoE + combine of the other". Both rest on the dispatcher's split phases
(`ExpertParallelDispatcher.dispatch_begin/_end`, `combine_begin/_end`): `*_begin` puts the rows
on the wire with asynchronous collectives, `*_end` waits for them at their first use.

Training (`apply_dispatch_overlap`, `dsv3 train --ep-overlap`): each expert-parallel MoE becomes
an `OverlappedMoE`, the same module with the same parameters whose forward runs the shared expert
between dispatch_begin and dispatch_end and the balance loss between combine_begin and
combine_end. The arithmetic is the MoE's, so outputs and gradients are unchanged (autograd goes
through the functional collectives as before). `parallelize` applies it right after expert
parallelism, before FSDP wraps the model (it swaps the module's class, as FSDP2 itself does).

Decoding (`MicroBatchDecode`): a forward over the main layers for the engine's decode step that
splits the batch's rows in two halves, A and B, each a generator that runs its part of the model
and yields whenever its rows are on the wire. Driven alternately, per MoE layer:

    A: attention, router, dispatch_begin        | yield
    B: attention, router, dispatch_begin        | yield   (A's rows in flight)
    A: dispatch_end, experts, combine_begin, shared expert   | yield   (B's rows in flight)
    B: dispatch_end, experts, combine_begin, shared expert   | yield   (A's outputs in flight)
    A: combine_end, residual; next layer's attention ...     (B's outputs in flight)

An empty half (a batch of one, or a rank with nothing to decode: `idle`) runs only its
collectives, with zero tokens, so every rank issues the same all-to-alls in the same order. The
outputs equal those of the plain forward (the same modules on the same rows).

`overlap_report(trace)` measures the overlap on a torch.profiler trace: the all-to-alls' time on
the wire (the backend's collective events) against the time the compute thread spent blocked on
them (the dispatcher marks its blocking count exchanges and its waits for rows).
"""

from __future__ import annotations

from collections.abc import Generator

import torch
from torch import Tensor, nn

from dsv3.model.moe import MoE, sequence_balance_loss
from dsv3.model.transformer import TransformerOutput
from dsv3.parallel.expert_parallel import (
    COMBINE_WAIT_EVENT,
    COUNTS_EVENT,
    DISPATCH_WAIT_EVENT,
    ExpertParallelDispatcher,
)


# ------------------------------------------------------------------------------ training
class OverlappedMoE(MoE):
    """MoE whose shared expert runs while the routed tokens are on the wire."""

    def forward(self, x: Tensor, with_aux: bool = False) -> tuple[Tensor, Tensor | None]:
        """x [B, T, H] -> (y [B, T, H], balance loss or None): MoE.forward's arithmetic."""
        B, T, H = x.shape
        flat = x.reshape(B * T, H)
        route = self.gate(flat)
        pending = self.dispatcher.dispatch_begin(flat, route.indices, self.n_routed_experts)
        shared = self.shared_experts(x) if self.shared_experts is not None else None  # tokens in flight
        x_sorted, offs, state = self.dispatcher.dispatch_end(pending)
        back = self.dispatcher.combine_begin(self.experts(x_sorted, offs), route.weights, state)
        aux = None
        if with_aux and self.aux_loss_alpha > 0:  # outputs in flight
            aux = self.aux_loss_alpha * sequence_balance_loss(
                route.scores.view(B, T, -1), route.indices.view(B, T, -1)
            )
        y = self.dispatcher.combine_end(back).view(B, T, H)
        if shared is not None:
            y = y + shared
        return y.to(x.dtype), aux


def apply_dispatch_overlap(model: nn.Module) -> int:
    """In place: every expert-parallel MoE of `model` becomes an OverlappedMoE (same parameters,
    same outputs). Returns how many. Call before FSDP wraps the model."""
    moes = [
        m for m in model.modules() if type(m) is MoE and isinstance(m.dispatcher, ExpertParallelDispatcher)
    ]
    for m in moes:
        m.__class__ = OverlappedMoE
    return len(moes)


# ------------------------------------------------------------------------------ decoding
class MicroBatchDecode:
    """The engine's decode forward, model(input_ids, cache=view, start_pos=..., absorb=True),
    over two interleaved micro-batches (module docstring); the MTP modules are not run."""

    def __init__(self, model: nn.Module):
        self.model = model

    @torch.no_grad()
    def __call__(
        self, input_ids: Tensor, *, cache, start_pos: Tensor, absorb: bool = True
    ) -> TransformerOutput:
        """input_ids [B, T] at positions start_pos [B] -> logits [B, T, V], hidden [B, T, H]."""
        from dsv3.infer.cache import CacheView

        B, T = input_ids.shape
        half = (B + 1) // 2
        halves = []
        for rows in (slice(0, half), slice(half, B)):
            view = CacheView(
                cache.cache,
                cache.write_idx.view(B, T)[rows].flatten(),
                cache.read_blocks[rows] if cache.read_blocks is not None else None,
                cache.start_pos[rows],
            )
            halves.append(self._micro_batch(input_ids[rows], view))
        h = torch.cat(interleave(halves), dim=0)  # [B, T, H]
        return TransformerOutput(logits=self.model.lm_head(self.model.norm(h)), hidden=h)

    @torch.no_grad()
    def idle(self, T: int = 1) -> None:
        """A rank with nothing to decode: both halves empty, only their collectives."""
        empty = torch.empty(0, T, dtype=torch.long, device=self.model.embed_tokens.weight.device)
        interleave([self._micro_batch(empty, None), self._micro_batch(empty, None)])

    def _micro_batch(self, ids: Tensor, view) -> Generator[None, None, Tensor]:
        """ids [b, T] (b may be 0) through the main layers; yields while its rows are on the wire."""
        model = self.model
        b, T = ids.shape
        h = model.embed_tokens(ids)  # [b, T, H]
        cos, sin = model.rope(view.start_pos, T) if b else (None, None)
        for block in model.layers.values():
            if b:
                attn = block.self_attn(
                    block.input_layernorm(h), cos, sin, view, block.layer_idx, view.start_pos, True
                )
                h = h + attn
            mlp = block.mlp
            if not isinstance(mlp, MoE):
                if b:
                    h = h + mlp(block.post_attention_layernorm(h))
                continue
            x = block.post_attention_layernorm(h)
            flat = x.reshape(b * T, x.shape[-1])
            route = mlp.gate(flat) if b else None
            indices = route.indices if b else torch.empty(0, mlp.top_k, dtype=torch.long, device=h.device)
            weights = route.weights if b else indices.to(flat.dtype)
            pending = mlp.dispatcher.dispatch_begin(flat, indices, mlp.n_routed_experts)
            yield  # rows in flight: the other micro-batch computes its attention
            x_sorted, offs, state = mlp.dispatcher.dispatch_end(pending)
            back = mlp.dispatcher.combine_begin(mlp.experts(x_sorted, offs), weights, state)
            shared = mlp.shared_experts(x) if b and mlp.shared_experts is not None else None
            yield  # outputs in flight: the other micro-batch computes its experts
            y = mlp.dispatcher.combine_end(back).view(b, T, x.shape[-1])
            if shared is not None:
                y = y + shared
            h = h + y.to(x.dtype)
        return h


def interleave(parts: list[Generator[None, None, Tensor]]) -> list[Tensor]:
    """Run the generators round-robin, one step each in turn, to their ends; their results."""
    results: list[Tensor | None] = [None] * len(parts)
    live = list(range(len(parts)))
    while live:
        for i in list(live):
            try:
                next(parts[i])
            except StopIteration as done:
                results[i] = done.value
                live.remove(i)
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------------------ measuring
def overlap_report(events) -> dict:
    """From torch.profiler events (`prof.events()`): the all-to-alls' time on the wire (the
    backend's collective events, on its own threads), the time the compute thread was blocked on
    them, split into the blocking count exchanges, the waits for dispatched rows and the waits
    for combined rows (the dispatcher's marked ranges), and hidden_fraction = 1 - blocked / on
    the wire. On a CPU with gloo "on the wire" includes waiting for the slower rank."""
    total = lambda name: sum(e.time_range.elapsed_us() for e in events if e.name == name)  # noqa: E731
    wire = total("gloo:all_to_all") + total("nccl:all_to_all")
    blocked = {
        "counts_us": total(COUNTS_EVENT),
        "dispatch_us": total(DISPATCH_WAIT_EVENT),
        "combine_us": total(COMBINE_WAIT_EVENT),
    }
    exposed = sum(blocked.values())
    return {"all_to_all_us": wire, **blocked, "hidden_fraction": 1 - exposed / wire if wire else None}
