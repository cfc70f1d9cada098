"""FP8-resident weights for inference: E4M3 codes and their 128x128 block scales stay in memory,
and each GEMM dequantizes the weight it needs just for that call.

Dequantizing an FP8 checkpoint at load (dsv3.hf.iter_checkpoint) makes its weights 2x (BF16) or
4x (FP32) larger in memory than on disk. DeepSeek's reference inference keeps them as stored:

    weight            float8_e4m3fn [out, in]
    weight_scale_inv  float32 [ceil(out/128), ceil(in/128)]   one scale per 128x128 block
    real weight       = weight * scale of its block (edge blocks partial)

and a Linear computes ``y = x @ dequantize(weight)^T`` with the weight dequantized, block by block,
to the GEMM's compute dtype (``dsv3.device.compute_dtype``: BF16 or FP32) for this call only;
the full-precision matrix is a temporary that the GEMM reads and drops (DeepSeek's BF16 GEMM path
does the same with its ``weight_dequant`` kernel). Dequantization is ``Fp8Tensor.dequantize``
of dsv3.fp8.quant: the FP32 product code x scale, then the cast to the compute dtype. A model
dequantized at load computes the very same FP32 products and casts them the same way, so both
run GEMMs on bit-identical weights and their logits differ only by GEMM summation order.

What stays in high precision is the selection of DeepSeek's release (``dsv3.hf.is_fp8_weight``):
the Linear weights of attention and of every MLP (dense, shared and routed experts, the MTP
layer's too) are FP8; embeddings, lm_head, norms, the router and the MTP ``eh_proj`` are not.
One FP8 weight of the release is kept dequantized here: ``kv_b_proj``, because the absorbed MLA
decode path reads W_UK and W_UV as views of ``kv_b_proj.weight`` (model/attention.py,
``absorbed_weights``) and the engine keeps contiguous copies of them in the compute dtype. It is
small: kv_lora_rank x heads x (d_nope + d_v) per layer, 0.15% of DeepSeek-V3's parameters.

The routed experts (``Fp8ResidentExperts``, the FP8 twin of ``GroupedExperts``) dequantize only
the experts that received tokens in this call, as ``offs`` tells, one expert at a time: a decode
step of a few tokens touches a few experts, and the temporary is one expert's weights. gate and
up keep their own block grids, as in the release (I need not be a multiple of 128).

On a CPU, which has no FP8 GEMMs, this trades speed for memory: the dequantization is a pass
over the weight before each GEMM (compiled, see dsv3.fp8.quant). benchmarks/fp8_resident.py
measures it on the `small` preset against BF16 weights dequantized at load: 0.62x the model's
bytes (embeddings and head stay BF16), 0.23x the peak RSS of loading (no dequantized copy is
ever built), 0.3-0.65x the decode tokens/s (three runs on 2 busy shared cores). Both GEMM kinds are
torch.library ops (``resident_linear``, ``resident_experts``), so the Engine's compiled decode
step sees one node for each and the dequantization keeps its own compiled kernel.

``to_fp8_resident(model, fmt)`` swaps the modules from outside the model, as convert_to_fp8 does
for training: it quantizes (128x128 blocks, ``fmt`` = "pow2" or "fp32" scales) the weights of a
model that holds them in high precision. Loading DeepSeek FP8 checkpoints straight into these
modules, codes and scales as stored, is ``dsv3.hf.load_pretrained(path, weights="fp8")``, which
builds the model on the meta device, swaps the modules there (nothing is quantized or
allocated), then streams the checkpoint in. These modules are for inference only (no gradients)
and are not trained; cast the model (``cast_``) before converting it, not after.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsv3.device import compute_dtype
from dsv3.errors import ConfigError
from dsv3.fp8.quant import TILE, WEIGHT, Fp8Tensor, quantize
from dsv3.hf import is_fp8_weight
from dsv3.model.linear import Linear

SCALE_FORMATS = ("pow2", "fp32")
DEFAULT_FMT = "pow2"
ABSORBED = "kv_b_proj"  # kept dequantized: the absorbed decode path reads its weight as views


def dequantize_weight(codes: Tensor, scale_inv: Tensor, dtype: torch.dtype) -> Tensor:
    """float8 codes [..., R, C] with FP32 block scales [..., ceil(R/128), ceil(C/128)] -> [..., R, C]
    in ``dtype``: the FP32 product code x scale per element, then cast."""
    return Fp8Tensor(codes, scale_inv, WEIGHT).dequantize(dtype)


@torch.library.custom_op("dsv3::fp8_resident_linear", mutates_args=())
def resident_linear(x: Tensor, codes: Tensor, scale_inv: Tensor, bias: Tensor | None) -> Tensor:
    """x [..., in] @ dequantize(codes [out, in], scale_inv)^T + bias in x's dtype -> [..., out]. A
    torch.library op: a compiled decode step (Engine(compile=True)) calls it as one node, and
    the dequantization runs its own compiled kernel (dsv3.fp8.quant) instead of breaking the graph."""
    return F.linear(x, dequantize_weight(codes, scale_inv, x.dtype), bias)


@resident_linear.register_fake
def _(x, codes, scale_inv, bias):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


@torch.library.custom_op("dsv3::fp8_resident_experts", mutates_args=())
def resident_experts(
    x: Tensor, gate_up: Tensor, gate_up_scale: Tensor, down: Tensor, down_scale: Tensor, offs: Tensor
) -> Tensor:
    """The routed experts' SwiGLU on x [M, H] (sorted by expert, offs int32 [E] cumulative ends)
    with FP8-resident weights (layout of ``Fp8ResidentExperts``), in x's dtype: one expert at a
    time, dequantizing only the experts that have rows. A torch.library op, as ``resident_linear``
    (the loop over experts reads offs on the host, which a compiled graph cannot)."""
    out = x.new_empty(x.shape[0], down.shape[1])  # [M, H]
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:  # the experts without tokens are not dequantized
            w_gate_up, w_down = expert_weights(gate_up, gate_up_scale, down, down_scale, e, x.dtype)
            gate, up = F.linear(x[start:end], w_gate_up).chunk(2, dim=-1)
            out[start:end] = F.linear(F.silu(gate) * up, w_down)
        start = end
    return out


@resident_experts.register_fake
def _(x, gate_up, gate_up_scale, down, down_scale, offs):
    return x.new_empty(x.shape[0], down.shape[1])


def expert_weights(
    gate_up: Tensor, gate_up_scale: Tensor, down: Tensor, down_scale: Tensor, e: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Expert e's gate_up [2I, H] and down [H, I] dequantized to ``dtype``, from the stacked codes
    gate_up [E, 2I, H] (gate and up with their own block grids, gate_up_scale [E, 2, ...]) and
    down [E, H, I]."""
    _, hidden, inter = down.shape
    w_gate_up = dequantize_weight(gate_up[e].view(2, inter, hidden), gate_up_scale[e], dtype)
    return w_gate_up.view(2 * inter, hidden), dequantize_weight(down[e], down_scale[e], dtype)


