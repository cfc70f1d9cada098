"""AdamW parameter groups, BF16-moment AdamW and the V3 / cosine schedules (dsv3.train.optim)."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from torch import nn

from dsv3.train.optim import (
    V3_DECAY_END,
    V3_DECAY_START,
    V3_TAIL_RATIO,
    AdamWLowPrecisionMoments,
    Schedule,
    bias_gamma_at,
    build_optimizer,
    mtp_lambda_at,
    param_groups,
)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4, bias=True)
        self.norm = nn.RMSNorm(4)
        self.head = nn.Linear(4, 10, bias=False)


def test_groups_decay_matrices_only():
    model = Toy()
    decay, no_decay = param_groups(model, 0.1)
    assert {id(p) for p in decay["params"]} == {id(model.proj.weight), id(model.head.weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(model.embed.weight),
        id(model.proj.bias),
        id(model.norm.weight),
    }
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


def test_the_optimizer_is_fused_adamw_and_steps_as_the_reference_does():
    """build_optimizer's AdamW runs fused on a CPU, and its steps (decay groups, several steps,
    an lr change between them) are the one-tensor-at-a-time reference's up to rounding."""
    torch.manual_seed(0)
    a, b = Toy(), Toy()
    b.load_state_dict(a.state_dict())
    start = [p.detach().clone() for p in a.parameters()]
    fused = build_optimizer(a, lr=1e-2, weight_decay=0.1)
    groups = param_groups(b, 0.1)
    reference = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    assert fused.defaults["fused"] and not reference.defaults["fused"]
    x = torch.randint(0, 10, (8,))
    for step in range(6):
        for model, opt in ((a, fused), (b, reference)):
            for group in opt.param_groups:
                group["lr"] = 1e-2 / (1 + step)
            model.head(model.norm(model.proj(model.embed(x)))).logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
    for pa, pb, p0 in zip(a.parameters(), b.parameters(), start):
        assert (pa - p0).abs().max() > 1e-3  # every tensor moved
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-6)


def test_bf16_moments_track_fp32_adamw_and_are_stored_in_bf16():
    torch.manual_seed(0)
    a, b = Toy(), Toy()
    b.load_state_dict(a.state_dict())
    opt_a = build_optimizer(a, lr=1e-2, weight_decay=0.1)
    opt_b = build_optimizer(b, lr=1e-2, weight_decay=0.1, bf16_moments=True)
    assert isinstance(opt_b, AdamWLowPrecisionMoments) and isinstance(opt_a, torch.optim.AdamW)
    x = torch.randint(0, 10, (8,))
    for _ in range(5):
        for model, opt in ((a, opt_a), (b, opt_b)):
            loss = model.head(model.norm(model.proj(model.embed(x)))).logsumexp(-1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=2e-4, rtol=1e-3), (pa - pb).abs().max()
    state = opt_b.state[b.proj.weight]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert float(state["step"]) == 5


def test_warmup_is_linear_to_the_peak():
    s = Schedule(peak_lr=1.0, total_steps=1000, warmup_steps=10)
    assert [s.lr_at(i) for i in range(10)] == pytest.approx([(i + 1) / 10 for i in range(10)])


def test_v3_shape_constant_cosine_then_tails():
    s = Schedule(peak_lr=2.2e-4, total_steps=10000, warmup_steps=100, kind="v3")
    start, end = round(V3_DECAY_START * 10000), round(V3_DECAY_END * 10000)
    assert s.lr_at(100) == s.lr_at(start - 1) == 2.2e-4
    decay = [s.lr_at(i) for i in range(start, end)]
    assert all(x > y for x, y in pairwise(decay))
    assert s.lr_at(end - 1) == pytest.approx(2.2e-5, rel=1e-3)
    assert s.lr_at(end) == pytest.approx(2.2e-5)
    assert s.lr_at(9999) == pytest.approx(2.2e-4 * V3_TAIL_RATIO) == pytest.approx(7.3e-6)


def test_cosine_decays_from_peak_to_min():
    s = Schedule(peak_lr=1.0, total_steps=100, warmup_steps=10, kind="cosine", min_lr_ratio=0.1)
    values = [s.lr_at(i) for i in range(10, 101)]
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)
    assert all(x >= y for x, y in pairwise(values))
    assert s.lr_at(55) == pytest.approx(0.55)


def test_mtp_lambda_and_gamma_follow_v3_phases():
    assert mtp_lambda_at(0, 1000) == 0.3 and mtp_lambda_at(999, 1000) == 0.1
    assert mtp_lambda_at(int(V3_DECAY_START * 1000) + 1, 1000) == 0.1
    assert bias_gamma_at(500, 1000, 0.001) == 0.001 and bias_gamma_at(990, 1000, 0.001) == 0.0
