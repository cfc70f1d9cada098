"""MLA: the absorbed decode path over the latent cache equals the naive training path."""

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.infer.cache import LatentCache
from dsv3.model import linear as linear_module
from dsv3.model import moe as moe_module
from dsv3.model.attention import AttentionCache
from fixtures import SMALL_MLA as SMALL


@pytest.mark.parametrize("inline", [False, True])
@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_absorbed_decode_equals_training_path_token_by_token(monkeypatch, q_lora_rank, inline):
    """Also with the branches a compiled decode step takes (inline: the Linears, the attention over
    the cache and the routed experts as broadcast products and sums), run eagerly here."""
    if inline:
        monkeypatch.setattr(linear_module, "compiled_inference", lambda: True)
        monkeypatch.setattr(moe_module, "compiled_inference", lambda: True)
    cfg = ModelConfig.from_dict({**SMALL, "q_lora_rank": q_lora_rank})
    model = Transformer(cfg).double().eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids).logits  # naive path over the whole sequence
        cache = LatentCache(cfg, batch_size=2, max_len=12, dtype=torch.float64)
        steps = [model(ids[:, t : t + 1], cache=cache, start_pos=t, absorb=True).logits for t in range(12)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-10


def test_prefill_then_absorbed_decode_equals_full_forward():
    cfg = ModelConfig.from_dict(SMALL)
    model = Transformer(cfg).double().eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 10))
    with torch.no_grad():
        full = model(ids).logits
        cache = LatentCache(cfg, batch_size=3, max_len=10, dtype=torch.float64)
        prefill = model(ids[:, :6], cache=cache).logits  # naive path, fills the cache
        chunk = model(ids[:, 6:], cache=cache, start_pos=6).logits  # absorbed, 4 queries at once
        naive_chunk = model(ids[:, 6:], cache=cache, start_pos=6, absorb=False).logits  # naive over the cache
    assert (torch.cat((prefill, chunk), 1) - full).abs().max().item() <= 1e-10
    assert (naive_chunk - full[:, 6:]).abs().max().item() <= 1e-10


@pytest.mark.parametrize("absorb", [False, True])
def test_rows_run_one_position_per_sequence_past_attention_and_cache_them_all(absorb):
    """Block(rows=...) (MTP's draft, a prompt's last token) returns what the full block gives at
    each sequence's chosen position, and leaves the cache as the full block does."""
    cfg = ModelConfig.from_dict(SMALL)
    model = Transformer(cfg).double().eval()
    block = model.layers[str(cfg.num_hidden_layers - 1)]
    assert isinstance(block.mlp, moe_module.MoE)
    x = torch.randn(2, 5, cfg.hidden_size, dtype=torch.float64)
    full_cache, rows_cache = (LatentCache(cfg, batch_size=2, max_len=5, dtype=torch.float64) for _ in "ab")
    with torch.no_grad():
        for cache in (full_cache, rows_cache):  # a cached prefix of 3 positions
            block(x[:, :3], *model.rope(0, 3), cache=cache)
        cos, sin = model.rope(3, 2)
        full, _ = block(x[:, 3:], cos, sin, cache=full_cache, start_pos=3, absorb=absorb)
        rows = torch.tensor([1, 0])
        one, _ = block(x[:, 3:], cos, sin, cache=rows_cache, start_pos=3, absorb=absorb, rows=rows)
        uncached, _ = block(x, *model.rope(0, 5), rows=torch.tensor([2, 4]))
    assert one.shape == (2, 1, cfg.hidden_size)
    assert (one[:, 0] - full[[0, 1], rows]).abs().max().item() <= 1e-10
    assert torch.equal(rows_cache.kv, full_cache.kv) and torch.equal(rows_cache.pe, full_cache.pe)
    whole, _ = block(x, *model.rope(0, 5))
    assert (uncached[:, 0] - whole[[0, 1], [2, 4]]).abs().max().item() <= 1e-10


class ConcatCache(AttentionCache):
    """A latent cache in a few lines: per layer, everything so far, grown by concatenation."""

    def __init__(self):
        self.latents = {}

    def update(self, layer_idx, c_kv, k_pe, start_pos):
        if layer_idx in self.latents:
            old_kv, old_pe = self.latents[layer_idx]
            assert old_kv.shape[1] == start_pos  # append-only
            c_kv, k_pe = torch.cat((old_kv, c_kv), 1), torch.cat((old_pe, k_pe), 1)
        self.latents[layer_idx] = c_kv, k_pe
        return c_kv, k_pe


def test_any_attention_cache_serves_prefill_and_decode():
    """MLA needs nothing of a cache but `update`: a new one is a class of its own."""
    cfg = ModelConfig.from_dict(SMALL)
    model = Transformer(cfg).double().eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        cache = ConcatCache()
        steps = [model(ids[:, :5], cache=cache).logits]
        steps += [model(ids[:, t : t + 1], cache=cache, start_pos=t).logits for t in range(5, 9)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-10


def test_cache_holds_only_the_latent():
    cfg = ModelConfig.from_dict(SMALL)
    cache = LatentCache(cfg, batch_size=2, max_len=7)
    per_token_values = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert cache.kv.numel() + cache.pe.numel() == 2 * 7 * per_token_values
    assert cache.bytes_per_token == per_token_values * 4
    with pytest.raises(ValueError, match="cache overflow"):
        Transformer(cfg)(torch.zeros(2, 8, dtype=torch.long), cache=cache)
    with pytest.raises(TypeError, match="start_pos must be an int.*PagedLatentCache"):
        Transformer(cfg)(torch.zeros(2, 1, dtype=torch.long), cache=cache, start_pos=torch.tensor([1, 2]))


def test_absorbed_weights_are_views_of_kv_b_proj():
    attn = Transformer(ModelConfig.from_dict(SMALL)).layers["0"].self_attn
    w_uk, w_uv = attn.absorbed_weights()
    assert w_uk.shape == (4, 16, 24) and w_uv.shape == (4, 12, 24)
    assert w_uk.untyped_storage().data_ptr() == attn.kv_b_proj.weight.untyped_storage().data_ptr()
