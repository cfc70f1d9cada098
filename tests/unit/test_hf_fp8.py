"""DeepSeek's FP8 checkpoint format: block dequantization against a plain loop, writing against
a plain transcription of the release format, and a written model's logits within FP8 error."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3 import ConfigError, ModelConfig, Transformer
from dsv3 import hf as hf_io
from dsv3.fp8.quant import sqnr_db
from fixtures import FP8_BLOCKS

CFG = FP8_BLOCKS
QUANTIZED_IN_LAYER_1 = {  # what the official release stores as FP8 in an MoE layer
    *(f"self_attn.{p}.weight" for p in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")),
    *(f"mlp.shared_experts.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")),
    *(f"mlp.experts.{e}.{p}.weight" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")),
}


@pytest.fixture(autouse=True)
def _eager_fp8(monkeypatch):
    monkeypatch.setenv("DSV3_FP8_COMPILE", "0")


def _model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_preset("tiny", **CFG)).eval()
    m.layers["1"].mlp.gate.e_score_correction_bias.normal_()
    return m


def release_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The release format spelled out: zero-pad to 128x128 blocks, scale = max(amax, 1e-4)/448,
    codes = E4M3(block / scale) by torch's cast, crop."""
    rows, cols = w.shape
    R, C = -(-rows // 128), -(-cols // 128)
    padded = torch.zeros(R * 128, C * 128)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(R, 128, C, 128)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4) / 448.0  # [R, C]
    codes = (blocks / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return codes.view(R * 128, C * 128)[:rows, :cols].contiguous(), scale


def dequantize_loop(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    out = torch.empty(w.shape)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = (slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1)))
            out[blk] = w[blk].float() * s[i, j].float()
    return out


@pytest.mark.parametrize("shape", [(300, 200), (128, 128), (1, 129), (257, 1)])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_dequantize_matches_a_loop_over_blocks(shape, dtype):
    codes = torch.randint(0, 256, shape, dtype=torch.uint8)
    codes = torch.where(codes.view(dtype).float().isfinite(), codes, 0).view(dtype)  # no NaN/inf codes
    scale = torch.rand(-(-shape[0] // 128), -(-shape[1] // 128)) + 0.5
    got = hf_io.dequantize_fp8_block(codes, scale)
    assert got.dtype == torch.float32
    assert torch.equal(got, dequantize_loop(codes, scale))
    # BF16 scales (seen in community re-uploads) are applied as their float32 values
    assert torch.equal(
        hf_io.dequantize_fp8_block(codes, scale.bfloat16()), dequantize_loop(codes, scale.bfloat16())
    )


def test_dequantize_rejects_scales_that_do_not_tile():
    w = torch.zeros(300, 200, dtype=torch.float8_e4m3fn)
    with pytest.raises(ConfigError, match=r"does not tile weight \(300, 200\)"):
        hf_io.dequantize_fp8_block(w, torch.ones(2, 2))
    with pytest.raises(ConfigError, match="2-D"):
        hf_io.dequantize_fp8_block(w, torch.ones(3))


@pytest.mark.parametrize("shape", [(272, 160), (80, 160), (129, 1), (256, 384)])
def test_quantize_is_the_release_format_bit_for_bit(shape):
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[1])  # columns of very different size
    w[:, 0] = 0  # an all-zero edge column
    codes, scale = hf_io.quantize_fp8_block(w)
    ref_codes, ref_scale = release_quantize(w)
    assert codes.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8))
    assert torch.equal(scale, ref_scale)


