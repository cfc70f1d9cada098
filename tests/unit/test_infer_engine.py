"""The serving engine: greedy output identical to HF transformers' generate and to a full-recompute
loop on batches of mixed prompt lengths, continuous batching, preemption, sampling parameters
against plain references, seeds, stops, validation."""

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.infer.engine import Engine, SamplingParams
from dsv3.infer.sampling import SamplingBatch
from dsv3.model.linear import PANEL_ROWS
from dsv3.model.packed_experts import can_pack
from fixtures import ENGINE, count_compiled_graphs

SMALL = {
    **ENGINE,
    "num_nextn_predict_layers": 0,
    "max_position_embeddings": 256,
    "rope_scaling": {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "mscale": 0.9,
        "mscale_all_dim": 0.9,
    },
}


GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_dict(SMALL)).double().eval()


def _prompts(*lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SMALL["vocab_size"], (n,), generator=g).tolist() for n in lengths]


def _reference(model, prompt, n, penalty=1.0):
    """Full recompute every token (naive path, no cache), greedy, CTRL repetition penalty by hand."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].clone()
            for t in set(ids):
                logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def test_greedy_equals_hf_generate_on_mixed_lengths(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = Transformer(ModelConfig.from_dict(SMALL)).eval()
    with torch.no_grad():
        for p in ours.parameters():  # weights large enough that greedy paths diverge on any error
            p.copy_(torch.randn_like(p) * 0.15 if p.dim() > 1 else 1 + 0.2 * torch.randn_like(p))
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()  # FP32
    prompts = _prompts(3, 17, 8, 30)
    for penalty in (1.0, 1.3):
        params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, repetition_penalty=penalty)
        got = [o.token_ids for o in Engine(ours, max_batch_size=4, block_size=8).generate(prompts, params)]
        with torch.no_grad():
            ref = [
                hf.generate(
                    torch.tensor([p]),
                    attention_mask=torch.ones(1, len(p), dtype=torch.long),
                    max_new_tokens=16,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                    repetition_penalty=penalty,
                )[0, len(p) :].tolist()
                for p in prompts
            ]
        assert got == ref
        assert len({tuple(r) for r in ref}) == len(ref)  # not a degenerate constant output


@pytest.mark.parametrize("penalty", [1.0, 1.5, 0.7])
def test_prefill_and_absorbed_decode_equal_full_recompute(model, penalty):
    prompts = _prompts(1, 9, 4, 21, 13)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=penalty)
    got = Engine(model, max_batch_size=3, block_size=4).generate(prompts, params)  # 5 prompts, batch 3
    assert [o.token_ids for o in got] == [_reference(model, p, 12, penalty) for p in prompts]
    assert all(o.finish_reason == "length" and o.finished for o in got)


@pytest.mark.parametrize("chunk", [None, 3])
def test_batched_and_chunked_prefill_equal_full_recompute(model, chunk):
    """Prompts of mixed lengths prefilled together in one padded forward per step, whole or in
    chunks of 3 tokens that attend to the cached earlier chunks."""
    prompts = _prompts(1, 9, 4, 21, 13)
    engine = Engine(model, max_batch_size=5, block_size=4, prefill_chunk=chunk)
    got = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in got] == [_reference(model, p, 12) for p in prompts]
    # one prefill forward per step: all five prompts together, then (chunked) 21 // 3 steps
    assert engine.stats()["forward_passes"] - engine._counters["decode_forward_passes"] == (
        1 if chunk is None else 7
    )


def test_requests_joining_mid_run_get_the_tokens_they_get_alone(model):
    prompts = _prompts(5, 12, 2, 19)
    sampled = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    alone = [
        Engine(model).generate([p], [GREEDY, sampled][i % 2])[0].token_ids for i, p in enumerate(prompts)
    ]
    engine = Engine(model, max_batch_size=4, block_size=4)
    done, step = {}, 0
    while len(done) < len(prompts):
        if step < len(prompts):  # one more request joins at every step
            engine.add_request(prompts[step], [GREEDY, sampled][step % 2], request_id=str(step))
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.token_ids
        step += 1
    assert [done[i] for i in range(len(prompts))] == alone
    assert engine.stats()["cache_blocks_used"] == 0 and engine.stats()["num_running"] == 0


def test_preemption_when_blocks_run_out_gives_the_same_tokens(model):
    prompts = _prompts(6, 14, 9, 3)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    engine = Engine(model, max_batch_size=4, block_size=4, num_blocks=12, max_seq_len=40)
    got = engine.generate(prompts, params)
    assert engine.stats()["preemptions"] > 0
    assert [o.token_ids for o in got] == [_reference(model, p, 20) for p in prompts]


def test_seeds_reproducible_and_independent_of_the_batch(model):
    p = _prompts(6)[0]
    params = [
        SamplingParams(max_tokens=12, temperature=1.0, top_k=20, seed=s, ignore_eos=True) for s in (1, 1, 2)
    ]
    outs = Engine(model, max_batch_size=3).generate([p, p, p], params)
    alone = Engine(model).generate([p], params[0])[0]
    assert outs[0].token_ids == outs[1].token_ids == alone.token_ids
    assert outs[2].token_ids != outs[0].token_ids


def test_stop_tokens_eos_stop_strings_and_length(model):
    p = _prompts(8)[0]
    full = _reference(model, p, 12)
    assert len(set(full[:4])) == 4, "pick a prompt whose first tokens differ"
    decode = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    engine = Engine(model, decode=decode, eos_token_id=full[3])
    cases = {
        "stop_token": SamplingParams(
            max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=(full[2],)
        ),
        "eos": SamplingParams(max_tokens=12, temperature=0),
        "stop_string": SamplingParams(
            max_tokens=12, temperature=0, ignore_eos=True, stop=(f"{full[1]}><{full[2]}",)
        ),
        "length": SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
    }
    out = dict(zip(cases, engine.generate([p] * 4, list(cases.values()))))
    assert out["stop_token"].token_ids == full[:2] and out["stop_token"].finish_reason == "stop"
    assert out["eos"].token_ids == full[:3] and out["eos"].finish_reason == "stop"
    assert out["stop_string"].token_ids == full[:2] and out["stop_string"].text == f"<{full[0]}><"
    assert out["stop_string"].finish_reason == "stop"
    assert out["length"].token_ids == full and out["length"].text == decode(full)
    assert out["length"].finish_reason == "length"


def test_streaming_outputs_and_abort(model):
    engine = Engine(model, max_batch_size=2)
    a = engine.add_request(_prompts(4)[0], GREEDY)
    b = engine.add_request(_prompts(5)[0], GREEDY)
    first = engine.step()
    assert [(o.request_id, len(o.new_token_ids), o.finished) for o in first] == [(a, 1, False), (b, 1, False)]
    assert engine.stats()["cache_blocks_used"] > 0
    engine.abort(a)
    outs = engine.step()
    assert (
        outs[0].request_id == a
        and outs[0].finish_reason == "abort"
        and outs[0].token_ids == first[0].token_ids
    )
    assert [o.request_id for o in outs[1:]] == [b] and outs[1].token_ids[:1] == first[1].new_token_ids
    assert engine.stats()["num_running"] == 1
    while engine.has_unfinished():
        engine.step()
    s = engine.stats()
    assert (
        s["cache_blocks_used"] == 0 and s["prompt_tokens_total"] == 9 and s["generation_tokens_total"] == 13
    )


def _plain_probs(logits, temperature, top_k, top_p):
    """One row at a time, straight from the definitions."""
    logits = logits / temperature
    if top_k:
        kth = sorted(logits.tolist(), reverse=True)[top_k - 1]
        logits = torch.where(logits >= kth, logits, torch.tensor(float("-inf"), dtype=logits.dtype))
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True).tolist()
    keep, mass = [], 0.0
    for i in order:
        keep.append(i)
        mass += probs[i].item()
        if mass >= top_p:
            break
    out = torch.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


def test_sampling_distribution_matches_plain_reference():
    logits = torch.randn(5, 50, dtype=torch.float64) * 2
    params = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(top_p=0.6),
        SamplingParams(temperature=0.5, top_k=10, top_p=0.8),
        SamplingParams(temperature=0),
    ]
    batch = SamplingBatch(params, [torch.Generator() for _ in params], [None] * 5, "cpu")
    got = batch.probs(logits)
    for i, p in enumerate(params[:4]):
        torch.testing.assert_close(got[i], _plain_probs(logits[i], p.temperature, p.top_k, p.top_p))
    assert got[4].tolist() == torch.nn.functional.one_hot(logits[4].argmax(), 50).double().tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_next_tokens_are_the_argmax_of_the_penalized_logits(dtype):
    """next_tokens of an all-greedy batch (argmax straight from the logits) picks what sampling
    the one-hot distributions picks, repetition penalty included; a sampled batch samples."""
    logits = (torch.randn(4, 50) * 3).to(dtype)
    params = [SamplingParams(temperature=0, repetition_penalty=r) for r in (1.0, 1.5, 3.0, 1.0)]
    seen = [None, *(torch.rand(50) < 0.5 for _ in range(3))]
    seen[2][logits[2].float().argmax()] = True  # the best token was seen: the penalty decides
    for rows in ([None] * 4, seen):
        batch = SamplingBatch(params, [torch.Generator() for _ in params], rows, "cpu")
        assert batch.next_tokens(logits).tolist() == batch.sample(batch.probs(logits)).tolist()
    sampled = [SamplingParams(temperature=1.0, seed=i) for i in range(4)]
    draw = [torch.Generator().manual_seed(i) for i in range(4)]
    batch = SamplingBatch(sampled, draw, [None] * 4, "cpu")
    expected = SamplingBatch(sampled, [torch.Generator().manual_seed(i) for i in range(4)], [None] * 4, "cpu")
    assert batch.next_tokens(logits).tolist() == expected.sample(expected.probs(logits)).tolist()


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("max_tokens", 2.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("repetition_penalty", 0),
        ("stop", ("",)),
        ("stop_token_ids", (-3,)),
        ("seed", "x"),
        ("ignore_eos", "yes"),
    ],
)
def test_bad_sampling_params_name_the_field(model, field, value):
    engine = Engine(model)
    with pytest.raises(ValueError, match=f"^{field}="):
        engine.add_request([1, 2], SamplingParams(**{field: value}))


def test_bad_requests_and_engine_arguments(model, monkeypatch):
    engine = Engine(model, max_seq_len=32)
    for prompt, match in (
        ([], "prompt_token_ids"),
        ([1, 96], "prompt_token_ids"),
        ("ab", "prompt_token_ids"),
        ([1] * 30, "exceeds max_seq_len=32"),
    ):
        with pytest.raises(ValueError, match=match):
            engine.add_request(prompt, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="stop strings need Engine"):
        engine.add_request([1], SamplingParams(stop=("x",)))
    engine.add_request([1], SamplingParams(), request_id="r")
    with pytest.raises(ValueError, match="request_id='r'"):
        engine.add_request([1], SamplingParams(), request_id="r")
    for kwargs, match in (
        ({"cache_dtype": "fp16"}, "cache_dtype"),
        ({"mtp": True}, "mtp=True"),
        ({"max_seq_len": 10_000}, "max_seq_len"),
        ({"num_blocks": 1}, "num_blocks"),
        ({"max_batch_size": 0}, "max_batch_size"),
    ):
        with pytest.raises(ValueError, match=match):
            Engine(model, **kwargs)
    monkeypatch.setattr("dsv3.infer.engine.can_compile", lambda device: False)  # no C++ compiler
    with pytest.raises(ValueError, match="compile=True: torch.compile cannot build code for cpu"):
        Engine(model, compile=True)


def test_streamed_text_only_grows_when_a_stop_string_spans_tokens(model):
    p = _prompts(8)[0]
    full = _reference(model, p, 6)
    decode = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    engine = Engine(model, decode=decode)
    engine.add_request(p, SamplingParams(max_tokens=6, temperature=0, stop=(f"><{full[2]}>",)))
    texts = []
    while engine.has_unfinished():
        texts += [o.text for o in engine.step()]
    assert texts == [f"<{full[0]}", f"<{full[0]}><{full[1]}", f"<{full[0]}><{full[1]}"]  # '>' held back


@pytest.mark.parametrize("drafts", [0, 1, 2])
def test_compiled_decode_is_warmed_up_for_every_step_and_equals_eager(monkeypatch, drafts):
    """After warmup() no request compiles the decode step again (a compile costs seconds in the
    middle of a request): batch 1, batch > 1 and the largest batch, contexts within the first
    cache block and past it, requests finishing at different steps. The compiled engine's greedy
    tokens are the eager engine's. Dynamo's guards decide what compiles; the graphs run eagerly
    here (a counting backend instead of Inductor: seconds instead of minutes). The warm-up's
    graphs outnumber Dynamo's default recompile limit, past which a call would silently run
    uncompiled (and the counting backend see nothing): hitting the limit fails here. drafts: MTP
    drafts per step (0: no MTP)."""
    import torch._dynamo

    mtp = {"mtp": drafts > 0, "mtp_drafts": max(drafts, 1)}

    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({**SMALL, "num_nextn_predict_layers": 1})
    fp32 = Transformer(cfg).eval()
    prompts = _prompts(3, 9, 2, 14)  # with block_size 4: one block and several
    full = _prompts(*range(3, 3 + PANEL_ROWS[1]), seed=2)  # the largest batch, past every regime's bounds
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    eager = Engine(fp32, block_size=4, **mtp, max_batch_size=len(full))
    expected = [
        o.token_ids for o in eager.generate(prompts[:1], params) + eager.generate(prompts[1:], params)
    ]
    expected_full = [o.token_ids for o in eager.generate(full, params)]

    graphs = count_compiled_graphs(monkeypatch)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        engine = Engine(fp32, block_size=4, **mtp, compile=True, max_batch_size=len(full))
        engine.warmup()
        compiled_in_warmup = len(graphs)
        got = [o.token_ids for o in engine.generate(prompts[:1], params)]  # batch 1
        got += [o.token_ids for o in engine.generate(prompts[1:], params)]  # batch 3, then 2, then 1
        # sampled, and greedy with a repetition penalty: with MTP not the greedy step's compiled call
        others = [
            SamplingParams(max_tokens=4, seed=1),
            SamplingParams(max_tokens=4, temperature=0, repetition_penalty=1.3),
        ]
        for sp in others:
            engine.generate(prompts[:1], sp)
            engine.generate(prompts[1:], sp)
        got_full = [o.token_ids for o in engine.generate(full, params)]
    assert compiled_in_warmup > 0 and len(graphs) == compiled_in_warmup
    assert got == expected and got_full == expected_full


@pytest.mark.parametrize("mtp", [False, True])
def test_compiled_prefill_is_one_graph_for_every_prompt_length(monkeypatch, mtp):
    """A compiled engine compiles its prefill too, traced as eager code runs
    (linear.compiled_prefill), so no size of the prompt picks a path: one graph serves one prompt
    of any length (with MTP, one more its pass over the prompt), one more several prompts at once,
    and a 1-token prompt runs eagerly. Counted with a counting backend, whose graphs run the
    traced ops eagerly: the prompt log-probabilities are the eager engine's, bit for bit."""
    graphs = count_compiled_graphs(monkeypatch)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict({**SMALL, "num_nextn_predict_layers": 1})).eval()
    prefill_only = SamplingParams(max_tokens=0, prompt_logprobs=1)
    eager = Engine(model, block_size=4, mtp=mtp)
    engine = Engine(model, block_size=4, mtp=mtp, compile=True)
    alone = [_prompts(n, seed=n) for n in (2, 7, 19, 33)]
    together = [_prompts(9, 4), _prompts(12, 3, 20), [[5]]]
    counts = []
    for prompts in alone + together:
        got = [o.prompt_logprobs for o in engine.generate(prompts, prefill_only)]
        assert got == [o.prompt_logprobs for o in eager.generate(prompts, prefill_only)]
        counts.append(len(graphs))
    per_prefill = 2 if mtp else 1
    assert counts == [per_prefill] * len(alone) + [2 * per_prefill] * len(together)


