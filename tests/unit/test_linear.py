"""`linear` (the router's product) of a few rows in a compiled inference step runs as a fused loop
(model/linear.py): the same product as F.linear, and what runs is read from the traced graphs."""

import pytest
import torch
import torch.nn.functional as F

from dsv3.model import linear as linear_module
from dsv3.model.linear import INLINE_MAX_ROWS, linear


def _inline_everywhere(monkeypatch):
    """Run the compiled-inference branches eagerly, to check their arithmetic without a compiler."""
    monkeypatch.setattr(linear_module, "compiled_inference", lambda: True)


@pytest.mark.parametrize("bias", [False, True])
def test_the_inline_product_equals_f_linear(monkeypatch, bias):
    """Exactly in float64, to FP32 rounding in FP32, to one BF16 rounding of the FP32 result in
    BF16 (a GEMM accumulates BF16 products in FP32 too): one row and INLINE_MAX_ROWS, [B, T, in]."""
    _inline_everywhere(monkeypatch)
    torch.manual_seed(0)
    w, b = torch.randn(48, 64, dtype=torch.float64), torch.randn(48, dtype=torch.float64)
    for shape in ((1, 64), (1, INLINE_MAX_ROWS, 64), (INLINE_MAX_ROWS, 1, 64)):
        x = torch.randn(*shape, dtype=torch.float64)
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            wb = b.to(dtype) if bias else None
            got = linear(x.to(dtype), w.to(dtype), wb)
            assert got.dtype == dtype and got.shape == (*shape[:-1], 48)
            torch.testing.assert_close(got, F.linear(x.to(dtype), w.to(dtype), wb), rtol=tol, atol=tol)
        xb, wbf = x.bfloat16(), w.bfloat16()
        exact = F.linear(xb.double(), wbf.double(), b.bfloat16().double() if bias else None)
        got = linear(xb, wbf, b.bfloat16() if bias else None)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), exact, rtol=2**-8, atol=1e-6)


def test_a_compiled_inference_step_inlines_linear_of_few_rows():
    """Compiled without autograd, `linear` of at most INLINE_MAX_ROWS rows traces to a product
    and a sum; with more rows, or with autograd, to F.linear. All equal eager."""
    torch.manual_seed(0)
    w, b = torch.randn(24, 32, requires_grad=True), torch.randn(24)

    def layer(x):
        return linear(x, w, b)

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes})
        return gm.forward

    for rows, grad in ((1, False), (INLINE_MAX_ROWS, False), (INLINE_MAX_ROWS + 1, False), (1, True)):
        x = torch.randn(rows, 32)
        torch._dynamo.reset()
        graphs.clear()
        with torch.set_grad_enabled(grad):
            got = torch.compile(layer, dynamic=True, backend=recording_backend)(x)
        ran = set().union(*graphs)
        assert any("linear" in t for t in ran) == (rows > INLINE_MAX_ROWS or grad), (rows, grad, ran)
        torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)
