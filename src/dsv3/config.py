"""Model configuration: one dataclass whose field names are the keys of a Hugging Face DeepSeek
`config.json`, the presets dsv3 ships, and validation at construction.

A `ModelConfig` describes the architecture only (what the checkpoint needs to be rebuilt);
training and serving options live in their own configs. Field names follow the published
DeepSeek-V3 `config.json` so that `from_hf` / `to_hf` are near-identity maps:

    cfg = ModelConfig.from_preset("tiny")
    cfg = ModelConfig.from_hf("path/to/config.json")      # or the folder holding it
    cfg.to_hf()                                           # dict for config.json

Routing variants, by `topk_method` (and `scoring_func`), are the classes registered in
`dsv3.model.routing.ROUTING_METHODS` (the score functions in its `SCORE_FUNCTIONS`):
  * "noaux_tc"             DeepSeek-V3: sigmoid scores, a selection-only bias, group score =
                           sum of the top-2 biased scores per group, unselected groups -> -inf.
  * "group_limited_greedy" DeepSeek-V2: group score = max score in the group.
  * "greedy"               plain top-k (V2-Lite).
`cfg.routing_method` is the configured method object.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv3.errors import ConfigError
from dsv3.model.routing import ROUTING_METHODS, SCORE_FUNCTIONS, RoutingMethod

HIDDEN_ACTS = ("silu",)


# DeepSeek-V3's context extension: 4K -> 160K (V3R section 4.3)
V3_YARN = {
    "type": "yarn",
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


@dataclass
class ModelConfig:
    # sizes
    vocab_size: int = 129280
    hidden_size: int = 7168
    num_hidden_layers: int = 61
    intermediate_size: int = 18432  # dense FFN (first_k_dense_replace layers)
    # MLA
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536  # None: plain query projection (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    # DeepSeekMoE
    first_k_dense_replace: int = 3
    moe_intermediate_size: int = 2048
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    aux_loss_alpha: float = 0.0001  # sequence-wise balance loss weight (alpha)
    seq_aux: bool = True
    # multi-token prediction
    num_nextn_predict_layers: int = 1
    # positions
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default_factory=lambda: dict(V3_YARN))
    rope_interleave: bool = True  # published weights rotate interleaved pairs (x0,x1),(x2,x3),...
    # misc
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.006
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1

    def __post_init__(self) -> None:
        if self.rope_scaling is not None:
            self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)
        self.validate()

    # ---------------------------------------------------------------- derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times mscale^2 with YaRN (the scale DeepSeek's reference code uses)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.get("mscale_all_dim"):
            m = yarn_get_mscale(rs["factor"], rs["mscale_all_dim"])
            scale *= m * m
        return scale

    @property
    def latent_cache_values_per_token(self) -> int:
        """Values cached per token over all layers by MLA: layers x (kv_lora_rank + rope dim)."""
        return self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim)

    @property
    def expanded_kv_values_per_token(self) -> int:
        """Values per token if per-head K and V were cached (the naive MLA / MHA cache)."""
        per_layer = self.num_attention_heads * (self.qk_head_dim + self.v_head_dim)
        return self.num_hidden_layers * per_layer

    @property
    def routing_method(self) -> RoutingMethod:
        """The routing method `topk_method` names, with this config's scoring and groups."""
        return ROUTING_METHODS[self.topk_method](self.scoring_func, self.n_group, self.topk_group)

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r}: {rule}")

        sizes = "vocab_size hidden_size num_hidden_layers intermediate_size num_attention_heads kv_lora_rank"
        for name in (sizes + " qk_nope_head_dim qk_rope_head_dim v_head_dim max_position_embeddings").split():
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, "must be a positive integer")
        need(
            self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
            "q_lora_rank",
            "must be a positive integer, or null for a plain query projection",
        )
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        need(
            0 <= self.first_k_dense_replace <= self.num_hidden_layers,
            "first_k_dense_replace",
            f"must be in [0, num_hidden_layers={self.num_hidden_layers}]",
        )
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        need(self.hidden_act in HIDDEN_ACTS, "hidden_act", f"must be one of {HIDDEN_ACTS}")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        if self.num_moe_layers > 0 or self.num_nextn_predict_layers > 0:
            self._validate_moe(need)

    def _validate_moe(self, need) -> None:
        need(self.n_routed_experts >= 1, "n_routed_experts", "must be >= 1 when the model has MoE layers")
        need(self.moe_intermediate_size >= 1, "moe_intermediate_size", "must be >= 1")
        need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
        need(self.scoring_func in SCORE_FUNCTIONS, "scoring_func", f"must be one of {tuple(SCORE_FUNCTIONS)}")
        need(self.topk_method in ROUTING_METHODS, "topk_method", f"must be one of {tuple(ROUTING_METHODS)}")
        need(
            1 <= self.num_experts_per_tok <= self.n_routed_experts,
            "num_experts_per_tok",
            f"must be in [1, n_routed_experts={self.n_routed_experts}]",
        )
        need(self.n_group >= 1, "n_group", "must be >= 1")
        need(
            self.n_routed_experts % self.n_group == 0,
            "n_routed_experts",
            f"must be divisible by n_group={self.n_group}",
        )
        need(1 <= self.topk_group <= self.n_group, "topk_group", f"must be in [1, n_group={self.n_group}]")
        method = self.routing_method
        if method.group_limited:
            per_group, m = self.n_routed_experts // self.n_group, method.group_score_experts
            need(
                self.num_experts_per_tok <= self.topk_group * per_group,
                "num_experts_per_tok",
                f"must be <= topk_group x experts per group = {self.topk_group} x {per_group}",
            )
            need(
                per_group >= m,
                "n_group",
                f"{self.topk_method} scores a group by its top-{m} experts: needs >= {m} per group",
            )
        need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be > 0")
        need(self.aux_loss_alpha >= 0, "aux_loss_alpha", "must be >= 0")

    # ---------------------------------------------------------------- presets and files
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        kwargs = copy.deepcopy(PRESETS[name])
        kwargs.update(overrides)
        return cls.from_dict(kwargs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Strict constructor for our own files: unknown keys are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; valid keys are {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face DeepSeek V2/V3 `config.json` (a path, its folder, or the dict).

        Extra HF keys are ignored. Keys that transformers omits because they equal its class
        defaults are filled from those defaults (per `model_type`); a file without a known
        `model_type` must carry every architecture key."""
        if isinstance(source, dict):
            d, where = dict(source), "config dict"
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            d, where = read_config_json(path), str(path)
        model_type = d.get("model_type")
        if model_type not in HF_DEFAULTS and model_type is not None:
            raise ConfigError(
                f"{where}: model_type={model_type!r} is not a DeepSeek model; expected one of {sorted(HF_DEFAULTS)}"
            )
        merged = dict(HF_DEFAULTS.get(model_type, {}))
        merged.update({k: v for k, v in d.items() if v is not None or k == "q_lora_rank"})
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            merged["num_nextn_predict_layers"] = d["num_mtp_layers"]
        # rope: published files use rope_theta + rope_scaling; transformers 5 writes rope_parameters.
        rope = d.get("rope_parameters")
        if rope:
            rope = dict(rope)
            merged["rope_theta"] = rope.pop("rope_theta", merged.get("rope_theta", 10000.0))
            merged["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(k for k in REQUIRED_HF_KEYS if k not in merged)
        if missing:
            raise ConfigError(f"{where}: missing required keys {missing}")
        kwargs = {k: v for k, v in merged.items() if k in names}
        if kwargs.get("n_group") is None:
            kwargs["n_group"] = 1
        if kwargs.get("topk_group") is None:
            kwargs["topk_group"] = kwargs["n_group"]
        try:
            return cls(**kwargs)
        except ConfigError as e:
            if isinstance(source, dict):
                raise
            raise ConfigError(f"{where}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_hf(self, dtype: str = "bfloat16") -> dict[str, Any]:
        """The `config.json` dict (published DeepSeek layout; transformers reads it); `dtype`
        names the dtype of the weights stored beside it (transformers loads in that dtype)."""
        d = self.to_dict()
        v2 = self.scoring_func == "softmax"
        d["model_type"] = "deepseek_v2" if v2 else "deepseek_v3"
        d["architectures"] = ["DeepseekV2ForCausalLM" if v2 else "DeepseekV3ForCausalLM"]
        d["num_key_value_heads"] = self.num_attention_heads
        d["moe_layer_freq"] = 1
        d["torch_dtype"] = dtype
        return d

    def save(self, path: str | Path, dtype: str = "bfloat16") -> None:
        Path(path).write_text(json.dumps(self.to_hf(dtype), indent=2) + "\n")


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: sqrt(1/t) = 0.1 * mscale * ln(s) + 1 (1.3689 for V3's s=40)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _normalize_rope_scaling(rs: dict[str, Any]) -> dict[str, Any]:
    rs = dict(rs)
    kind = rs.pop("rope_type", None) or rs.pop("type", None)
    rs.pop("type", None)
    if kind in (None, "default"):
        raise ConfigError(f"rope_scaling={rs!r}: needs a 'type' ('yarn'), or set rope_scaling to null")
    if kind != "yarn":
        raise ConfigError(
            f"rope_scaling.type={kind!r}: only 'yarn' is supported (DeepSeek's long-context RoPE)"
        )
    for key in ("factor", "original_max_position_embeddings"):
        if key not in rs:
            raise ConfigError(f"rope_scaling is missing {key!r} (required for yarn)")
    out = {
        "type": "yarn",
        "factor": float(rs["factor"]),
        "original_max_position_embeddings": int(rs["original_max_position_embeddings"]),
        "beta_fast": float(rs.get("beta_fast") or 32.0),
        "beta_slow": float(rs.get("beta_slow") or 1.0),
        "mscale": float(rs.get("mscale") or 1.0),
        "mscale_all_dim": float(rs.get("mscale_all_dim") or 0.0),
    }
    if out["factor"] < 1:
        raise ConfigError(f"rope_scaling.factor={out['factor']}: must be >= 1")
    return out


# Architecture keys a config.json without a known model_type must carry.
REQUIRED_HF_KEYS = tuple(
    "vocab_size hidden_size num_hidden_layers num_attention_heads intermediate_size kv_lora_rank "
    "qk_nope_head_dim qk_rope_head_dim v_head_dim".split()
)

# transformers' class defaults for the keys it leaves out of a saved config.json (where a key is in
# neither, ModelConfig's default applies: the same value).
_V3_DEFAULTS = {  # our defaults are DeepSeek-V3's published config; transformers' class differs in three
    **{
        f.name: getattr(ModelConfig, f.name)
        for f in dataclasses.fields(ModelConfig)
        if f.name != "rope_scaling"
    },
    "max_position_embeddings": 4096,
    "initializer_range": 0.02,
    "rope_scaling": None,
}
HF_DEFAULTS: dict[str | None, dict[str, Any]] = {
    "deepseek_v3": _V3_DEFAULTS,
    "deepseek_v2": {  # where DeepseekV2Config's defaults differ from DeepseekV3Config's
        **_V3_DEFAULTS,
        "vocab_size": 102400,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "moe_intermediate_size": 1407,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "n_shared_experts": 2,
        "n_routed_experts": 64,
        "routed_scaling_factor": 1.0,
        "n_group": 1,
        "topk_group": 1,
        "num_experts_per_tok": 6,
        "first_k_dense_replace": 0,
        "norm_topk_prob": False,
        "max_position_embeddings": 2048,
        "topk_method": "greedy",
        "scoring_func": "softmax",
        "num_nextn_predict_layers": 0,
    },
}

# The CPU default: ~7M activated parameters; Linear dims are multiples of 128 (FP8 tiles).
TINY = dict(
    vocab_size=8192,
    hidden_size=256,
    num_hidden_layers=4,
    intermediate_size=768,
    num_attention_heads=4,
    q_lora_rank=128,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    first_k_dense_replace=1,
    moe_intermediate_size=128,
    n_shared_experts=1,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    num_nextn_predict_layers=1,
    max_position_embeddings=2048,
    rope_scaling=None,
    initializer_range=0.02,
)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": TINY,
    # A laptop-GPU / patient-CPU model: 135M total, 63M activated parameters.
    "small": {
        **TINY,
        "vocab_size": 32768,
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "intermediate_size": 1536,
        "num_attention_heads": 8,
        "q_lora_rank": 256,
        "kv_lora_rank": 256,
        "moe_intermediate_size": 256,
        "n_routed_experts": 32,
        "num_experts_per_tok": 6,
        "max_position_embeddings": 4096,
    },
    # DeepSeek-V2-Lite (15.7B total, ~2.4B activated): plain query projection, softmax gating.
    "v2-lite": {  # transformers' DeepseekV2Config defaults, where the released V2-Lite config differs
        **HF_DEFAULTS["deepseek_v2"],
        "hidden_size": 2048,
        "num_hidden_layers": 27,
        "intermediate_size": 10944,
        "num_attention_heads": 16,
        "q_lora_rank": None,
        "first_k_dense_replace": 1,
        "moe_intermediate_size": 1408,
        "aux_loss_alpha": 0.001,
        "max_position_embeddings": 163840,
        "initializer_range": 0.006,
        "bos_token_id": 100000,
        "eos_token_id": 100001,
        "rope_scaling": {**V3_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
    },
    # DeepSeek-V3 as published (671B total, 37B activated, MTP depth 1).
    "v3-671b": dict(rope_scaling=dict(V3_YARN)),
}


def read_config_json(path: Path) -> dict[str, Any]:
    """The JSON object in a config file; a ConfigError naming the file if it is missing, is not
    JSON, or holds something other than an object."""
    if not path.is_file():
        raise ConfigError(f"no config.json at {path}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
        kind = kinds.get(type(d), "a number")
        raise ConfigError(f"{path} holds {kind}, not a JSON object {{...}} of config keys")
    return d
