"""Expert-parallel decode limit (ISCA 2.3.2), decode roofline and training throughput (Table 4)."""

import pytest

from dsv3.analysis import costs, limits
from dsv3.analysis.hardware import load_catalog
from dsv3.analysis.limits import LimitError

PAPER_EP = {"hidden": 7000, "layers": 61, "tokens_per_device": 32, "routed_experts": 8, "shared_experts": 1}


def test_ep_limit_on_h800_infiniband():
    lim = limits.ep_decode_limit(bandwidth_gbps=50, **PAPER_EP)
    assert lim.comm_us == pytest.approx(120.96, abs=1e-9)
    assert lim.layer_us == pytest.approx(241.92, abs=1e-9)
    assert round(lim.tpot_ms, 2) == 14.76
    assert int(lim.tokens_per_s) == 67


def test_ep_limit_on_gb200_nvl72():
    lim = limits.ep_decode_limit(bandwidth_gbps=900, **PAPER_EP)
    assert lim.comm_us == pytest.approx(6.72, abs=1e-9)
    assert round(lim.tpot_ms, 2) == 0.82
    assert lim.tokens_per_s == pytest.approx(1200, rel=0.02)


def test_ep_limit_generalizations():
    base = limits.ep_decode_limit(bandwidth_gbps=50, **PAPER_EP)
    lat = limits.ep_decode_limit(bandwidth_gbps=50, latency_us=3.7, **PAPER_EP)
    assert lat.comm_us == pytest.approx(base.comm_us + 2 * 3.7)
    mtp = limits.ep_decode_limit(bandwidth_gbps=50, mtp_acceptance=0.85, **PAPER_EP)
    assert mtp.tokens_per_s == pytest.approx(1.85 * base.tokens_per_s)
    slow = limits.ep_decode_limit(bandwidth_gbps=50, compute_us=200, **PAPER_EP)
    assert slow.layer_us == 400  # compute no longer hidden
    serial = limits.ep_decode_limit(bandwidth_gbps=50, micro_batches=1, compute_us=10, **PAPER_EP)
    assert serial.layer_us == pytest.approx(base.comm_us + 10)


def test_ep_limit_from_a_config_uses_its_experts():
    v3 = costs.load_architecture("deepseek-v3")
    lim = limits.ep_decode_limit_for(v3, 50)
    assert lim.bytes_per_layer == 3 * 32 * 9 * 7168
    with pytest.raises(LimitError, match="no MoE layers"):
        limits.ep_decode_limit_for(costs.load_architecture("llama-3.1-8b"), 50)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bandwidth_gbps": 0}, "bandwidth_gbps=0 must be > 0"),
        ({"bandwidth_gbps": -1}, "bandwidth_gbps=-1"),
        ({"bandwidth_gbps": 50, "mtp_acceptance": 1.5}, "mtp_acceptance=1.5"),
        ({"bandwidth_gbps": 50, "tokens_per_device": 0}, "tokens_per_device=0"),
    ],
)
def test_bad_limit_inputs(kwargs, message):
    with pytest.raises(LimitError, match=message):
        limits.ep_decode_limit(**{**PAPER_EP, **kwargs})


def test_decode_roofline_dense_batch_one_reads_every_weight_once():
    arch = costs.load_architecture("llama-3.1-8b")
    h100 = load_catalog().accelerator("H100")
    r = limits.decode_roofline(arch, h100, batch=1, context=0)
    assert r.weight_bytes == 2 * costs.count_params(arch).activated_without_embedding
    assert r.memory_ms == pytest.approx(r.weight_bytes / 3350e6)
    assert r.bound == "memory" and r.fits


def test_moe_decode_touches_more_experts_with_batch():
    v3 = costs.load_architecture("deepseek-v3")
    one = limits.touched_weights(v3, 1)
    assert one == costs.count_params(v3).activated_without_embedding
    huge = limits.touched_weights(v3, 100_000)
    c = costs.count_params(v3)
    assert huge == pytest.approx(
        c.total - c.embedding, rel=1e-9
    )  # every expert; the lookup table is not read whole


def test_table4_throughput_gpu_hours_and_mfu():
    v3 = costs.load_architecture("deepseek-v3")
    peak = load_catalog().accelerator("H800").bf16_tflops
    flops = costs.training_flops_per_token(v3, 4096)
    t = limits.training_throughput(15360 * 4096, 19.926, 2048, flops, peak)
    assert t.tokens_per_day / 1e9 == pytest.approx(272.80, abs=0.01)
    assert t.gpu_hours_per_trillion_tokens == pytest.approx(180_000, rel=0.005)
    assert 100 * t.mfu == pytest.approx(38.94, rel=0.005)
    noncausal = costs.training_flops_per_token(v3, 4096, causal=False)
    assert 100 * limits.training_throughput(15360 * 4096, 19.926, 2048, noncausal, peak).mfu == pytest.approx(
        43.73, rel=0.005
    )


def test_training_at_mfu_inverts_training_throughput():
    v3 = costs.load_architecture("deepseek-v3")
    h800 = load_catalog().accelerator("H800")
    t = limits.training_at_mfu(v3, h800, gpus=2048, mfu=0.3894)
    assert t.mfu == pytest.approx(0.3894)
    with pytest.raises(LimitError, match="mfu=0"):
        limits.training_at_mfu(v3, h800, gpus=2048, mfu=0)
