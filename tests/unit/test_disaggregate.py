"""Prefill/decode disaggregation: a PrefillEngine hands each prefilled request (latent cache +
state) over a socket to a DecodeEngine in another thread, whose outputs come back; everything a
client sees (tokens, text with stop strings, log-probabilities, finish reasons) equals one
Engine's, greedy and seeded sampling, with MTP, with an FP8 cache, with requests that wait for
room on the decode side; the latent bytes handed over per prompt token are the cache's."""

import dataclasses
import socket
import threading

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.fp8.quant import eager
from dsv3.infer.disaggregate import (
    DecodeEngine,
    PrefillEngine,
    PrefillFront,
    recv_message,
    run_decode_worker,
    send_message,
)
from dsv3.infer.engine import Engine, SamplingParams
from fixtures import ENGINE, count_compiled_graphs

CFG = ENGINE


def decode_text(ids):
    return "".join(chr(65 + t % 26) for t in ids)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_dict(CFG)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.15 if p.dim() > 1 else 1 + 0.2 * torch.randn_like(p))
    return m


def _requests(model, **kw):
    """Mixed lengths, greedy and seeded sampling, log-probabilities; one with a repetition penalty
    and one with a stop string that its output contains."""
    g = torch.Generator().manual_seed(3)
    reqs = []
    for i in range(7):
        prompt = torch.randint(
            0, CFG["vocab_size"], (int(torch.randint(1, 20, (), generator=g)),), generator=g
        )
        params = SamplingParams(
            max_tokens=5 + 2 * i,
            temperature=0.0 if i % 2 else 0.9,
            seed=i,
            ignore_eos=True,
            logprobs=2,
            repetition_penalty=1.3 if i == 3 else 1.0,
        )
        reqs.append((prompt.tolist(), params))
    prompt, params = reqs[5]
    text = Engine(model, decode=decode_text, **kw).generate([prompt], params)[0].text
    reqs[5] = (prompt, dataclasses.replace(params, stop=(text[4:6],)))
    return reqs


def _visible(out):
    """What a client sees, the log-probabilities' values apart (compared to 1e-5: a decode batch
    of other sequences rounds the float32 GEMMs differently)."""
    return (
        out.token_ids,
        out.text,
        out.finish_reason,
        [(lp.token_id, [t for t, _ in lp.top]) for lp in out.logprobs],
    )


def _logprob_values(outs):
    return torch.tensor([v for o in outs for lp in o.logprobs for v in (lp.logprob, *(x for _, x in lp.top))])


def _disaggregated(model, reqs, **kw):
    """Run the requests through a PrefillFront and a decode worker thread joined by a socket pair."""
    prefill_side, decode_side = socket.socketpair()
    prefill = PrefillEngine(model, block_size=4, decode=decode_text, **kw)
    decoder = DecodeEngine(model, block_size=4, decode=decode_text, **{**kw, "max_batch_size": 2})
    worker = threading.Thread(target=run_decode_worker, args=(decoder, decode_side))
    worker.start()
    front = PrefillFront(prefill, prefill_side)
    ids = [front.add_request(p, sp) for p, sp in reqs]
    final, streamed = {}, {i: [] for i in ids}
    while front.has_unfinished():
        for out in front.step():
            streamed[out.request_id].append(out.token_ids)
            if out.finished:
                final[out.request_id] = out
    stats = front.stats()
    front.close()
    worker.join(timeout=10)
    return [final[i] for i in ids], [streamed[i] for i in ids], stats, prefill.cache.bytes_per_token


@pytest.mark.parametrize(
    "kw",
    [
        dict(mtp=True),
        dict(mtp=True, mtp_drafts=2, prefill_chunk=4),
        dict(mtp=False, cache_dtype="fp8", prefill_chunk=4),
    ],
)
def test_handed_off_requests_decode_exactly_as_one_engine(model, kw):
    with eager():  # the FP8 cache's quantizer uncompiled: seconds instead of a compile
        _check_handoff(model, kw)


def _check_handoff(model, kw):
    reqs = _requests(model, **kw)
    want = Engine(model, block_size=4, decode=decode_text, max_batch_size=8, **kw).generate(
        [p for p, _ in reqs], [sp for _, sp in reqs]
    )
    got, streamed, stats, bytes_per_token = _disaggregated(model, reqs, max_batch_size=8, **kw)
    assert [_visible(o) for o in got] == [_visible(o) for o in want]
    torch.testing.assert_close(_logprob_values(got), _logprob_values(want), rtol=0, atol=1e-5)
    assert any(o.finish_reason == "stop" for o in got) and len({tuple(o.token_ids) for o in got}) == len(got)
    for outs, final in zip(
        streamed, got
    ):  # the first token from the prefill worker, the rest from the decoder
        assert outs[0] == final.token_ids[:1] and outs[-1] == final.token_ids
    prompt_tokens = sum(len(p) for p, _ in reqs)
    assert stats["handed_off_requests"] == len(reqs) and stats["handed_off_prompt_tokens"] == prompt_tokens
    assert stats["handoff_bytes_per_token"] == bytes_per_token  # latents only: the cache's bytes per token
    assert stats["handoff_wire_bytes"] > stats["handed_off_latent_bytes"]


def test_a_compiled_prefill_engine_warms_up_and_hands_off_what_an_eager_one_does(model, monkeypatch):
    """PrefillEngine(compile=True).warmup() returns (it used to wait forever for outputs a prefill
    engine never finishes) and keeps no handoff of its own; the engine then hands off what the
    eager one does: first tokens, MTP drafts, latents. A counting backend: the compiled prefill's
    graphs run the traced ops eagerly, so the latents are equal bit for bit."""
    graphs = count_compiled_graphs(monkeypatch)
    prompts = [[5, 9, 2, 7, 7, 1, 3], [4, 4, 8], [11, 3, 6, 2, 9, 9, 10, 1, 2, 5, 7]]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, seed=0)  # seed: equal generators
    kw = dict(block_size=4, mtp=True, max_seq_len=32)
    eager = PrefillEngine(model, **kw)
    compiled = PrefillEngine(model, compile=True, **kw)
    compiled.warmup()
    assert graphs and not compiled.handoffs and compiled.handed_off["requests"] == 0
    want, got = eager.generate(prompts, params), compiled.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert all(len(o.token_ids) == 1 for o in got)  # the first token; the rest is the decode worker's
    assert len(compiled.handoffs) == len(prompts) and compiled.handed_off == eager.handed_off
    for a, b in zip(eager.handoffs, compiled.handoffs):
        assert {**a.state, "id": None} == {**b.state, "id": None}
        assert a.tensors.keys() == b.tensors.keys()
        assert [k for k in a.tensors if not torch.equal(a.tensors[k], b.tensors[k])] == []


def test_wire_carries_json_and_tensors_only():
    a, b = socket.socketpair()
    t = {"x": torch.arange(6, dtype=torch.bfloat16).view(2, 3), "y": torch.tensor([1], dtype=torch.uint8)}
    n = send_message(a, {"type": "sequence", "n": [1, 2]}, t)
    header, tensors = recv_message(b)
    assert header == {"type": "sequence", "n": [1, 2]} and n > 0
    assert all(torch.equal(tensors[k], t[k]) and tensors[k].dtype == t[k].dtype for k in t)
    a.close()
    assert recv_message(b) is None
