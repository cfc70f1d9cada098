"""What a model costs per token: parameters, KV-cache bytes, FLOPs and training memory.

Any decoder-only config reduces to an `Architecture`: embedding, L blocks of
[RMSNorm -> attention -> RMSNorm -> SwiGLU FFN or MoE], final norm, head. Counting is exact
(it sums the weight shapes of the Hugging Face implementations):

    SwiGLU FFN of width I:       3 d I
    GQA / MHA:                   d (H + 2 H_kv) h  +  H h d        (+ q/k/v biases for Qwen2)
    MLA (DeepSeek V2/V3):        d r_q + r_q + r_q H (d_nope + d_rope)           (query bottleneck)
                               + d (r_kv + d_rope) + r_kv + r_kv H (d_nope + d_v) (latent K/V)
                               + H d_v d                                        (output)
    MoE layer:                   (N_routed + N_shared) 3 d I_e + N_routed d (router)
                                 (+ N_routed selection biases for noaux_tc routing)
    activated per token:         the same with K_r routed experts instead of N_routed

KV cache per token: GQA caches K and V, 2 L H_kv h values; MLA caches the latent and the shared
RoPE key, L (r_kv + d_rope) values (ISCA Table 1).

Training FLOPs per token (forward + backward = 3 x forward, each multiply-add 2 FLOPs):

    6 N_act  +  6 L H (d_qk + d_v) S_ctx          S_ctx = seq/2 causal, seq non-causal

with N_act the activated parameters excluding the input embedding (a lookup) and including the
head. This is the convention of ISCA Table 2 for the MoE rows; its dense rows use the textbook
6 (12 L d^2 + d V) instead, which `paper_training_flops_per_token` reproduces. Inference FLOPs per
token at context C are 2 N_act + 2 L H (d_qk + d_v) C; MLA's absorbed decode attends over the
latent, so its attention term uses (r_kv + d_rope) + r_kv per head instead.

Training memory per GPU (`training_memory`) gives each pipeline stage L/PP contiguous blocks
(rounded), shards non-expert weights over tensor parallel and experts over expert parallel,
applies ZeRO to optimizer states / gradients / weights, and counts activations as the bytes
saved for backward (the inputs of every matmul and norm, attention q/k/v/out with a fused
kernel, SwiGLU's two branches) times the micro-batches in flight under 1F1B (PP - s on stage
s); with recomputation only each layer's input is kept, plus one layer's working set. Logits
and allocator slack are not counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv3.config import PRESETS, ModelConfig, read_config_json
from dsv3.errors import ConfigError

DATA_DIR = Path(__file__).with_name("data")
# Bundled HF config.json files of the models the paper compares (typed from their published configs).
REFERENCE_MODELS = {p.stem: p for p in sorted(DATA_DIR.glob("*.json")) if p.stem != "hardware"}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
GQA_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral")
GQA_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)


# ---------------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class MLA:
    num_heads: int
    q_lora_rank: int | None  # None: plain query projection
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def params(self, d: int) -> int:
        h, q_out = self.num_heads, self.num_heads * self.qk_head_dim
        r_q, r_kv = self.q_lora_rank, self.kv_lora_rank
        query = d * q_out if r_q is None else d * r_q + r_q + r_q * q_out
        latent = (
            d * (r_kv + self.qk_rope_head_dim) + r_kv + r_kv * h * (self.qk_nope_head_dim + self.v_head_dim)
        )
        return query + latent + h * self.v_head_dim * d

    def cached_values_per_layer(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    def score_value_dims(self, absorbed: bool) -> tuple[int, int]:
        """Per-head widths of the q.k and p.v products (naive path, or over the latent)."""
        if absorbed:
            return self.kv_lora_rank + self.qk_rope_head_dim, self.kv_lora_rank
        return self.qk_head_dim, self.v_head_dim

    def saved_values_per_token(self, d: int) -> int:
        r_q = self.q_lora_rank or 0
        qkv_out = self.num_heads * (2 * self.qk_head_dim + 2 * self.v_head_dim)
        return 2 * d + 2 * r_q + 2 * self.kv_lora_rank + qkv_out


@dataclass(frozen=True)
class GQA:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False

    def params(self, d: int) -> int:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = (q + 2 * kv) * self.qkv_bias + d * self.o_bias
        return d * (q + 2 * kv) + q * d + bias

    def cached_values_per_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim

    def score_value_dims(self, absorbed: bool) -> tuple[int, int]:
        return self.head_dim, self.head_dim

    def saved_values_per_token(self, d: int) -> int:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return 2 * d + 2 * q + 2 * kv


@dataclass(frozen=True)
class MoE:
    n_routed: int
    top_k: int
    n_shared: int
    expert_intermediate: int
    selection_bias: bool  # DeepSeek-V3's e_score_correction_bias (one value per routed expert)

    def expert_params(self, d: int) -> int:
        return swiglu_params(d, self.expert_intermediate)

    def router_params(self, d: int) -> int:
        return self.n_routed * d + self.n_routed * self.selection_bias


@dataclass(frozen=True)
class Architecture:
    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    attention: MLA | GQA
    intermediate_size: int  # dense FFN width
    num_dense_layers: int  # the first layers use the dense FFN, the rest the MoE
    moe: MoE | None
    tie_word_embeddings: bool = False
    mtp_layers: int = 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers if self.moe else 0

    @property
    def is_moe(self) -> bool:
        return self.num_moe_layers > 0


def swiglu_params(d: int, width: int) -> int:
    return 3 * d * width


# ---------------------------------------------------------------------------------- loading
def load_architecture(spec: str | Path | dict[str, Any]) -> Architecture:
    """A preset name, a bundled reference model name, a config.json path (or its folder), or a dict."""
    if isinstance(spec, dict):
        return from_hf_dict(spec, "config dict")
    text = str(spec)
    if text in PRESETS:
        return from_model_config(ModelConfig.from_preset(text), text)
    if text in REFERENCE_MODELS:
        return from_hf_dict(json.loads(REFERENCE_MODELS[text].read_text()), text)
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"unknown model {text!r}: not a preset {sorted(PRESETS)}, not a reference model "
            f"{sorted(REFERENCE_MODELS)}, and no config.json at {path}"
        )
    return from_hf_dict(read_config_json(path), str(path))


def from_model_config(cfg: ModelConfig, name: str) -> Architecture:
    if cfg.attention_bias:
        raise ConfigError(
            f"{name}: attention_bias=True is not modelled by the analyzer (DeepSeek configs use false)"
        )
    attention = MLA(
        cfg.num_attention_heads,
        cfg.q_lora_rank,
        cfg.kv_lora_rank,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
    )
    moe = None
    if cfg.num_moe_layers > 0 or cfg.num_nextn_predict_layers > 0:
        moe = MoE(
            cfg.n_routed_experts,
            cfg.num_experts_per_tok,
            cfg.n_shared_experts,
            cfg.moe_intermediate_size,
            selection_bias=cfg.routing_method.selection_bias,
        )
    return Architecture(
        name,
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.num_hidden_layers,
        attention,
        cfg.intermediate_size,
        cfg.first_k_dense_replace,
        moe,
        cfg.tie_word_embeddings,
        cfg.num_nextn_predict_layers,
    )


def from_hf_dict(d: dict[str, Any], name: str) -> Architecture:
    """DeepSeek V2/V3 through ModelConfig; Llama/Qwen2/Mistral/Mixtral-style GQA decoders here.

    An unknown model_type is read as a Llama-style decoder if it carries the keys that needs
    (or as DeepSeek if it has `kv_lora_rank`); otherwise the error names the missing keys."""
    model_type = d.get("model_type")
    if model_type in ("deepseek_v2", "deepseek_v3") or "kv_lora_rank" in d:
        deepseek = (
            model_type if model_type in ("deepseek_v2", "deepseek_v3") else None
        )  # else: every key needed
        return from_model_config(ModelConfig.from_hf({**d, "model_type": deepseek}), name)
    missing = [k for k in GQA_REQUIRED_KEYS if d.get(k) is None]
    if missing:
        known = ["deepseek_v2", "deepseek_v3", *GQA_MODEL_TYPES]
        raise ConfigError(
            f"{name}: model_type={model_type!r} (known: {known}) read as a Llama-style decoder is "
            f"missing keys {missing}; an MLA model needs kv_lora_rank, qk_nope_head_dim, "
            "qk_rope_head_dim, v_head_dim"
        )
    if d.get("mlp_bias"):
        raise ConfigError(f"{name}: mlp_bias=True is not modelled by the analyzer")
    _check_gqa_sizes(d, name)
    heads = d["num_attention_heads"]
    qkv_bias = model_type == "qwen2" or bool(d.get("attention_bias"))
    attention = GQA(
        heads,
        d.get("num_key_value_heads") or heads,
        d.get("head_dim") or d["hidden_size"] // heads,
        qkv_bias=qkv_bias,
        o_bias=bool(d.get("attention_bias")),
    )
    moe = None
    if d.get("num_local_experts"):
        moe = MoE(
            d["num_local_experts"], d["num_experts_per_tok"], 0, d["intermediate_size"], selection_bias=False
        )
    return Architecture(
        name,
        d["vocab_size"],
        d["hidden_size"],
        d["num_hidden_layers"],
        attention,
        d["intermediate_size"],
        0 if moe else d["num_hidden_layers"],
        moe,
        bool(d.get("tie_word_embeddings", False)),
    )


def _check_gqa_sizes(d: dict[str, Any], name: str) -> None:
    for key in (
        *GQA_REQUIRED_KEYS,
        "num_key_value_heads",
        "head_dim",
        "num_local_experts",
        "num_experts_per_tok",
    ):
        value = d.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ConfigError(f"{name}: {key}={value!r} must be a positive integer")
    kv_heads = d.get("num_key_value_heads") or d["num_attention_heads"]
    if d["num_attention_heads"] % kv_heads:
        raise ConfigError(f"{name}: num_key_value_heads={kv_heads} must divide num_attention_heads")
    if d.get("num_local_experts") and not 1 <= d.get("num_experts_per_tok", 0) <= d["num_local_experts"]:
        raise ConfigError(
            f"{name}: num_experts_per_tok must be in [1, num_local_experts={d['num_local_experts']}]"
        )


# ---------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParamCounts:
    """Exact parameter counts of the main model (MTP modules reported apart)."""

    embedding: int
    head: int  # 0 when tied to the embedding
    attention: int  # all layers
    norms: int  # per-layer norms, MLA's latent norms excluded (they are in attention), final norm
    dense_ffn: int
    routed_experts: int
    shared_experts: int
    routers: int
    mtp: int  # unique MTP parameters (their embedding and head are the main model's)
    activated: int  # per token, with embedding and head
    activated_without_embedding: int  # per token, without the input embedding (the FLOPs count)

    @property
    def total(self) -> int:
        return (
            self.embedding
            + self.head
            + self.attention
            + self.norms
            + self.dense_ffn
            + self.routed_experts
            + self.shared_experts
            + self.routers
        )

    def by_component(self) -> dict[str, int]:
        keys = (
            "embedding",
            "head",
            "attention",
            "norms",
            "dense_ffn",
            "routed_experts",
            "shared_experts",
            "routers",
        )
        return {k: getattr(self, k) for k in keys}


def layer_params(arch: Architecture, moe_layer: bool, activated: bool = False) -> int:
    """One block: attention, two norms, and the dense FFN or the MoE (all experts or the activated)."""
    d = arch.hidden_size
    base = arch.attention.params(d) + 2 * d
    if not moe_layer:
        return base + swiglu_params(d, arch.intermediate_size)
    moe = arch.moe
    experts = (moe.top_k if activated else moe.n_routed) + moe.n_shared
    return base + experts * moe.expert_params(d) + moe.router_params(d)


def mtp_module_params(arch: Architecture) -> int:
    """One DeepSeek MTP module: enorm, hnorm, the 2d->d projection, one block, the head's norm."""
    d = arch.hidden_size
    return 3 * d + 2 * d * d + layer_params(arch, moe_layer=arch.moe is not None)


