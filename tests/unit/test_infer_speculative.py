"""MTP self-speculative decoding: greedy output identical to plain greedy (random and trained
models, mixed lengths, one draft per step or several chained), drafts equal to the
training-path MTP prediction (chained ones: the module run again on its own output), and the
acceptance rule preserving the sampling distribution (checked statistically, with a negative
control)."""

from pathlib import Path

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.infer.engine import Engine, SamplingParams
from dsv3.infer.sampling import SamplingBatch, apply_repetition_penalty, sample_from
from dsv3.infer.speculative import greedy_step, verify
from fixtures import ENGINE

TRAINED = Path(__file__).parents[2] / "runs" / "demo" / "hf"  # written by `make run`; skipped without it
SMALL = {
    **ENGINE,
    "vocab_size": 8,
    "num_hidden_layers": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.3,
}


def _model(vocab_size=8, dtype=torch.float64):
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_dict({**SMALL, "vocab_size": vocab_size})).to(dtype).eval()


def _prompts(vocab, *lengths):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("vocab_size, drafts", [(8, 1), (32, 1), (8, 2), (32, 3)])
def test_greedy_mtp_output_identical_to_plain_greedy_random_model(vocab_size, drafts):
    model = _model(vocab_size)
    prompts = _prompts(vocab_size, 2, 13, 7, 25, 4)
    params = [
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, repetition_penalty=r)
        for r in (1.0, 1.0, 1.4, 1.0, 0.8)
    ]
    plain = Engine(model, max_batch_size=3, block_size=4).generate(prompts, params)
    spec = {"max_batch_size": 3, "block_size": 4, "mtp": True, "mtp_drafts": drafts}
    engine = Engine(model, **spec)
    assert [o.token_ids for o in engine.generate(prompts, params)] == [o.token_ids for o in plain]
    chunked = Engine(model, **spec, prefill_chunk=5).generate(prompts, params)
    assert [o.token_ids for o in chunked] == [o.token_ids for o in plain]  # the MTP layer's cache too
    narrow = Engine(model, **spec, draft_vocab=2).generate(prompts, params)
    assert [o.token_ids for o in narrow] == [o.token_ids for o in plain]  # drafts among tokens 0, 1 only
    s = engine.stats()
    assert 0 < s["mtp_accepted"] < s["mtp_drafted"]  # both branches taken
    per_forward = s["mtp_accepted"] / (s["mtp_drafted"] / drafts)  # drafts accepted per decode forward
    assert s["tokens_per_forward"] == pytest.approx(1 + per_forward, abs=0.05)
    assert s["cache_blocks_used"] == 0


@pytest.mark.parametrize("one_call", [False, True])
@pytest.mark.parametrize("draft_vocab", [32, 10])
@pytest.mark.parametrize("drafts", [1, 3])
def test_drafts_equal_the_training_path_mtp_prediction(one_call, draft_vocab, drafts):
    """After every step each running request's drafts (and their distributions) are what MTP
    module 1 computes in training over the whole sequence: h_i + Emb(t_{i+1}) -> t_{i+2}, among
    the `draft_vocab` lowest token ids; a chained draft, the module run over the sequence once
    more with its own output at the last position and the draft before as that position's input.
    one_call: the steps a compiled engine takes for greedy batches, verify and draft in one
    function (speculative.greedy_step), run eagerly."""
    model = _model(32)
    engine = Engine(
        model, max_batch_size=4, block_size=4, mtp=True, mtp_drafts=drafts, draft_vocab=draft_vocab
    )
    prompts = _prompts(32, 3, 11, 6)
    temperatures = (0, 0, 0) if one_call else (0, 1.0, 0)
    one_calls = []
    if one_call:
        engine.compiled = True  # the compiled engine's branches; its functions stay eager
        engine._greedy_step = lambda *args: one_calls.append(1) or greedy_step(*args)
    for p, temp in zip(prompts, temperatures):
        engine.add_request(p, SamplingParams(max_tokens=12, temperature=temp, seed=1, ignore_eos=True))
    checked = 0
    mtp = model.mtp[0]
    with torch.no_grad():
        while engine.has_unfinished():
            engine.step()
            for r in engine.running:
                n, tokens = r.num_cached, r.tokens
                h = model(torch.tensor([tokens[:n]])).hidden  # [1, n, H]
                following = tokens[1 : n + 1]
                assert len(r.draft) == drafts
                for j in range(drafts):
                    m = len(following)
                    hm, _ = mtp(h, model.embed_tokens(torch.tensor([following])), *model.rope(1, m))
                    logits = model.lm_head(mtp.shared_head.norm(hm[:, -1]))[0]
                    logits[draft_vocab:] = float("-inf")
                    if r.params.greedy:
                        assert r.draft[j] == int(logits.argmax())
                    else:
                        torch.testing.assert_close(r.draft_q[j], logits.softmax(-1), rtol=0, atol=1e-10)
                    h = torch.cat((h, hm[:, -1:]), dim=1)  # the chain: its own output, the draft before
                    following = following + [r.draft[j]]
                checked += 1
    assert checked > 20
    assert len(one_calls) == (engine._counters["decode_forward_passes"] if one_call else 0)