def _blocks(rows: int, cols: int) -> tuple[int, int]:
    return -(-rows // TILE), -(-cols // TILE)


def _quantized(weight: Tensor, fmt: str) -> tuple[Tensor, Tensor]:
    """weight [..., R, C] (2-D or 3-D) -> (codes, FP32 scales); empty ones on the meta device."""
    if weight.is_meta:
        codes = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device="meta")
        return codes, torch.empty(*weight.shape[:-2], *_blocks(*weight.shape[-2:]), device="meta")
    with torch.no_grad():
        q = quantize(weight.detach(), WEIGHT, fmt)
    return q.data, q.scale


class Fp8ResidentLinear(nn.Module):
    """An inference Linear whose ``weight`` is float8_e4m3fn [out, in] with ``weight_scale_inv``
    FP32 [ceil(out/128), ceil(in/128)] (the checkpoint's names); forward dequantizes the weight
    to x's compute dtype for this GEMM only."""

    def __init__(self, codes: Tensor, scale_inv: Tensor, bias: nn.Parameter | None = None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        if scale_inv.shape != _blocks(*codes.shape):
            raise ConfigError(
                f"weight_scale_inv shape {tuple(scale_inv.shape)} does not tile weight {tuple(codes.shape)} in 128x128 blocks"
            )
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.register_buffer("weight_scale_inv", scale_inv.float())
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = DEFAULT_FMT) -> Fp8ResidentLinear:
        """Quantize ``linear``'s weight in 128x128 blocks (a meta Linear gives an empty meta module)."""
        return cls(*_quantized(linear.weight, fmt), linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        dtype = compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        return resident_linear(x.to(dtype), self.weight, self.weight_scale_inv, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8"


class Fp8ResidentExperts(nn.Module):
    """The routed experts with FP8-resident weights; ``forward(x [M, H] sorted by expert, offs int32
    [E] cumulative ends)`` as ``GroupedExperts``, dequantizing only the experts with tokens.

    gate_up_proj float8 [E, 2I, H] (gate rows first), gate_up_proj_scale_inv [E, 2, ceil(I/128),
    ceil(H/128)] (gate's grid, then up's); down_proj float8 [E, H, I], down_proj_scale_inv
    [E, ceil(H/128), ceil(I/128)]."""

    def __init__(self, gate_up: Tensor, gate_up_scale: Tensor, down: Tensor, down_scale: Tensor):
        super().__init__()
        self.n_experts, self.dim, self.inter_dim = down.shape
        self.first_expert = 0  # global id of expert 0 here, as GroupedExperts
        E, H, inter = down.shape
        expected = [(E, 2 * inter, H), (E, 2, *_blocks(inter, H)), (E, *_blocks(H, inter))]
        got = [tuple(gate_up.shape), tuple(gate_up_scale.shape), tuple(down_scale.shape)]
        if got != expected:
            raise ConfigError(
                f"FP8 experts: gate_up_proj, its scales and down_proj's scales have shapes {got}, "
                f"expected {expected} for down_proj {tuple(down.shape)}"
            )
        self.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
        self.register_buffer("gate_up_proj_scale_inv", gate_up_scale.float())
        self.down_proj = nn.Parameter(down, requires_grad=False)
        self.register_buffer("down_proj_scale_inv", down_scale.float())

    @classmethod
    def from_experts(cls, experts: nn.Module, fmt: str = DEFAULT_FMT) -> Fp8ResidentExperts:
        """Quantize a ``GroupedExperts``: gate and up each in their own 128x128 blocks, as the release."""
        E, H, inter = experts.down_proj.shape
        gate_up, gate_up_scale = _quantized(experts.gate_up_proj.view(E * 2, inter, H), fmt)  # [2E, I, H]
        down, down_scale = _quantized(experts.down_proj, fmt)
        new = cls(
            gate_up.view(E, 2 * inter, H),
            gate_up_scale.view(E, 2, *gate_up_scale.shape[-2:]),
            down,
            down_scale,
        )
        new.first_expert = experts.first_expert
        return new

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.gate_up_proj, self.gate_up_proj_scale_inv, self.down_proj, self.down_proj_scale_inv

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Expert e's gate_up [2I, H] and down [H, I], dequantized to ``dtype``."""
        return expert_weights(*self.tensors(), e, dtype)

    def forward(self, x: Tensor, offs: Tensor) -> Tensor:
        return resident_experts(x.to(compute_dtype(x)), *self.tensors(), offs)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, dim={self.dim}, inter_dim={self.inter_dim}, fp8"


def check_scale_format(fmt: str) -> None:
    if fmt not in SCALE_FORMATS:
        raise ConfigError(f"FP8 weight scale format {fmt!r}: must be one of {list(SCALE_FORMATS)}")


def to_fp8_resident(model: nn.Module, fmt: str = DEFAULT_FMT, keep: Iterable[str] = ()) -> nn.Module:
    """Swap, in place, the Linears and routed experts that DeepSeek's release stores in FP8
    (``is_fp8_weight``) for FP8-resident modules, quantizing their weights with ``fmt`` scales
    ("pow2" or "fp32"). ``kv_b_proj`` stays dequantized (see the module docstring), and so does
    any module whose attribute name or dotted path is in ``keep``, with everything below it.
    On a meta model nothing is quantized: the modules come out empty, to be loaded."""
    from dsv3.model.moe import GroupedExperts

    check_scale_format(fmt)
    keep = {*keep, ABSORBED}
    for path, module in _convertible(model, "", keep):
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        if type(module) in (nn.Linear, Linear) and is_fp8_weight(f".{path}.weight"):
            setattr(parent, name, Fp8ResidentLinear.from_linear(module, fmt))
        elif isinstance(module, GroupedExperts) and is_fp8_weight(f".{path}.0.down_proj.weight"):
            setattr(parent, name, Fp8ResidentExperts.from_experts(module, fmt))
    return model


def _convertible(module: nn.Module, path: str, keep: set[str]) -> list[tuple[str, nn.Module]]:
    """(dotted path, module) of every descendant not in ``keep`` and not below a kept one."""
    found = []
    for name, child in module.named_children():
        child_path = f"{path}.{name}" if path else name
        if name in keep or child_path in keep:
            continue
        found.append((child_path, child))
        found.extend(_convertible(child, child_path, keep))
    return found
