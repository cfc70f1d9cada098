"""Paged latent cache: exact byte accounting, blocks, batched decode over mixed lengths against the
full forward, FP8 storage, and the contiguous cache of infer/generate.py against the engine."""

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.fp8.quant import quantize
from dsv3.infer.cache import PagedLatentCache
from dsv3.infer.engine import Engine
from dsv3.infer.generate import generate
from dsv3.infer.sampling import SamplingParams
from fixtures import SMALL_MLA as SMALL


@pytest.fixture(autouse=True)
def _eager_fp8(monkeypatch):
    monkeypatch.setenv("DSV3_FP8_COMPILE", "0")


def _model(**overrides):
    return Transformer(ModelConfig.from_dict({**SMALL, **overrides})).double().eval()


def test_v3_671b_bytes_per_token_on_meta():
    cfg = ModelConfig.from_preset("v3-671b")
    bf16 = PagedLatentCache(cfg, num_blocks=4, block_size=16, dtype=torch.bfloat16, device="meta")
    assert bf16.bytes_per_token == 70_272 == 61 * (512 + 64) * 2
    assert bf16.nbytes == 4 * 16 * 70_272
    fp8 = PagedLatentCache(cfg, num_blocks=4, block_size=16, fp8=True, device="meta")
    assert fp8.bytes_per_token == 61 * (512 * 1 + 4 * 4 + 64 * 2) == 40_016  # codes + FP32 scales + BF16 k_pe


def test_blocks_are_allocated_freed_and_counted():
    cfg = ModelConfig.from_dict(SMALL)
    cache = PagedLatentCache(cfg, num_blocks=5, block_size=4, dtype=torch.float32)
    per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert cache.bytes_per_token == per_token and cache.nbytes == 5 * 4 * per_token
    assert cache.ensure("a", 9) and cache.block_tables["a"] == [0, 1, 2]  # ceil(9 / 4) blocks
    assert cache.ensure("a", 12) and len(cache.block_tables["a"]) == 3  # still fits
    assert cache.ensure("b", 5) and cache.blocks_used == 5
    assert cache.bytes_used == 5 * 4 * per_token
    assert not cache.ensure("c", 1) and "c" not in cache.block_tables  # pool exhausted: nothing taken
    cache.release("a")
    assert cache.blocks_used == 2 and cache.ensure("c", 12)
    assert sorted(cache.block_tables["c"] + cache.block_tables["b"]) == [0, 1, 2, 3, 4]


def _decode_logits_over_paged_cache(model, seqs, cache, block_order):
    """Prefill each sequence but its last token alone, then one batched absorbed decode of the
    last tokens, each at its own position. Blocks are handed out in a scrambled order."""
    cache._free = list(block_order)
    for i, s in enumerate(seqs):
        assert cache.ensure(i, len(s))
        view = cache.view([i], [0], len(s) - 1, read=False)
        model(torch.tensor([s[:-1]]), cache=view, start_pos=0, absorb=False)
    view = cache.view(list(range(len(seqs))), [len(s) - 1 for s in seqs], 1)
    last = torch.tensor([[s[-1]] for s in seqs])
    return model(last, cache=view, start_pos=view.start_pos, absorb=True).logits[:, 0]


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_batched_decode_of_mixed_lengths_equals_full_forward(q_lora_rank):
    model = _model(q_lora_rank=q_lora_rank)
    seqs = [torch.randint(0, 64, (n,)).tolist() for n in (3, 11, 6, 17)]
    cache = PagedLatentCache(model.cfg, num_blocks=16, block_size=4, dtype=torch.float64)
    with torch.no_grad():
        got = _decode_logits_over_paged_cache(model, seqs, cache, torch.randperm(16).tolist())
        ref = torch.stack([model(torch.tensor([s])).logits[0, -1] for s in seqs])
    assert (got - ref).abs().max().item() <= 1e-10


def test_fp8_latent_cache_logits_within_fp8_error_of_bf16_cache():
    """c_kv in E4M3 with per-128 scales: each value within half an E4M3 step (2^-4 relative) of its
    tile; the decode logits move by about that much relative to the exact cache, BF16 by ~2^-8."""
    model = _model(kv_lora_rank=256).float()
    seqs = [torch.randint(0, 64, (n,)).tolist() for n in (5, 23, 14)]
    errors = {}
    with torch.no_grad():
        ref = torch.stack([model(torch.tensor([s])).logits[0, -1] for s in seqs])
        for kind in ("bf16", "fp8"):
            cache = PagedLatentCache(
                model.cfg, num_blocks=12, block_size=8, dtype=torch.bfloat16, fp8=kind == "fp8"
            )
            got = _decode_logits_over_paged_cache(model, seqs, cache, range(12))
            errors[kind] = ((got - ref).norm() / ref.norm()).item()
        c_kv = torch.randn(40, 256) * torch.rand(40, 1) * 10
        q = quantize(c_kv)
        tile_amax = c_kv.view(40, 2, 128).abs().amax(-1, keepdim=True)
        assert ((q.dequantize() - c_kv).view(40, 2, 128).abs() <= tile_amax * 2**-4 + 1e-6).all()
    assert errors["bf16"] < 2**-7
    assert errors["bf16"] < errors["fp8"] < 2**-3
    assert errors["fp8"] > 2**-10  # the FP8 cache is really in use