def count_params(arch: Architecture) -> ParamCounts:
    d, L_dense, L_moe = arch.hidden_size, arch.num_dense_layers, arch.num_moe_layers
    embedding = arch.vocab_size * d
    head = 0 if arch.tie_word_embeddings else embedding
    moe = arch.moe
    expert = moe.expert_params(d) if moe else 0
    counts = {
        "embedding": embedding,
        "head": head,
        "attention": arch.num_layers * arch.attention.params(d),
        "norms": arch.num_layers * 2 * d + d,
        "dense_ffn": L_dense * swiglu_params(d, arch.intermediate_size),
        "routed_experts": L_moe * moe.n_routed * expert if moe else 0,
        "shared_experts": L_moe * moe.n_shared * expert if moe else 0,
        "routers": L_moe * moe.router_params(d) if moe else 0,
        "mtp": arch.mtp_layers * mtp_module_params(arch),
    }
    body = L_dense * layer_params(arch, False) + d
    if L_moe:
        body += L_moe * layer_params(arch, True, activated=True)
    head_or_tied = embedding  # the head multiplies by a vocab x d matrix, tied or not
    return ParamCounts(
        **counts, activated=embedding + head + body, activated_without_embedding=body + head_or_tied
    )


# ---------------------------------------------------------------------------------- KV cache, FLOPs
def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype={dtype!r}: expected one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def kv_cache_bytes_per_token(arch: Architecture, dtype: str = "bf16") -> int:
    return arch.num_layers * arch.attention.cached_values_per_layer() * dtype_bytes(dtype)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name}={value!r} must be > 0")