def test_fp8_checkpoint_has_the_release_layout(tmp_path):
    m = _model()
    hf_io.save_pretrained(m, tmp_path, fp8=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    assert config["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fp8 = {k for k, t in tensors.items() if t.dtype == torch.float8_e4m3fn}
    assert {
        k.removeprefix("model.layers.1.") for k in fp8 if k.startswith("model.layers.1.")
    } == QUANTIZED_IN_LAYER_1
    L = m.cfg.num_hidden_layers  # the MTP layer's attention and experts are FP8 too, its eh_proj is not
    assert (
        f"model.layers.{L}.self_attn.o_proj.weight" in fp8 and f"model.layers.{L}.eh_proj.weight" not in fp8
    )
    assert "model.layers.0.mlp.up_proj.weight" in fp8  # the dense MLP
    for name in fp8:
        w, s = tensors[name], tensors[name + "_scale_inv"]
        assert s.dtype == torch.float32 and s.shape == (-(-w.shape[0] // 128), -(-w.shape[1] // 128)), name
    scales = {k for k in tensors if k.endswith("_scale_inv")}
    assert scales == {k + "_scale_inv" for k in fp8}
    for name, t in tensors.items():
        if name in fp8 or name in scales:
            continue
        want = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        assert t.dtype == want, name  # embeddings, head, norms, router gate, eh_proj: BF16


def test_fp8_checkpoint_logits_within_fp8_error(tmp_path):
    """Loaded weights are exactly the release-format dequantization; the logits then differ from
    the BF16 model's by the FP8 rounding of the weights only.

    Bound: E4M3 keeps 3 fraction bits, a relative rounding error within +-2^-4, which for these
    Gaussian weights measures ~31 dB SQNR per weight (`weight_db`). A token's path to the logits
    crosses n = 8 quantized GEMMs per layer (q_a, q_b, kv_a, kv_b, o, gate, up, down); their
    independent errors add, so the logits' SQNR is about weight_db - 10 log10(n * layers), which
    we require with a 3 dB margin. To show that quantization took place, it must also be at least
    10 dB below the SQNR of BF16 rounding alone (8 fraction bits, ~45 dB here)."""
    m = _model()
    bf16 = _model().to(torch.bfloat16).float()  # the BF16 model (evaluated in FP32)
    hf_io.save_pretrained(m, tmp_path / "fp8", fp8=True, max_shard_bytes=200_000)
    assert len(list((tmp_path / "fp8").glob("*.safetensors"))) > 1
    loaded = Transformer.from_pretrained(tmp_path / "fp8").eval()

    expected = {}
    for name, t in hf_io.to_hf_state_dict(m).items():
        if hf_io.is_fp8_weight(name):
            expected[name] = dequantize_loop(*release_quantize(t))
    got = hf_io.to_hf_state_dict(loaded)
    for name, want in expected.items():
        assert torch.equal(got[name], want), name
    ref_weights = hf_io.to_hf_state_dict(m)
    weight_db = sum(sqnr_db(ref_weights[k], got[k]) for k in expected) / len(expected)
    bound = weight_db - 10 * math.log10(8 * CFG["num_hidden_layers"]) - 3

    x = torch.randint(0, CFG["vocab_size"], (2, 24))
    with torch.no_grad():
        ref, out = bf16(x).logits, loaded(x).logits
        bf16_only = sqnr_db(m(x).logits, ref)
    sqnr = sqnr_db(ref, out)
    print(
        f"SQNR: weights {weight_db:.1f} dB, logits {sqnr:.1f} dB (bound {bound:.1f}), BF16 alone {bf16_only:.1f} dB"
    )
    assert bound < sqnr < bf16_only - 10, (sqnr, bound, bf16_only)
    # loading straight to BF16 keeps the router in FP32 and stays within the same error
    low = Transformer.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16).eval()
    assert low.layers["1"].mlp.gate.weight.dtype == torch.float32
    with torch.no_grad():
        assert sqnr_db(ref, low(x).logits.float()) > bound


def test_scale_in_another_shard_is_found_through_the_index(tmp_path):
    m = _model()
    hf_io.save_pretrained(m, tmp_path / "a", fp8=True)
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    moved = "model.layers.1.mlp.experts.2.down_proj.weight_scale_inv"
    (tmp_path / "b").mkdir()
    save_file(
        {k: v for k, v in tensors.items() if k != moved},
        str(tmp_path / "b" / "model-00001-of-00002.safetensors"),
    )
    save_file({moved: tensors[moved]}, str(tmp_path / "b" / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in tensors}
    weight_map[moved] = "model-00002-of-00002.safetensors"
    hf_io.write_index(tmp_path / "b", weight_map, 0)
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    a = Transformer.from_pretrained(tmp_path / "a")
    b = Transformer.from_pretrained(tmp_path / "b")
    assert torch.equal(a.layers["1"].mlp.experts.down_proj, b.layers["1"].mlp.experts.down_proj)
    del weight_map[moved]
    hf_io.write_index(tmp_path / "b", weight_map, 0)
    with pytest.raises(ConfigError, match="has no model.layers.1.mlp.experts.2.down_proj.weight_scale_inv"):
        Transformer.from_pretrained(tmp_path / "b")
