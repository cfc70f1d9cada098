"""`dsv3 serve` against hostile and careless clients (issue 12): out-of-range numbers, lone
surrogates, huge bodies, huge stop strings, clients that give up, no API key, SIGTERM, a step
that raises, and property-based fuzzing of every endpoint's JSON. Each case checks that the
server still answers correctly afterwards: /health is 200 and a greedy request gets the answer
the engine gave alone before serving."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from urllib.parse import quote

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server import Server

from dsv3.infer import routes
from dsv3.infer.cli import load
from dsv3.infer.sampling import SamplingParams
from dsv3.infer.server import Limits, bind_warning, create_app
from fixtures import free_port

GOOD = {"model": "micro", "prompt": "def add(a, b):", "max_tokens": 4, "temperature": 0}
POISON_SEED = 4242  # a request with this seed makes the engine's step raise (see `served`)
LIMITS = Limits(max_concurrent=16, max_prompt_tokens=128, max_tokens_limit=16, max_body_bytes=2**20)


@pytest.fixture(scope="module")
def served(folder):
    """A server whose engine raises in any step that decodes a POISON_SEED request, and the
    greedy answer to GOOD computed by the same engine before serving."""
    engine, tok = load(folder, max_batch_size=8)
    reference = engine.generate([tok.encode(GOOD["prompt"])], SamplingParams(max_tokens=4, temperature=0))[0]
    step = engine.step

    def step_that_fails_on_poison():
        outputs = step()
        if any(r.params.seed == POISON_SEED for r in engine.running):
            raise RuntimeError("injected failure")
        return outputs

    engine.step = step_that_fails_on_poison
    server = Server(create_app(engine, tok, "micro", LIMITS))
    server.http = httpx.Client(base_url=server.url, timeout=60)
    server.reference = reference.text
    yield server
    server.http.close()
    server.close()


def assert_still_serving(server) -> None:
    assert server.http.get("/health").json() == {"status": "ok"}
    r = server.http.post("/v1/completions", json=GOOD)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == server.reference


def post_raw(server, path: str, raw: str | bytes) -> httpx.Response:
    return server.http.post(path, content=raw, headers={"content-type": "application/json"})


def metric(server, name: str) -> float:
    lines = server.http.get("/metrics").text.splitlines()
    return float(next(line.split(" ")[1] for line in lines if line.startswith(name + " ")))


def assert_error(r: httpx.Response, status: int, param: str | None, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["param"], err["code"]) == (param, code), err
    return err


def slow(engine, seconds: float = 0.02):
    """Make each engine step take at least `seconds` (a model slow enough to catch mid-request)."""
    step = engine.step
    engine.step = lambda: (time.sleep(seconds), step())[1]
    return engine


# ---------------------------------------------------------------------------------- 1. numbers
@pytest.mark.parametrize(
    "field, value",
    [
        ("top_k", 2**63),
        ("top_k", 10**30),
        ("seed", 2**63),
        ("max_tokens", 2**64),
        ("n", 2**70),
        ("repetition_penalty", 1e308),
        ("repetition_penalty", 1e-300),
        ("temperature", 1e308),
        ("presence_penalty", 1e308),
        ("logprobs", -(2**80)),
        ("prompt", [2**64]),
        ("prompt", [-1]),
    ],
)
def test_numbers_out_of_range_are_400s_before_the_engine(served, field, value):
    """The issue's request (top_k = 2**63) stopped the engine thread for everyone."""
    body = {**GOOD, "temperature": 1, field: value}
    code = "unsupported_parameter" if field == "n" else "invalid_value"
    assert_error(served.http.post("/v1/completions", json=body), 400, field, code)
    assert_still_serving(served)


