"""FP8-resident weights for inference: the same weights as dequantizing at load (bit for bit, so
equal logits up to GEMM summation order), FP8 state in memory, only the routed experts with
tokens dequantized, quantization at load for checkpoints without FP8 data, and greedy decoding
through the Engine."""

import logging
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3 import ConfigError, ModelConfig, Transformer
from dsv3 import hf as hf_io
from dsv3.fp8 import resident
from dsv3.fp8.quant import WEIGHT, quantize_reference
from dsv3.fp8.resident import Fp8ResidentExperts, Fp8ResidentLinear, to_fp8_resident
from dsv3.infer.engine import Engine, SamplingParams
from dsv3.model.moe import GroupedExperts

# shapes on purpose not multiples of 128: mlp.up_proj [272, 160] is a 3x2 block grid with partial edges
CFG = dict(vocab_size=300, hidden_size=160, num_hidden_layers=2, intermediate_size=272)
CFG |= dict(num_attention_heads=2, q_lora_rank=136, kv_lora_rank=72, qk_nope_head_dim=24, qk_rope_head_dim=8)
CFG |= dict(v_head_dim=24, moe_intermediate_size=40, n_routed_experts=4, num_experts_per_tok=2, n_group=2)
CFG |= dict(topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=1, initializer_range=0.05)
CFG |= dict(max_position_embeddings=128)


@pytest.fixture(autouse=True)
def _eager_fp8(monkeypatch):
    monkeypatch.setenv("DSV3_FP8_COMPILE", "0")  # the same codes, without seconds of compiling per shape


def _model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_preset("tiny", **CFG)).eval()
    m.layers["1"].mlp.gate.e_score_correction_bias.normal_()
    return m


@pytest.fixture(scope="module")
def fp8_folder(tmp_path_factory):
    """DeepSeek's FP8 release format (E4M3 + 128x128 FP32 scales), written from a random model."""
    folder = tmp_path_factory.mktemp("ckpt") / "fp8"
    hf_io.save_pretrained(_model(), folder, fp8=True)
    return folder


def _resident_modules(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (Fp8ResidentLinear, Fp8ResidentExperts))}


def _bytes_by_dtype(model) -> Counter:
    held: Counter = Counter()
    for t in [*model.parameters(), *model.buffers()]:
        held[t.dtype] += t.nbytes
    return held


