"""Optimizer and learning-rate schedules, as DeepSeek-V3 trained (V3R section 4.2).

AdamW with betas (0.9, 0.95) and weight decay 0.1, applied to matrices only: norms, biases, router
correction biases and embeddings are not decayed (`param_groups`). Master weights stay FP32. The
update is torch's fused AdamW (one kernel per group of tensors, on CPU as on CUDA) where the
parameters allow it: its default on a CPU runs ~10 ops per tensor one tensor at a time, 439 ms per
step for the small preset's 149M parameters on 2 cores of an AMD EPYC against 40 ms fused, a sixth
of the whole training step. With `bf16_moments=True` the two Adam moments are stored in BF16 (half
the optimizer memory, as in V3's FP8 recipe); each step upcasts them, updates in FP32 and rounds
back.

Schedules are pure functions of the step (`lr_at`), so a checkpoint only needs the step to resume:
  * "v3":     linear warm-up to the peak, constant, cosine down to 10% of the peak, then a short
              tail at 1/30 of the peak. The phase boundaries are V3's, as fractions of the run:
              constant to 10T of 14.8T tokens, cosine to 14.3T, 0.1x to 14.63T, 0.033x after.
  * "cosine": linear warm-up, then cosine from the peak down to min_lr_ratio x peak.
V3's other step-dependent knobs follow the same token fractions: the MTP weight lambda is 0.3 and
drops to 0.1 where the decay starts, and the router-bias speed gamma drops to 0 for the final
phase (`mtp_lambda_at`, `bias_gamma_at`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# V3's phase boundaries as fractions of the 14.8T training tokens.
V3_DECAY_START = 10.0 / 14.8
V3_DECAY_END = 14.3 / 14.8
V3_TAIL_START = (14.3 + 0.333) / 14.8
V3_MIN_RATIO = 2.2e-5 / 2.2e-4
V3_TAIL_RATIO = 7.3e-6 / 2.2e-4
SCHEDULES = ("v3", "cosine")


@dataclass(frozen=True)
class Schedule:
    """Learning-rate shape over `total_steps` optimizer steps."""

    peak_lr: float
    total_steps: int
    warmup_steps: int
    kind: str = "v3"  # "v3" | "cosine"
    min_lr_ratio: float = V3_MIN_RATIO

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if self.kind == "cosine":
            return self._cosine(step, self.warmup_steps, self.total_steps)
        frac = step / self.total_steps
        if frac < V3_DECAY_START:
            return self.peak_lr
        if frac < V3_DECAY_END:
            start = max(self.warmup_steps, round(V3_DECAY_START * self.total_steps))
            return self._cosine(step, start, round(V3_DECAY_END * self.total_steps))
        ratio = self.min_lr_ratio if frac < V3_TAIL_START else V3_TAIL_RATIO
        return self.peak_lr * ratio

    def _cosine(self, step: int, start: int, end: int) -> float:
        progress = min(1.0, (step - start) / max(1, end - start))
        ratio = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return self.peak_lr * ratio


def mtp_lambda_at(step: int, total_steps: int, first: float = 0.3, later: float = 0.1) -> float:
    """MTP loss weight: `first` for V3's first 10T of 14.8T tokens, `later` after."""
    return first if step < V3_DECAY_START * total_steps else later


def bias_gamma_at(step: int, total_steps: int, gamma: float) -> float:
    """Router-bias update speed: gamma, and 0 for V3's final 500B of 14.8T tokens."""
    return gamma if step < V3_DECAY_END * total_steps else 0.0


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices, and everything else (norms, biases, embeddings)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.1,
    eps: float = 1e-8,
    bf16_moments: bool = False,
) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if bf16_moments:
        return AdamWLowPrecisionMoments(groups, lr=lr, betas=betas, eps=eps)
    params = [p for g in groups for p in g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused_adamw_runs(params))


def fused_adamw_runs(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these parameters: floating point, on a CPU or a CUDA device."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


class AdamWLowPrecisionMoments(torch.optim.Optimizer):
    """AdamW (decoupled decay) whose moments are stored in BF16 and updated in FP32."""

    def __init__(
        self, params, lr: float, betas: tuple[float, float], eps: float = 1e-8, weight_decay: float = 0.0
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "closures are not supported"
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                t = state["step"].item()
                g = p.grad.float()
                m = state["exp_avg"].float().lerp_(g, 1 - beta1)
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1**t))
