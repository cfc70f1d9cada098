"""Routing methods: which experts a token may choose, and by which values (V3R section 2.1.2).

Every DeepSeek router (`dsv3.model.moe.Router`) shares one skeleton, in FP32:
    s = score(u . e)                      affinities [N, E]: sigmoid (V3) or softmax (V2)
    choice = s + b  or  s                 b = e_score_correction_bias, for *selection only*
    indices = top-k of choice             within the best topk_group of n_group groups, if limited
    weights = s of the chosen experts     (normalized, scaled: the Router's business)
A `RoutingMethod` is the part that differs between versions, named by the checkpoint's config
keys: `topk_method` picks the class and `scoring_func` the score function.

  * "noaux_tc"             DeepSeek-V3: a selection bias, moved by the balancing step instead of
                           an auxiliary loss; a group scores the sum of its top-2 choice values.
  * "group_limited_greedy" DeepSeek-V2: no bias; a group scores its best choice value (the max).
  * "greedy"               plain top-k over all experts (V2-Lite).

Group-limited (node-limited) routing: the experts form n_group groups (one per node in V3); the
best topk_group groups by group score are kept and every expert of the others is masked with
-inf (not 0: with a zero mask a negative bias could make a masked expert win), then top-k runs
over what is left. Expert parallelism aligns groups with nodes, so this caps the nodes a token's
hidden state travels to (parallel/expert_parallel.py).

Adding a method is one subclass and one entry in `ROUTING_METHODS`: config validation
(`ModelConfig.routing_method`), the Router, the balancing step, the expert-parallel layout rules
and the cost analyzer all read it from there.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor

from dsv3.model.linear import compiled_inference

SCORE_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid,  # V3: each expert's affinity on its own
    "softmax": partial(torch.softmax, dim=-1),  # V2: affinities compete across experts
}


def k_largest(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """x.topk(k, dim=-1): (values, indices) [..., k], largest first. In a compiled inference step,
    k rounds of argmax, which Inductor fuses into its loops: torch.topk is a library call there
    (three per MoE layer, ~1.3 us each with its outputs' allocations; a tiny decode step takes
    ~0.33 ms). Of equal values the lower index comes first (torch.topk leaves their order open, so
    an exact tie of two experts' scores may route differently there)."""
    if not compiled_inference():
        return x.topk(k, dim=-1)
    values, indices = [], []
    for _ in range(k):
        index = x.argmax(dim=-1, keepdim=True)
        values.append(x.gather(-1, index))
        indices.append(index)
        x = x.scatter(-1, index, float("-inf"))
    return torch.cat(values, dim=-1), torch.cat(indices, dim=-1)


class RoutingMethod:
    """Plain top-k over all experts; subclasses add a selection bias and/or a group limit."""

    name: ClassVar[str]  # the config's topk_method
    selection_bias: ClassVar[bool] = False  # the Router keeps b [E] (gate.e_score_correction_bias)
    group_score_experts: ClassVar[int] = 0  # a group is scored from its best this-many experts; 0: no groups

    def __init__(self, scoring_func: str, n_group: int = 1, topk_group: int = 1):
        self.score: Callable[[Tensor], Tensor] = SCORE_FUNCTIONS[scoring_func]  # logits [N, E] -> s [N, E]
        self.n_group, self.topk_group = n_group, topk_group

    @property
    def group_limited(self) -> bool:
        """Whether a token chooses only within its best topk_group of n_group expert groups."""
        return self.group_score_experts > 0 and self.n_group > 1

    def group_scores(self, grouped: Tensor) -> Tensor:
        """choice values [N, G, E/G] -> group scores [N, G]: the sum of the group's best
        `group_score_experts` values (for 1, the max)."""
        return k_largest(grouped, self.group_score_experts)[0].sum(dim=-1)

    def select(self, choice: Tensor, top_k: int) -> Tensor:
        """choice [N, E] (scores, plus the bias if any) -> the chosen experts [N, top_k]."""
        if self.group_limited:
            choice = self._mask_groups(choice.detach())
        return k_largest(choice, top_k)[1]

    def _mask_groups(self, choice: Tensor) -> Tensor:
        N, E = choice.shape
        grouped = choice.view(N, self.n_group, E // self.n_group)  # [N, G, E/G] (N may be 0)
        group_scores = self.group_scores(grouped)  # [N, G]
        keep = k_largest(group_scores, self.topk_group)[1]  # [N, topk_group]
        masked = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
        return grouped.masked_fill(masked[..., None], float("-inf")).view(N, E)  # [N, E]


class NoAuxTC(RoutingMethod):
    """DeepSeek-V3: auxiliary-loss-free balancing through a selection bias; top-2 group scores."""

    name = "noaux_tc"
    selection_bias = True
    group_score_experts = 2


class GroupLimitedGreedy(RoutingMethod):
    """DeepSeek-V2: device-limited routing, a group scored by its best expert."""

    name = "group_limited_greedy"
    group_score_experts = 1


class Greedy(RoutingMethod):
    """Plain top-k over all experts (V2-Lite)."""

    name = "greedy"


ROUTING_METHODS: dict[str, type[RoutingMethod]] = {m.name: m for m in (NoAuxTC, GroupLimitedGreedy, Greedy)}
