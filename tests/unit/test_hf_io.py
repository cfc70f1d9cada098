"""Checkpoint files: sharding with an index, atomic writes, the MTP layer, FP8 block scales."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3 import ConfigError, ModelConfig, Transformer
from dsv3 import hf as hf_io

CFG = dict(
    vocab_size=96,
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=160,
    num_attention_heads=2,
    q_lora_rank=48,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    moe_intermediate_size=32,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    num_nextn_predict_layers=1,
    initializer_range=0.1,
)


def _model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_preset("tiny", **CFG))
    m.layers["1"].mlp.gate.e_score_correction_bias.normal_()
    return m


def _keys(path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def test_sharded_save_load_round_trip(tmp_path):
    m = _model()
    m.save_pretrained(tmp_path / "ckpt", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = Transformer.from_pretrained(tmp_path / "ckpt")
    for (name, a), (_, b) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_mtp_layer_is_exported_with_checkpoint_names(tmp_path):
    m = _model()
    m.save_pretrained(tmp_path)
    keys = _keys(tmp_path / "model.safetensors")
    L = m.cfg.num_hidden_layers
    for name in (
        "enorm.weight",
        "hnorm.weight",
        "eh_proj.weight",
        "shared_head.norm.weight",
        "shared_head.head.weight",
        "embed_tokens.weight",
        "self_attn.kv_b_proj.weight",
        "mlp.experts.7.down_proj.weight",
    ):
        assert f"model.layers.{L}.{name}" in keys
    assert (
        "model.layers.1.mlp.experts.0.gate_proj.weight" in keys
        and "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    )


def test_checkpoint_without_mtp_loads_with_fresh_mtp(tmp_path, caplog):
    m = _model()
    tensors = {
        k: v
        for k, v in hf_io.to_hf_state_dict(m).items()
        if not k.startswith(f"model.layers.{m.cfg.num_hidden_layers}.")
    }
    m.cfg.save(tmp_path / "config.json", dtype="float32")
    save_file({k: v.clone() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    loaded = Transformer.from_pretrained(tmp_path)
    assert "no MTP weights" in caplog.text
    assert torch.equal(loaded.layers["1"].mlp.experts.down_proj, m.layers["1"].mlp.experts.down_proj)


def test_missing_or_unexpected_tensors_are_clear_errors(tmp_path):
    m = _model()
    tensors = hf_io.to_hf_state_dict(m)
    m.cfg.save(tmp_path / "config.json", dtype="float32")
    bad = {k: v.clone() for k, v in tensors.items() if k != "model.norm.weight"}
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="lacks 1 tensors.*'norm.weight'"):
        Transformer.from_pretrained(tmp_path)
    bad = {k: v.clone() for k, v in tensors.items() if "experts.3.up_proj" not in k}
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="lacks its 'up_proj' weight"):
        Transformer.from_pretrained(tmp_path)


def test_save_is_atomic_a_failure_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    m = _model()
    m.save_pretrained(tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    calls = {"n": 0}
    real = hf_io.save_file

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_io, "save_file", flaky)
    with torch.no_grad():
        m.norm.weight.add_(1)
    with pytest.raises(OSError, match="disk full"):
        m.save_pretrained(tmp_path / "ckpt", max_shard_bytes=100_000)
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind


def _fp8_quantize_blocks(w: torch.Tensor):
    """DeepSeek's release format: E4M3 blocks of 128x128, zero-padded edges, scale = amax/448."""
    rows, cols = w.shape
    R, C = -(-rows // 128), -(-cols // 128)
    padded = torch.zeros(R * 128, C * 128)
    padded[:rows, :cols] = w
    blocks = padded.view(R, 128, C, 128)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4) / 448.0  # [R, C]
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(R * 128, C * 128)[:rows, :cols]
    return q.contiguous(), scale


def test_fp8_block_scaled_checkpoint_dequantizes_on_cpu(tmp_path):
    m = _model()
    tensors = hf_io.to_hf_state_dict(m)
    fp8, expected = {}, {}
    for name, t in tensors.items():
        quantize = name.endswith("proj.weight") and "eh_proj" not in name and t.dim() == 2
        if quantize:  # unaligned shapes too (e.g. 160 x 64): zero-padded edge blocks
            q, s = _fp8_quantize_blocks(t.float())
            fp8[name], fp8[name + "_scale_inv"] = q, s
            expected[name] = hf_io.dequantize_fp8_block(q, s)
        else:
            fp8[name] = t.clone()
    m.cfg.save(tmp_path / "config.json", dtype="float32")
    save_file(fp8, str(tmp_path / "model.safetensors"))
    loaded = Transformer.from_pretrained(tmp_path)
    w = loaded.layers["0"].mlp.up_proj.weight  # [160, 64]: a 2x1 block grid with a partial edge
    torch.testing.assert_close(w, expected["model.layers.0.mlp.up_proj.weight"], rtol=0, atol=0)
    # the block scale is applied per 128x128 block: rows 128.. use the second block's scale
    q, s = fp8["model.layers.0.mlp.up_proj.weight"], fp8["model.layers.0.mlp.up_proj.weight_scale_inv"]
    assert torch.equal(w[130], q[130].float() * s[1, 0])
    rel = (w - m.layers["0"].mlp.up_proj.weight).norm() / m.layers["0"].mlp.up_proj.weight.norm()
    assert rel < 0.05  # E4M3 keeps ~3 mantissa bits
    gate_up = loaded.layers["1"].mlp.experts.gate_up_proj
    assert torch.equal(gate_up[3, :32], expected["model.layers.1.mlp.experts.3.gate_proj.weight"])
    with pytest.raises(ConfigError, match="does not tile"):
        hf_io.dequantize_fp8_block(q, s[:1])
