"""The paged decode attention kernel (model/paged_attention.py) against plain PyTorch: absorbed MLA
attention over blocks gathered by their tables, the model's decode through it, and its errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3.config import ModelConfig
from dsv3.infer.cache import PagedLatentCache
from dsv3.model import paged_attention
from dsv3.model.attention import MLA
from dsv3.model.paged_attention import PagedLatents
from dsv3.model.rope import rope_cos_sin, rope_inv_freq

pytestmark = pytest.mark.skipif(
    not paged_attention.can_run(torch.float32, "cpu", 16, 2), reason="the CPU kernels cannot be built here"
)


def _reference(q, q_pe, latents: PagedLatents, start_pos, scale):
    """What MLA._absorbed computes, in FP32 with the probabilities rounded to the cache dtype."""
    B, T, H, r = q.shape
    kv = latents.kv[latents.table.flatten()].view(B, -1, r).float()  # [B, S, r]
    pe = latents.pe[latents.table.flatten()].view(B, -1, q_pe.shape[-1]).float()
    scores = (
        torch.einsum("bthr,bsr->bths", q.float(), kv) + torch.einsum("bthr,bsr->bths", q_pe.float(), pe)
    ) * scale
    seen = (
        torch.arange(kv.shape[1]) <= (start_pos[:, None] + torch.arange(T))[:, :, None, None]
    )  # [B, T, 1, S]
    probs = scores.masked_fill(~seen, float("-inf")).softmax(-1).to(q.dtype).float()
    return torch.einsum("bths,bsr->bthr", probs, kv).to(q.dtype)


def _case(B, T, H, r, dr, bs, width, dtype, seed, blocks=None):
    g = torch.Generator().manual_seed(seed)
    blocks = blocks or B * width + 3
    latents = PagedLatents(
        torch.randn(blocks, bs, r, generator=g).to(dtype),
        torch.randn(blocks, bs, dr, generator=g).to(dtype),
        torch.randperm(blocks, generator=g)[: B * width].view(B, width),
    )
    q = torch.randn(B, T, H, r, generator=g).to(dtype)
    q_pe = torch.randn(B, T, H, dr, generator=g).to(dtype)
    start_pos = torch.randint(0, width * bs - T + 1, (B,), generator=g)
    return q, q_pe, latents, start_pos


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 3),
    H=st.integers(1, 20),  # groups of 16 queries (T x H) and their remainders
    r=st.sampled_from([16, 32, 48, 64]),  # pairs of 16-column chunks and a lone one
    half_dr=st.integers(1, 8),
    bs=st.integers(1, 20),  # pieces of 16, 8, 4, 2, 1 rows
    width=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_decode_equals_attention_over_the_gathered_blocks(B, T, H, r, half_dr, bs, width, dtype, seed):
    if width * bs < T:
        width = -(-T // bs)
    q, q_pe, latents, start_pos = _case(B, T, H, r, 2 * half_dr, bs, width, dtype, seed)
    got = paged_attention.decode(q, q_pe, latents, start_pos, 0.3)
    want = _reference(q, q_pe, latents, start_pos, 0.3)
    assert got.dtype == dtype and got.shape == (B, T, H, r)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # FP32 sums in another order may round a probability or the result the other way
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-6)
        assert (got == want).float().mean() > 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H", [1, 3, 4, 8, 12])  # either layout, one token's heads filling a group or not
def test_a_token_attends_alike_whatever_the_tokens_beside_it(H, dtype):
    """MTP's verify runs a sequence's token with 1 + k others where plain decoding runs it alone;
    greedy MTP equals greedy decoding only if the token's attention has the very same bits in
    both steps (and a BF16 tie in the logits is common enough to matter)."""
    q, q_pe, latents, _ = _case(3, 4, H, 256, 32, 16, 8, dtype, H)  # the small preset's widths
    start = torch.tensor([5, 40, 120])
    together = paged_attention.decode(q, q_pe, latents, start, 0.3)
    for t in range(4):
        alone = paged_attention.decode(q[:, t : t + 1], q_pe[:, t : t + 1], latents, start + t, 0.3)
        assert torch.equal(alone[:, 0], together[:, t]), f"token {t} of 4"
        two = paged_attention.decode(q[:, t : t + 2], q_pe[:, t : t + 2], latents, start + t, 0.3)
        assert torch.equal(two[:, 0], together[:, t]), f"token {t} of 2"


def test_a_query_sees_its_own_position_and_those_before_only():
    """The first query of a sequence at position 0 sees one key: its output is that key's latent.
    Keys past a query's position weigh nothing, whatever they hold."""
    q, q_pe, latents, _ = _case(2, 2, 3, 32, 4, 4, 2, torch.float32, 0)
    start = torch.tensor([0, 5])
    got = paged_attention.decode(q, q_pe, latents, start, 1.0)
    assert torch.equal(got[0, 0], latents.kv[latents.table[0, 0], 0].expand(3, -1))
    later = latents.kv.clone()
    later[latents.table[1, 1], 3:] = 1e4  # positions 7 (and on) of sequence 1: past both its queries (5, 6)
    moved = paged_attention.decode(q, q_pe, latents._replace(kv=later), start, 1.0)
    assert torch.equal(moved, got)


