"""`dsv3 serve` through the official `openai` client: completions, chat and streaming equal the
engine's greedy answers computed alone, 32 concurrent clients are batched and all answered
correctly, every class of bad request gets an OpenAI-style 4xx JSON error while the server keeps
serving, and the concurrency limit answers 429."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from dsv3.cli import main
from dsv3.infer.cli import load
from dsv3.infer.sampling import SamplingParams
from dsv3.infer.server import Limits, create_app
from fixtures import MICRO_VOCAB, free_port

PROMPTS = [f"def function_{i}(x" + ", y" * (i % 5) + "):" for i in range(16)]  # of different lengths
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
N = 4  # tokens per answer
LIMITS = Limits(max_concurrent=40, max_prompt_tokens=128, max_tokens_limit=200)


class Server:
    """uvicorn serving an app in a thread, on a free port."""

    def __init__(self, app) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def served(folder):
    """The server, plus each prompt's greedy answer computed by the same engine alone, before serving."""
    engine, tok = load(folder, max_batch_size=32)
    greedy = SamplingParams(max_tokens=N, temperature=0)
    refs = {p: engine.generate([tok.encode(p)], greedy)[0] for p in PROMPTS}
    chat_params = SamplingParams(max_tokens=N, temperature=0, stop=tok.stop)
    refs["chat"] = engine.generate([tok.encode_chat(CHAT)], chat_params)[0]
    server = Server(create_app(engine, tok, "micro", LIMITS))
    yield server, engine, tok, refs
    server.close()


