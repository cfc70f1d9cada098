"""One rank's Engine in an expert-parallel deployment: its own sequences, everyone's MoE layers.

DeepSeek-V3 serves with data-parallel attention and expert-parallel MoE (V3R sec. 3.4): every
rank holds attention, the dense layers and the shared experts, and decodes its own sequences;
the routed experts are spread over the ranks, so each MoE layer of each forward is an
all-to-all in which every rank must take part: a rank's experts compute for the tokens of all
ranks, whether or not it has tokens of its own.

`LockstepEngine` is the Engine with a step that keeps the ranks in lockstep. A step runs, on
every rank, the same *phases* in the same order, and each phase is a fixed sequence of
MoE-layer calls:

    prefill  the main layers' MoEs, then (MTP on) the MTP layer's MoE   (the prompt chunks)
    decode   the main layers' MoEs, then (MTP on) the MTP layer's MoE   (verify + next draft)

Before each phase the ranks agree whether it runs (one all-reduce of a flag: does any rank have
work for it?). A rank with work runs its forward; a rank without runs an *idle pass*: each MoE
of the phase's sequence is entered with zero tokens (dispatch of an empty batch, the local
experts on whatever rows the other ranks sent, the combine back) and nothing else. One case is
decided during the phase: a decode whose sequences all finished skips its draft; the rank then
runs the draft's MoE calls idle after the forward, so the call sequences stay equal. The number
of forwards per step is therefore the same everywhere, whatever each rank holds: idle ranks,
requests that end at different times and one rank with all the traffic never deadlock.

With overlap=True the decode forward runs as two micro-batches whose all-to-alls hide behind
each other's compute (parallel/overlap.py: `MicroBatchDecode`); every rank then issues two
dispatches and two combines per MoE layer of that forward, an idle one with two empty halves.

Scheduling (admission, preemption, sampling) is the Engine's, per rank: a request's tokens are
those it would get from a single-process Engine (the experts' math does not depend on where
they run).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dsv3.infer.engine import Engine, RequestOutput
from dsv3.model.moe import MoE
from dsv3.parallel.overlap import MicroBatchDecode


class LockstepEngine(Engine):
    """An Engine whose every step takes part in all the MoE collectives of its expert-parallel
    group. `group`: the (CPU, gloo) process group the ranks agree over; the model's dispatchers
    carry the all-to-alls on their own group."""

    def __init__(
        self, model, *, group: dist.ProcessGroup | None = None, overlap: bool = False, **engine_kwargs
    ):
        if engine_kwargs.get("compile"):
            raise ValueError(
                "compile=True: the compiled decode step is single-process; expert-parallel "
                "serving runs eagerly (drop --compile)"
            )
        super().__init__(model, **engine_kwargs)
        self.group = group
        self.main_moes = [b.mlp for b in model.layers.values() if isinstance(b.mlp, MoE)]
        # the MTP layer's MoE calls of a phase: one per draft (chained drafts run the layer again)
        self.mtp_moes = [m.mlp for m in model.mtp if isinstance(m.mlp, MoE)] * self.mtp_drafts
        self.idle_passes = 0  # MoE sequences run with zero tokens of this rank's own
        self.overlap = overlap
        if overlap:  # two micro-batches per decode forward, one's all-to-alls behind the other's compute
            self._decode_forward = MicroBatchDecode(model)

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Engine.step's phases, each agreed over the group and padded with idle passes."""
        outputs, self._outbox = self._outbox, []
        decoding = [r for r in self.running if r.num_cached >= r.prefill_to]
        self._admit(decoding)
        prefilling = [r for r in self.running if r.num_cached < r.prefill_to]
        if self._agree(bool(prefilling)):
            if prefilling:
                self._prefill(prefilling, outputs)
            else:
                self._idle(self.main_moes + self.mtp_moes)
        decoding = self._make_room([r for r in decoding if r.finish_reason is None])
        if self._agree(bool(decoding)):
            if decoding:
                drafts = self._calls(self.mtp_moes)
                self._decode(decoding, outputs)
                if self._calls(self.mtp_moes) == drafts:  # every sequence finished: no draft ran
                    self._idle(self.mtp_moes)
            elif self.overlap:
                self._decode_forward.idle(self.steps_per_decode)  # both micro-batches empty
                self._idle(self.mtp_moes, count=False)
                self.idle_passes += 1
            else:
                self._idle(self.main_moes + self.mtp_moes)
        return outputs

    def _agree(self, mine: bool) -> bool:
        """Whether any rank of the group has work for the next phase."""
        flag = torch.tensor([int(mine)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def _idle(self, moes: list[MoE], count: bool = True) -> None:
        """Enter each MoE with zero tokens: its experts still serve the other ranks' tokens."""
        H = self.cfg.hidden_size
        for moe in moes:
            x = torch.empty(0, H, dtype=self.dtype, device=self.device)  # [0, H]
            indices = torch.empty(0, moe.top_k, dtype=torch.long, device=self.device)  # [0, K]
            x_sorted, offs, state = moe.dispatcher.dispatch(x, indices, moe.n_routed_experts)
            moe.dispatcher.combine(moe.experts(x_sorted, offs), indices.to(x.dtype), state)
        if moes and count:
            self.idle_passes += 1

    @staticmethod
    def _calls(moes: list[MoE]) -> int:
        """How many times the first of `moes` has dispatched (0 without MoEs)."""
        return moes[0].dispatcher.stats.calls if moes else 0

    def stats(self) -> dict:
        return {
            **super().stats(),
            "idle_passes": self.idle_passes,
            "decode_tokens": self._counters["decode_tokens"],
            "decode_sequence_forwards": self._counters["decode_sequence_forwards"],
        }
