"""Parameter counts, KV cache, FLOPs and training memory against published figures (PAPER.md)."""

import json

import pytest

from dsv3.analysis import costs
from dsv3.analysis.costs import ParallelLayout, count_params, load_architecture
from dsv3.errors import ConfigError


def test_v3_parameter_counts_match_the_paper():
    arch = load_architecture("deepseek-v3")
    c = count_params(arch)
    assert c.total == 671_026_419_200
    assert c.embedding == c.head == 926_679_040
    assert arch.attention.params(arch.hidden_size) == 187_107_328
    assert arch.moe.expert_params(arch.hidden_size) == 44_040_192
    assert round(c.activated / 1e9, 2) == 37.55
    assert round(c.activated_without_embedding / 1e9, 2) == 36.63
    assert round(c.mtp / 1e9, 1) == 11.6
    assert sum(c.by_component().values()) == c.total


def test_preset_and_reference_config_agree():
    assert count_params(load_architecture("v3-671b")) == count_params(load_architecture("deepseek-v3"))


@pytest.mark.parametrize(
    "name, total, activated",
    [
        ("llama-3.1-405b", 405_853_388_800, None),
        ("llama-3.1-8b", 8_030_261_248, None),
        ("qwen2.5-72b", 72_706_203_648, None),  # q/k/v biases included
        ("mixtral-8x7b", 46_702_792_704, 12_879_925_248),
    ],
)
def test_gqa_models_match_published_counts(name, total, activated):
    c = count_params(load_architecture(name))
    assert c.total == total
    assert c.activated == (activated or total)


def test_deepseek_v2_family():
    v2 = count_params(load_architecture("deepseek-v2"))
    assert round(v2.total / 1e9) == 236 and round(v2.activated / 1e9) == 21
    lite = count_params(load_architecture("v2-lite"))
    assert round(lite.total / 1e9, 2) == 15.71
    assert round(lite.activated_without_embedding / 1e9, 1) == 2.5  # "~2.4B activated" in DeepSeek's card
    assert v2.routers == 59 * 160 * 5120  # softmax routing: no selection bias


@pytest.mark.parametrize(
    "name, nbytes", [("deepseek-v3", 70_272), ("qwen2.5-72b", 327_680), ("llama-3.1-405b", 516_096)]
)
def test_table1_kv_cache_bytes(name, nbytes):
    arch = load_architecture(name)
    assert costs.kv_cache_bytes_per_token(arch, "bf16") == nbytes
    assert costs.kv_cache_bytes_per_token(arch, "fp8") * 2 == nbytes
    assert costs.kv_cache_bytes_per_token(arch, "fp32") == 2 * nbytes


@pytest.mark.parametrize(
    "name, gflop",
    [("deepseek-v2", 155), ("deepseek-v3", 250), ("qwen2.5-72b", 394), ("llama-3.1-405b", 2448)],
)
def test_table2_paper_convention_within_half_a_percent(name, gflop):
    value = costs.paper_training_flops_per_token(load_architecture(name), 4096) / 1e9
    assert value == pytest.approx(gflop, rel=0.005)


def test_exact_training_flops():
    v3 = load_architecture("deepseek-v3")
    attention = 3 * 61 * 2 * 128 * (192 + 128) * 4096 / 2  # PAPER.md's causal attention term
    assert costs.training_flops_per_token(v3, 4096) == 6 * 36_625_618_432 + attention
    qwen = load_architecture("qwen2.5-72b")
    assert costs.training_flops_per_token(qwen, 4096) / 1e9 == pytest.approx(444.87, abs=0.01)
    noncausal = costs.training_flops_per_token(v3, 4096, causal=False)
    assert noncausal - costs.training_flops_per_token(v3, 4096) == attention


def test_inference_flops_absorbed_mla_attends_over_the_latent():
    v3 = load_architecture("deepseek-v3")
    base = costs.inference_flops_per_token(v3, 0)
    assert base == 2 * count_params(v3).activated_without_embedding
    naive = costs.inference_flops_per_token(v3, 1000) - base
    absorbed = costs.inference_flops_per_token(v3, 1000, absorbed=True) - base
    assert naive == 2 * 61 * 128 * (192 + 128) * 1000
    assert absorbed == 2 * 61 * 128 * (576 + 512) * 1000


