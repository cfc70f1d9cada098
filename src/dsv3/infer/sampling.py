"""Turning logits into tokens, per request: the parameters, their validation, and the
distribution each request samples from.

For a step of the engine every running request has its own SamplingParams; `SamplingBatch`
holds them as tensors so the logits of the whole batch [B, V] are processed at once, in the
order transformers applies them:
    repetition penalty (CTRL: a seen token's logit is divided by p if > 0, else multiplied by p)
    -> temperature -> top-k -> top-p (the smallest set of most likely tokens reaching top_p)
and `probs` returns the resulting distribution; a greedy row (temperature 0) is one-hot on its
argmax, so greedy decoding and speculative acceptance go through the same code. A token is drawn
by inverse CDF from one uniform per row, taken from that request's own torch.Generator: the
same seed gives the same tokens whatever else is in the batch. Greedy rows draw nothing.

Ranges. `validate` holds every parameter to the range this code can compute with: integers that
become int64 tensors (top_k, stop_token_ids) or seed a generator fit in int64; floats are finite;
a temperature below GREEDY_BELOW is greedy (as in vLLM; dividing the logits by a temperature
near 0 overflows float32 and the distribution turns to NaN); the repetition penalty,
which divides or multiplies logits, lies in [MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY].

Log-probabilities. A request may ask for the log-probability of each token it gets (`logprobs`)
and of each prompt token after the first (`prompt_logprobs`), with that many of the most likely
tokens at each position (0..MAX_LOGPROBS). They are log_softmax of the model's raw logits, before
the repetition penalty, temperature and top-k/top-p shape the distribution sampled from (what
vLLM reports by default): the model's own probability of the text, whatever the sampling.
`max_tokens=0` with prompt_logprobs scores a prompt without generating.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

INT64_MAX = 2**63 - 1
GREEDY_BELOW = 1e-5  # temperatures below this are greedy
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-6, 1e6
MAX_LOGPROBS = 20  # most likely tokens reported per position (OpenAI's top_logprobs limit)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 (below GREEDY_BELOW) = greedy
    top_p: float = 1.0  # 1.0 = off
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    stop: tuple[str, ...] = ()  # stop strings (need Engine(decode=...)); not included in the output
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None  # per-request generator; same seed -> same tokens
    logprobs: int | None = None  # each generated token's log-probability and this many top ones (None: off)
    prompt_logprobs: int | None = None  # the same for the prompt tokens after the first (None: off)

    def validate(self) -> None:
        """ValueError naming the field, its value and the rule."""

        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: {rule}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        need(
            is_int(self.max_tokens) and self.max_tokens >= (0 if self.prompt_logprobs is not None else 1),
            "max_tokens",
            "must be an integer >= 1 (0 only with prompt_logprobs: score the prompt without generating)",
        )
        need(
            is_num(self.temperature) and self.temperature >= 0,
            "temperature",
            "must be a number >= 0 (0 = greedy)",
        )
        need(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be a number in (0, 1] (1 = off)")
        need(
            is_int(self.top_k) and 0 <= self.top_k <= INT64_MAX,
            "top_k",
            f"must be an integer in [0, {INT64_MAX}] (0 = off)",
        )
        need(
            is_num(self.repetition_penalty)
            and MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
            "repetition_penalty",
            f"must be a number in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] (1 = off)",
        )
        need(
            isinstance(self.stop, (tuple, list)) and all(isinstance(s, str) and s for s in self.stop),
            "stop",
            "must be a list of non-empty strings",
        )
        need(
            isinstance(self.stop_token_ids, (tuple, list))
            and all(is_int(t) and 0 <= t <= INT64_MAX for t in self.stop_token_ids),
            "stop_token_ids",
            f"must be a list of integers in [0, {INT64_MAX}]",
        )
        need(isinstance(self.ignore_eos, bool), "ignore_eos", "must be true or false")
        need(
            self.seed is None or (is_int(self.seed) and 0 <= self.seed <= INT64_MAX),
            "seed",
            f"must be an integer in [0, {INT64_MAX}] or None",
        )

        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            need(
                value is None or (is_int(value) and 0 <= value <= MAX_LOGPROBS),
                name,
                f"must be an integer in [0, {MAX_LOGPROBS}] (most likely tokens to report) or None",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class TokenLogprob:
    """A token at one position, its log-probability, and the most likely tokens there."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log-probability), most likely first


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """logits [N, V] (raw, as the model gives them), tokens [N] -> per row the token's
    log_softmax and the `top` most likely (token, log-probability) pairs."""
    logprobs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(dim=-1)  # [N, V]
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()  # [N]
    best, best_ids = logprobs.topk(top, dim=-1)  # [N, top]
    return [
        TokenLogprob(t, lp, tuple(zip(ids, values)))
        for t, lp, ids, values in zip(tokens.tolist(), chosen, best_ids.tolist(), best.tolist())
    ]


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits [..., V] -> the most likely token ids [...], compared in FP32 or wider (torch's
    argmax over BF16 is not vectorized: 121 vs 25 us for 32768 logits on a CPU core)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).argmax(dim=-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """logits [N, V], seen [N, V] bool, penalty [N] -> logits with seen tokens penalized."""
    p = penalty[:, None].to(logits.dtype)
    return torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)


