"""Speed limits: expert-parallel decode (ISCA 2.3.2), the decode roofline, and training MFU.

Expert-parallel decode. Each device holds one expert and serves T tokens; every MoE layer runs
two all-to-alls, dispatch (b_d bytes per value, FP8: 1) and combine (b_c, BF16: 2), each token
reaching K routed + S shared experts of hidden width h:

    t_comm  = (b_d + b_c) T (K + S) h / B  (+ 2 latencies)       B: per-device bandwidth
    t_layer = m max(t_comm, t_compute)  with m >= 2 overlapped micro-batches (the compute of one
                                         hides under the other's communication; m = 1: sum)
    TPOT    = L t_layer,   tokens/s = (1 + a) / TPOT               a: MTP draft acceptance

With T = 32, K + S = 9, h = 7000, B = 50 GB/s (CX7 InfiniBand): 120.96 us, 241.92 us per layer,
14.76 ms over 61 layers, ~67 tokens/s; with NVL72's 900 GB/s: 6.72 us, 0.82 ms, ~1200 tokens/s.

Decode roofline. One decode step of a batch B at context C reads the touched weights once and
every sequence's KV cache, and computes B x inference FLOPs:

    t = max(bytes / HBM bandwidth, FLOPs / peak)
    bytes = (dense part + E (1 - (1 - K/E)^B) experts per MoE layer) x weight bytes + B C kv bytes

(a batch of B tokens touches E (1 - (1 - K/E)^B) of E routed experts on average).

Training. MFU = training FLOPs per token x tokens per second / (GPUs x peak); tokens per day and
GPU hours per trillion tokens follow from the same throughput (ISCA Table 4: 272.80B tokens/day
on 2048 H800s is 180K GPU hours per trillion tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv3.analysis.costs import (
    MLA,
    Architecture,
    count_params,
    dtype_bytes,
    inference_flops_per_token,
    kv_cache_bytes_per_token,
    training_flops_per_token,
)
from dsv3.analysis.hardware import Accelerator
from dsv3.analysis.network import transfer_time_us
from dsv3.errors import UserError


class LimitError(UserError):
    """A speed-limit parameter out of range."""


def _check(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise LimitError(f"{name}={value!r} must be > 0")


@dataclass(frozen=True)
class EPDecodeLimit:
    bytes_per_layer: float  # per device, both all-to-alls, one micro-batch
    comm_us: float
    layer_us: float
    tpot_ms: float
    tokens_per_s: float


def ep_decode_limit(
    hidden: int,
    layers: int,
    bandwidth_gbps: float,
    tokens_per_device: int = 32,
    routed_experts: int = 8,
    shared_experts: int = 1,
    dispatch_bytes: float = 1.0,
    combine_bytes: float = 2.0,
    micro_batches: int = 2,
    latency_us: float = 0.0,
    compute_us: float = 0.0,
    mtp_acceptance: float = 0.0,
) -> EPDecodeLimit:
    _check(
        hidden=hidden,
        layers=layers,
        bandwidth_gbps=bandwidth_gbps,
        tokens_per_device=tokens_per_device,
        routed_experts=routed_experts,
        micro_batches=micro_batches,
    )
    if shared_experts < 0 or compute_us < 0 or not 0 <= mtp_acceptance <= 1:
        raise LimitError(
            f"shared_experts={shared_experts} and compute_us={compute_us} must be >= 0, "
            f"mtp_acceptance={mtp_acceptance} in [0, 1]"
        )
    nbytes = (dispatch_bytes + combine_bytes) * tokens_per_device * (routed_experts + shared_experts) * hidden
    comm = transfer_time_us(nbytes, bandwidth_gbps, 2 * latency_us)
    layer = comm + compute_us if micro_batches == 1 else micro_batches * max(comm, compute_us)
    tpot_ms = layers * layer / 1e3
    return EPDecodeLimit(nbytes, comm, layer, tpot_ms, (1 + mtp_acceptance) * 1e3 / tpot_ms)


def ep_decode_limit_for(arch: Architecture, bandwidth_gbps: float, **kwargs) -> EPDecodeLimit:
    """The limit for a MoE model: its hidden size, layers and experts per token."""
    if arch.moe is None:
        raise LimitError(f"{arch.name} has no MoE layers; the expert-parallel limit does not apply")
    return ep_decode_limit(
        arch.hidden_size,
        arch.num_layers,
        bandwidth_gbps,
        routed_experts=arch.moe.top_k,
        shared_experts=arch.moe.n_shared,
        **kwargs,
    )


@dataclass(frozen=True)
class DecodeRoofline:
    weight_bytes: float
    kv_bytes: float
    flops: float
    memory_ms: float
    compute_ms: float
    fits: bool  # all weights + this batch's KV cache fit the devices' memory

    @property
    def step_ms(self) -> float:
        return max(self.memory_ms, self.compute_ms)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_ms >= self.compute_ms else "compute"


def touched_weights(arch: Architecture, batch: int) -> float:
    """Parameters one decode step reads: all but the untouched routed experts (and the embedding)."""
    params = count_params(arch).activated_without_embedding
    moe = arch.moe
    if not arch.is_moe:
        return params
    expert = moe.expert_params(arch.hidden_size)
    touched = moe.n_routed * (1 - (1 - moe.top_k / moe.n_routed) ** batch)
    return params + arch.num_moe_layers * (touched - moe.top_k) * expert


def decode_roofline(
    arch: Architecture,
    hw: Accelerator,
    batch: int,
    context: int,
    weight_dtype: str = "bf16",
    kv_dtype: str = "bf16",
    devices: int = 1,
) -> DecodeRoofline:
    _check(batch=batch, devices=devices)
    if context < 0:
        raise LimitError(f"context={context!r} must be >= 0")
    weight_bytes = touched_weights(arch, batch) * dtype_bytes(weight_dtype)
    kv_bytes = batch * context * kv_cache_bytes_per_token(arch, kv_dtype)
    absorbed = isinstance(arch.attention, MLA)
    flops = batch * inference_flops_per_token(arch, context, absorbed=absorbed)
    peak = hw.peak_tflops("fp8" if weight_dtype == "fp8" else "bf16")
    total_bytes = count_params(arch).total * dtype_bytes(weight_dtype) + kv_bytes
    return DecodeRoofline(
        weight_bytes,
        kv_bytes,
        flops,
        memory_ms=(weight_bytes + kv_bytes) / (devices * hw.hbm_gbps * 1e6),
        compute_ms=flops / (devices * peak * 1e9),
        fits=total_bytes <= devices * hw.hbm_gb * 1e9,
    )


@dataclass(frozen=True)
class TrainingThroughput:
    tokens_per_s: float
    tokens_per_day: float
    gpu_hours_per_trillion_tokens: float
    mfu: float


def training_throughput(
    tokens_per_step: float, step_s: float, gpus: int, flops_per_token: float, peak_tflops: float
) -> TrainingThroughput:
    """Measured throughput -> tokens/day, GPU hours per 1e12 tokens and MFU."""
    _check(
        tokens_per_step=tokens_per_step,
        step_s=step_s,
        gpus=gpus,
        flops_per_token=flops_per_token,
        peak_tflops=peak_tflops,
    )
    rate = tokens_per_step / step_s
    return TrainingThroughput(
        rate, rate * 86400, gpus / rate * 1e12 / 3600, flops_per_token * rate / (gpus * peak_tflops * 1e12)
    )


def training_at_mfu(
    arch: Architecture, hw: Accelerator, gpus: int, mfu: float, seq_len: int = 4096, dtype: str = "bf16"
) -> TrainingThroughput:
    """The training roofline: throughput of `gpus` devices running at a given MFU."""
    if not 0 < mfu <= 1:
        raise LimitError(f"mfu={mfu!r} must be in (0, 1]")
    _check(gpus=gpus)
    flops = training_flops_per_token(arch, seq_len)
    peak = hw.peak_tflops(dtype)
    rate = mfu * gpus * peak * 1e12 / flops
    return training_throughput(rate, 1.0, gpus, flops, peak)