def test_hf_config_path_and_folder(tmp_path):
    d = json.loads((costs.DATA_DIR / "llama-3.1-8b.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert count_params(load_architecture(tmp_path)).total == 8_030_261_248
    assert count_params(load_architecture(str(tmp_path / "config.json"))).total == 8_030_261_248


def test_unknown_architecture_names_missing_fields():
    with pytest.raises(ConfigError, match=r"missing keys \['intermediate_size'\]"):
        costs.from_hf_dict(
            {
                "model_type": "mystery",
                "vocab_size": 10,
                "hidden_size": 8,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
            },
            "mystery.json",
        )
    with pytest.raises(ConfigError, match="unknown model 'nope'.*v3-671b.*qwen2.5-72b"):
        load_architecture("nope")
    with pytest.raises(ConfigError, match="dtype='int3'"):
        costs.kv_cache_bytes_per_token(load_architecture("tiny"), "int3")
    with pytest.raises(ConfigError, match="seq_len=0"):
        costs.training_flops_per_token(load_architecture("tiny"), 0)


def test_unknown_model_type_with_all_keys_reads_as_llama():
    d = json.loads((costs.DATA_DIR / "llama-3.1-8b.json").read_text())
    assert count_params(costs.from_hf_dict({**d, "model_type": "my-llama"}, "x")).total == 8_030_261_248


# ---------------------------------------------------------------------------------- training memory
def test_single_gpu_memory_is_bytes_per_param_times_params():
    arch = load_architecture("llama-3.1-8b")
    m = costs.training_memory(arch, ParallelLayout(zero=0))
    total = count_params(arch).total
    assert m.weights == 2 * total and m.master_weights == 4 * total
    assert m.gradients == 4 * total and m.optimizer_states == 4 * total


def test_zero_and_expert_parallel_shard_states():
    arch = load_architecture("deepseek-v3")
    base = ParallelLayout(pp=16, ep=64, dp=128, zero=0)
    m0 = costs.training_memory(arch, base)
    m1 = costs.training_memory(arch, ParallelLayout(pp=16, ep=64, dp=128, zero=1))
    assert m1.weights == m0.weights and m1.gradients == m0.gradients
    assert m1.optimizer_states < m0.optimizer_states / 2
    # all stages together hold every parameter once (ep = 64 shards of experts, no tensor parallel)
    stages = [costs._stage_params(arch, base, s) for s in range(16)]
    routed = count_params(arch).routed_experts + arch.mtp_layers * 256 * 44_040_192
    assert sum(e for _, e in stages) * 64 == routed
    assert sum(n for n, _ in stages) + routed == count_params(arch).total + count_params(arch).mtp


def test_recompute_shrinks_activations():
    arch = load_architecture("deepseek-v3")
    full = costs.training_memory(arch, ParallelLayout(ep=64, dp=64))  # one stage: same stage both times
    rec = costs.training_memory(arch, ParallelLayout(ep=64, dp=64, recompute=True))
    assert rec.activations < full.activations / 10
    assert rec.activations == full.activations_recompute


@pytest.mark.parametrize(
    "layout, message",
    [
        (ParallelLayout(tp=3), "tp=3 must divide num_heads=128"),
        (ParallelLayout(pp=62), "pp=62 must be <= num_layers=61"),
        (ParallelLayout(ep=3, dp=3), "ep=3 must divide the 256 routed experts"),
        (ParallelLayout(ep=8, dp=4), "ep=8 must divide dp x tp = 4"),
        (ParallelLayout(dp=0), "dp=0 must be a positive integer"),
        (ParallelLayout(zero=4), "zero=4"),
    ],
)
def test_bad_layouts_are_named(layout, message):
    with pytest.raises(ConfigError, match=message):
        costs.training_memory(load_architecture("deepseek-v3"), layout)


# ------------------------------------------------------------------- cross-check with the model
@pytest.mark.parametrize("preset", ["tiny", "small", "v2-lite", "v3-671b"])
def test_counts_match_the_model_built_on_meta(preset):
    import torch

    from dsv3.config import ModelConfig
    from dsv3.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset(preset))
    biases = sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    mtp_biases = sum(b.numel() for n, b in model.mtp.named_buffers() if n.endswith("e_score_correction_bias"))
    mtp = sum(p.numel() for p in model.mtp.parameters()) + mtp_biases
    main = sum(p.numel() for p in model.parameters()) + biases - mtp
    c = count_params(load_architecture(preset))
    assert main == c.total
    assert mtp == c.mtp
    if preset == "v3-671b":
        assert main == 671_026_419_200


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": -4096}, "hidden_size=-4096 must be a positive integer"),
        ({"num_key_value_heads": 5}, "num_key_value_heads=5 must divide num_attention_heads"),
        ({"num_hidden_layers": 0}, "num_hidden_layers=0"),
    ],
)
def test_bad_sizes_in_hf_configs_are_named(change, message):
    d = json.loads((costs.DATA_DIR / "llama-3.1-8b.json").read_text())
    with pytest.raises(ConfigError, match=message):
        costs.from_hf_dict({**d, **change}, "llama.json")
    v3 = json.loads((costs.DATA_DIR / "deepseek-v3.json").read_text())
    with pytest.raises(ConfigError, match="kv_lora_rank=-1"):
        costs.from_hf_dict({**v3, "kv_lora_rank": -1}, "v3.json")
    with pytest.raises(ConfigError, match=r"missing required keys \['v_head_dim'\]"):
        costs.from_hf_dict({k: v for k, v in v3.items() if k not in ("model_type", "v_head_dim")}, "v3.json")
