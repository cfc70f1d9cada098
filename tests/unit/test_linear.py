"""`linear` (the router's product) of a few rows in a compiled inference step runs as a fused loop,
and the model's packed `Linear`s of a few more rows on the panel kernel (model/linear.py): the
same product as F.linear, and what runs is read from the traced graphs."""

import pytest
import torch
import torch.nn.functional as F

from dsv3.model import linear as linear_module
from dsv3.model import panel_gemm
from dsv3.model.linear import INLINE_MAX_ROWS, PANEL_ROWS, Linear, linear, pack_linears


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


needs_panels = pytest.mark.skipif(
    not panel_gemm.can_pack(torch.empty(0, 2)), reason="the panel kernel cannot be built here"
)


def test_linear_is_an_nn_linear_with_the_same_state_dict():
    """The model's Linear keeps nn.Linear's parameters and state dict: its packed copy is not saved."""
    torch.manual_seed(0)
    layer, plain = Linear(32, 24, bias=True), torch.nn.Linear(32, 24, bias=True)
    plain.load_state_dict(layer.state_dict())
    pack_linears(layer)
    assert layer.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), plain(x))  # eager: F.linear, packed or not


@needs_panels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_a_compiled_inference_step_runs_packed_linears_of_a_few_rows_on_the_panel_kernel(dtype, bias):
    """Packed, a Linear of PANEL_ROWS rows in a compiled inference step is one panel-kernel call,
    equal to F.linear; one row (Inductor's own GEMM is faster there), more rows, autograd, or an
    unpacked Linear trace to F.linear."""
    torch.manual_seed(0)
    layer = Linear(64, 40, bias=bias).to(dtype)
    assert pack_linears(torch.nn.Sequential(layer)) == 1 and layer.panels is not None
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes})
        return gm.forward

    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1 / 128, atol=1e-2)
    cases = [
        (1, False),
        (PANEL_ROWS[0], False),
        (PANEL_ROWS[-1], False),
        (PANEL_ROWS[-1] + 1, False),
        (4, True),
    ]
    for rows, grad in cases:
        x = torch.randn(rows // 2, 2, 64).to(dtype) if rows % 2 == 0 else torch.randn(rows, 64).to(dtype)
        torch._dynamo.reset()
        graphs.clear()
        with torch.set_grad_enabled(grad):
            got = torch.compile(layer, dynamic=True, backend=recording_backend)(x)
            ref = F.linear(x, layer.weight, layer.bias)
        panel = any("dsv3_panel.linear" in t for t in set().union(*graphs))
        assert panel == (PANEL_ROWS[0] <= rows <= PANEL_ROWS[1] and not grad), (rows, grad, graphs)
        assert got.shape == ref.shape and got.dtype == dtype
        torch.testing.assert_close(got.detach(), ref.detach(), **tol)
    pack_linears(layer, enabled=False)
    assert layer.panels is None


@needs_panels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_outputs_read_the_first_rows_packed_or_not(dtype):
    """Linear.first_outputs(x, n) is F.linear with the first n rows of the weight (and bias):
    eagerly from a view of the weight, in a compiled inference step of a few rows from the panels
    holding those rows (n a multiple of 16 or not), nothing copied."""
    torch.manual_seed(0)
    layer = Linear(64, 40, bias=True).to(dtype)
    assert pack_linears(torch.nn.Sequential(layer)) == 1
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1 / 128, atol=1e-2)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes})
        return gm.forward

    x = torch.randn(2, 64).to(dtype)
    for n in (5, 16, 33):
        want = F.linear(x, layer.weight[:n], layer.bias[:n])
        torch.testing.assert_close(layer.first_outputs(x, n), want, **tol)  # eager
        torch._dynamo.reset()
        graphs.clear()
        with torch.no_grad():
            got = torch.compile(layer.first_outputs, backend=recording_backend)(x, n)
        assert any("dsv3_panel.linear" in t for t in set().union(*graphs)), graphs
        assert got.shape == (2, n)
        torch.testing.assert_close(got, want.detach(), **tol)


def test_pack_linears_leaves_what_the_panel_kernel_does_not_run(monkeypatch):
    model = torch.nn.Sequential(Linear(8, 8), torch.nn.Linear(8, 8), Linear(8, 8).double())
    monkeypatch.setattr(panel_gemm, "can_pack", lambda w: w.dtype == torch.float32)
    monkeypatch.setattr(panel_gemm, "pack", lambda w: w.detach().clone())
    assert pack_linears(model) == 1  # not the plain nn.Linear, not the float64 one
    assert model[0].panels is not None and model[2].panels is None