def test_infinities_and_tiny_temperatures(served):
    raw = json.dumps({**GOOD, "repetition_penalty": math.inf})  # Python's json writes Infinity
    assert_error(post_raw(served, "/v1/completions", raw), 400, "repetition_penalty", "invalid_value")
    near_zero = served.http.post("/v1/completions", json={**GOOD, "temperature": 1e-300})  # greedy, no NaN
    assert near_zero.status_code == 200 and near_zero.json()["choices"][0]["text"] == served.reference
    assert_still_serving(served)


def test_a_step_that_raises_fails_its_requests_and_the_engine_serves_on(served):
    """Whatever escapes a step fails the requests decoded in it (500, or an error event in a
    stream), frees their cache blocks, and the engine thread goes on."""
    failed = metric(served, "dsv3_engine_failed_steps_total")
    poison = {**GOOD, "seed": POISON_SEED, "max_tokens": 8, "ignore_eos": True}
    err = assert_error(served.http.post("/v1/completions", json=poison), 500, None, "request_failed")
    assert "injected failure" in err["message"] and err["type"] == "server_error"
    events = served.http.post("/v1/completions", json={**poison, "stream": True}).text.split("\n\n")
    assert json.loads(events[-3].removeprefix("data: "))["error"]["code"] == "request_failed"
    assert events[-2] == "data: [DONE]"
    assert_still_serving(served)
    assert metric(served, "dsv3_engine_failed_steps_total") == failed + 2
    assert metric(served, "dsv3_cache_blocks_used") == 0 and metric(served, "dsv3_requests_in_flight") == 0


# ---------------------------------------------------------------------------------- 2. unicode
SURROGATES = [  # (case, raw JSON body, path, param)
    ("escaped in the prompt", b'{"model":"micro","prompt":"ab\\ud800cd"}', "/v1/completions", "prompt"),
    ("raw bytes ED A0 80", b'{"model":"micro","prompt":"ab\xed\xa0\x80cd"}', "/v1/completions", "prompt"),
    ("in a list prompt", b'{"model":"micro","prompt":["\\udfff"]}', "/v1/completions", "prompt"),
    ("in the model name", b'{"model":"mi\\ud800","prompt":"ab"}', "/v1/completions", "model"),
    ("in a stop string", b'{"model":"micro","prompt":"a","stop":["\\udc00"]}', "/v1/completions", "stop"),
    (
        "in chat content",
        b'{"model":"micro","messages":[{"role":"user","content":"a\\ud83d"}]}',
        "/v1/chat/completions",
        "messages[0].content",
    ),
    (
        "in a text part",
        b'{"model":"micro","messages":[{"role":"user","content":[{"type":"text","text":"\\ud800"}]}]}',
        "/v1/chat/completions",
        "messages[0].content",
    ),
    (
        "in a name",
        b'{"model":"micro","messages":[{"role":"user","content":"a","name":"\\ud800"}]}',
        "/v1/chat/completions",
        "messages[0].name",
    ),
]


@pytest.mark.parametrize("case, raw, path, param", SURROGATES, ids=[c[0] for c in SURROGATES])
def test_lone_surrogates_are_400s_and_the_connection_stays_open(served, case, raw, path, param):
    r = post_raw(served, path, raw)
    err = assert_error(r, 400, param, "invalid_value")
    assert "surrogate" in err["message"] and r.headers.get("connection") != "close"
    assert_still_serving(served)  # on the same keep-alive connection


# ---------------------------------------------------------------------------------- 3. body size, event loop
def test_a_huge_body_is_refused_at_once(served):
    started = time.perf_counter()
    r = served.http.post("/v1/completions", json={**GOOD, "prompt": "x " * 10_000_000})  # 20 MB
    assert_error(r, 413, None, "request_too_large")
    assert time.perf_counter() - started < 5  # the old server tokenized it for ~30 s

    def chunks():  # no Content-Length: counted while read
        for _ in range(40):
            yield b" " * 2**16

    try:
        r = httpx.post(served.url + "/v1/completions", content=chunks(), timeout=30)
        assert_error(r, 413, None, "request_too_large")
    except httpx.TransportError:  # the server answered and closed while the client still sent
        pass
    assert_still_serving(served)