def test_fp8_cache_stores_codes_scales_and_bf16_rope():
    cfg = ModelConfig.from_dict({**SMALL, "kv_lora_rank": 256})
    cache = PagedLatentCache(cfg, num_blocks=2, block_size=4, fp8=True)
    assert len(cache.kv) == len(cache.kv_scale) == len(cache.pe) == cfg.num_hidden_layers  # one per layer
    # (2 blocks + the scratch block that padded prefill rows write to) x 4 slots, 256 / 128 scales
    assert (
        cache.kv[0].dtype == torch.uint8
        and cache.kv_scale[0].shape == (12, 2)
        and cache.pe[0].dtype == torch.bfloat16
    )
    assert cache.ensure("s", 3)
    view = cache.view(["s"], [0], 3)
    c_kv, k_pe = torch.randn(1, 3, 256), torch.randn(1, 3, 8)
    got_kv, got_pe = view.update(1, c_kv, k_pe)
    assert got_kv.shape == (1, 4, 256)  # read by whole blocks; position 3 is masked by attention
    assert torch.equal(got_kv[0, :3], quantize(c_kv[0]).dequantize())
    assert torch.equal(got_pe[:, :3], k_pe.bfloat16().float())


def test_contiguous_generate_matches_the_engine():
    """infer/generate.py (contiguous LatentCache, one batch) and the paged engine, greedy."""
    model = _model()
    prompt = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        ref = generate(model, prompt, 9, temperature=0)[:, 7:].tolist()
    outs = Engine(model, max_batch_size=2).generate(
        prompt.tolist(), SamplingParams(max_tokens=9, temperature=0)
    )
    assert [o.token_ids for o in outs] == ref


def test_cache_ratio_against_hf_dynamic_cache(tmp_path):
    """Measured on the same model: HF transformers 5.24 caches the same latent (ratio 1.0), but its
    decode expands it to per-head K/V for the whole context at every step; that transient K/V is
    heads x (d_qk + d_v) / (r + d_rope) times larger."""
    transformers = pytest.importorskip("transformers")
    model = _model().float()
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    expanded = []
    attn_cls = type(hf.model.layers[0].self_attn)
    original = attn_cls.expand_kv

    def recording(self, kv_nope, k_rot):
        k, v = original(self, kv_nope, k_rot)
        expanded.append((k.nbytes + v.nbytes) / k.shape[2])  # bytes per token of this layer
        return k, v

    ids = torch.randint(0, 64, (1, 20))
    attn_cls.expand_kv = recording
    try:
        with torch.no_grad():
            cache = hf(ids, use_cache=True).past_key_values
    finally:
        attn_cls.expand_kv = original
    hf_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    engine = Engine(model, max_batch_size=1, max_seq_len=64)
    engine.add_request(ids[0].tolist(), SamplingParams(max_tokens=1, temperature=0))
    ours = engine.cache.bytes_per_token * 20
    cfg = model.cfg
    assert hf_bytes / ours == 1.0
    assert sum(expanded) / engine.cache.bytes_per_token == pytest.approx(
        cfg.num_attention_heads
        * (cfg.qk_head_dim + cfg.v_head_dim)
        / (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    )


def test_a_compiled_step_sees_the_pools_as_static_blocks():
    """Under torch.compile with dynamic shapes, the pools a step reads and writes have constant
    sizes (else every slot index is an integer division by a symbolic block size in the
    attention's innermost loop), and writes through those views land in the cache's tensors."""
    cfg = ModelConfig.from_dict(SMALL)
    r, dr = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    cache = PagedLatentCache(cfg, num_blocks=3, block_size=4, dtype=torch.float32)
    assert cache.ensure("a", 6) and cache.block_tables["a"] == [0, 1]
    view = cache.view(["a"], [5], 1)
    pools = []

    def recording_backend(gm, example_inputs):
        for node in gm.graph.nodes:
            value = node.meta.get("example_value")
            if node.op == "placeholder" and "cache_blocks" in node.name:  # lifted from cache.blocks
                pools.append(tuple(value.shape))
        return gm.forward

    c_kv, k_pe = torch.randn(1, 1, r), torch.randn(1, 1, dr)
    kv, pe = torch.compile(lambda a, b: view.update(0, a, b), dynamic=True, backend=recording_backend)(
        c_kv, k_pe
    )
    assert sorted(pools) == sorted([(4, 4, r), (4, 4, dr)])  # 3 blocks + the scratch block, all ints
    assert all(type(size) is int for shape in pools for size in shape)
    assert torch.equal(cache.kv[0][5], c_kv[0, 0]) and torch.equal(cache.pe[0][5], k_pe[0, 0])  # slot 1*4 + 1
    assert kv.shape == (1, 8, r) and torch.equal(kv[0, 5], c_kv[0, 0]) and torch.equal(pe[0, 5], k_pe[0, 0])


def test_int64_tensor_equals_torch_tensor():
    from dsv3.infer.cache import int64_tensor

    cpu = torch.device("cpu")
    for values in ([], [7], [0, -3, 2**40, 5] * 33):
        got = int64_tensor(values, cpu)
        assert got.dtype == torch.int64 and torch.equal(got, torch.tensor(values, dtype=torch.int64))
