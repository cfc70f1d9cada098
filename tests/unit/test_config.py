import json

import pytest

from dsv3.config import PRESETS, ModelConfig
from dsv3.errors import ConfigError
from dsv3.model.routing import Greedy, NoAuxTC


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_round_trip_through_hf_json(name, tmp_path):
    cfg = ModelConfig.from_preset(name)
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.from_hf(tmp_path) == cfg


def test_tiny_linear_dims_are_fp8_tile_aligned():
    cfg = ModelConfig.from_preset("tiny")
    for dim in (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.moe_intermediate_size,
        cfg.q_lora_rank,
        cfg.kv_lora_rank,
        cfg.num_attention_heads * cfg.qk_head_dim,
        cfg.num_attention_heads * cfg.v_head_dim,
    ):
        assert dim % 128 == 0, dim


@pytest.mark.parametrize(
    "overrides, field, rule",
    [
        (dict(topk_group=5), "topk_group", "n_group=4"),
        (dict(n_routed_experts=18), "n_routed_experts", "divisible by n_group"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok", "topk_group x experts per group"),
        (dict(num_experts_per_tok=17), "num_experts_per_tok", "n_routed_experts=16"),
        (dict(scoring_func="relu"), "scoring_func", "sigmoid"),
        (dict(topk_method="best"), "topk_method", "noaux_tc"),
        (dict(n_group=16, topk_group=16), "n_group", "noaux_tc scores a group by its top-2 experts"),
        (dict(qk_rope_head_dim=33), "qk_rope_head_dim", "even"),
        (dict(hidden_size=0), "hidden_size", "positive integer"),
        (dict(first_k_dense_replace=9), "first_k_dense_replace", "num_hidden_layers=4"),
        (dict(q_lora_rank=-1), "q_lora_rank", "null"),
    ],
)
def test_validation_names_field_value_and_rule(overrides, field, rule):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_preset("tiny", **overrides)
    msg = str(e.value)
    assert msg.startswith(f"{field}=") and rule in msg


def test_routing_method_comes_from_the_registry():
    v3 = ModelConfig.from_preset("v3-671b").routing_method
    assert type(v3) is NoAuxTC and v3.selection_bias and v3.group_limited
    assert (v3.n_group, v3.topk_group) == (8, 4)
    lite = ModelConfig.from_preset("v2-lite").routing_method
    assert type(lite) is Greedy and not lite.selection_bias and not lite.group_limited
    assert not ModelConfig.from_preset("tiny", n_group=1, topk_group=1).routing_method.group_limited
    # a group scored by its best expert needs one expert per group (top-2 needs two: see above)
    one_per_group = dict(n_group=16, topk_group=16, topk_method="group_limited_greedy")
    assert ModelConfig.from_preset("tiny", **one_per_group).routing_method.group_limited


def test_unknown_keys_and_presets_are_errors():
    with pytest.raises(ConfigError, match="unknown config keys \\['hiden_size'\\]"):
        ModelConfig.from_dict({"hiden_size": 3})
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        ModelConfig.from_preset("huge")


def test_from_hf_ignores_extras_fills_class_defaults_and_requires_architecture(tmp_path):
    # transformers omits keys equal to its class defaults; those come from the model_type
    cfg = ModelConfig.from_hf({"model_type": "deepseek_v3", "hidden_size": 256, "some_hf_extra": 1})
    assert cfg.hidden_size == 256 and cfg.n_routed_experts == 256 and cfg.num_nextn_predict_layers == 1
    v2 = ModelConfig.from_hf({"model_type": "deepseek_v2"})
    assert (v2.scoring_func, v2.topk_method, v2.num_nextn_predict_layers) == ("softmax", "greedy", 0)
    # without a model_type every architecture key must be there
    with pytest.raises(ConfigError, match="missing required keys \\['intermediate_size'"):
        ModelConfig.from_hf(
            {"vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1}
        )
    with pytest.raises(ConfigError, match="not a DeepSeek model"):
        ModelConfig.from_hf({"model_type": "llama"})
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_hf(tmp_path)


def test_rope_scaling_and_rope_parameters_are_the_same_config():
    published = {
        "model_type": "deepseek_v3",
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    }
    transformers5 = {
        "model_type": "deepseek_v3",
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    }
    a, b = ModelConfig.from_hf(published), ModelConfig.from_hf(transformers5)
    assert a == b and a.rope_scaling["factor"] == 40.0
    # V3: softmax scale 1/sqrt(192) x (0.1 ln 40 + 1)^2
    assert a.softmax_scale == pytest.approx(192**-0.5 * 1.368887945**2, rel=1e-9)
    with pytest.raises(ConfigError, match="only 'yarn'"):
        ModelConfig.from_preset("tiny", rope_scaling={"type": "linear", "factor": 2.0})


def test_saved_json_is_the_published_layout(tmp_path):
    ModelConfig.from_preset("v3-671b").save(tmp_path / "config.json")
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["model_type"] == "deepseek_v3" and d["architectures"] == ["DeepseekV3ForCausalLM"]
    assert d["rope_scaling"]["type"] == "yarn" and d["num_nextn_predict_layers"] == 1
