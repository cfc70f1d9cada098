"""Same weights, same logits: dsv3 against transformers' DeepseekV3/V2 reference models,
loaded through transformers' save_pretrained -> dsv3 Transformer.from_pretrained."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dsv3 import ModelConfig, Transformer  # noqa: E402

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.8,
    "mscale_all_dim": 0.8,
}
BASE = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    max_position_embeddings=256,
    attn_implementation="eager",
)

V3_CASES = {
    "qlora-grouped-dense-first": dict(
        q_lora_rank=48,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        rope_parameters=YARN,
    ),
    "no-qlora-ungrouped": dict(
        q_lora_rank=None,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        n_shared_experts=2,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    ),
    "all-dense-first-not-interleaved": dict(
        q_lora_rank=32,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        rope_interleave=False,
        routed_scaling_factor=1.7,
        norm_topk_prob=False,
    ),
}


def _randomize(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name:
                continue
            if name.endswith("e_score_correction_bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)  # nonzero biases change the selection
            elif t.dim() == 1:
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def _hf_and_ours(hf_cls, hf_config, tmp_path):
    hf = hf_cls(hf_config).eval()
    _randomize(hf)
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path).eval()
    return hf, ours


@pytest.mark.parametrize("case", sorted(V3_CASES))
def test_logits_equal_deepseek_v3(case, tmp_path):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hf, ours = _hf_and_ours(DeepseekV3ForCausalLM, DeepseekV3Config(**BASE, **V3_CASES[case]), tmp_path)
    ids = torch.randint(0, BASE["vocab_size"], (3, 40))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids).logits
    assert (got - ref).abs().max().item() <= 1e-4


def test_logits_equal_deepseek_v2_lite_style(tmp_path):
    """Softmax gating, plain query projection, greedy top-k, no normalization (V2-Lite)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    cfg = DeepseekV2Config(
        **BASE,
        q_lora_rank=None,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_shared_experts=2,
        first_k_dense_replace=1,
        topk_method="greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        rope_parameters=YARN,
    )
    hf, ours = _hf_and_ours(DeepseekV2ForCausalLM, cfg, tmp_path)
    assert ours.cfg.scoring_func == "softmax" and ours.cfg.q_lora_rank is None
    ids = torch.randint(0, BASE["vocab_size"], (2, 33))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4


def test_published_rope_scaling_format_loads_like_rope_parameters(tmp_path):
    """A config.json in the published layout (rope_theta + rope_scaling with 'type') gives the
    same model as the transformers-5 layout (rope_parameters)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hf, ours = _hf_and_ours(
        DeepseekV3ForCausalLM, DeepseekV3Config(**BASE, **V3_CASES["qlora-grouped-dense-first"]), tmp_path
    )
    published = ours.cfg.to_hf()
    assert "rope_scaling" in published and "rope_parameters" not in published
    assert published["rope_scaling"]["type"] == "yarn"
    again = ModelConfig.from_hf(published)
    assert again == ours.cfg


def test_our_save_pretrained_loads_in_transformers(tmp_path):
    """dsv3 -> save_pretrained -> transformers from_pretrained: same logits."""
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig.from_dict(
        dict(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            q_lora_rank=48,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=12,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            max_position_embeddings=256,
            rope_scaling={
                "type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
        )
    )
    ours = Transformer(cfg).eval()
    _randomize(ours)
    ours.save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4