@pytest.mark.skipif(not (TRAINED / "config.json").is_file(), reason="needs the trained tiny model")
def test_greedy_mtp_identical_on_the_trained_model():
    from dsv3.tokenizer import load_tokenizer

    tok = load_tokenizer(TRAINED, 8192)
    texts = ["def __init__(self", "class ", "for i in range(", "    return "]
    prompts = [[tok.bos_id] + tok.tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = Engine.from_pretrained(TRAINED, max_seq_len=128, max_batch_size=4).generate(prompts, params)
    engine = Engine.from_pretrained(TRAINED, max_seq_len=128, max_batch_size=4, mtp=True)
    spec = engine.generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert engine.stats()["mtp_acceptance_rate"] > 0.3


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was produced"
    return (((counts - expected)[keep] ** 2) / expected[keep]).sum().item()


CHI2_999 = {5: 20.5, 7: 24.3}  # 99.9% quantiles of chi-square with 5 and 7 degrees of freedom


@pytest.mark.parametrize("k", [1, 2])
def test_speculative_acceptance_preserves_the_distribution(k):
    """p (target, one distribution per position) and q (draft) far apart on 6 tokens, 30,000 rows,
    k drafts per row: each position's token follows its p (where the drafts before it were
    accepted: then it is the accepted draft or, at the first rejection, resampled; after all k,
    the bonus), each draft is accepted with probability sum(min(p, q)); resampling from p instead
    of the residual max(0, p - q) (a classic bug) fails the same test."""
    N, V = 30_000, 6
    logits = torch.tensor(
        [[2.0, 1.0, 0.5, 0.0, -1.0, -3.0], [0.0, 0.3, 1.5, -0.5, 0.2, 1.0], [1.0, -1.0, 0.0, 2.0, 0.5, 0.0]],
        dtype=torch.float64,
    )[: k + 1]
    p = logits.softmax(-1)  # [k + 1, V]
    q = torch.tensor([0.05, 0.1, 0.4, 0.3, 0.1, 0.05], dtype=torch.float64)
    params = [SamplingParams(temperature=1.0)] * N
    batch = SamplingBatch(params, [torch.Generator().manual_seed(i) for i in range(N)], [None] * N, "cpu")
    g = torch.Generator().manual_seed(0)
    drafts = torch.stack(
        [sample_from(q.expand(N, V), torch.rand(N, generator=g, dtype=torch.float64)) for _ in range(k)], 1
    )
    tokens, accepted = verify(batch, logits.expand(N, k + 1, V), drafts, q.expand(N, k, V))
    for j in range(k + 1):
        reached = accepted >= j  # the drafts before position j were accepted
        assert _chi2(torch.bincount(tokens[reached, j], minlength=V).double(), p[j]) < CHI2_999[5]
    for j in range(k):
        rate = (accepted[accepted >= j] > j).double().mean().item()
        assert rate == pytest.approx(torch.minimum(p[j], q).sum().item(), abs=0.015)
    first = accepted > 0
    wrong = torch.where(first, drafts[:, 0], sample_from(p[0].expand(N, V), batch.uniform()))
    assert _chi2(torch.bincount(wrong, minlength=V).double(), p[0]) > 10 * CHI2_999[5]


@pytest.mark.parametrize("k", [1, 2])
def test_an_all_greedy_verify_takes_the_tokens_of_the_general_rule(k):
    """An all-greedy batch skips the one-hot rows and the residuals (one argmax per position); its
    tokens are those the general rule gives the same greedy rows inside a batch with a sampled
    row, with a repetition penalty that counts the drafts before a position as seen; drafts
    accepted and not."""
    torch.manual_seed(0)
    B, V = 6, 50
    logits = torch.randn(B, k + 1, V)
    seen = [torch.rand(V) < 0.3 for _ in range(B)]
    penalty = torch.full((B,), 1.7)
    drafts = torch.empty(B, k, dtype=torch.long)
    for j in range(k):
        also = torch.stack(seen).scatter(1, drafts[:, :j], True)
        drafts[:, j] = apply_repetition_penalty(logits[:, j], also, penalty).argmax(-1)
    drafts[::2, 0] = (drafts[::2, 0] + 1) % V  # rows 0, 2, 4 are rejected at once
    drafts[1, k - 1] = (drafts[1, k - 1] + 1) % V  # row 1 at its last draft
    greedy = [SamplingParams(temperature=0, repetition_penalty=1.7)] * B
    gens = [torch.Generator().manual_seed(i) for i in range(B + 1)]
    fast = verify(SamplingBatch(greedy, gens[:B], seen, "cpu"), logits, drafts, None)
    mixed = SamplingBatch([*greedy, SamplingParams(temperature=1.0)], gens, [*seen, None], "cpu")
    q = torch.nn.functional.one_hot(torch.cat((drafts, drafts[:1])), V).float()
    general = verify(mixed, torch.cat((logits, logits[:1])), torch.cat((drafts, drafts[:1])), q)
    assert not mixed.all_greedy and fast[1].tolist() == [0, k - 1, 0, k, 0, k]
    for got, want in zip(fast, general):
        assert torch.equal(got, want[:B])


@pytest.mark.parametrize("drafts", [1, 2])
def test_engine_mtp_sampling_follows_the_model_distribution(drafts):
    """End to end through the engine (temperature 1, 1,200 seeds): the 2nd generated token, the
    one the first speculative step decides, and the 3rd follow the model's exact marginals."""
    model = _model(8)
    prompt, V, N = [3, 1, 4, 1, 5], 8, 1200
    engine = Engine(model, max_batch_size=64, mtp=True, mtp_drafts=drafts)
    outs = engine.generate(
        [prompt] * N, [SamplingParams(max_tokens=3, seed=i, ignore_eos=True) for i in range(N)]
    )
    tokens = torch.tensor([o.token_ids for o in outs])  # [N, 3]
    with torch.no_grad():
        p1 = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)  # [V]
        p2 = model(torch.tensor([prompt + [a] for a in range(V)])).logits[:, -1].softmax(-1)  # [V(t1), V]
        pairs = [prompt + [a, b] for a in range(V) for b in range(V)]
        p3 = model(torch.tensor(pairs)).logits[:, -1].softmax(-1).view(V, V, V)
    marg2 = (p1[:, None] * p2).sum(0)
    marg3 = (p1[:, None, None] * p2[:, :, None] * p3).sum((0, 1))
    assert _chi2(torch.bincount(tokens[:, 1], minlength=V).double(), marg2) < CHI2_999[7]
    assert _chi2(torch.bincount(tokens[:, 2], minlength=V).double(), marg3) < CHI2_999[7]
    accepted_per_forward = engine.stats()["mtp_acceptance_rate"] * drafts
    assert 0.05 < accepted_per_forward < 0.95 * drafts


