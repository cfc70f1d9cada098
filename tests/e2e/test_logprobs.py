"""Log-probabilities: the engine's are log_softmax of the raw logits of a full recompute, whatever
the sampling parameters (batched and chunked prefill, MTP verification, preemption); the server
reports them in OpenAI's shapes (completions with echo, chat with top_logprobs), streamed or not,
and answers lm-evaluation-harness's log-likelihood requests as lm-eval reads them."""

from __future__ import annotations

import json

import openai
import pytest
import torch
from fastapi.testclient import TestClient

from dsv3 import ModelConfig, Transformer
from dsv3.infer.cli import load
from dsv3.infer.engine import Engine
from dsv3.infer.sampling import SamplingParams
from dsv3.infer.server import create_app
from fixtures import MICRO_SERVE

# a small vocabulary: a random model's MTP drafts are then accepted now and then, so bonus tokens
# (logprobs from the second position of a verify forward) are tested too
CFG = {**MICRO_SERVE, "vocab_size": 96}
SAMPLED = dict(temperature=1.3, top_k=40, top_p=0.95, repetition_penalty=1.3, seed=3, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny", **CFG)).double().eval()


def prompts(*lengths):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, CFG["vocab_size"], (n,), generator=g).tolist() for n in lengths]


def reference(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the full forward's logits [len(ids), V]: row i is the distribution of ids[i + 1]."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].log_softmax(-1)


def check_entry(entry, ref_row: torch.Tensor, token: int, top: int, tol: float) -> None:
    assert entry.token_id == token
    assert entry.logprob == pytest.approx(float(ref_row[token]), abs=tol)
    values, ids = ref_row.topk(top)
    assert [t for t, _ in entry.top] == ids.tolist()
    assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=tol)


# ---------------------------------------------------------------------------------- engine
@pytest.mark.parametrize("mtp, chunk", [(False, None), (False, 3), (True, None), (True, 4)])
def test_engine_logprobs_are_the_raw_distribution(model, mtp, chunk):
    """Sampling with temperature, top-k, top-p and a repetition penalty, three prompts batched
    (one of a single token): each sampled token's and each prompt token's log-probability and top
    tokens equal the full forward's log_softmax, not the distribution sampled from."""
    engine = Engine(model, max_batch_size=3, block_size=4, mtp=mtp, prefill_chunk=chunk)
    params = SamplingParams(max_tokens=7, logprobs=3, prompt_logprobs=2, **SAMPLED)
    for prompt, out in zip(prompts(1, 7, 13), engine.generate(prompts(1, 7, 13), params)):
        full = prompt + out.token_ids
        ref = reference(model, full)
        assert len(out.logprobs) == len(out.token_ids) == 7
        for k, entry in enumerate(out.logprobs):
            check_entry(entry, ref[len(prompt) + k - 1], full[len(prompt) + k], 3, 1e-9)
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
            check_entry(entry, ref[i - 1], prompt[i], 2, 1e-9)
    if mtp:
        assert engine.stats()["mtp_accepted"] > 0  # some tokens came from verify's second position


def test_engine_logprobs_survive_preemption(model):
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    engine = Engine(model, max_batch_size=4, block_size=4, num_blocks=12, max_seq_len=40)
    outs = engine.generate(prompts(6, 14, 9, 3), params)
    assert engine.stats()["preemptions"] > 0
    for prompt, out in zip(prompts(6, 14, 9, 3), outs):
        full = prompt + out.token_ids
        ref = reference(model, full)
        assert [e.token_id for e in out.logprobs] == out.token_ids
        for i, entry in enumerate(out.prompt_logprobs[1:] + out.logprobs, start=1):
            check_entry(entry, ref[i - 1], full[i], 1, 1e-9)


def test_the_token_that_ends_a_request_has_its_logprob(model):
    """eos and stop tokens are left out of token_ids and the text, not out of the logprobs."""
    prompt = prompts(5)[0]
    first = int(reference(model, prompt)[-1].argmax())
    for engine, params in (
        (Engine(model, eos_token_id=first), SamplingParams(max_tokens=4, temperature=0, logprobs=0)),
        (Engine(model), SamplingParams(max_tokens=4, temperature=0, logprobs=0, stop_token_ids=(first,))),
    ):
        out = engine.generate([prompt], params)[0]
        assert out.finish_reason == "stop" and out.token_ids == []
        assert [e.token_id for e in out.logprobs] == [first] and out.logprobs[0].top == ()