def test_tokenizing_a_long_prompt_does_not_stall_the_event_loop(served):
    """A prompt just under the body limit takes a second or more to tokenize (then it is too long
    for the context); meanwhile /health answers at once."""
    body = {**GOOD, "prompt": "def f(x):\n    return x ** 2  # é\n" * 28_000}  # ~0.95 MB
    result = {}

    def send():
        t = time.perf_counter()
        result["r"] = httpx.post(served.url + "/v1/completions", json=body, timeout=60)
        result["s"] = time.perf_counter() - t

    thread = threading.Thread(target=send)
    thread.start()
    worst = 0.0
    while thread.is_alive():
        t = time.perf_counter()
        assert httpx.get(served.url + "/health", timeout=10).status_code == 200
        worst = max(worst, time.perf_counter() - t)
        time.sleep(0.02)
    thread.join()
    assert_error(result["r"], 400, "prompt", "context_length_exceeded")
    assert result["s"] > 0.5 and worst < result["s"] / 2, (result["s"], worst)
    assert_still_serving(served)


# ---------------------------------------------------------------------------------- 4. stop strings
def test_stop_strings_are_bounded_and_matching_them_delays_no_one(served):
    """stop="x" * 512K took 15 s of the engine thread (and the event loop) and delayed everyone."""
    started = time.perf_counter()
    r = served.http.post("/v1/completions", json={**GOOD, "stop": "x" * 524_288})
    assert_error(r, 400, "stop", "invalid_value")
    assert_error(
        served.http.post("/v1/completions", json={**GOOD, "stop": ["a"] * 5}), 400, "stop", "invalid_value"
    )
    assert time.perf_counter() - started < 3
    longest = {**GOOD, "stop": ["x" * 1023 + str(i) for i in range(4)], "max_tokens": 8, "ignore_eos": True}
    with httpx.Client(base_url=served.url, timeout=60) as other:
        r = other.post("/v1/completions", json={**longest, "stream": True})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    assert_still_serving(served)


