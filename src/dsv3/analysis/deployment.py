"""The deployment view: what one rank of an expert-parallel serving deployment holds and sends.

DeepSeek-V3 serves with data-parallel attention and expert-parallel MoE (V3R sec. 3.4; ISCA
sec. 2.3.2): every rank holds the replicated part of the model (embedding, head, attention,
dense FFN layers, shared experts, routers, norms, the MTP module's own) and E_slots / ep routed
expert slots per MoE layer, the E + R slots of EPLB (R redundant copies of hot experts):

    weights per rank = replicated + (E + R) / ep x (3 d I_e) x MoE layers (the MTP layer's too)

in the weight dtype (FP8 as DeepSeek's release: the embedding and head stay BF16; the 128x128
block scales, 1/4096 of the FP8 bytes, are left out). What HBM leaves after the weights and a
reserve for activations and workspace is the latent-cache budget, in tokens and in sequences of
the given context, at the cache's bytes per token:

    MLA  (layers [+ 1 MTP layer]) x (r_kv + d_rope) x dtype bytes
    FP8  (layers [+ 1]) x (r_kv E4M3 + 4 bytes per 128 of scales + d_rope BF16)  (dsv3's paged cache)

which is also what prefill/decode disaggregation moves per prompt token. One decode step with
T tokens per rank sends out of the rank, per MoE layer, each token's K routed rows to the
experts on other ranks and gets them back:

    all-to-all bytes per step = T x MoE layers x K x d x (b_dispatch + b_combine) x (ep - 1) / ep

(routing assumed uniform over the ranks; the shared expert is replicated, so it sends nothing).
The paper's EP decode limit (limits.ep_decode_limit, which counts the shared expert as a remote
one, as in a deployment of one expert per GPU) is given for the rank's T tokens per step with
overlap (two micro-batches of T/2: layer = 2 max(comm, compute) of a half) and without (layer =
comm + compute of all T). The compute of a MoE layer is given (compute_us, for T tokens), or
estimated as its roofline on the rank: max(2 x tokens x activated parameters of the layer /
peak, bytes of the layer's weights on the rank / HBM bandwidth); a micro-batch reads the
weights again, which is what overlap costs in memory-bound decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsv3.analysis.costs import MLA, Architecture, count_params, dtype_bytes, mtp_module_params
from dsv3.analysis.hardware import Accelerator
from dsv3.analysis.limits import EPDecodeLimit, LimitError, ep_decode_limit_for

CACHE_DTYPES = ("fp32", "bf16", "fp8")
FP8_SCALE_TILE = 128


@dataclass(frozen=True)
class Deployment:
    model: str
    hardware: str
    ep: int
    redundant_experts: int
    slots_per_rank: int
    replicated_bytes: float  # every rank: all but the routed experts
    expert_bytes: float  # this rank's slots of every MoE layer
    hbm_bytes: float
    reserve_bytes: float  # activations, workspace
    cache_budget_bytes: float
    cache_bytes_per_token: int
    cache_tokens: int
    sequences_at_context: int
    context: int
    tokens_per_rank: int  # decoded per step
    dispatch_bytes_per_step: float  # leaving one rank, all MoE layers
    combine_bytes_per_step: float
    handoff_bytes_per_token: int  # prefill -> decode worker, per prompt token
    compute_us: float  # one MoE layer's compute for the T tokens (given or estimated)
    limit_overlapped: EPDecodeLimit  # two micro-batches of T/2
    limit_serial: EPDecodeLimit  # one batch of T

    @property
    def weight_bytes(self) -> float:
        return self.replicated_bytes + self.expert_bytes

    @property
    def fits(self) -> bool:
        return self.cache_budget_bytes > 0


def cache_bytes_per_token(arch: Architecture, dtype: str = "bf16", mtp: bool = False) -> int:
    """Latent cache bytes per token, the MTP layer's included when drafting with it."""
    if dtype not in CACHE_DTYPES:
        raise LimitError(f"cache dtype {dtype!r}: choose one of {CACHE_DTYPES}")
    layers = arch.num_layers + (arch.mtp_layers if mtp else 0)
    att = arch.attention
    if dtype == "fp8":
        if not isinstance(att, MLA):
            raise LimitError(f"{arch.name}: the FP8 cache holds MLA latents; this model has no MLA")
        return layers * (
            att.kv_lora_rank + 4 * math.ceil(att.kv_lora_rank / FP8_SCALE_TILE) + 2 * att.qk_rope_head_dim
        )
    return layers * att.cached_values_per_layer() * dtype_bytes(dtype)


