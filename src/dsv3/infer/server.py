"""`dsv3 serve`: an OpenAI-compatible HTTP server over the Engine (FastAPI + uvicorn).

    dsv3 serve --checkpoint runs/tiny --port 8000
    curl localhost:8000/v1/completions -d '{"model": "tiny", "prompt": "def f(x):", "max_tokens": 20}'

Endpoints: GET /v1/models, POST /v1/completions and /v1/chat/completions (with "stream": true:
server-sent events in OpenAI's chunk format, ending with `data: [DONE]`), GET /health and
GET /metrics (Prometheus text: tokens, tokens/s, running and waiting requests, cache blocks).

Concurrency. The Engine is not thread-safe, so exactly one thread owns it (`EngineLoop`): it
takes new requests and aborts from a command queue, runs `engine.step()` while anything is
unfinished, and hands every RequestOutput to the asyncio queue of its HTTP request through the
event loop (`call_soon_threadsafe`). Requests that arrive together are therefore decoded in the
same forward passes (continuous batching); the event loop never waits on the model.

Validation. Request bodies are pydantic models (strict types, unknown fields rejected), and
every error is OpenAI's JSON shape {"error": {"message", "type", "param", "code"}}: 400 for
malformed JSON, wrong types, out-of-range values, unsupported options (n > 1, logprobs, ...)
and prompts that do not fit (code "context_length_exceeded"); 404 for an unknown model or
route; 429 when `max_concurrent` requests are in flight; 503 when the engine has stopped.
"""

import argparse
import asyncio
import json
import logging
import queue
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("dsv3.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or HF folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--model-name", default=None, help="name clients use (default: the checkpoint folder's)"
    )
    parser.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--max-concurrent", type=int, default=64, help="requests in flight; more get 429")
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the context length - 1")
    parser.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens accepted")
    parser.add_argument(
        "--max-seq-len", type=int, default=None, help="context per sequence (default: the model's)"
    )
    parser.add_argument(
        "--num-blocks", type=int, default=None, help="latent cache blocks (default: a full batch)"
    )
    parser.add_argument("--cache-dtype", choices=("auto", "bf16", "fp8"), default="auto")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default=None, help="weights (default: float32)"
    )
    parser.add_argument("--mtp", action="store_true", help="MTP self-speculative decoding")


@dataclass
class Limits:
    max_concurrent: int = 64  # requests in flight (running + waiting); beyond -> 429
    max_prompt_tokens: int | None = None  # None: the engine's context - 1
    max_tokens_limit: int | None = None  # None: the engine's context - 1

    def validate(self) -> None:
        for name in ("max_concurrent", "max_prompt_tokens", "max_tokens_limit"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}={v!r}: must be an integer >= 1")


