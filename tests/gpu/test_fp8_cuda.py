"""The CUDA FP8 backend (torch scaled_mm, blockwise 1x128 / 128x128 scales) held to the
per-K-block FP32 reference by SQNR, and Fp8Linear on CUDA against the CPU emulation.
Skipped without CUDA; run on a GPU with ``pytest -m gpu tests/gpu``."""

import warnings

import pytest
import torch

from dsv3.fp8.gemm import fp8_gemm
from dsv3.fp8.quant import ACT, WEIGHT, quantize, sqnr_db

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("fmt", ["fp32", "pow2"])
@pytest.mark.parametrize("b_block", [WEIGHT, ACT])
def test_cuda_gemm_matches_reference(fmt, b_block) -> None:
    """Same FP8 operands: only the accumulation order and the BF16 output rounding differ
    (~50 dB); a wrong scale layout or tile order costs tens of dB."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(512, 1024, device="cuda", generator=g)
    x[:, :3] *= 50  # outlier channels: a scale applied to the wrong block shows up
    w = torch.randn(768, 1024, device="cuda", generator=g)
    a, b = quantize(x, ACT, fmt), quantize(w, b_block, fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the BF16 fallback would pass the SQNR bound: forbid it
        out = fp8_gemm(a, b, torch.bfloat16, backend="cuda")
    ref = fp8_gemm(a, b, torch.float32, backend="reference")
    assert out.dtype == torch.bfloat16 and sqnr_db(ref, out.float()) > 40


def test_fp8_linear_cuda_matches_cpu_emulation() -> None:
    from torch import nn

    from dsv3.fp8.linear import Fp8Linear

    torch.manual_seed(0)
    linear = nn.Linear(512, 384, bias=False)
    x, dy = torch.randn(256, 512).bfloat16(), torch.randn(256, 384).bfloat16()
    results = []
    for device in ("cpu", "cuda"):
        module = Fp8Linear.from_linear(nn.Linear(512, 384, bias=False).to(device))
        module.weight.data.copy_(linear.weight.data)
        xi = x.to(device).detach().requires_grad_()
        y = module(xi)
        y.backward(dy.to(device))
        results.append([t.float().cpu() for t in (y, xi.grad, module.weight.grad)])
    for cpu, cuda in zip(*results, strict=True):
        assert sqnr_db(cpu, cuda) > 35  # same FP8 operands, different summation and output rounding