def test_max_tokens_0_scores_the_prompt_only(model):
    prompt = prompts(9)[0]
    engine = Engine(model, prefill_chunk=4)
    out = engine.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert (out.finished, out.finish_reason, out.token_ids, out.logprobs) == (True, "length", [], None)
    ref = reference(model, prompt)
    assert [e.logprob for e in out.prompt_logprobs[1:]] == pytest.approx(
        [float(ref[i - 1, prompt[i]]) for i in range(1, 9)], abs=1e-9
    )
    assert engine.stats()["generation_tokens_total"] == 0 and engine.stats()["cache_blocks_used"] == 0


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_tokens", 0, "0 only with prompt_logprobs"),
        ("logprobs", 21, r"\[0, 20\]"),
        ("prompt_logprobs", -1, r"\[0, 20\]"),
        ("logprobs", True, "integer"),
    ],
)
def test_bad_logprob_params_name_the_field(model, field, value, message):
    with pytest.raises(ValueError, match=f"^{field}=.*{message}"):
        Engine(model).add_request([1, 2], SamplingParams(**{field: value}))


# ---------------------------------------------------------------------------------- server
PROMPT = "def add(a, b):"
CHAT = [{"role": "user", "content": "What is a list?"}]


@pytest.fixture(scope="module")
def served(folder):
    """The app on the micro model in float32, its tokenizer, the same weights as a plain model, and
    the greedy tokens the engine generates for PROMPT and CHAT (computed before serving)."""
    engine, tok = load(folder, dtype="float32", max_batch_size=4)
    greedy = SamplingParams(max_tokens=5, temperature=0)
    generated = {
        "completion": engine.generate([tok.encode(PROMPT)], greedy)[0].token_ids,
        "chat": engine.generate(
            [tok.encode_chat(CHAT)], SamplingParams(max_tokens=5, temperature=0, stop=tok.stop)
        )[0].token_ids,
    }
    with TestClient(create_app(engine, tok, "micro")) as client:
        yield client, tok, Transformer.from_pretrained(folder).eval(), generated


def post(client, path: str, **body) -> dict:
    r = client.post(path, json={"model": "micro", **body})
    assert r.status_code == 200, r.text
    return r.json()


def names(tok, ids: list[int]) -> list[str]:
    return [tok.tokenizer.decode([i], skip_special_tokens=False) for i in ids]


def streamed(client, path: str, **body) -> list[dict]:
    with client.stream("POST", path, json={"model": "micro", "stream": True, **body}) as r:
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_completion_echo_logprobs_are_the_models(served):
    client, tok, ref_model, generated = served
    got = post(client, "/v1/completions", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2, echo=True)
    choice, generated = choice_of(got), generated["completion"]
    lp = choice["logprobs"]
    prompt_ids = tok.encode(PROMPT)
    assert prompt_ids[0] == tok.bos_id and got["usage"]["prompt_tokens"] == len(prompt_ids)
    assert choice["finish_reason"] == "length" and len(generated) == 5
    full = prompt_ids + generated
    ref_all = reference(ref_model, full)
    assert lp["tokens"] == names(tok, full) and lp["tokens"][0] == "<|bos|>"
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(
        [float(ref_all[i - 1, full[i]]) for i in range(1, len(full))], abs=1e-4
    )
    for i in range(1, len(full)):
        values, ids = ref_all[i - 1].topk(2)
        want = dict(zip(names(tok, ids.tolist()), values.tolist())) | {
            lp["tokens"][i]: lp["token_logprobs"][i]
        }
        assert lp["top_logprobs"][i] == pytest.approx(want, abs=1e-4)  # the top 2 and the chosen token
    assert choice["text"] == PROMPT + tok.decode(generated)
    for token, start, end in zip(
        lp["tokens"], lp["text_offset"], lp["text_offset"][1:] + [len(choice["text"])]
    ):
        assert choice["text"][start:end] == ("" if token == "<|bos|>" else token)


def choice_of(response: dict) -> dict:
    assert len(response["choices"]) == 1
    return response["choices"][0]


