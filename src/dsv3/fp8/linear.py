"""FP8 linear layers and ``convert_to_fp8`` (DeepSeek-V3 report sec. 3.3.1-3.3.3; ISCA sec. 3.1).

A Linear ``y = x W^T`` runs three GEMMs per training step, and in DeepSeek-V3 all three take E4M3
inputs with fine-grained scales and accumulate in FP32 (promotion every N_C = 128, see gemm.py):

* Fprop ``Y = X W^T``: X in 1x128 tiles (per token), W in 128x128 blocks;
* Dgrad ``dX = dY W``: dY in 1x128 tiles along the output channels, the same W blocks transposed
  (a 128x128 grid is its own transpose, so the forward's FP8 weight is reused);
* Wgrad ``dW = dY^T X``: the contraction runs over tokens, so dY and X are re-tiled 128x1
  (128 tokens of one channel). X comes from the FP8 copy saved in forward - the BF16 input is
  never kept - dequantized and re-quantized in the new tiling, as the paper does (with FP32 scales
  a third rounding of X; with power-of-2 scales the re-scaling by 2**k is exact).

Outputs and dX are in the activation dtype, dW in the master weight's dtype (FP32; the CPU BF16
fast path rounds it to BF16 first, as autocast's BF16 GEMM does, see gemm.py). Biases,
norms, the attention core, the router (``gate``), ``embed_tokens``, ``lm_head`` and the MTP
``eh_proj`` stay in BF16/FP32. ``convert_to_fp8`` swaps modules from outside the model: every
``nn.Linear`` not named in ``keep`` becomes an ``Fp8Linear`` sharing the same Parameters (so
optimizer state and checkpoints are unchanged), and every ``GroupedExperts`` becomes an
``Fp8GroupedExperts`` with the same forward signature. The trainer calls it for ``--fp8``.

Recipe and speed. The default scales are powers of two (``fmt="pow2"``; UE8M0, the scale format
of DeepSeek-V3.1 and of Blackwell's MX GEMMs, stores the same values in a byte): then the
dequantized operands are exact in BF16 (and FP32), so the CPU emulation is a GEMM in the run's
compute dtype, BF16 where this CPU has fast BF16 GEMMs and FP32 elsewhere (see gemm.py), and one
fused pass per operand makes the E4M3 codes, the scales and the values together.
``fmt="fp32"`` is the V3 paper's FP32-scale recipe, emulated exactly with FP32 GEMMs (slower).
The weight is quantized once per optimizer step: its FP8 copy is cached on the module and
re-made only when the weight changes (its version counter moves), and Dgrad uses the same
128x128 blocks transposed. The routed experts run as grouped GEMMs over all experts at once; the
Wgrad tiles of 128 tokens restart at every expert's first token (``fake_quantize_segments``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsv3.device import compute_dtype, tensor_stamp
from dsv3.fp8.gemm import emulation_dtype, fp8_gemm, resolve_backend
from dsv3.fp8.quant import ACT, ACT_T, WEIGHT, Fp8Tensor, ScaleFormat, fake_quantize_segments, quantize
from dsv3.model.linear import Linear

KEEP_HIGH_PRECISION = ("embed_tokens", "lm_head", "gate", "eh_proj")
DEFAULT_FMT: ScaleFormat = "pow2"


class _Fp8Matmul(torch.autograd.Function):
    """``x [M, K] @ weight[N, K]^T`` with FP8 Fprop, Dgrad and Wgrad; saves FP8 x, not x.
    ``wq`` is the weight's FP8 copy (128x128 blocks), made by the caller once per step."""

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor, wq: Fp8Tensor, out_dtype: torch.dtype, backend: str
    ) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            xq = quantize(x, ACT, wq.fmt, values=_values_of(wq))
            ctx.save_for_backward(xq.data, xq.scale)
            ctx.wq, ctx.x_dtype, ctx.weight_dtype, ctx.backend = wq, x.dtype, weight.dtype, backend
            return fp8_gemm(xq, wq, out_dtype, backend)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, Tensor, None, None, None]:
        x_data, x_scale = ctx.saved_tensors
        wq, backend = ctx.wq, ctx.backend
        fmt, values = wq.fmt, _values_of(wq)
        with torch.autocast(dy.device.type, enabled=False):
            dx = fp8_gemm(quantize(dy, ACT, fmt, values), wq.t(), ctx.x_dtype, backend)  # [M, N] x [N, K]
            dy_t = quantize(dy, ACT_T, fmt, values).t()  # [N, M], tiles along tokens
            x = Fp8Tensor(x_data, x_scale, ACT, fmt).dequantize()  # from the saved FP8 copy
            x_t = quantize(x, ACT_T, fmt, values).t()  # [K, M], re-tiled 128x1
            dw = fp8_gemm(dy_t, x_t, ctx.weight_dtype, backend)  # [N, K]
        return dx, dw, None, None, None