def attention_flops_per_token(arch: Architecture, context: float, absorbed: bool = False) -> float:
    """Forward FLOPs of q.k and p.v for one query token over `context` keys, all layers."""
    qk, v = arch.attention.score_value_dims(absorbed)
    return 2 * arch.num_layers * arch.attention.num_heads * (qk + v) * context


def training_flops_per_token(arch: Architecture, seq_len: int, causal: bool = True) -> float:
    """6 N_act (without input embedding) + 3 x attention at the mean context (seq/2 if causal)."""
    _positive("seq_len", seq_len)
    context = seq_len / 2 if causal else seq_len
    return 6 * count_params(arch).activated_without_embedding + 3 * attention_flops_per_token(arch, context)


def paper_training_flops_per_token(arch: Architecture, seq_len: int) -> float:
    """ISCA Table 2's convention: MoE rows as `training_flops_per_token`, dense rows 6 (12 L d^2 + d V)."""
    if arch.is_moe:
        return training_flops_per_token(arch, seq_len)
    _positive("seq_len", seq_len)
    d = arch.hidden_size
    return 6 * (12 * arch.num_layers * d * d + d * arch.vocab_size)


def inference_flops_per_token(arch: Architecture, context: int, absorbed: bool = False) -> float:
    """Forward FLOPs to decode one token at `context` cached positions."""
    if context < 0:
        raise ConfigError(f"context={context!r} must be >= 0")
    return 2 * count_params(arch).activated_without_embedding + attention_flops_per_token(
        arch, context, absorbed
    )