def test_lm_eval_loglikelihood_requests(served):
    """lm-evaluation-harness's local-completions model sends the context and continuation as one
    list of token ids (no <|bos|>), max_tokens 1, logprobs 1, echo, and reads token_logprobs and
    top_logprobs[ctxlen:-1]; max_tokens 0 (other clients) gives the prompt's alone."""
    client, tok, ref_model, _ = served
    context = tok.tokenizer.encode("import os\nprint(os.path.", add_special_tokens=False).ids
    continuation = tok.tokenizer.encode("join('a', 'b'))", add_special_tokens=False).ids
    ids = context + continuation
    ref = reference(ref_model, ids)
    want = sum(float(ref[i - 1, ids[i]]) for i in range(len(context), len(ids)))
    greedy = all(int(ref[i - 1].argmax()) == ids[i] for i in range(len(context), len(ids)))
    body = {"prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    lp = choice_of(post(client, "/v1/completions", **body))["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1
    got = sum(lp["token_logprobs"][len(context) : -1])
    is_greedy = all(
        t == max(top.values())
        for t, top in zip(lp["token_logprobs"][len(context) : -1], lp["top_logprobs"][len(context) : -1])
    )
    assert got == pytest.approx(want, abs=1e-4) and is_greedy == greedy
    lp = choice_of(post(client, "/v1/completions", **{**body, "max_tokens": 0}))["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids)
    assert sum(lp["token_logprobs"][len(context) :]) == pytest.approx(want, abs=1e-4)


def test_chat_logprobs_are_the_models(served):
    client, tok, ref_model, generated = served
    got = post(
        client,
        "/v1/chat/completions",
        messages=CHAT,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    choice, generated = choice_of(got), generated["chat"]
    content = choice["logprobs"]["content"]
    assert choice["finish_reason"] == "length" and len(content) == len(generated) == 5
    prompt = tok.encode_chat(CHAT)
    ref_all = reference(ref_model, prompt + generated)
    for k, (entry, token) in enumerate(zip(content, generated)):
        ref = ref_all[len(prompt) + k - 1]
        values, top = ref.topk(3)
        assert entry["token"] == names(tok, [token])[0] and entry["bytes"] == list(entry["token"].encode())
        assert entry["logprob"] == pytest.approx(float(ref[token]), abs=1e-4)
        assert [t["token"] for t in entry["top_logprobs"]] == names(tok, top.tolist())
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(values.tolist(), abs=1e-4)
        assert [t["bytes"] for t in entry["top_logprobs"]] == [
            list(t["token"].encode()) for t in entry["top_logprobs"]
        ]


def test_streams_carry_the_same_logprobs(served):
    client = served[0]
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 2, "echo": True}
    whole = choice_of(post(client, "/v1/completions", **body))
    chunks = [choice_of(c) for c in streamed(client, "/v1/completions", **body)]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    parts = [c["logprobs"] for c in chunks if c["logprobs"]]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for p in parts for x in p[key]] == whole["logprobs"][key], key
    body = {"messages": CHAT, "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    whole = choice_of(post(client, "/v1/chat/completions", **body))
    chunks = [choice_of(c) for c in streamed(client, "/v1/chat/completions", **body)]
    assert [e for c in chunks if c["logprobs"] for e in c["logprobs"]["content"]] == whole["logprobs"][
        "content"
    ]
    assert "".join(c["delta"].get("content") or "" for c in chunks) == whole["message"]["content"]


def test_the_openai_client_reads_them(served):
    client = served[0]
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="-", http_client=client, max_retries=0)
    c = api.completions.create(
        model="micro", prompt=PROMPT, max_tokens=2, temperature=0, logprobs=1, echo=True
    )
    assert c.choices[0].logprobs.token_logprobs[0] is None and c.choices[0].text.startswith(PROMPT)
    chat = api.chat.completions.create(
        model="micro", messages=CHAT, max_tokens=2, temperature=0, logprobs=True, top_logprobs=1
    )
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 1
    plain = api.completions.create(model="micro", prompt=PROMPT, max_tokens=2)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": PROMPT, "logprobs": 6}, "logprobs"),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True}, "max_tokens"),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0, "logprobs": 1}, "max_tokens"),
        ("/v1/completions", {"prompt": [[1, 2], [3]], "logprobs": 1}, "prompt"),
        ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_bad_logprob_requests_are_400s(served, path, body, param):
    client = served[0]
    r = client.post(path, json={"model": "micro", **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
