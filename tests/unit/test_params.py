"""Parameter counts and cache sizes, from modules built on the meta device."""

import time

import torch

from dsv3 import ModelConfig, Transformer
from dsv3.infer.cache import LatentCache
from dsv3.info import model_info


def _meta(name):
    with torch.device("meta"):
        return Transformer(ModelConfig.from_preset(name))


def test_v3_671b_counts_on_meta_in_seconds():
    t = time.perf_counter()
    counts = _meta("v3-671b").num_params()
    assert time.perf_counter() - t < 30
    assert counts["total_params"] == 671_026_419_200
    assert round(counts["activated_params"] / 1e9, 2) == 37.55
    assert round(counts["activated_params_without_embedding"] / 1e9, 2) == 36.63
    assert round(counts["mtp_params"] / 1e9, 1) == 11.6


def test_v2_lite_counts():
    counts = _meta("v2-lite").num_params()
    assert round(counts["total_params"] / 1e9, 2) == 15.71
    assert 2.4e9 <= counts["activated_params_without_embedding"] < 2.5e9  # "2.4B activated"
    assert counts["mtp_params"] == 0


def test_latent_cache_bytes_per_token_v3_bf16():
    cfg = ModelConfig.from_preset("v3-671b")
    cache = LatentCache(cfg, batch_size=1, max_len=4, dtype=torch.bfloat16, device="meta")
    assert cache.bytes_per_token == 70_272 == 61 * (512 + 64) * 2
    info = model_info(cfg)
    assert info["kv_cache_bytes_per_token"] == 70_272
    assert info["expanded_kv_bytes_per_token"] == 61 * 128 * (192 + 128) * 2