@pytest.mark.parametrize("mtp", [False, True])
def test_an_unfrozen_engine_follows_weights_updated_in_place(mtp):
    """Engine(freeze=False) is the engine for a model updated in place (evaluation or rollouts
    between optimizer steps): after an in-place update of every weight its tokens are those of a
    new engine on the updated model; no copy made at construction (the absorbed path's W_UK and
    W_UV, packed experts or Linears) outlives the update."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_dict(ENGINE)).eval()
    with torch.no_grad():
        for p in m.parameters():  # large weights: greedy paths differ between the updates
            p.copy_(torch.randn_like(p) * 0.15 if p.dim() > 1 else 1 + 0.2 * torch.randn_like(p))
    prompts = _prompts(5, 9)
    engine = Engine(m, block_size=4, mtp=mtp, freeze=False)
    before = [o.token_ids for o in engine.generate(prompts, GREEDY)]
    with torch.no_grad():  # as an optimizer step does
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    after = [o.token_ids for o in engine.generate(prompts, GREEDY)]
    fresh = [o.token_ids for o in Engine(m, block_size=4, mtp=mtp, freeze=False).generate(prompts, GREEDY)]
    assert after == fresh and after != before


def test_frozen_inductor_decode_equals_eager_for_two_models_in_one_process():
    """The real compiled decode step (Inductor, weights frozen into the graph and packed) gives the
    eager engine's greedy tokens; and two engines of different weights in one process, used in
    turn with guards skipped as a warmed-up Engine runs, each run their own weights (a frozen graph
    holds its weights as constants: the other model's graph would give that model's tokens).
    One batch shape (2 sequences past the first cache block), so one compile per model; the
    routed experts run on their packed copies (the panel kernel, or oneDNN where it cannot be
    built)."""
    import torch._dynamo

    torch._dynamo.reset()
    cfg = ModelConfig.from_dict({**SMALL, "num_hidden_layers": 2})
    models = [Transformer(cfg).eval() for _ in range(2)]  # two random draws: different weights
    with torch.no_grad():
        for m in models:
            for p in m.parameters():  # large weights: greedy paths differ between the models
                p.copy_(torch.randn_like(p) * 0.15 if p.dim() > 1 else 1 + 0.2 * torch.randn_like(p))
    prompts = _prompts(9, 9)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    expected = [[o.token_ids for o in Engine(m, block_size=4).generate(prompts, params)] for m in models]
    assert expected[0] != expected[1]
    engines = [Engine(m, block_size=4, max_seq_len=16, compile=True) for m in models]
    for engine, tokens in zip(engines, expected):  # compiles
        assert [o.token_ids for o in engine.generate(prompts, params)] == tokens
    with torch.compiler.set_stance(skip_guard_eval_unsafe=True), torch.profiler.profile() as prof:
        for engine, tokens in zip(engines, expected):
            assert [o.token_ids for o in engine.generate(prompts, params)] == tokens
    if can_pack(torch.empty(0)):  # the experts (FP32) ran on their packed copies
        ran = {e.key for e in prof.key_averages()}
        assert ran & {"dsv3_panel::expert_mlp", "mkldnn::_linear_pointwise"}, sorted(ran)


def test_compiled_bf16_steps_give_a_row_the_same_bits_in_every_graph():
    """MTP's verify feeds 2 tokens where plain decoding feeds 1: greedy MTP equals plain greedy
    only if the compiled 2-token step gives its first row the very logits of the 1-token step
    (BF16 logits tie often enough). Each step shape is its own Inductor graph; the graphs fuse
    differently, so this holds only where Inductor rounds to BF16 wherever the model does."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict({**SMALL, "num_hidden_layers": 2})).to(torch.bfloat16).eval()
    engine = Engine(model, block_size=4, max_seq_len=32, max_batch_size=1, compile=True)
    engine.add_request(_prompts(9)[0], GREEDY)
    engine.step()  # the prefill
    seq = engine.running[0]
    first_rows = []
    with torch.no_grad():
        for n in (1, 2):
            view = engine.cache.view([seq.id], [seq.num_cached], n)
            fed = torch.tensor([[seq.tokens[-1]] + [7] * (n - 1)])
            out, _ = engine._fast(engine._decode_step, engine.model, fed, view, view.start_pos)
            first_rows.append(out.logits[0, 0])
    assert torch.equal(first_rows[0], first_rows[1])