def filtered_probs(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [N, V] (temperature applied), top_k [N] (0 = off), top_p [N] -> probabilities [N, V]."""
    V = logits.shape[-1]
    if bool((top_k == 0).all()) and bool((top_p >= 1).all()):
        return logits.softmax(dim=-1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k, V)[:, None]
    drop = torch.arange(V, device=logits.device) >= k  # [N, V] beyond the top k
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    p = sorted_logits.softmax(dim=-1)
    drop = (p.cumsum(dim=-1) - p) >= top_p[:, None]  # mass before this token already reaches top_p
    p = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    return torch.zeros_like(p).scatter_(1, order, p)


def sample_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: probs [N, V], u [N] uniform in [0, 1) -> token ids [N]. A one-hot row gives
    its token for any u; a token of probability 0 is never chosen."""
    cdf = probs.cumsum(dim=-1)
    x = (u.to(cdf.dtype) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, x, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


class SamplingBatch:
    """The sampling parameters of B requests as tensors, for one step.

    seen: per row a bool [V] mask of the tokens seen so far (prompt and output), or None for a
    row without repetition penalty."""

    def __init__(
        self,
        params: list[SamplingParams],
        generators: list[torch.Generator],
        seen: list[torch.Tensor | None],
        device,
    ):
        self.params, self.generators, self.device = params, generators, device
        self.all_greedy = all(p.greedy for p in params)
        self.seen = None
        if any(s is not None for s in seen):
            V = next(s for s in seen if s is not None).shape[0]
            empty = torch.zeros(V, dtype=torch.bool, device=device)
            self.seen = torch.stack([empty if s is None else s for s in seen])  # [B, V]

    # the parameters as tensors [B], made when first used: a greedy batch without repetition
    # penalty (most decode steps) needs none of them
    @functools.cached_property
    def greedy(self) -> torch.Tensor:
        return torch.tensor([p.greedy for p in self.params], device=self.device)

    @functools.cached_property
    def temperature(self) -> torch.Tensor:
        return torch.tensor([1.0 if p.greedy else p.temperature for p in self.params], device=self.device)

    @functools.cached_property
    def top_k(self) -> torch.Tensor:
        return torch.tensor([p.top_k for p in self.params], device=self.device)

    @functools.cached_property
    def top_p(self) -> torch.Tensor:
        return torch.tensor([float(p.top_p) for p in self.params], device=self.device)

    @functools.cached_property
    def penalty(self) -> torch.Tensor:
        return torch.tensor([float(p.repetition_penalty) for p in self.params], device=self.device)

    def probs(self, logits: torch.Tensor, also_seen: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, V] -> the distribution each row samples from [B, V] (float32 or wider).
        also_seen [B] or [B, j]: more tokens per row to count as seen (drafts being verified)."""
        logits = self._penalized(logits, also_seen)
        one_hot = torch.zeros_like(logits).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        if self.all_greedy:
            return one_hot
        probs = filtered_probs(logits / self.temperature[:, None].to(logits.dtype), self.top_k, self.top_p)
        return torch.where(self.greedy[:, None], one_hot, probs)

    def uniform(self) -> torch.Tensor:
        """One uniform [0, 1) per row from its request's generator; 0 for greedy rows."""
        u = torch.zeros(len(self.params), dtype=torch.float64)
        for i, (p, g) in enumerate(zip(self.params, self.generators)):
            if not p.greedy:
                u[i] = torch.rand((), generator=g, dtype=torch.float64)
        return u.to(self.device)

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [B, V] -> token ids [B] (argmax for greedy rows)."""
        return probs.argmax(dim=-1) if self.all_greedy else sample_from(probs, self.uniform())

    def next_tokens(self, logits: torch.Tensor, also_seen: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, V] -> token ids [B]: sample(probs(logits, also_seen)), where an all-greedy
        batch takes the argmax of the (penalized) logits without building its one-hot rows."""
        if not self.all_greedy:
            return self.sample(self.probs(logits, also_seen))
        return greedy_tokens(self._penalized(logits, also_seen))

    def _penalized(self, logits: torch.Tensor, also_seen: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, V] in float32 (or wider), with the repetition penalty of the rows that have one."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        seen = self.seen
        if seen is not None and also_seen is not None:
            seen = seen.clone().scatter_(1, also_seen.view(also_seen.shape[0], -1), True)
        return logits if seen is None else apply_repetition_penalty(logits, seen, self.penalty)


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator
) -> torch.Tensor:
    """logits [B, V] -> token ids [B] with one set of parameters for the batch (the simple
    sampler of `dsv3.infer.generate`). A temperature below GREEDY_BELOW is greedy."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    B = logits.shape[0]
    probs = filtered_probs(
        logits.float() / temperature,
        torch.full((B,), top_k or 0, device=logits.device),
        torch.full((B,), top_p if top_p is not None else 1.0, device=logits.device),
    )
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