class _Fp8GroupedMatmul(torch.autograd.Function):
    """Emulation fast path for all experts at once: ``x [M, K]`` sorted by expert, ``offs [E]``
    cumulative ends, ``weight [E, N, K]`` -> ``[M, N]``; three grouped GEMMs on dequantized
    operands (BF16 with power-of-2 scales), tiles as in ``_Fp8Matmul``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, offs: Tensor, wq: Fp8Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            xq = quantize(x, ACT, wq.fmt, values=wq.values.dtype)
            ctx.save_for_backward(xq.data, xq.scale, offs)
            ctx.wq, ctx.x_dtype, ctx.weight_dtype = wq, x.dtype, weight.dtype
            return F.grouped_mm(xq.values, wq.values.transpose(-2, -1), offs=offs)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, Tensor, None, None]:
        x_data, x_scale, offs = ctx.saved_tensors
        wq = ctx.wq
        fmt, values = wq.fmt, wq.values.dtype
        with torch.autocast(dy.device.type, enabled=False):
            dx = F.grouped_mm(quantize(dy, ACT, fmt, values).values, wq.values, offs=offs)  # [M, K]
            dy_t = fake_quantize_segments(dy, offs, fmt, values)  # [M, N], 128x1 tiles per expert
            x_t = fake_quantize_segments(Fp8Tensor(x_data, x_scale, ACT, fmt).dequantize(), offs, fmt, values)
            dw = F.grouped_mm(dy_t.t(), x_t, offs=offs)  # [E, N, K]
        return dx.to(ctx.x_dtype), dw.to(ctx.weight_dtype), None, None


class _WeightCache:
    """A weight's FP8 copy, made once per optimizer step (the paper quantizes W once per step):
    re-made when the weight changes in place (its version counter moves: optimizer step,
    ``load_state_dict``) or is replaced (another storage), or when the recipe changes. The weight
    quantized is held (a detached alias), so a replacement can never sit at its freed address and
    pass for it."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.q: Fp8Tensor | None = None
        self.source: Tensor | None = None

    def get(self, weight: Tensor, fmt: ScaleFormat, values: torch.dtype | None) -> Fp8Tensor:
        key = (tensor_stamp(weight), weight.shape, fmt, values)
        if key != self.key or self.q is None:
            with torch.no_grad():
                self.q = quantize(weight.detach(), WEIGHT, fmt, values)
            self.key, self.source = key, weight.detach()
        return self.q


def fp8_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    backend: str | None = None,
    fmt: ScaleFormat = DEFAULT_FMT,
    wq: Fp8Tensor | None = None,
) -> Tensor:
    """``F.linear`` with the three GEMMs in FP8; x [..., K], weight [N, K] -> [..., N].
    ``wq``: the weight's FP8 copy if the caller keeps one (else it is quantized here)."""
    out_dtype, backend = compute_dtype(x), resolve_backend(x.device, backend)
    if wq is None:
        with torch.no_grad():
            wq = quantize(weight.detach(), WEIGHT, fmt, _values_dtype(backend, fmt, out_dtype))
    y = _Fp8Matmul.apply(x.reshape(-1, x.shape[-1]), weight, wq, out_dtype, backend)
    y = y.view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias.to(out_dtype)


class Fp8Linear(nn.Linear):
    """Drop-in ``nn.Linear`` (same Parameters and state-dict keys) computed by ``fp8_linear``."""

    def __init__(self, *args, backend: str | None = None, fmt: ScaleFormat = DEFAULT_FMT, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend, self.fmt, self._wcache = backend, fmt, _WeightCache()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, backend: str | None = None, fmt: ScaleFormat = DEFAULT_FMT
    ) -> Fp8Linear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias, new.backend, new.fmt = linear.weight, linear.bias, backend, fmt
        new._wcache = _WeightCache()
        return new

    def forward(self, x: Tensor) -> Tensor:
        backend = resolve_backend(x.device, self.backend)
        wq = self._wcache.get(self.weight, self.fmt, _values_dtype(backend, self.fmt, compute_dtype(x)))
        return fp8_linear(x, self.weight, self.bias, backend, self.fmt, wq)