def test_the_draft_vocabulary_is_checked_and_defaults_to_a_share_of_the_vocabulary():
    model = _model(32)
    Engine(model, mtp=True)
    assert model.mtp[0].draft_vocab == 4  # DRAFT_VOCAB_SHARE of 32
    Engine(model, mtp=True, draft_vocab=32)
    assert model.mtp[0].draft_vocab is None  # the whole head
    for bad in (0, 33, 2.5):
        with pytest.raises(ValueError, match=r"draft_vocab=.*between 1 and vocab_size=32"):
            Engine(model, mtp=True, draft_vocab=bad)
    with pytest.raises(ValueError, match=r"draft_vocab=4: must be None without mtp=True"):
        Engine(model, draft_vocab=4)


def test_bf16_model_with_fp8_cache_and_mtp_sampling_runs_clean(monkeypatch):
    """The dtype plumbing: BF16 weights, FP8 latent cache (MTP layer included), sampled requests."""
    monkeypatch.setenv("DSV3_FP8_COMPILE", "0")
    model = _model(32, torch.bfloat16)
    engine = Engine(model, max_batch_size=2, block_size=4, cache_dtype="fp8", mtp=True)
    assert engine.cache.bytes_per_token == 3 * (32 + 4 + 8 * 2)  # 2 layers + MTP: codes, scale, BF16 k_pe
    params = SamplingParams(max_tokens=9, temperature=0.8, top_k=10, repetition_penalty=1.1, ignore_eos=True)
    outs = engine.generate(_prompts(32, 4, 9, 6), params)
    assert all(len(o.token_ids) == 9 and o.finish_reason == "length" for o in outs)
    assert engine.stats()["mtp_drafted"] > 0 and engine.stats()["cache_blocks_used"] == 0
