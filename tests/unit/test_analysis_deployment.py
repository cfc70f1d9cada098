"""The deployment view: per-rank weights add up to the model, cache bytes per token are the
paged cache's (and what disaggregation measurably hands over), traffic and limits follow their
formulas, bad layouts are one-line errors."""

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.analysis import costs, hardware
from dsv3.analysis.deployment import cache_bytes_per_token, deployment, weight_bytes_per_rank
from dsv3.analysis.limits import LimitError
from dsv3.cli import main
from dsv3.fp8.quant import eager
from dsv3.infer.disaggregate import PrefillEngine
from dsv3.infer.engine import SamplingParams
from fixtures import ENGINE

V3 = costs.load_architecture("v3-671b")
H800 = hardware.load_catalog().accelerator("H800")


def test_weights_over_the_ranks_add_up_to_the_model_and_its_mtp_module():
    counts = costs.count_params(V3)
    total = counts.total + V3.mtp_layers * costs.mtp_module_params(V3)
    for ep in (8, 64, 256):
        replicated, experts, slots = weight_bytes_per_rank(V3, ep, 0, "bf16")
        assert slots == 256 // ep and replicated + ep * experts == 2 * total
    # R copies add R expert slots over the ranks, nothing else
    replicated, experts, slots = weight_bytes_per_rank(V3, 32, 32, "bf16")
    expert = V3.moe.expert_params(V3.hidden_size)
    assert slots == 9 and experts == 9 * expert * (58 + 1) * 2


def test_cache_bytes_per_token_are_the_paged_caches():
    assert cache_bytes_per_token(V3, "bf16") == 70_272  # ISCA Table 1
    assert cache_bytes_per_token(V3, "bf16", mtp=True) == 62 * 576 * 2
    assert cache_bytes_per_token(V3, "fp8") == 40_016  # infer/cache.py: 61 x (512 + 4 x 4 + 64 x 2)


CFG = {**ENGINE, "kv_lora_rank": 160}


@pytest.mark.parametrize("cache_dtype,analyzer_dtype", [("auto", "fp32"), ("fp8", "fp8")])
def test_handoff_bytes_measured_equal_the_analyzers(cache_dtype, analyzer_dtype):
    """kv_lora_rank 160: two FP8 scale tiles, one partial."""
    cfg = ModelConfig.from_dict(CFG)
    engine = PrefillEngine(Transformer(cfg).eval(), block_size=4, mtp=True, cache_dtype=cache_dtype)
    with eager():
        engine.generate([[1, 2, 3, 4, 5], list(range(11))], SamplingParams(max_tokens=1, temperature=0))
        engine.add_request(list(range(9)), SamplingParams(max_tokens=5, temperature=0))
        while engine.has_unfinished():
            engine.step()
    h = engine.handed_off
    assert h["requests"] == 1 and h["prompt_tokens"] == 9
    arch = costs.from_model_config(cfg, "test")
    assert h["latent_bytes"] / h["prompt_tokens"] == cache_bytes_per_token(arch, analyzer_dtype, mtp=True)


def test_traffic_and_limits():
    d = deployment(V3, H800, 320, redundant_experts=64, tokens_per_rank=32)
    assert d.slots_per_rank == 1
    remote = 32 * (58 + 1) * 8 * 7168 * 319 / 320
    assert d.dispatch_bytes_per_step == remote * 1.0 and d.combine_bytes_per_step == remote * 2.0
    assert d.handoff_bytes_per_token == d.cache_bytes_per_token == 71_424
    assert d.cache_tokens == int(d.cache_budget_bytes // 71_424) and d.fits
    # one expert per rank: compute is light, two micro-batches hide the all-to-alls and win;
    # nine slots per rank: reading the experts twice (once per micro-batch) costs more than it hides
    assert d.limit_overlapped.tokens_per_s > d.limit_serial.tokens_per_s
    heavy = deployment(V3, H800, 32, redundant_experts=32)
    assert heavy.limit_overlapped.tokens_per_s < heavy.limit_serial.tokens_per_s
    # with a given compute time and nothing to re-read, overlap hides min(comm, compute) per layer
    given = deployment(V3, H800, 320, redundant_experts=64, compute_us=100.0)
    assert given.limit_serial.layer_us == pytest.approx(given.limit_serial.comm_us + 100.0)
    assert given.limit_overlapped.layer_us == pytest.approx(2 * max(given.limit_overlapped.comm_us, 50.0))


def test_bad_layouts_are_one_line_errors(capsys):
    with pytest.raises(LimitError, match="the 256 \\+ 1 expert slots must split evenly"):
        deployment(V3, H800, 32, redundant_experts=1)
    assert main(["analyze", "deployment", "--ep", "3"]) == 2
    assert capsys.readouterr().err.startswith("error: ep=3, redundant experts=0: the 256 + 0 expert slots")
    assert main(["analyze", "deployment", "--ep", "64", "--cache-dtype", "int4"]) == 2
    assert "cache dtype 'int4'" in capsys.readouterr().err


def test_cli_json(capsys):
    import json

    assert main(["analyze", "deployment", "--config", "v3-671b", "--ep", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["slots_per_rank"] == 4 and out["fits"] and out["limit_overlapped"]["tokens_per_s"] > 0
    torch.testing.assert_close(out["weight_bytes"], out["replicated_bytes"] + out["expert_bytes"])