class Fp8GroupedExperts(nn.Module):
    """Routed experts in FP8: same Parameters and ``forward(x [M, H] sorted, offs [E]) -> [M, H]``
    as ``dsv3.model.moe.GroupedExperts``. The emulation runs grouped GEMMs over all experts; other
    backends (reference, hopper, cuda) run one ``fp8_linear`` per expert and projection. Tiles are
    per token (1x128) in Fprop/Dgrad and per expert's block of 128 tokens (128x1) in Wgrad."""

    def __init__(
        self,
        gate_up_proj: nn.Parameter,  # [E, 2I, H]
        down_proj: nn.Parameter,  # [E, H, I]
        backend: str | None = None,
        fmt: ScaleFormat = DEFAULT_FMT,
    ):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.backend, self.fmt = gate_up_proj, down_proj, backend, fmt
        self.n_experts, self.dim, self.inter_dim = down_proj.shape  # as GroupedExperts
        self._caches = {"gate_up_proj": _WeightCache(), "down_proj": _WeightCache()}

    @classmethod
    def from_float(
        cls, experts: nn.Module, backend: str | None = None, fmt: ScaleFormat = DEFAULT_FMT
    ) -> Fp8GroupedExperts:
        return cls(experts.gate_up_proj, experts.down_proj, backend, fmt)

    def forward(self, x: Tensor, offs: Tensor) -> Tensor:
        out_dtype, backend = compute_dtype(x), resolve_backend(x.device, self.backend)
        values = _values_dtype(backend, self.fmt, out_dtype)
        gu_q = self._caches["gate_up_proj"].get(self.gate_up_proj, self.fmt, values)
        down_q = self._caches["down_proj"].get(self.down_proj, self.fmt, values)
        if backend == "emulate":
            gate, up = _Fp8GroupedMatmul.apply(x, self.gate_up_proj, offs, gu_q).chunk(2, dim=-1)
            return _Fp8GroupedMatmul.apply(F.silu(gate) * up, self.down_proj, offs, down_q).to(out_dtype)
        out, start = [x.new_empty(0, self.down_proj.shape[1], dtype=out_dtype)], 0
        for e, end in enumerate(offs.tolist()):
            if end == start:  # no tokens for this expert
                continue
            gu = fp8_linear(x[start:end], self.gate_up_proj[e], None, backend, self.fmt, _expert(gu_q, e))
            gate, up = gu.chunk(2, dim=-1)
            h = F.silu(gate) * up
            out.append(fp8_linear(h, self.down_proj[e], None, backend, self.fmt, _expert(down_q, e)))
            start = end
        return torch.cat(out)


def convert_to_fp8(
    model: nn.Module,
    keep: Iterable[str] = KEEP_HIGH_PRECISION,
    backend: str | None = None,
    fmt: ScaleFormat = DEFAULT_FMT,
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
            if type(child) in (nn.Linear, Linear):
                setattr(parent, name, Fp8Linear.from_linear(child, backend, fmt))
            elif isinstance(child, GroupedExperts):
                setattr(parent, name, Fp8GroupedExperts.from_float(child, backend, fmt))
    return model


def _values_dtype(backend: str, fmt: ScaleFormat, compute: torch.dtype) -> torch.dtype | None:
    """The emulation GEMMs run on dequantized values made with the codes; other backends don't."""
    return emulation_dtype(fmt, compute=compute) if backend == "emulate" else None


def _values_of(wq: Fp8Tensor) -> torch.dtype | None:
    """Activations are dequantized to the dtype of their weight's values (None: no values kept)."""
    return None if wq.values is None else wq.values.dtype


def _expert(wq: Fp8Tensor, e: int) -> Fp8Tensor:
    values = None if wq.values is None else wq.values[e]
    return Fp8Tensor(wq.data[e], wq.scale[e], wq.block, wq.fmt, values)