def test_models_health_and_metrics(served):
    server, engine, _, _ = served
    assert [m.id for m in server.client.models.list().data] == ["micro"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    server.client.completions.create(model="micro", prompt="x", max_tokens=2, temperature=0)
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    values = dict(line.split(" ") for line in metrics.text.splitlines() if not line.startswith("#"))
    for name in (
        "dsv3_generation_tokens_per_second",
        "dsv3_requests_running",
        "dsv3_requests_waiting",
        "dsv3_cache_blocks_used",
        "dsv3_cache_blocks_total",
    ):
        assert name in values
    assert float(values["dsv3_generation_tokens_total"]) >= 2
    assert float(values["dsv3_cache_blocks_total"]) == engine.cache.num_blocks
    assert float(values["dsv3_requests_running"]) == 0 and float(values["dsv3_cache_blocks_used"]) == 0


def test_completion_and_chat_equal_the_engine_alone(served):
    server, _, tok, refs = served
    ref = refs[PROMPTS[0]]
    out = server.client.completions.create(model="micro", prompt=PROMPTS[0], max_tokens=N, temperature=0)
    assert out.object == "text_completion" and out.model == "micro"
    assert out.choices[0].text == ref.text and out.choices[0].finish_reason == ref.finish_reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (
        len(tok.encode(PROMPTS[0])),
        len(ref.token_ids),
    )
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    # token ids as the prompt give the same answer
    ids = server.client.completions.create(
        model="micro", prompt=tok.encode(PROMPTS[0]), max_tokens=N, temperature=0
    )
    assert ids.choices[0].text == ref.text
    chat = server.client.chat.completions.create(model="micro", messages=CHAT, max_tokens=N, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == refs["chat"].text
    assert chat.usage.prompt_tokens == len(tok.encode_chat(CHAT))


def test_streaming_completion_and_chat(served):
    server, _, _, refs = served
    chunks = list(
        server.client.completions.create(
            model="micro",
            prompt=PROMPTS[1],
            max_tokens=N,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == refs[PROMPTS[1]].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == refs[PROMPTS[1]].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(refs[PROMPTS[1]].token_ids)
    chunks = list(
        server.client.chat.completions.create(
            model="micro", messages=CHAT, max_tokens=N, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == refs["chat"].text
    assert chunks[-1].choices[0].finish_reason == refs["chat"].finish_reason
    raw = httpx.post(
        server.url + "/v1/completions",
        json={"model": "micro", "prompt": "x", "max_tokens": 2, "stream": True},
    )
    events = [e for e in raw.text.split("\n\n") if e]
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_32_concurrent_clients_are_batched_and_all_correct(served):
    server, engine, _, refs = served
    before = engine.stats()["forward_passes"]

    def ask(i: int) -> str:
        prompt = PROMPTS[i % len(PROMPTS)]
        if i % 2:  # half of them stream
            stream = server.client.completions.create(
                model="micro", prompt=prompt, max_tokens=N, temperature=0, stream=True
            )
            return "".join(c.choices[0].text for c in stream)
        return (
            server.client.completions.create(model="micro", prompt=prompt, max_tokens=N, temperature=0)
            .choices[0]
            .text
        )

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    assert answers == [refs[PROMPTS[i % len(PROMPTS)]].text for i in range(32)]
    passes = engine.stats()["forward_passes"] - before  # read after the engine thread went idle
    assert passes < 0.5 * 32 * N, f"{passes} forward passes: requests were not batched (alone: {32 * N})"


def _post(url: str, body, path: str = "/v1/completions") -> httpx.Response:
    if isinstance(body, str):
        return httpx.post(url + path, content=body, headers={"content-type": "application/json"})
    return httpx.post(url + path, json=body)


GOOD = {"model": "micro", "prompt": "hello", "max_tokens": 2, "temperature": 0}
BAD = [  # (case, body, path, status, param, code)
    ("malformed JSON", '{"model": "micro", "prompt": ', "/v1/completions", 400, None, "invalid_json"),
    ("not an object", "[1, 2]", "/v1/completions", 400, None, "invalid_body"),
    ("missing prompt", {"model": "micro"}, "/v1/completions", 400, "prompt", "missing_required_parameter"),
    (
        "max_tokens wrong type",
        {**GOOD, "max_tokens": "ten"},
        "/v1/completions",
        400,
        "max_tokens",
        "invalid_value",
    ),
    ("max_tokens float", {**GOOD, "max_tokens": 2.5}, "/v1/completions", 400, "max_tokens", "invalid_value"),
    (
        "temperature wrong type",
        {**GOOD, "temperature": "hot"},
        "/v1/completions",
        400,
        "temperature",
        "invalid_value",
    ),
    ("stream wrong type", {**GOOD, "stream": "yes"}, "/v1/completions", 400, "stream", "invalid_value"),
    (
        "prompt wrong type",
        {**GOOD, "prompt": {"text": "x"}},
        "/v1/completions",
        400,
        "prompt",
        "invalid_value",
    ),
    (
        "negative max_tokens",
        {**GOOD, "max_tokens": -5},
        "/v1/completions",
        400,
        "max_tokens",
        "invalid_value",
    ),
    ("zero max_tokens", {**GOOD, "max_tokens": 0}, "/v1/completions", 400, "max_tokens", "invalid_value"),
    ("huge max_tokens", {**GOOD, "max_tokens": 10**9}, "/v1/completions", 400, "max_tokens", "invalid_value"),
    (
        "temperature out of range",
        {**GOOD, "temperature": 5},
        "/v1/completions",
        400,
        "temperature",
        "invalid_value",
    ),
    ("top_p zero", {**GOOD, "top_p": 0}, "/v1/completions", 400, "top_p", "invalid_value"),
    ("negative seed", {**GOOD, "seed": -1}, "/v1/completions", 400, "seed", "invalid_value"),
    (
        "too many stops",
        {**GOOD, "stop": ["a", "b", "c", "d", "e"]},
        "/v1/completions",
        400,
        "stop",
        "invalid_value",
    ),
    (
        "prompt over the limit",
        {**GOOD, "prompt": [5] * 129},
        "/v1/completions",
        400,
        "prompt",
        "context_length_exceeded",
    ),
    (
        "over the context",
        {**GOOD, "prompt": [5] * 100, "max_tokens": 190},
        "/v1/completions",
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    (
        "token id out of vocab",
        {**GOOD, "prompt": [1, MICRO_VOCAB]},
        "/v1/completions",
        400,
        "prompt",
        "invalid_value",
    ),
    ("unknown model", {**GOOD, "model": "gpt-4"}, "/v1/completions", 404, "model", "model_not_found"),
    ("n > 1", {**GOOD, "n": 2}, "/v1/completions", 400, "n", "unsupported_parameter"),
    ("logprobs out of range", {**GOOD, "logprobs": 6}, "/v1/completions", 400, "logprobs", "invalid_value"),
    ("unknown field", {**GOOD, "temprature": 0.5}, "/v1/completions", 400, "temprature", "unknown_parameter"),
    (
        "chat: bad role",
        {"model": "micro", "messages": [{"role": "robot", "content": "hi"}]},
        "/v1/chat/completions",
        400,
        "messages[0].role",
        "invalid_value",
    ),
    (
        "chat: no messages",
        {"model": "micro", "messages": []},
        "/v1/chat/completions",
        400,
        "messages",
        "invalid_value",
    ),
    (
        "chat: content wrong type",
        {"model": "micro", "messages": [{"role": "user", "content": 7}]},
        "/v1/chat/completions",
        400,
        "messages[0].content",
        "invalid_value",
    ),
    (
        "chat: unknown model",
        {"model": "x", "messages": [{"role": "user", "content": "hi"}]},
        "/v1/chat/completions",
        404,
        "model",
        "model_not_found",
    ),
    (
        "chat: n > 1",
        {"model": "micro", "n": 3, "messages": [{"role": "user", "content": "hi"}]},
        "/v1/chat/completions",
        400,
        "n",
        "unsupported_parameter",
    ),
    ("unknown route", GOOD, "/v1/embeddings", 404, None, "not_found"),
]


def test_every_bad_request_gets_a_4xx_json_error_and_the_server_keeps_serving(served):
    server, _, _, refs = served
    for case, body, path, status, param, code in BAD:
        r = _post(server.url, body, path)
        assert r.status_code == status, (case, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], case
        assert (err["param"], err["code"]) == (param, code), (case, err)
        assert err["type"] == "invalid_request_error", case
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    with pytest.raises(openai.NotFoundError) as e:  # the client parses our error body
        server.client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert (e.value.code, e.value.param) == ("model_not_found", "model")
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model="micro", prompt=[3] * 100, max_tokens=190)
    assert e.value.code == "context_length_exceeded" and "maximum context length is 256" in e.value.message
    ok = server.client.completions.create(model="micro", prompt=PROMPTS[2], max_tokens=N, temperature=0)
    assert ok.choices[0].text == refs[PROMPTS[2]].text


def test_concurrency_limit_is_429_and_a_disconnect_frees_the_slot(folder):
    engine, tok = load(folder, max_batch_size=4)
    step = engine.step
    engine.step = lambda: (time.sleep(0.02), step())[1]  # a slow model: 200 tokens take > 4 s
    server = Server(create_app(engine, tok, "micro", Limits(max_concurrent=1)))
    try:
        long = {"model": "micro", "prompt": "a", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=long) as first:
            lines = first.iter_lines()  # kept referenced: a collected iterator closes the connection
            next(lines)  # the first request is in flight
            r = _post(server.url, GOOD)
            assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        # the client went away: its request is aborted and the slot freed
        deadline = time.time() + 20
        while time.time() < deadline and _post(server.url, GOOD).status_code == 429:
            time.sleep(0.1)
        assert _post(server.url, GOOD).status_code == 200
        assert engine.stats()["generation_tokens_total"] < 150 + 2  # the first one did not run to the end
    finally:
        server.close()


def test_dsv3_serve_command(folder, capsys):
    port = free_port()
    assert main(["serve", "--checkpoint", str(folder / "nope")]) == 2
    assert "holds no model" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(folder), "--max-concurrent", "0"]) == 2
    assert "max_concurrent=0: must be an integer >= 1" in capsys.readouterr().err
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dsv3",
            "serve",
            "--checkpoint",
            str(folder),
            "--port",
            str(port),
            "--max-seq-len",
            "128",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["micro"]
        out = client.chat.completions.create(model="micro", messages=CHAT, max_tokens=3, temperature=0)
        assert out.choices[0].finish_reason in ("stop", "length") and out.usage.completion_tokens <= 3
        card = json.loads(httpx.get(f"http://127.0.0.1:{port}/v1/models/micro").text)
        assert card["max_model_len"] == 128
    finally:
        proc.terminate()
        proc.wait(timeout=20)