def test_bad_operands_are_named():
    q, q_pe, latents, start = _case(1, 1, 2, 32, 4, 4, 2, torch.float32, 0)
    with pytest.raises(RuntimeError, match="block 99 is not in the pool of"):
        paged_attention.decode(q, q_pe, latents._replace(table=torch.tensor([[0, 99]])), start, 1.0)
    with pytest.raises(RuntimeError, match="share one dtype"):
        paged_attention.decode(q.bfloat16(), q_pe, latents, start, 1.0)
    with pytest.raises(RuntimeError, match="table .B, W. and start_pos .B. int64"):
        paged_attention.decode(q, q_pe, latents, start.int(), 1.0)
    with pytest.raises(RuntimeError, match="r must be a multiple of 16"):
        paged_attention.decode(
            q[..., :24], q_pe, latents._replace(kv=latents.kv[..., :24].contiguous()), start, 1.0
        )
    assert not paged_attention.can_run(torch.float16, "cpu", 32, 4)
    assert not paged_attention.can_run(torch.bfloat16, "cpu", 32, 3)
    assert not paged_attention.can_run(torch.float32, "meta", 32, 4)


CFG = ModelConfig.from_preset("tiny", vocab_size=64, num_hidden_layers=1, hidden_size=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_decodes_through_the_kernel_as_through_the_gathered_cache(dtype):
    """MLA's absorbed decode over a paged cache: on the kernel (update_paged) and over the gathered
    latents (the kernel turned off), the same outputs; prefill and FP8 caches never take it."""
    torch.manual_seed(0)
    mla = MLA(CFG).to(dtype)
    lengths = [5, 19]

    def run(kernel: bool) -> torch.Tensor:
        cache = PagedLatentCache(CFG, num_blocks=8, block_size=4, dtype=dtype)
        assert cache.paged_kernel
        cache.paged_kernel = kernel
        torch.manual_seed(1)
        outs = []
        for seq, n in enumerate(lengths):
            cache.ensure(seq, n + 2)
            x = torch.randn(1, n, CFG.hidden_size).to(dtype)
            cos, sin = _rope(torch.arange(n))
            prefill = cache.view([seq], [0], n, read=False)
            assert prefill.update_paged(0, x[..., : CFG.kv_lora_rank], x[..., :4]) is None
            mla(x, cos, sin, cache=prefill, start_pos=0, absorb=False)
        view = cache.view([0, 1], lengths, 2)  # two tokens per sequence (MTP's verify)
        x = torch.randn(2, 2, CFG.hidden_size).to(dtype)
        pos = torch.tensor(lengths)[:, None] + torch.arange(2)
        cos, sin = _rope(pos)
        outs.append(mla(x, cos, sin, cache=view, start_pos=view.start_pos, absorb=True))
        return torch.cat(outs)

    mla.prepare_absorbed()
    torch.testing.assert_close(
        run(True), run(False), **({"rtol": 2**-7, "atol": 2**-7} if dtype == torch.bfloat16 else {})
    )
    assert not PagedLatentCache(CFG, num_blocks=2, fp8=True).paged_kernel


def _rope(pos: torch.Tensor):
    inv_freq, factor = rope_inv_freq(CFG)
    return rope_cos_sin(inv_freq, factor, pos)


def test_the_kernels_split_their_work_over_torch_threads():
    """at::parallel_for runs on torch's OpenMP threads only if the library is compiled with OpenMP
    (it ran on one thread before): the library calls the OpenMP runtime, and a batch computed on
    two threads equals the one computed on one (each sequence is one thread's)."""
    from dsv3.model import cpu_kernels

    library = next(cpu_kernels.build_folder().glob("*.so")).read_bytes()
    assert b"GOMP_parallel" in library or b"__kmpc_fork_call" in library
    q, q_pe, latents, start = _case(6, 1, 8, 64, 8, 16, 3, torch.bfloat16, 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = paged_attention.decode(q, q_pe, latents, start, 0.1)
        torch.set_num_threads(2)
        assert torch.equal(paged_attention.decode(q, q_pe, latents, start, 0.1), one)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not paged_attention.can_run(torch.bfloat16, "cpu", 16, 2), reason="no CPU kernels here")
@pytest.mark.parametrize("nope, packs", [(16, True), (15, False)])
def test_absorbed_weights_are_packed_per_head_only_where_the_kernel_takes_them(nope, packs):
    """W_UK's per-head input is the query's nope part: an odd width cannot be packed in BF16 pairs,
    so those heads keep the batched GEMM; packed panels equal the heads' own products."""
    from dsv3.model import panel_gemm

    cfg = ModelConfig.from_preset("tiny", qk_nope_head_dim=nope)
    mla = MLA(cfg).to(torch.bfloat16)
    mla.prepare_absorbed(torch.bfloat16, panels=True)
    assert (mla.w_uk_panels is not None) == packs and (mla.w_uv_panels is not None) == packs
    if packs:
        q = torch.randn(3, cfg.num_attention_heads, nope).bfloat16()
        want = torch.einsum("mhi,hio->mho", q.float(), mla.w_uk.float())
        got = panel_gemm.per_head(q, mla.w_uk_panels, cfg.kv_lora_rank)
        torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-2)
