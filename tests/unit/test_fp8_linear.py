"""Fp8Linear / Fp8GroupedExperts against their BF16 counterparts, and convert_to_fp8 on a Transformer."""

import math

import pytest
import torch
from torch import nn

from dsv3.fp8.linear import Fp8GroupedExperts, Fp8Linear, convert_to_fp8
from dsv3.fp8.quant import quantize, sqnr_db


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    monkeypatch.setenv("DSV3_FP8_COMPILE", "0")


def run(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, *args) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_()
    module.zero_grad()
    y = module(x, *args)
    y.backward(dy)
    return y, x.grad, *(p.grad for p in module.parameters())


@pytest.mark.parametrize("fmt", ["pow2", "fp32"])
def test_fp8_linear_matches_bf16_module(fmt) -> None:
    """The attainable bounds, derived (measured in benchmarks/fp8_accuracy.py gradient_table).

    Rounding to E4M3 (3 fraction bits) leaves a relative error uniform within +-ulp/2, ulp =
    2**(e-3) for x = m * 2**e: noise power ulp**2 / 12 against E[m**2] * 4**e, i.e. an SQNR of
    10 log10(12 * 64 * E[m**2]) ~ 32.5 dB for mantissas uniform in [1, 2), ~31.8 dB measured on
    Gaussian data. A GEMM of two independently rounded operands adds the two error powers: -3 dB,
    ~28.8 dB. Every one of Fprop, Dgrad and Wgrad has two E4M3 operands, so all three sit near
    28.8 dB, and the issue's ">= 30 dB for both gradients" is unreachable with E4M3 everywhere
    (the paper's recipe; E5M2 for dY, 2 fraction bits, measures ~24.8 dB: worse). With FP32
    scales Wgrad re-quantizes the saved FP8 X in 128x1 tiles, a third rounding (~27.2 dB); with
    power-of-2 scales that re-scaling by 2**k is exact, so Wgrad stays at ~28.5 dB. The bounds
    below sit ~1 dB under these values (sampling spread of a 150 x 320 problem)."""
    torch.manual_seed(0)
    linear = nn.Linear(320, 200)  # FP32 master weights, unaligned K and N
    x, dy = torch.randn(3, 50, 320).bfloat16(), torch.randn(3, 50, 200).bfloat16()
    y_ref, dx_ref, dw_ref, db_ref = run(linear.bfloat16().float(), x.float(), dy.float())
    fp8 = Fp8Linear.from_linear(linear, fmt=fmt)
    y, dx, dw, db = run(fp8, x, dy)
    assert y.dtype == dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    assert sqnr_db(y_ref, y) >= 27.5 and sqnr_db(dx_ref, dx) >= 27.5  # the issue: forward >= 25
    assert sqnr_db(dw_ref, dw) >= (27.5 if fmt == "pow2" else 26.0)
    assert sqnr_db(db_ref, db) >= 40  # bias gradient stays high precision


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_pow2_emulation_runs_in_the_compute_dtype_exactly(compute) -> None:
    """Power-of-2 scales: the emulated GEMM runs in the run's compute dtype (FP32 where a CPU's BF16
    GEMM is slow) and equals the per-128-block FP32-accumulating reference in either."""
    from dsv3.fp8.gemm import gemm_reference
    from dsv3.fp8.quant import ACT, WEIGHT

    torch.manual_seed(0)
    linear = nn.Linear(256, 64, bias=False)
    x = torch.randn(8, 256).to(compute)
    fp8 = Fp8Linear.from_linear(linear, fmt="pow2")
    with torch.no_grad():
        y = fp8(x)
    assert y.dtype == compute and fp8._wcache.q.values.dtype == compute
    ref = gemm_reference(quantize(x.float(), ACT, "pow2"), quantize(linear.weight.detach(), WEIGHT, "pow2"))
    torch.testing.assert_close(y.float(), ref, rtol=2**-8 if compute == torch.bfloat16 else 1e-6, atol=1e-6)


def test_fp8_linear_shares_parameters_and_state_dict() -> None:
    linear = nn.Linear(128, 64, bias=False)
    fp8 = Fp8Linear.from_linear(linear)
    assert fp8.weight is linear.weight and fp8.bias is None
    assert fp8.state_dict().keys() == linear.state_dict().keys()