class APIError(Exception):
    """An error returned to the client as OpenAI's JSON error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------- engine thread
class EngineLoop:
    """The one thread that calls the Engine; outputs go to per-request asyncio queues."""

    def __init__(self, engine, rate_window_s: float = 10.0) -> None:
        self.engine = engine
        self.stats: dict[str, Any] = dict(engine.stats())
        self.error: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, Callable[[Any], None]]] = {}
        self._stopping = False
        self._history: deque[tuple[float, int]] = deque()  # (time, generation_tokens_total)
        self._window = rate_window_s
        self._thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._stopping

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def pending(self) -> int:
        """Commands (new requests, aborts) not yet taken by the engine thread."""
        return self._commands.qsize()

    def submit(self, prompt_ids: list[int], params, deliver: Callable[[Any], None]) -> Future:
        """Queue a request; the future resolves to its id, or to the engine's ValueError. Each of
        its RequestOutputs (or the exception that stopped the engine) is passed to `deliver`, called
        in the caller's event loop."""
        fut: Future = Future()
        self._commands.put(("add", prompt_ids, params, (asyncio.get_running_loop(), deliver), fut))
        self._wake.set()
        return fut

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def tokens_per_second(self) -> float:
        h = self._history
        return (h[-1][1] - h[0][1]) / (h[-1][0] - h[0][0]) if len(h) > 1 and h[-1][0] > h[0][0] else 0.0

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._take_commands()
                if not self.engine.has_unfinished():
                    self._record()
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, out, out.finished)
                self._record()
        except BaseException as e:  # the engine broke: fail every open request, /health turns 503
            log.exception("engine loop stopped")
            self.error = e
            for rid in list(self._sinks):
                self._deliver(rid, e, True)
            self._fail_commands(e)

    def _take_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "abort":
                self.engine.abort(cmd[1])
                continue
            _, prompt_ids, params, sink, fut = cmd
            try:
                rid = self.engine.add_request(prompt_ids, params, request_id=f"req-{uuid.uuid4().hex}")
            except ValueError as e:
                fut.set_exception(e)
                continue
            self._sinks[rid] = sink
            fut.set_result(rid)

    def _fail_commands(self, error: BaseException) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                cmd[-1].set_exception(error)

    def _deliver(self, rid: str, item: Any, finished: bool) -> None:
        sink = self._sinks.pop(rid, None) if finished else self._sinks.get(rid)
        if sink is None:
            return
        loop, deliver = sink
        try:
            loop.call_soon_threadsafe(deliver, item)
        except RuntimeError:  # the event loop is closed (server shutting down)
            pass

    def _record(self) -> None:
        stats = dict(self.engine.stats())
        now = time.monotonic()
        self._history.append((now, stats["generation_tokens_total"]))
        while len(self._history) > 2 and now - self._history[1][0] > self._window:
            self._history.popleft()
        self.stats = stats