# ---------------------------------------------------------------------------------- training memory
@dataclass(frozen=True)
class ParallelLayout:
    """Parallel degrees and precision of a training run (defaults: DeepSeek-V3's byte budget)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1
    zero: int = 1  # 0 none, 1 optimizer states + master, 2 + gradients, 3 + weights (over data parallel)
    micro_batch: int = 1  # sequences per micro-batch
    seq_len: int = 4096
    recompute: bool = False
    weight_bytes: int = 2  # BF16 working weights
    master_bytes: int = 4  # FP32 master weights
    grad_bytes: int = 4  # FP32 gradients
    moment_bytes: int = 4  # two BF16 AdamW moments

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def validate(self, arch: Architecture) -> None:
        for name in ("tp", "pp", "ep", "dp", "micro_batch", "seq_len"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"zero={self.zero!r} must be 0, 1, 2 or 3")
        rules = [
            (self.pp <= arch.num_layers, f"pp={self.pp} must be <= num_layers={arch.num_layers}"),
            (
                arch.attention.num_heads % self.tp == 0,
                f"tp={self.tp} must divide num_heads={arch.attention.num_heads}",
            ),
            ((self.dp * self.tp) % self.ep == 0, f"ep={self.ep} must divide dp x tp = {self.dp * self.tp}"),
        ]
        if isinstance(arch.attention, GQA):
            kv = arch.attention.num_kv_heads
            rules.append(
                (
                    kv % self.tp == 0 or self.tp % kv == 0,
                    f"tp={self.tp} and num_kv_heads={kv} must divide one another",
                )
            )
        n_routed = arch.moe.n_routed if arch.moe else 1
        rules.append((n_routed % self.ep == 0, f"ep={self.ep} must divide the {n_routed} routed experts"))
        for ok, message in rules:
            if not ok:
                raise ConfigError(f"parallel layout: {message}")


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes per GPU on the heaviest pipeline stage."""

    weights: float
    master_weights: float
    gradients: float
    optimizer_states: float
    activations: float
    activations_recompute: float  # what activations would be with full per-layer recomputation
    stage: int

    @property
    def total(self) -> float:
        acts = self.activations
        return self.weights + self.master_weights + self.gradients + self.optimizer_states + acts