def _dequantized(module, dtype) -> dict[str, torch.Tensor]:
    """A resident module's weights dequantized as its forward does, by their dense names."""
    if isinstance(module, Fp8ResidentLinear):
        return {"weight": resident.dequantize_weight(module.weight, module.weight_scale_inv, dtype)}
    pairs = [module.expert_weights(e, dtype) for e in range(module.n_experts)]
    return {
        "gate_up_proj": torch.stack([g for g, _ in pairs]),
        "down_proj": torch.stack([d for _, d in pairs]),
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_resident_weights_are_the_dequantized_weights_bit_for_bit(fp8_folder, dtype):
    """Both ways compute code x scale in FP32 and cast that to the compute dtype."""
    dense = hf_io.load_pretrained(fp8_folder, dtype=dtype)
    fp8 = hf_io.load_pretrained(fp8_folder, dtype=dtype, weights="fp8")
    modules = _resident_modules(fp8)
    # q_a, q_b, kv_a, o in 2 layers + MTP; the dense MLP; shared + routed experts in layer 1 and MTP
    assert len(modules) == 3 * 4 + 3 + 2 * (3 + 1)
    for name, module in modules.items():
        for weight, got in _dequantized(module, dtype).items():
            want = dense.get_parameter(f"{name}.{weight}")
            assert got.dtype == dtype and torch.equal(got, want), (name, weight)


def test_resident_logits_equal_dequantize_at_load_up_to_gemm_order(fp8_folder):
    """The weights are identical (above), so the logits differ only where the two models sum a GEMM
    in another order: the resident experts run one F.linear per expert, the dense ones a grouped
    GEMM (in FP64 also per expert). In FP64 that is a few units of 2^-53 per dot product over
    K <= 272 terms, far below 1e-12 on logits of size ~3; a dequantization error would be of the
    order of E4M3's step, 2^-4 relative."""
    dense = hf_io.load_pretrained(fp8_folder, dtype=torch.float64).eval()
    fp8 = hf_io.load_pretrained(fp8_folder, dtype=torch.float64, weights="auto").eval()
    x = torch.randint(0, CFG["vocab_size"], (2, 24))
    with torch.no_grad():
        want, got = dense(x).logits, fp8(x).logits
    assert want.abs().max() > 1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_resident_model_holds_fp8_codes_and_scales_only(fp8_folder, monkeypatch):
    calls = []
    dequantize = hf_io.dequantize_fp8_block
    monkeypatch.setattr(hf_io, "dequantize_fp8_block", lambda w, s: calls.append(w.shape) or dequantize(w, s))
    model = hf_io.load_pretrained(fp8_folder, dtype=torch.bfloat16, weights="fp8").eval()
    # streaming: of the FP8 tensors only kv_b_proj (kept dense for the absorbed decode) is dequantized
    kv_b = (CFG["num_attention_heads"] * (CFG["qk_nope_head_dim"] + CFG["v_head_dim"]), CFG["kv_lora_rank"])
    assert calls == [kv_b] * 3  # 2 layers + the MTP layer

    # the resident modules are exactly the checkpoint's FP8 weights but kv_b_proj
    L = CFG["num_hidden_layers"]
    fp8_in_checkpoint = {
        hf_io._dsv3_prefix(k, L).removesuffix(".weight")
        for k, d in hf_io.checkpoint_dtypes(fp8_folder).items()
        if d == "F8_E4M3"
    }
    expected = {n.split(".experts.")[0] + ".experts" if ".experts." in n else n for n in fp8_in_checkpoint}
    assert set(_resident_modules(model)) == {n for n in expected if not n.endswith("kv_b_proj")}
    assert all(
        isinstance(model.get_submodule(n), torch.nn.Linear) for n in expected if n.endswith("kv_b_proj")
    )

    dense = hf_io.load_pretrained(fp8_folder, dtype=torch.bfloat16)
    codes = sum(
        m.weight.numel() for m in _resident_modules(model).values() if isinstance(m, Fp8ResidentLinear)
    )
    experts = [m for m in _resident_modules(model).values() if isinstance(m, Fp8ResidentExperts)]
    codes += sum(m.gate_up_proj.numel() + m.down_proj.numel() for m in experts)
    scales = sum(b.nbytes for n, b in model.named_buffers() if n.endswith("_scale_inv"))
    before, dense_bytes = _bytes_by_dtype(model), _bytes_by_dtype(dense)
    assert before[torch.float8_e4m3fn] == codes  # one byte per weight
    assert before[torch.bfloat16] == dense_bytes[torch.bfloat16] - 2 * codes  # no BF16 copy of them
    assert before[torch.float32] == dense_bytes[torch.float32] + scales  # routers, RoPE + the scales
    with torch.no_grad():
        model(torch.randint(0, CFG["vocab_size"], (1, 16)))
    assert _bytes_by_dtype(model) == before  # no dequantized copy kept by a forward
    for m in _resident_modules(model).values():
        assert not [v for v in vars(m).values() if isinstance(v, torch.Tensor)]


def test_experts_dequantize_only_the_experts_with_tokens(monkeypatch):
    torch.manual_seed(0)
    E, H, inter = 6, 160, 40
    dense = GroupedExperts(E, H, inter)
    torch.nn.init.normal_(dense.gate_up_proj, std=0.05)
    torch.nn.init.normal_(dense.down_proj, std=0.05)
    experts = Fp8ResidentExperts.from_experts(dense, fmt="pow2")
    seen = []
    dequantize = resident.dequantize_weight

    def counting(codes, scale, dtype):
        for name in ("gate_up_proj", "down_proj"):
            base, stride = getattr(experts, name), getattr(experts, name)[0].nbytes
            offset = codes.data_ptr() - base.data_ptr()
            if 0 <= offset < base.nbytes:
                seen.append((name, offset // stride))
        return dequantize(codes, scale, dtype)

    monkeypatch.setattr(resident, "dequantize_weight", counting)
    offs = torch.tensor([0, 3, 3, 3, 7, 7], dtype=torch.int32)  # tokens for experts 1 and 4 only
    x = torch.randn(7, H, dtype=torch.float64)
    with torch.no_grad():
        got = experts(x, offs)
    assert sorted(seen) == [("down_proj", 1), ("down_proj", 4), ("gate_up_proj", 1), ("gate_up_proj", 4)]
    # the reference: the plain loop over experts on the dequantized weights (FP64: the same F.linear calls)
    weights = _dequantized(experts, torch.float64)
    seen.clear()
    reference = GroupedExperts(E, H, inter).double()
    reference.load_state_dict(weights)
    assert torch.equal(got, reference.forward_reference(x, offs))
    assert experts(x[:0], torch.zeros(E, dtype=torch.int32)).shape == (0, H) and not seen


def test_resident_modules_trace_without_graph_breaks():
    """The Engine's compiled decode step traces the whole model: each resident module is one op."""
    torch.manual_seed(0)
    linear = Fp8ResidentLinear.from_linear(torch.nn.Linear(160, 272, bias=True))
    dense = GroupedExperts(4, 160, 40)
    torch.nn.init.normal_(dense.gate_up_proj, std=0.05)
    torch.nn.init.normal_(dense.down_proj, std=0.05)
    experts = Fp8ResidentExperts.from_experts(dense)
    x, offs = torch.randn(5, 160), torch.tensor([2, 2, 5, 5], dtype=torch.int32)
    for module, args in ((linear, (x,)), (experts, (x, offs))):
        traced = torch.compile(module, fullgraph=True, backend="eager")  # fullgraph: a break is an error
        assert torch.equal(traced(*args), module(*args))


def test_to_fp8_resident_makes_the_release_codes():
    """Quantizing a model in memory with FP32 scales gives the FP8 checkpoint's codes and scales."""
    model = _model()
    folder_state = dict(
        hf_io.to_fp8_tensors(hf_io.to_hf_state_dict(model).items())
    )  # as save_pretrained(fp8=True)
    converted = to_fp8_resident(_model(), fmt="fp32")
    for name, module in _resident_modules(converted).items():
        if isinstance(module, Fp8ResidentLinear):
            hf_name = hf_io._hf_prefix(f"{name}.weight", CFG["num_hidden_layers"])
            assert torch.equal(module.weight.view(torch.uint8), folder_state[hf_name].view(torch.uint8)), name
            assert torch.equal(module.weight_scale_inv, folder_state[hf_name + "_scale_inv"]), name
        else:
            base = hf_io._hf_prefix(name, CFG["num_hidden_layers"])
            for e in range(module.n_experts):
                codes, scale = hf_io._expert_slots(module, e, "up_proj")
                assert torch.equal(
                    codes.view(torch.uint8), folder_state[f"{base}.{e}.up_proj.weight"].view(torch.uint8)
                )
                assert torch.equal(scale, folder_state[f"{base}.{e}.up_proj.weight_scale_inv"])
    assert isinstance(converted.layers["1"].self_attn.kv_b_proj, torch.nn.Linear)
    assert isinstance(converted.lm_head, torch.nn.Linear) and isinstance(
        converted.mtp[0].eh_proj, torch.nn.Linear
    )
    kept = to_fp8_resident(_model(), keep=["mtp", "layers.0.mlp"])
    assert not _resident_modules(kept.mtp) and not _resident_modules(kept.layers["0"].mlp)
    assert isinstance(kept.layers["0"].self_attn.o_proj, Fp8ResidentLinear)


@pytest.mark.parametrize("fmt", ["pow2", "fp32"])
def test_checkpoint_without_fp8_data_is_quantized_at_load(tmp_path, caplog, fmt):
    model = _model()
    model.save_pretrained(tmp_path)  # FP32 weights
    with caplog.at_level(logging.WARNING, logger="dsv3.hf"):
        loaded = hf_io.load_pretrained(tmp_path, weights="fp8", scale_format=fmt)
    assert f"quantized them to E4M3 at load (128x128 blocks, {fmt} scales)" in caplog.text
    up = loaded.layers["0"].mlp.up_proj  # [272, 160]: partial blocks on both edges
    want = quantize_reference(model.layers["0"].mlp.up_proj.weight.detach(), WEIGHT, fmt)
    assert torch.equal(up.weight.view(torch.uint8), want.data.view(torch.uint8))
    assert torch.equal(up.weight_scale_inv, want.scale)
    experts, dense = loaded.layers["1"].mlp.experts, model.layers["1"].mlp.experts
    for e in range(CFG["n_routed_experts"]):
        gate, up_ = dense.gate_up_proj[e].detach().chunk(2)
        for proj, w in (("gate_proj", gate), ("up_proj", up_), ("down_proj", dense.down_proj[e].detach())):
            codes, scale = hf_io._expert_slots(experts, e, proj)
            want = quantize_reference(w, WEIGHT, fmt)
            assert torch.equal(codes.view(torch.uint8), want.data.view(torch.uint8)) and torch.equal(
                scale, want.scale
            )
    if fmt == "pow2":
        assert torch.equal(up.weight_scale_inv.log2(), up.weight_scale_inv.log2().round())
    # "auto" keeps such a checkpoint in its dtype
    plain = hf_io.load_pretrained(tmp_path, dtype=torch.bfloat16, weights="auto")
    assert not _resident_modules(plain) and plain.layers["0"].mlp.up_proj.weight.dtype == torch.bfloat16


def test_checkpoint_without_mtp_keeps_a_fresh_unquantized_mtp(fp8_folder, tmp_path, caplog):
    tensors = load_file(str(fp8_folder / "model.safetensors"))
    L = CFG["num_hidden_layers"]
    (tmp_path / "config.json").write_text((fp8_folder / "config.json").read_text())
    save_file(
        {k: v for k, v in tensors.items() if not k.startswith(f"model.layers.{L}.")},
        str(tmp_path / "model.safetensors"),
    )
    with caplog.at_level(logging.WARNING, logger="dsv3.hf"):
        model = hf_io.load_pretrained(tmp_path, weights="auto")
    assert "has no MTP weights" in caplog.text
    assert _resident_modules(model) and not _resident_modules(model.mtp)


@pytest.mark.parametrize("mtp", [False, True])
def test_engine_greedy_tokens_match_dequantize_at_load(fp8_folder, mtp):
    """Batched greedy decoding (prefill through the naive MLA path, decode through the absorbed one,
    whose W_UK/W_UV come from the dense kv_b_proj) gives the same tokens both ways."""
    prompts = [[5, 6, 7], list(range(10, 31))]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    dense = Engine(hf_io.load_pretrained(fp8_folder, dtype=torch.float64), max_batch_size=2, mtp=mtp)
    fp8 = Engine.from_pretrained(fp8_folder, dtype=torch.float64, max_batch_size=2, mtp=mtp)
    assert isinstance(fp8.model.layers["1"].mlp.experts, Fp8ResidentExperts)  # "auto" on an FP8 checkpoint
    want = [o.token_ids for o in dense.generate(prompts, params)]
    got = [o.token_ids for o in fp8.generate(prompts, params)]
    assert got == want and all(len(t) == 8 for t in got)
    assert fp8.stats()["forward_passes"] > len(prompts)  # prefills, then decode steps


def test_bad_weights_arguments_are_one_line_errors(fp8_folder, tmp_path):
    with pytest.raises(
        ConfigError, match=r"weights='fp16': must be one of \['auto', 'fp8', 'bf16', 'fp32'\]"
    ):
        hf_io.load_pretrained(fp8_folder, weights="fp16")
    with pytest.raises(ConfigError, match=r"scale format 'ue8m0': must be one of \['pow2', 'fp32'\]"):
        hf_io.load_pretrained(fp8_folder, weights="fp8", scale_format="ue8m0")
    with pytest.raises(ConfigError, match="weights='bf16' and dtype=torch.float32 disagree"):
        Engine.from_pretrained(fp8_folder, weights="bf16", dtype="float32")
    tensors = load_file(str(fp8_folder / "model.safetensors"))
    (tmp_path / "config.json").write_text((fp8_folder / "config.json").read_text())
    gone = "model.layers.1.mlp.experts.2.up_proj.weight"
    save_file(
        {k: v for k, v in tensors.items() if not k.startswith(gone)}, str(tmp_path / "model.safetensors")
    )
    with pytest.raises(
        ConfigError, match=r"layers.1.mlp.experts: checkpoint lacks expert weights, e.g. \[\(2, 'up_proj'\)\]"
    ):
        hf_io.load_pretrained(tmp_path, weights="fp8")
