"""FP8 linear layers and ``convert_to_fp8`` (DeepSeek-V3 report sec. 3.3.1-3.3.3; ISCA sec. 3.1).

A Linear ``y = x W^T`` runs three GEMMs per training step, and in DeepSeek-V3 all three take E4M3
inputs with fine-grained scales and accumulate in FP32 (promotion every N_C = 128, see gemm.py):

* Fprop ``Y = X W^T``: X in 1x128 tiles (per token), W in 128x128 blocks;
* Dgrad ``dX = dY W``: dY in 1x128 tiles along the output channels, the same W blocks transposed
  (a 128x128 grid is its own transpose, so the forward's FP8 weight is reused);
* Wgrad ``dW = dY^T X``: the contraction runs over tokens, so dY and X are re-tiled 128x1
  (128 tokens of one channel). X comes from the FP8 copy saved in forward - the BF16 input is
  never kept - dequantized and re-quantized in the new tiling, as the paper does.

Outputs and dX are in the activation dtype, dW in the master weight's dtype (FP32). Biases,
norms, the attention core, the router (``gate``), ``embed_tokens``, ``lm_head`` and the MTP
``eh_proj`` stay in BF16/FP32. ``convert_to_fp8`` swaps modules from outside the model: every
``nn.Linear`` not named in ``keep`` becomes an ``Fp8Linear`` sharing the same Parameters (so
optimizer state and checkpoints are unchanged), and every ``GroupedExperts`` becomes an
``Fp8GroupedExperts`` with the same forward signature. The trainer calls it for ``--fp8``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsv3.fp8.gemm import fp8_gemm
from dsv3.fp8.quant import ACT, ACT_T, WEIGHT, Fp8Tensor, quantize

KEEP_HIGH_PRECISION = ("embed_tokens", "lm_head", "gate", "eh_proj")


class _Fp8Matmul(torch.autograd.Function):
    """``x [M, K] @ weight[N, K]^T`` with FP8 Fprop, Dgrad and Wgrad; saves FP8 x, not x."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, out_dtype: torch.dtype, backend: str | None) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            xq, wq = quantize(x, ACT), quantize(weight, WEIGHT)
            ctx.save_for_backward(xq.data, xq.scale, wq.data, wq.scale)
            ctx.x_dtype, ctx.weight_dtype, ctx.backend = x.dtype, weight.dtype, backend
            return fp8_gemm(xq, wq, out_dtype, backend)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, Tensor, None, None]:
        x_data, x_scale, w_data, w_scale = ctx.saved_tensors
        xq, wq = Fp8Tensor(x_data, x_scale, ACT), Fp8Tensor(w_data, w_scale, WEIGHT)
        with torch.autocast(dy.device.type, enabled=False):
            dx = fp8_gemm(quantize(dy, ACT), wq.t(), ctx.x_dtype, ctx.backend)  # [M, N] x [N, K]
            dy_t = quantize(dy, ACT_T).t()  # [N, M], tiles along tokens
            x_t = quantize(xq.dequantize(), ACT_T).t()  # [K, M], re-tiled from the saved FP8 copy
            dw = fp8_gemm(dy_t, x_t, ctx.weight_dtype, ctx.backend)  # [N, K]
        return dx, dw, None, None


def fp8_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, backend: str | None = None) -> Tensor:
    """``F.linear`` with the three GEMMs in FP8; x [..., K], weight [N, K] -> [..., N]."""
    out_dtype = _compute_dtype(x)
    y = _Fp8Matmul.apply(x.reshape(-1, x.shape[-1]), weight, out_dtype, backend)
    y = y.view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias.to(out_dtype)


class Fp8Linear(nn.Linear):
    """Drop-in ``nn.Linear`` (same Parameters and state-dict keys) computed by ``fp8_linear``."""

    backend: str | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str | None = None) -> Fp8Linear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias, new.backend = linear.weight, linear.bias, backend
        return new

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(x, self.weight, self.bias, self.backend)


class Fp8GroupedExperts(nn.Module):
    """Routed experts in FP8: same Parameters and ``forward(x [M, H] sorted, offs [E]) -> [M, H]``
    as ``dsv3.model.moe.GroupedExperts``, one ``fp8_linear`` per expert and projection. Tiles are
    per token (1x128) in Fprop/Dgrad and per expert's token block (128x1) in Wgrad."""

    def __init__(self, gate_up_proj: nn.Parameter, down_proj: nn.Parameter, backend: str | None = None):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.backend = (
            gate_up_proj,
            down_proj,
            backend,
        )  # [E, 2I, H], [E, H, I]

    @classmethod
    def from_float(cls, experts: nn.Module, backend: str | None = None) -> Fp8GroupedExperts:
        return cls(experts.gate_up_proj, experts.down_proj, backend)

    def forward(self, x: Tensor, offs: Tensor) -> Tensor:
        out, start = [x.new_empty(0, self.down_proj.shape[1], dtype=_compute_dtype(x))], 0
        for e, end in enumerate(offs.tolist()):
            if end == start:  # no tokens for this expert
                continue
            gate, up = fp8_linear(x[start:end], self.gate_up_proj[e], backend=self.backend).chunk(2, dim=-1)
            out.append(fp8_linear(F.silu(gate) * up, self.down_proj[e], backend=self.backend))
            start = end
        return torch.cat(out)


def convert_to_fp8(
    model: nn.Module, keep: Iterable[str] = KEEP_HIGH_PRECISION, backend: str | None = None
) -> nn.Module:
    """Swap, in place, every ``nn.Linear`` for ``Fp8Linear`` and every ``GroupedExperts`` for
    ``Fp8GroupedExperts``, except modules whose attribute name or dotted path is in ``keep``."""
    from dsv3.model.moe import GroupedExperts

    keep = set(keep)
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            path = f"{parent_name}.{name}" if parent_name else name
            if name in keep or path in keep:
                continue
            if type(child) is nn.Linear:
                setattr(parent, name, Fp8Linear.from_linear(child, backend))
            elif isinstance(child, GroupedExperts):
                setattr(parent, name, Fp8GroupedExperts.from_float(child, backend))
    return model


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a Linear on x produces: autocast's if enabled, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