# ---------------------------------------------------------------------------------- request bodies
def _models():
    """The pydantic request models (built on first use: pydantic is imported lazily)."""
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field

    class Body(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

    class StreamOptions(Body):
        include_usage: bool = False

    class Common(Body):
        model: str
        temperature: float = Field(1.0, ge=0, le=2)
        top_p: float = Field(1.0, gt=0, le=1)
        top_k: int = Field(0, ge=0)  # extension (vLLM's)
        repetition_penalty: float = Field(1.0, gt=0)  # extension (vLLM's)
        n: int = Field(1, ge=1)
        stream: bool = False
        stream_options: StreamOptions | None = None
        stop: str | list[str] | None = None
        seed: int | None = Field(None, ge=0, lt=2**63)
        presence_penalty: float = Field(0.0, ge=-2, le=2)
        frequency_penalty: float = Field(0.0, ge=-2, le=2)
        logit_bias: dict[str, float] | None = None
        user: str | None = None
        ignore_eos: bool = False  # extension

    class CompletionRequest(Common):
        prompt: str | list[int] | list[str]
        max_tokens: int | None = Field(16, ge=1)
        best_of: int | None = None
        echo: bool = False
        logprobs: int | None = None
        suffix: str | None = None

    class TextPart(Body):
        type: Literal["text"]
        text: str

    class Message(Body):
        role: Literal["system", "developer", "user", "assistant"]
        content: str | list[TextPart] | None = None
        name: str | None = None

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        logprobs: bool = False
        top_logprobs: int | None = None

    return CompletionRequest, ChatRequest


EXPECTED = {  # what a union field accepts, for its error message
    "prompt": "a string, a list of token ids, or a list holding one string",
    "stop": "a string or a list of up to 4 strings",
    "content": "a string or a list of text parts",
}
UNSUPPORTED = (  # (field, the values we support, message)
    ("n", (1,), "n > 1 is not supported; send one request per choice"),
    ("best_of", (None, 1), "best_of > 1 is not supported"),
    ("echo", (False,), "echo is not supported"),
    ("logprobs", (None, False), "logprobs are not supported"),
    ("top_logprobs", (None,), "logprobs are not supported"),
    ("suffix", (None,), "suffix is not supported"),
    ("presence_penalty", (0.0,), "presence_penalty is not supported (use repetition_penalty)"),
    ("frequency_penalty", (0.0,), "frequency_penalty is not supported (use repetition_penalty)"),
)


def _param(loc: tuple) -> str | None:
    """pydantic's error location -> OpenAI's param ("messages[0].role"); union tags dropped."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool", "list", "dict", "none"):
            out += f".{part}" if out else part
        else:
            break
    return out or None


def validation_error(errors: list[dict]) -> APIError:
    """FastAPI's RequestValidationError -> one OpenAI-style 400."""
    e = errors[0] if errors else {"type": "missing", "loc": ("body",), "msg": "missing"}
    if e["type"] == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", "")
        return APIError(
            400, f"We could not parse the JSON body of your request: {detail}", code="invalid_json"
        )
    param = _param(tuple(e["loc"]))
    if param is None:
        return APIError(400, "The request body must be a JSON object", code="invalid_body")
    if e["type"] == "extra_forbidden":
        return APIError(
            400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
        )
    if e["type"] == "missing":
        return APIError(
            400, f"Missing required parameter: '{param}'", param=param, code="missing_required_parameter"
        )
    message = f"Invalid value for '{param}': {e['msg']}"
    field = param.split(".")[-1].split("[")[0]
    if len(errors) > 1 and field in EXPECTED and all(_param(tuple(x["loc"])) == param for x in errors):
        message = f"Invalid value for '{param}': expected {EXPECTED[field]}"  # every branch of a union failed
    return APIError(400, message, param=param, code="invalid_value")


# ---------------------------------------------------------------------------------- the app
def create_app(engine, tokenizer, model_name: str, limits: Limits | None = None):
    """The FastAPI app serving `engine` (an Engine) with `tokenizer` (a ChatTokenizer). The engine
    thread starts and stops with the app's lifespan."""
    from contextlib import aclosing, asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from dsv3.infer.chat import ChatError, TextDeltas
    from dsv3.infer.sampling import SamplingParams

    limits = limits or Limits()
    limits.validate()
    context = engine.max_seq_len
    max_prompt = min(limits.max_prompt_tokens or context - 1, context - 1)
    max_tokens_limit = min(limits.max_tokens_limit or context - 1, context - 1)
    CompletionRequest, ChatRequest = _models()
    loop_thread = EngineLoop(engine)
    state = {"in_flight": 0, "rejected": 0, "requests": 0, "errors": 0, "created": int(time.time())}

    @asynccontextmanager
    async def lifespan(app):
        loop_thread.start()
        yield
        loop_thread.stop()

    app = FastAPI(title="dsv3", lifespan=lifespan)
    app.state.engine_loop = loop_thread

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        state["errors"] += 1
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return await api_error(request, validation_error(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return await api_error(
            request, APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code)
        )

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):
        log.exception("request failed")
        return await api_error(request, APIError(500, f"internal error: {e}", type="server_error"))

    # ------------------------------------------------------------------ helpers
    def check_common(body) -> None:
        if body.model != model_name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")  # fmt: skip
        for field, supported, message in UNSUPPORTED:
            if getattr(body, field, None) not in supported + (None,):
                raise APIError(400, message, param=field, code="unsupported_parameter")
        if body.logit_bias:
            raise APIError(
                400, "logit_bias is not supported", param="logit_bias", code="unsupported_parameter"
            )
        if body.stop is not None:
            stops = [body.stop] if isinstance(body.stop, str) else body.stop
            if len(stops) > 4 or not all(stops):
                raise APIError(400, "stop must be a non-empty string or a list of up to 4 of them", param="stop",
                               code="invalid_value")  # fmt: skip

    def sampling(
        body, prompt_len: int, max_tokens: int | None, extra_stop: tuple[str, ...] = ()
    ) -> SamplingParams:
        if prompt_len > max_prompt:
            raise APIError(400, f"The prompt has {prompt_len} tokens, more than this server's limit of {max_prompt}",
                           param="messages" if hasattr(body, "messages") else "prompt",
                           code="context_length_exceeded")  # fmt: skip
        if max_tokens is None:
            max_tokens = min(max_tokens_limit, context - prompt_len)
        if max_tokens > max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} exceeds this server's limit of {max_tokens_limit}",
                           param="max_tokens", code="invalid_value")  # fmt: skip
        if prompt_len + max_tokens > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                           f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                           "completion). Please reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")  # fmt: skip
        stops = [] if body.stop is None else [body.stop] if isinstance(body.stop, str) else body.stop
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                              repetition_penalty=body.repetition_penalty, stop=tuple(stops) + extra_stop,
                              ignore_eos=body.ignore_eos, seed=body.seed)  # fmt: skip

    async def submit(prompt_ids: list[int], params: SamplingParams) -> tuple[str, asyncio.Queue]:
        if not loop_thread.alive:
            raise APIError(503, "the engine is not running", type="server_error", code="engine_unavailable")
        if state["in_flight"] >= limits.max_concurrent:
            state["rejected"] += 1
            raise APIError(429, f"{limits.max_concurrent} requests are in flight, the server's limit; retry later",
                           type="rate_limit_error", code="rate_limit_exceeded")  # fmt: skip
        sink: asyncio.Queue = asyncio.Queue()

        def deliver(item) -> None:  # in the event loop; the slot is free once the engine is done
            sink.put_nowait(item)
            if getattr(item, "finished", True):
                state["in_flight"] -= 1

        state["in_flight"] += 1
        try:
            rid = await asyncio.wrap_future(loop_thread.submit(prompt_ids, params, deliver))
        except ValueError as e:
            state["in_flight"] -= 1
            raise APIError(400, str(e), code="invalid_value") from None
        except BaseException:
            state["in_flight"] -= 1
            raise
        state["requests"] += 1
        return rid, sink

    async def outputs(rid: str, sink: asyncio.Queue):
        """The request's RequestOutputs up to the finished one; aborts it if the client goes away."""
        finished = False
        try:
            while not finished:
                out = await sink.get()
                if isinstance(out, BaseException):
                    raise APIError(
                        503, f"the engine stopped: {out}", type="server_error", code="engine_unavailable"
                    )
                finished = out.finished
                yield out
        finally:
            if not finished:
                loop_thread.abort(rid)

    def usage(prompt_len: int, n: int) -> dict:
        return {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def respond(body, prompt_ids: list[int], params: SamplingParams, chat: bool):
        rid, sink = await submit(prompt_ids, params)
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + rid.removeprefix("req-"), "created": int(time.time()),
                "model": model_name}  # fmt: skip
        if not body.stream:
            final = None
            async with aclosing(outputs(rid, sink)) as stream:
                async for out in stream:
                    final = out
            choice = {"index": 0, "logprobs": None, "finish_reason": final.finish_reason}
            if chat:
                choice["message"] = {"role": "assistant", "content": final.text or ""}
            else:
                choice["text"] = final.text or ""
            obj = "chat.completion" if chat else "text_completion"
            return {
                **head,
                "object": obj,
                "choices": [choice],
                "usage": usage(len(prompt_ids), len(final.token_ids)),
            }

        obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(piece: str | None, finish_reason: str | None = None, role: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant"} if role else {}) | (
                    {"content": piece} if piece is not None else {}
                )
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish_reason}
            return sse({**head, "object": obj, "choices": [choice]})

        async def events():
            deltas = TextDeltas(params.stop)
            if chat:
                yield chunk("", role=True)
            final = None
            try:
                async with aclosing(outputs(rid, sink)) as stream:
                    async for out in stream:
                        piece, final = deltas.update(out.text, out.finished), out
                        if piece:
                            yield chunk(piece)
            except APIError as e:  # mid-stream failure: an error event, then the end
                yield sse(e.body())
                yield "data: [DONE]\n\n"
                return
            yield chunk(None, final.finish_reason)
            if include_usage:
                yield sse(
                    {
                        **head,
                        "object": obj,
                        "choices": [],
                        "usage": usage(len(prompt_ids), len(final.token_ids)),
                    }
                )
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        if not loop_thread.alive:
            raise APIError(503, "the engine is not running", type="server_error", code="engine_unavailable")
        return {"status": "ok"}

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": state["created"], "owned_by": "dsv3",
                "max_model_len": context}  # fmt: skip

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}")
    async def model(model: str):
        if model != model_name:
            raise APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_common(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "batched prompts are not supported; send one prompt per request",
                               param="prompt", code="unsupported_parameter")  # fmt: skip
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = engine.cfg.vocab_size
            if not ids or not all(0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be a non-empty list of ids in [0, {vocab})",
                               param="prompt", code="invalid_value")  # fmt: skip
        return await respond(body, ids, sampling(body, len(ids), body.max_tokens), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        check_common(body)
        messages = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        try:
            ids = tokenizer.encode_chat(messages)
        except ChatError as e:
            raise APIError(400, str(e), param="messages", code="invalid_value") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await respond(body, ids, sampling(body, len(ids), max_tokens, tokenizer.stop), chat=True)

    @app.get("/metrics")
    async def metrics():
        s = loop_thread.stats
        rows = [  # (name, type, help, value)
            ("dsv3_prompt_tokens_total", "counter", "Prompt tokens prefilled.", s["prompt_tokens_total"]),
            ("dsv3_generation_tokens_total", "counter", "Tokens generated.", s["generation_tokens_total"]),
            ("dsv3_generation_tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.",
             loop_thread.tokens_per_second()),
            ("dsv3_requests_running", "gauge", "Requests being decoded.", s["num_running"]),
            ("dsv3_requests_waiting", "gauge", "Requests waiting for a batch slot or cache blocks.",
             s["num_waiting"] + loop_thread.pending),
            ("dsv3_requests_in_flight", "gauge", "HTTP requests being served.", state["in_flight"]),
            ("dsv3_requests_total", "counter", "Requests accepted.", state["requests"]),
            ("dsv3_requests_rejected_total", "counter", "Requests refused at the concurrency limit (429).",
             state["rejected"]),
            ("dsv3_request_errors_total", "counter", "Requests answered with an error.", state["errors"]),
            ("dsv3_cache_blocks_used", "gauge", "Latent-cache blocks in use.", s["cache_blocks_used"]),
            ("dsv3_cache_blocks_total", "gauge", "Latent-cache blocks allocated.", s["cache_blocks_total"]),
            ("dsv3_cache_bytes_used", "gauge", "Latent-cache bytes in use.", s["cache_bytes_used"]),
            ("dsv3_cache_bytes_total", "gauge", "Latent-cache bytes allocated.", s["cache_bytes_total"]),
            ("dsv3_forward_passes_total", "counter", "Model forward passes.", s["forward_passes"]),
            ("dsv3_mtp_drafted_total", "counter", "MTP draft tokens verified.", s["mtp_drafted"]),
            ("dsv3_mtp_accepted_total", "counter", "MTP draft tokens accepted.", s["mtp_accepted"]),
        ]  # fmt: skip
        text = "".join(f"# HELP {n} {h}\n# TYPE {n} {t}\n{n} {v}\n" for n, t, h, v in rows)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


# ---------------------------------------------------------------------------------- CLI
def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dsv3.errors import CheckpointError, ConfigError, DataError
    from dsv3.infer.chat import ChatError
    from dsv3.infer.cli import load

    try:
        import uvicorn
    except ImportError:
        print("error: dsv3 serve needs fastapi and uvicorn: pip install 'dsv3[serve]'", file=sys.stderr)
        return 2
    limits = Limits(args.max_concurrent, args.max_prompt_tokens, args.max_tokens_limit)
    try:
        limits.validate()
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port {args.port}: must be in 0..65535")
        engine, tok = load(args.checkpoint, None, args.dtype, mtp=args.mtp, max_batch_size=args.max_batch_size,
                           max_seq_len=args.max_seq_len, num_blocks=args.num_blocks, cache_dtype=args.cache_dtype)  # fmt: skip
    except (CheckpointError, DataError, ConfigError, ChatError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.model_name or Path(args.checkpoint).resolve().name
    app = create_app(engine, tok, name, limits)
    print(f"serving {name!r} ({engine.cfg.num_hidden_layers} layers, context {engine.max_seq_len}) "
          f"on http://{args.host}:{args.port}/v1", flush=True)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