# ---------------------------------------------------------------------------------- 5. disconnects
def test_non_streaming_clients_that_give_up_are_aborted(folder):
    """Four requests of 200 tokens abandoned after 0.5 s used to run to the end (the slots of a
    4-request server full for seconds: 429 for everyone else)."""
    engine, tok = load(folder, max_batch_size=4)
    server = Server(create_app(slow(engine), tok, "micro", Limits(max_concurrent=4)))
    try:
        long = {**GOOD, "max_tokens": 200, "ignore_eos": True}

        def give_up():
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(server.url + "/v1/completions", json=long, timeout=0.5)

        threads = [threading.Thread(target=give_up) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(0.5)
        r = httpx.post(server.url + "/v1/completions", json=GOOD, timeout=30)
        assert r.status_code == 200, r.text
        assert engine.stats()["generation_tokens_total"] < 4 * 200 / 2
    finally:
        server.close()


# ---------------------------------------------------------------------------------- 6. API key
def test_api_key_guards_v1_routes_only(folder, monkeypatch):
    engine, tok = load(folder, max_batch_size=2)
    server = Server(create_app(engine, tok, "micro", Limits(max_body_bytes=2**20), api_key="sk-test-123"))
    compared = []
    monkeypatch.setattr(routes.hmac, "compare_digest", lambda a, b: compared.append(1) or a == b)
    try:
        for headers in ({}, {"authorization": "Bearer sk-wrong"}, {"authorization": "Basic sk-test"}):
            r = httpx.post(server.url + "/v1/completions", json=GOOD, headers=headers)
            err = assert_error(r, 401, None, "invalid_api_key")
            assert r.headers["www-authenticate"] == "Bearer" and "sk-" not in err["message"]
        assert httpx.get(server.url + "/v1/models").status_code == 401
        big = httpx.post(server.url + "/v1/completions", content=b"x" * 2**21)  # refused before reading
        assert big.status_code == 401
        assert compared, "the key was not compared with hmac.compare_digest"
        key = "sk-test-123"
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        assert client.completions.create(**GOOD).choices[0].finish_reason in ("stop", "length")
        r = httpx.post(server.url + "/v1/completions", json=GOOD, headers={"authorization": f"bearer {key}"})
        assert r.status_code == 200  # the scheme is case-insensitive
        assert httpx.get(server.url + "/health").status_code == 200  # open
        assert httpx.get(server.url + "/metrics").status_code == 200  # open (a documented choice)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        server.close()


def test_binding_beyond_loopback_without_a_key_warns():
    assert bind_warning("127.0.0.1", None) is None and bind_warning("localhost", None) is None
    assert bind_warning("::1", None) is None and bind_warning("0.0.0.0", "k") is None
    for host in ("0.0.0.0", "::", "192.168.1.4", "myhost"):
        assert "without an API key" in bind_warning(host, None)


# ---------------------------------------------------------------------------------- 7. shutdown
def test_drain_refuses_new_requests_and_ends_late_ones(folder):
    """What SIGTERM starts: new requests and /health get 503 at once; after the grace period the
    requests still running are ended cleanly (an error event and [DONE], or a 503)."""
    engine, tok = load(folder, max_batch_size=4)
    app = create_app(slow(engine), tok, "micro", Limits())
    server = Server(app)
    long = {**GOOD, "max_tokens": 200, "ignore_eos": True}
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json={**long, "stream": True}) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            answer = {}

            def wait_for_the_answer():
                answer["r"] = httpx.post(server.url + "/v1/completions", json=long, timeout=30)

            waiter = threading.Thread(target=wait_for_the_answer)
            waiter.start()
            time.sleep(0.3)
            app.state.bridge.drain_threadsafe(0.5)
            time.sleep(0.1)
            assert_error(
                httpx.post(server.url + "/v1/completions", json=GOOD), 503, None, "engine_unavailable"
            )
            assert httpx.get(server.url + "/health").status_code == 503
            rest = [line for line in lines if line]
        waiter.join()
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2].removeprefix("data: "))["error"]["code"] == "engine_unavailable"
        assert_error(answer["r"], 503, None, "engine_unavailable")
        assert engine.stats()["generation_tokens_total"] < 2 * 200
    finally:
        server.close()