def weight_bytes_per_rank(
    arch: Architecture, ep: int, redundant: int = 0, dtype: str = "bf16", mtp: bool = True
) -> tuple[float, float, int]:
    """(replicated bytes, routed-expert bytes, slots) per rank; ValueError-family LimitError
    unless the E + R slots split evenly over the ep ranks."""
    moe = arch.moe
    if moe is None:
        raise LimitError(
            f"{arch.name} has no MoE layers: there is nothing to spread over expert-parallel ranks"
        )
    if ep < 1 or redundant < 0 or (moe.n_routed + redundant) % ep:
        raise LimitError(
            f"ep={ep}, redundant experts={redundant}: the {moe.n_routed} + {redundant} expert slots must split "
            f"evenly over the ranks (ep >= 1 dividing E + R)"
        )
    d, b = arch.hidden_size, dtype_bytes(dtype)
    counts = count_params(arch)
    expert = moe.expert_params(d)
    moe_layers = arch.num_moe_layers + (arch.mtp_layers if mtp else 0)
    mtp_params = arch.mtp_layers * (mtp_module_params(arch) - moe.n_routed * expert) if mtp else 0
    replicated = counts.total - counts.routed_experts + mtp_params  # params
    embeddings = counts.embedding + counts.head
    replicated_bytes = (replicated - embeddings) * b + embeddings * (2 if dtype == "fp8" else b)
    slots = (moe.n_routed + redundant) // ep
    return replicated_bytes, slots * expert * moe_layers * b, slots


