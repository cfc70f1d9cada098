"""The fused head + cross entropy against the plain one: loss and both gradients."""

import pytest
import torch

from dsv3.model import loss as loss_mod
from dsv3.model.loss import linear_cross_entropy, linear_cross_entropy_reference


@pytest.mark.parametrize("upstream", [1.0, 2.0])  # the main loss's unit gradient, and a scaled one
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_equals_reference(autocast, upstream, monkeypatch):
    monkeypatch.setattr(loss_mod, "CHUNK_ROWS", 7)  # several chunks, a ragged last one
    torch.manual_seed(0)
    h = torch.randn(3, 11, 16, requires_grad=True)
    w = (torch.randn(50, 16) * 0.3).requires_grad_()
    t = torch.randint(0, 50, (3, 11))
    t[0, 2] = t[2, -1] = -100
    results = []
    for f in (linear_cross_entropy, linear_cross_entropy_reference):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = f(h, w, t) * upstream
        out.backward()
        results.append((out.detach(), h.grad, w.grad))
        h.grad = w.grad = None
    (a, ga_h, ga_w), (b, gb_h, gb_w) = results
    tol = dict(rtol=2e-2, atol=1e-3) if autocast else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(ga_h, gb_h, **tol)
    torch.testing.assert_close(ga_w, gb_w, **tol)
    assert ga_h.dtype == h.dtype and ga_w.dtype == w.dtype


def test_all_targets_ignored_gives_zero_loss_and_gradients():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    out = linear_cross_entropy(h, w, torch.full((4,), -100))
    out.backward()
    assert out.item() == 0 and h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0