def test_sigterm_finishes_requests_in_flight_then_exits_0(folder):
    port = free_port()
    env = {**os.environ, "DSV3_API_KEY": "sk-env"}
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
            "256",
            "--shutdown-grace",
            "20",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.post(url + "/v1/completions", json=GOOD).status_code == 401  # the key from the env
        auth = {"authorization": "Bearer sk-env"}
        body = {**GOOD, "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth, timeout=60) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0]
    assert "Shutting down" in output, output


# ---------------------------------------------------------------------------------- fuzzing
huge = st.integers(-(2**70), 2**70) | st.sampled_from([2**63, 2**63 - 1, 2**64, -(2**63) - 1])
floats = st.floats() | st.sampled_from([1e308, -1e308, 5e-324, 1e-300])
text = st.text(max_size=12) | st.builds(
    lambda a, c: a + chr(c), st.text(max_size=4), st.integers(0xD800, 0xDFFF)
)
any_json = st.recursive(
    st.none() | st.booleans() | huge | floats | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)


def field(valid):
    """Mostly a value of the right type (often in range), sometimes any JSON at all."""
    return st.one_of(*[valid] * 6, any_json)


COMMON = {
    "max_tokens": field(st.integers(1, 10) | st.integers(-2, 20) | huge),
    "temperature": field(st.floats(0, 2) | floats),
    "top_p": field(st.floats(0, 1)),
    "top_k": field(st.integers(0, 50) | huge),
    "seed": field(huge),
    "repetition_penalty": field(st.floats(0.5, 2) | floats),
    "stop": field(text | st.lists(text, max_size=5)),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({}, optional={"include_usage": st.booleans()})),
    "ignore_eos": field(st.booleans()),
    "n": field(huge),
    "user": field(text),
    "logit_bias": any_json,
}
COMPLETION = st.fixed_dictionaries(
    {
        "model": field(st.just("micro")),
        "prompt": field(text | st.lists(st.integers(-2, 2100), max_size=6) | st.lists(text, max_size=2)),
    },
    optional={**COMMON, "logprobs": field(huge), "echo": field(st.booleans()), "suffix": field(text)},
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant"]) | any_json,
        "content": field(
            text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": field(text)}), max_size=2)
        ),
    },
    optional={"name": field(text)},
)
CHAT = st.fixed_dictionaries(
    {"model": field(st.just("micro")), "messages": field(st.lists(MESSAGE, max_size=3))},
    optional={**COMMON, "max_completion_tokens": field(st.integers(-1, 10) | huge)},
)
plain_text = st.text(max_size=12)
VALID_COMMON = {  # in range: these reach the engine, at the edges of what it accepts
    "temperature": st.floats(0, 2) | st.sampled_from([0.0, 1e-300, 2.0]),
    "top_p": st.floats(1e-6, 1) | st.just(1e-300),
    "top_k": st.integers(0, 50) | st.just(2**63 - 1),
    "seed": st.integers(0, 2**63 - 1),
    "repetition_penalty": st.floats(0.5, 2) | st.sampled_from([1e-6, 1e6]),
    "stop": st.text(min_size=1, max_size=8) | st.lists(st.text(min_size=1, max_size=1024), max_size=4),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
    "user": plain_text,
}
VALID_COMPLETION = st.fixed_dictionaries(
    {
        "model": st.just("micro"),
        "max_tokens": st.integers(1, 8),
        "prompt": plain_text
        | st.lists(st.integers(0, 2047), min_size=1, max_size=20)
        | st.lists(plain_text, min_size=1, max_size=1),
    },
    optional=VALID_COMMON,
)
VALID_CHAT = st.fixed_dictionaries(
    {
        "model": st.just("micro"),
        "max_tokens": st.integers(1, 8),
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["system", "developer", "user", "assistant"]), "content": plain_text}
            ),
            min_size=1,
            max_size=3,
        ),
    },
    optional=VALID_COMMON,
)
BODIES = st.one_of(
    COMPLETION.map(lambda b: ("/v1/completions", b)),
    CHAT.map(lambda b: ("/v1/chat/completions", b)),
    VALID_COMPLETION.map(lambda b: ("/v1/completions", b)),
    VALID_CHAT.map(lambda b: ("/v1/chat/completions", b)),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), any_json),
)


def assert_well_formed(r: httpx.Response) -> None:
    """Never a 5xx; an error is OpenAI's shape; a success is a whole answer."""
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [e for e in r.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events), r.text
    else:
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=BODIES)
def test_fuzzed_json_bodies_never_break_the_server(served, request):
    path, body = request
    assert_well_formed(post_raw(served, path, json.dumps(body)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64), path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzzed_raw_bytes_never_break_the_server(served, raw, path):
    assert_well_formed(post_raw(served, path, raw))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=text)
def test_fuzzed_model_paths_never_break_the_server(served, name):
    r = served.http.get("/v1/models/" + quote(name.encode("utf-8", "surrogatepass"), safe=""))
    if r.status_code == 307:  # FastAPI redirects a path ending in "/" to the one without
        assert (name or "/").endswith("/")
        return
    assert r.status_code in (200, 404), r.text
    assert (
        r.json()["id"] == "micro"
        if r.status_code == 200
        else set(r.json()["error"]) == {"message", "type", "param", "code"}
    )


def test_the_server_still_serves_after_the_fuzzing(served):
    assert_still_serving(served)
    assert metric(served, "dsv3_requests_in_flight") == 0 and metric(served, "dsv3_cache_blocks_used") == 0