def deployment(
    arch: Architecture,
    hw: Accelerator,
    ep: int,
    *,
    redundant_experts: int = 0,
    weight_dtype: str = "fp8",
    cache_dtype: str = "bf16",
    mtp: bool = True,
    context: int = 4096,
    tokens_per_rank: int = 32,
    bandwidth_gbps: float | None = None,
    dispatch_bytes: float = 1.0,
    combine_bytes: float = 2.0,
    memory_reserve: float = 0.1,
    latency_us: float = 0.0,
    compute_us: float | None = None,
    mtp_acceptance: float = 0.0,
) -> Deployment:
    """One rank of `ep` on `hw` serving `arch` (bandwidth: default the accelerator's scale-out)."""
    if not 0 <= memory_reserve < 1:
        raise LimitError(f"memory_reserve={memory_reserve!r}: must be a fraction of HBM in [0, 1)")
    if context < 1 or tokens_per_rank < 1:
        raise LimitError(f"context={context}, tokens_per_rank={tokens_per_rank}: must be >= 1")
    mtp = mtp and arch.mtp_layers > 0
    replicated, experts, slots = weight_bytes_per_rank(arch, ep, redundant_experts, weight_dtype, mtp)
    hbm = hw.hbm_gb * 1e9
    reserve = memory_reserve * hbm
    budget = hbm - reserve - replicated - experts
    per_token = cache_bytes_per_token(arch, cache_dtype, mtp)
    tokens = max(0, int(budget // per_token))
    moe_layers = arch.num_moe_layers + (arch.mtp_layers if mtp else 0)
    remote = tokens_per_rank * moe_layers * arch.moe.top_k * arch.hidden_size * (ep - 1) / ep
    bandwidth = hw.scaleout_gbps if bandwidth_gbps is None else bandwidth_gbps
    half = math.ceil(tokens_per_rank / 2)
    compute = (
        layer_compute_us(arch, hw, slots, tokens_per_rank, weight_dtype) if compute_us is None else compute_us
    )
    half_compute = (
        layer_compute_us(arch, hw, slots, half, weight_dtype) if compute_us is None else compute_us / 2
    )
    limit = dict(
        dispatch_bytes=dispatch_bytes,
        combine_bytes=combine_bytes,
        latency_us=latency_us,
        mtp_acceptance=mtp_acceptance,
    )
    return Deployment(
        arch.name,
        hw.name,
        ep,
        redundant_experts,
        slots,
        replicated,
        experts,
        hbm,
        reserve,
        budget,
        per_token,
        tokens,
        tokens // context,
        context,
        tokens_per_rank,
        remote * dispatch_bytes,
        remote * combine_bytes,
        per_token,
        compute,
        ep_decode_limit_for(
            arch, bandwidth, tokens_per_device=half, micro_batches=2, compute_us=half_compute, **limit
        ),
        ep_decode_limit_for(
            arch, bandwidth, tokens_per_device=tokens_per_rank, micro_batches=1, compute_us=compute, **limit
        ),
    )


def layer_compute_us(arch: Architecture, hw: Accelerator, slots: int, tokens: int, dtype: str) -> float:
    """A MoE layer's roofline time on one rank: max(FLOPs / peak, its weights there / HBM)."""
    moe, d, b = arch.moe, arch.hidden_size, dtype_bytes(dtype)
    expert = moe.expert_params(d)
    attention = arch.attention.params(d) + moe.router_params(d)
    flops = 2 * tokens * (attention + (moe.top_k + moe.n_shared) * expert)
    weight_bytes = (attention + moe.n_shared * expert + slots * expert) * b
    peak = hw.peak_tflops("fp8" if dtype == "fp8" else "bf16")
    return max(flops / (peak * 1e6), weight_bytes / (hw.hbm_gbps * 1e3))


def deployment_tables(d: Deployment) -> list:
    """The view as report Tables: memory per rank, traffic per step, decode limits."""
    from dsv3.analysis.report import Table

    GB = 1e9
    memory = Table(
        f"{d.model} on {d.hardware}: one rank of ep={d.ep} ({d.slots_per_rank} expert slots each, "
        f"{d.redundant_experts} redundant)",
        ["quantity", "value"],
        [
            [
                "replicated weights (attention, dense, shared, routers, embeddings), GB",
                d.replicated_bytes / GB,
            ],
            ["routed-expert slots, GB", d.expert_bytes / GB],
            ["weights, GB", d.weight_bytes / GB],
            ["reserve (activations, workspace), GB", d.reserve_bytes / GB],
            ["latent cache budget, GB", d.cache_budget_bytes / GB],
            ["cache bytes per token", d.cache_bytes_per_token],
            ["cache tokens", d.cache_tokens],
            [f"sequences of {d.context} tokens", d.sequences_at_context],
        ],
        [] if d.fits else ["the weights do not fit this accelerator's HBM: raise ep or use FP8 weights"],
    )
    traffic = Table(
        f"Traffic per rank ({d.tokens_per_rank} tokens per decode step)",
        ["quantity", "value"],
        [
            ["dispatch bytes per step (all MoE layers)", d.dispatch_bytes_per_step],
            ["combine bytes per step", d.combine_bytes_per_step],
            ["prefill -> decode hand-off bytes per prompt token", d.handoff_bytes_per_token],
            ["MoE layer compute, us (given or roofline)", d.compute_us],
        ],
        ["routing assumed uniform over the ranks: (ep - 1) / ep of the routed rows leave the rank"],
    )
    limits = Table(
        "Expert-parallel decode limit (ISCA 2.3.2)",
        ["schedule", "MB per layer", "all-to-all us", "layer us", "TPOT ms", "tokens/s per sequence"],
        [
            [name, lim.bytes_per_layer / 1e6, lim.comm_us, lim.layer_us, lim.tpot_ms, lim.tokens_per_s]
            for name, lim in (
                ("2 micro-batches, overlapped", d.limit_overlapped),
                ("1 batch, no overlap", d.limit_serial),
            )
        ],
        ["overlapped: each micro-batch of T/2 tokens reads the layer's weights again"],
    )
    return [memory, traffic, limits]