def stage_layers(arch: Architecture, layout: ParallelLayout, stage: int) -> range:
    """Blocks of one pipeline stage: contiguous, sizes differing by at most one."""
    return range(stage * arch.num_layers // layout.pp, (stage + 1) * arch.num_layers // layout.pp)


def _split(arch: Architecture, moe_layer: bool, extra: int = 0) -> tuple[int, int]:
    """(non-expert, routed-expert) parameters of one block (+ `extra` non-expert ones)."""
    routed = arch.moe.n_routed * arch.moe.expert_params(arch.hidden_size) if moe_layer else 0
    return layer_params(arch, moe_layer) + extra - routed, routed


def _stage_params(arch: Architecture, layout: ParallelLayout, stage: int) -> tuple[float, float]:
    """(non-expert, routed-expert) parameters of one pipeline stage held by one GPU: the stage's
    blocks, the embedding on the first stage, the final norm, head and MTP modules on the last."""
    d = arch.hidden_size
    parts = [
        _split(arch, arch.is_moe and i >= arch.num_dense_layers) for i in stage_layers(arch, layout, stage)
    ]
    if stage == 0:
        parts.append((arch.vocab_size * d, 0))
    if stage == layout.pp - 1:
        parts.append((d + (0 if arch.tie_word_embeddings else arch.vocab_size * d), 0))
        mtp_glue = mtp_module_params(arch) - layer_params(arch, arch.moe is not None)
        parts += [_split(arch, arch.moe is not None, mtp_glue)] * arch.mtp_layers
    return sum(p[0] for p in parts) / layout.tp, sum(p[1] for p in parts) / layout.ep


def activation_values_per_token_layer(arch: Architecture, moe_layer: bool) -> int:
    """Values one block saves for backward per token (see the module docstring)."""
    d = arch.hidden_size
    attention = arch.attention.saved_values_per_token(d)
    if moe_layer:
        moe = arch.moe
        return attention + 2 * d + (moe.top_k + moe.n_shared) * (d + 3 * moe.expert_intermediate)
    return attention + 2 * d + 3 * arch.intermediate_size


def training_memory(arch: Architecture, layout: ParallelLayout) -> TrainingMemory:
    layout.validate(arch)
    best: TrainingMemory | None = None
    for stage in range(layout.pp):
        memory = _stage_memory(arch, layout, stage)
        if best is None or memory.total > best.total:
            best = memory
    return best


def _stage_memory(arch: Architecture, layout: ParallelLayout, stage: int) -> TrainingMemory:
    non_expert, experts = _stage_params(arch, layout, stage)
    expert_dp = layout.dp * layout.tp // layout.ep  # replicas of each expert shard

    def sharded(level: int, bytes_per_param: int) -> float:
        if layout.zero < level:
            return (non_expert + experts) * bytes_per_param
        return (non_expert / layout.dp + experts / expert_dp) * bytes_per_param

    layers = stage_layers(arch, layout, stage)
    saved = [
        activation_values_per_token_layer(arch, i >= arch.num_dense_layers and arch.is_moe) for i in layers
    ]
    tokens = layout.micro_batch * layout.seq_len
    in_flight = layout.pp - stage  # 1F1B: stage s holds pp - s micro-batches
    full = sum(saved) * tokens * in_flight * 2 / layout.tp
    recompute = (len(saved) * arch.hidden_size * in_flight + max(saved)) * tokens * 2 / layout.tp
    return TrainingMemory(
        weights=sharded(3, layout.weight_bytes),
        master_weights=sharded(1, layout.master_bytes),
        gradients=sharded(2, layout.grad_bytes),
        optimizer_states=sharded(1, layout.moment_bytes),
        activations=recompute if layout.recompute else full,
        activations_recompute=recompute,
        stage=stage,
    )