def test_fp8_linear_saves_fp8_input_not_bf16() -> None:
    fp8 = Fp8Linear.from_linear(nn.Linear(256, 256, bias=False))
    x = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fp8(x)
    assert {t.dtype for t in saved if t.numel() >= x.numel()} == {torch.float8_e4m3fn}


class LoopExperts(nn.Module):
    """Plain reference: the BF16 per-expert loop with GroupedExperts' layout."""

    def __init__(self, n_experts: int, dim: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(n_experts, 2 * inter, dim) * dim**-0.5)
        self.down_proj = nn.Parameter(torch.randn(n_experts, dim, inter) * inter**-0.5)

    def forward(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        out, start = [], 0
        for e, end in enumerate(offs.tolist()):
            gate, up = (x[start:end] @ self.gate_up_proj[e].t()).chunk(2, dim=-1)
            out.append((nn.functional.silu(gate) * up) @ self.down_proj[e].t())
            start = end
        return torch.cat(out)


def test_fp8_grouped_experts_match_loop_reference() -> None:
    torch.manual_seed(0)
    ref = LoopExperts(4, 256, 192)
    offs = torch.tensor([100, 100, 230, 300], dtype=torch.int32)  # expert 1 gets no tokens
    x, dy = torch.randn(300, 256), torch.randn(300, 256)
    y_ref, dx_ref, dgu_ref, dd_ref = run(ref, x, dy, offs)
    y, dx, dgu, dd = run(Fp8GroupedExperts.from_float(ref), x, dy, offs)
    # two chained FP8 GEMMs, four quantized operands along each path: ~3 dB below one Fp8Linear
    assert min(sqnr_db(y_ref, y), sqnr_db(dx_ref, dx), sqnr_db(dgu_ref, dgu), sqnr_db(dd_ref, dd)) >= 22
    assert (dgu[1] == 0).all() and (dd[1] == 0).all()


def test_convert_to_fp8_on_transformer() -> None:
    from dsv3 import ModelConfig, Transformer
    from dsv3.model.moe import GroupedExperts

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    names_before = set(model.state_dict())
    convert_to_fp8(model)
    assert set(model.state_dict()) == names_before
    assert model.training_flops_per_token(256) == Transformer(
        ModelConfig.from_preset("tiny")
    ).training_flops_per_token(256)
    leaf = {n.rsplit(".", 1)[-1]: type(m) for n, m in model.named_modules()}
    assert leaf.get("o_proj") is Fp8Linear and leaf.get("kv_b_proj") is Fp8Linear
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if short in ("lm_head", "embed_tokens", "gate", "eh_proj"):
            assert not isinstance(module, (Fp8Linear, Fp8GroupedExperts)), name
        assert type(module) is not nn.Linear or short in ("lm_head", "eh_proj"), name
        assert not isinstance(module, GroupedExperts), name


def test_grouped_fast_path_equals_per_expert_loop() -> None:
    """The emulation's grouped GEMMs (Wgrad tiles restarting per expert) against one fp8_linear
    per expert on the per-K-block reference backend: the same FP8 operands, so only FP32 summation
    order and the BF16 roundings it flips differ - far above the ~25 dB of FP8 itself."""
    torch.manual_seed(0)
    ref = LoopExperts(4, 256, 128)
    offs = torch.tensor([100, 100, 300, 431], dtype=torch.int32)  # expert 1 gets no tokens
    x, dy = torch.randn(431, 256).bfloat16(), torch.randn(431, 256).bfloat16()
    fast = run(Fp8GroupedExperts.from_float(ref), x, dy, offs)
    loop = run(Fp8GroupedExperts.from_float(ref, backend="reference"), x, dy, offs)
    for a, b in zip(fast, loop, strict=True):
        assert a.dtype == b.dtype and sqnr_db(b, a) > 40


def test_weight_is_quantized_once_per_step(monkeypatch) -> None:
    """Fprop and Dgrad share one FP8 copy of W; an optimizer step makes a new one."""
    import dsv3.fp8.linear as linear_mod

    calls = []
    real = linear_mod.quantize

    def counting(x, block, *args, **kwargs):
        calls.append(block)
        return real(x, block, *args, **kwargs)

    monkeypatch.setattr(linear_mod, "quantize", counting)
    fp8 = Fp8Linear.from_linear(nn.Linear(256, 128, bias=False))
    opt = torch.optim.SGD(fp8.parameters(), lr=0.1)
    x = torch.randn(64, 256)
    for _ in range(2):  # forward, backward, a second forward on the same weights (evaluation)
        fp8(x).sum().backward()
    assert calls.count((128, 128)) == 1
    w_before = fp8._wcache.q.values.clone()
    opt.step()
    fp8(x).sum().backward()
    assert calls.count((128, 128)) == 2
    assert torch.equal(
        fp8._wcache.q.values.float(), quantize(fp8.weight.detach(), (128, 128), "pow2").dequantize()
    )
    assert not torch.equal(fp8._wcache.q.values, w_before)


def test_weight_fp8_copy_is_remade_for_a_new_weight_where_the_old_one_was() -> None:
    """A new weight tensor swapped in may sit at the old one's address with the same version (0):
    the cache names the storage object, so the FP8 copy is of the new weight. Two numpy-backed
    tensors over one buffer stand for the allocator handing a freed block back."""
    fp8 = Fp8Linear.from_linear(nn.Linear(256, 128, bias=False))
    buffer = fp8.weight.detach().numpy().copy()
    fp8.weight = nn.Parameter(torch.from_numpy(buffer))
    x = torch.randn(4, 256)
    fp8(x)
    buffer *= 2.0  # behind torch's back: no version bump
    fp8.weight = nn.Parameter(torch.from_numpy(buffer))
    assert fp8.weight._version == 0
    fp8(x)
    assert torch.equal(
        fp8._wcache.q.values.float(), quantize(fp8.weight.detach(), (128, 128), "pow2").dequantize()
    )


def test_fp8_forward_loss_within_0_1_percent_of_bf16_on_trained_weights() -> None:
    """End-to-end criterion (a) in miniature: a small model trained in the test (so that its
    predictions are sharp, unlike random weights where any noise leaves the loss at ln V) is
    evaluated on held-out sequences with a BF16 and with an FP8 forward on the same weights."""
    from dsv3 import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", num_hidden_layers=2, vocab_size=256, num_nextn_predict_layers=0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    perm = torch.randperm(256)

    def batch(n: int) -> torch.Tensor:  # next = perm[token] with probability 0.7, else uniform
        x = torch.randint(0, 256, (n, 128))
        for t in range(1, 128):
            x[:, t] = torch.where(torch.rand(n) < 0.7, perm[x[:, t - 1]], x[:, t])
        return x

    for _ in range(40):
        x = batch(8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x[:, :-1], labels=x[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    held_out = batch(16)

    @torch.no_grad()
    def evaluate() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.eval()(held_out[:, :-1], labels=held_out[:, 1:]).loss.item()

    bf16 = evaluate()
    assert bf16 < 0.5 * math.log(256)  # trained: far below the uniform loss
    fp8 = evaluate() if convert_to_fp8(model) else None
    assert abs(fp8 - bf16) / bf16 < 1e-3


@pytest.mark.parametrize("scales", ["pow2", "fp32"])
def test_train_with_fp8_flag(tmp_path, scales) -> None:
    """`dsv3 train --fp8 [--fp8-scales S]`: the trainer converts the model with that scale format and
    the micro run trains (BF16 autocast); a bad format is refused before work."""
    from dsv3.errors import ConfigError
    from dsv3.train.trainer import Trainer
    from fixtures import micro_config, write_corpus

    corpus = write_corpus(tmp_path / "corpus", n_docs=10)
    cfg = micro_config(
        tmp_path,
        corpus,
        tmp_path / "cache",
        fp8=True,
        fp8_scales=scales,
        dtype="bfloat16",
        steps=8,
        save_every=8,
    )
    with pytest.raises(ConfigError, match="fp8_scales='e5m2'"):
        cfg.updated({"fp8_scales": "e5m2"}).validate()
    trainer = Trainer(cfg)
    fp8_modules = [m for m in trainer.model.modules() if isinstance(m, (Fp8Linear, Fp8GroupedExperts))]
    assert {type(m) for m in fp8_modules} == {Fp8Linear, Fp8GroupedExperts}
    assert {m.fmt for m in fp8_modules} == {scales}
    summary = trainer.fit()
    assert math.isfinite(summary["last"]["val_loss"])
    assert summary["last"]["loss"] < summary["first"]["loss"]
