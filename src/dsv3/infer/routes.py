"""The HTTP routes of `dsv3 serve`: one small function per endpoint on `router`.

    GET  /health                 200 {"status": "ok"} while the engine serves; 503 when it has
                                 stopped or the server is shutting down
    GET  /v1/models, /v1/models/{model}
    POST /v1/completions         a prompt (text, token ids, or a list of one text)
    POST /v1/chat/completions    messages rendered with the tokenizer's chat template
    GET  /metrics                Prometheus text (tokens, tokens/s, requests, cache, errors)

To add an endpoint, add a function here with its decorator; it gets the server's state
(`ServerContext`: the engine bridge, the tokenizer, the limits) by declaring `ctx: Ctx`, and
raises APIError for anything the client should hear about.

`RequestGuard` (plain ASGI middleware) runs before any route. With an API key, every route under
/v1 needs `Authorization: Bearer <key>`, compared in constant time (hmac.compare_digest), and is
refused with 401 before its body is read. The body is then read in full up to max_body_bytes
(413 beyond; at once when Content-Length says so) and handed on, so that a huge body costs
neither parsing nor tokenizing.

A generation (`generate`) takes a place among the concurrent requests first (429 when none is
left), so that the CPU work of a request is bounded as well as its decoding; then tokenizes in a
worker thread (a long prompt never stalls the event loop), checks the lengths, submits to the
engine and either streams server-sent events or waits for the final output. A non-streaming
request is raced against the client's disconnect: a client that gives up has its request
aborted, as a streaming one does when its connection drops.

Log-probabilities (protocol.py has the shapes) are the engine's: log_softmax of the model's raw
logits, whatever the sampling parameters, for every token sampled, including one that ended the
generation (eos, whose text is not in the output). A token is named by its text decoded alone
(special tokens by their name, e.g. <|bos|>, which starts every text prompt); `text_offset` adds
up the lengths those texts have in the choice's text (0 for special tokens; a character split
over several byte-level tokens counts once per piece, each decoded as U+FFFD, as in vLLM). With
`echo`, a text prompt is echoed as sent and a token-id prompt decoded. `max_tokens: 0` with
`echo` and `logprobs` scores the prompt without generating (lm-evaluation-harness's log-likelihood
requests send max_tokens 1 and read all but the last token; both work). A streamed response
carries, with each piece of text, the log-probabilities of the tokens sampled since the last.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import time
from collections.abc import Callable, Coroutine, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from dsv3.infer.bridge import EngineBridge, EngineUnavailable, Overloaded, RequestFailed, Slot
from dsv3.infer.chat import ChatError, TextDeltas
from dsv3.infer.protocol import (
    SSE_DONE,
    UNSUPPORTED,
    APIError,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatRequest,
    ChatTokenLogprob,
    CommonRequest,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ModelCard,
    ModelList,
    TopLogprob,
    Usage,
    server_error,
    sse,
    unavailable,
)
from dsv3.infer.sampling import SamplingParams, TokenLogprob

router = APIRouter()


@dataclass
class ServerContext:
    """What the routes serve with; one per app, on app.state.ctx."""

    bridge: EngineBridge
    tokenizer: Any  # a ChatTokenizer
    model_name: str
    context: int  # tokens per sequence (the engine's max_seq_len)
    max_prompt_tokens: int
    max_tokens_limit: int
    vocab_size: int
    created: int = field(default_factory=lambda: int(time.time()))
    errors: int = 0  # requests answered with an error

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=self.created, max_model_len=self.context)


def server_context(request: Request) -> ServerContext:
    return request.app.state.ctx


Ctx = Annotated[ServerContext, Depends(server_context)]


# ---------------------------------------------------------------------------------- routes
@router.get("/health")
async def health(ctx: Ctx) -> dict:
    if ctx.bridge.draining:
        raise unavailable("the server is shutting down")
    if not ctx.bridge.alive:
        raise unavailable("the engine is not running")
    return {"status": "ok"}


@router.get("/v1/models", response_model=ModelList)
async def list_models(ctx: Ctx) -> ModelList:
    return ModelList(data=[ctx.model_card()])


@router.get("/v1/models/{model}", response_model=ModelCard)
async def get_model(model: str, ctx: Ctx) -> ModelCard:
    if model != ctx.model_name:
        raise APIError(404, f"The model '{model:.100}' does not exist", param="model", code="model_not_found")
    return ctx.model_card()


@router.post("/v1/completions", response_model=CompletionResponse)
async def completions(body: CompletionRequest, request: Request, ctx: Ctx):
    check_common(ctx, body)
    if body.max_tokens == 0 and not (body.echo and body.logprobs is not None):
        raise APIError(
            400,
            "max_tokens=0 scores the prompt without generating: it needs echo=true and logprobs",
            param="max_tokens",
            code="invalid_value",
        )
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(
                400,
                "batched prompts are not supported; send one prompt per request",
                param="prompt",
                code="unsupported_parameter",
            )
        prompt = prompt[0]

    def encode() -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            return ctx.tokenizer.encode(prompt), prompt if body.echo else None
        if not prompt or not all(t < ctx.vocab_size for t in prompt):
            raise APIError(
                400,
                f"prompt token ids must be a non-empty list of ids in [0, {ctx.vocab_size})",
                param="prompt",
                code="invalid_value",
            )
        return list(prompt), ctx.tokenizer.decode(prompt) if body.echo else None

    return await generate(ctx, request, body, encode, body.max_tokens, chat=False)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(body: ChatRequest, request: Request, ctx: Ctx):
    check_common(ctx, body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value")
    messages = []
    for m in body.messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})

    def encode() -> tuple[list[int], None]:
        try:
            return ctx.tokenizer.encode_chat(messages), None
        except ChatError as e:
            raise APIError(400, str(e), param="messages", code="invalid_value") from None

    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return await generate(ctx, request, body, encode, max_tokens, chat=True, extra_stop=ctx.tokenizer.stop)


@router.get("/metrics")
async def metrics(ctx: Ctx) -> PlainTextResponse:
    bridge, s, counts = ctx.bridge, ctx.bridge.stats, ctx.bridge.counts
    rows = [  # (name, type, help, value)
        ("dsv3_prompt_tokens_total", "counter", "Prompt tokens prefilled.", s["prompt_tokens_total"]),
        ("dsv3_generation_tokens_total", "counter", "Tokens generated.", s["generation_tokens_total"]),
        (
            "dsv3_generation_tokens_per_second",
            "gauge",
            "Generated tokens per second over the last 10 s.",
            bridge.tokens_per_second(),
        ),
        ("dsv3_requests_running", "gauge", "Requests being decoded.", s["num_running"]),
        (
            "dsv3_requests_waiting",
            "gauge",
            "Requests waiting for a batch slot or cache blocks.",
            s["num_waiting"] + bridge.pending,
        ),
        ("dsv3_requests_in_flight", "gauge", "HTTP requests being served.", counts["in_flight"]),
        ("dsv3_requests_total", "counter", "Requests accepted.", counts["accepted"]),
        (
            "dsv3_requests_rejected_total",
            "counter",
            "Requests refused at the concurrency limit (429).",
            counts["rejected"],
        ),
        ("dsv3_request_errors_total", "counter", "Requests answered with an error.", ctx.errors),
        (
            "dsv3_engine_failed_steps_total",
            "counter",
            "Engine steps that raised (their requests failed).",
            counts["failed_steps"],
        ),
        ("dsv3_cache_blocks_used", "gauge", "Latent-cache blocks in use.", s["cache_blocks_used"]),
        ("dsv3_cache_blocks_total", "gauge", "Latent-cache blocks allocated.", s["cache_blocks_total"]),
        ("dsv3_cache_bytes_used", "gauge", "Latent-cache bytes in use.", s["cache_bytes_used"]),
        ("dsv3_cache_bytes_total", "gauge", "Latent-cache bytes allocated.", s["cache_bytes_total"]),
        ("dsv3_forward_passes_total", "counter", "Model forward passes.", s["forward_passes"]),
        ("dsv3_mtp_drafted_total", "counter", "MTP draft tokens proposed.", s["mtp_drafted"]),
        ("dsv3_mtp_accepted_total", "counter", "MTP draft tokens accepted.", s["mtp_accepted"]),
    ]
    text = "".join(f"# HELP {n} {h}\n# TYPE {n} {t}\n{n} {v}\n" for n, t, h, v in rows)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


# ---------------------------------------------------------------------------------- generation
def check_common(ctx: ServerContext, body: CommonRequest) -> None:
    """What the schema cannot say: the model served, the options we do not support."""
    if body.model != ctx.model_name:
        raise APIError(
            404,
            f"The model '{body.model:.100}' does not exist; this server serves '{ctx.model_name}'",
            param="model",
            code="model_not_found",
        )
    for field_name, supported, message in UNSUPPORTED:
        if getattr(body, field_name, None) not in supported + (None,):
            raise APIError(400, message, param=field_name, code="unsupported_parameter")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias", code="unsupported_parameter")


def sampling_params(
    ctx: ServerContext,
    body: CommonRequest,
    prompt_len: int,
    max_tokens: int | None,
    extra_stop: tuple[str, ...],
) -> SamplingParams:
    """The engine's parameters, once the prompt's length is known (400s for what does not fit)."""
    context = ctx.context
    if prompt_len > ctx.max_prompt_tokens:
        raise APIError(
            400,
            f"The prompt has {prompt_len} tokens, more than this server's limit of {ctx.max_prompt_tokens}",
            param="messages" if isinstance(body, ChatRequest) else "prompt",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(ctx.max_tokens_limit, context - prompt_len)
    if max_tokens > ctx.max_tokens_limit:
        raise APIError(
            400,
            f"max_tokens={max_tokens} exceeds this server's limit of {ctx.max_tokens_limit}",
            param="max_tokens",
            code="invalid_value",
        )
    if prompt_len + max_tokens > context:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
            "completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        repetition_penalty=body.repetition_penalty,
        stop=body.stops + tuple(extra_stop),
        ignore_eos=body.ignore_eos,
        seed=body.seed,
        **logprob_params(body),
    )


def logprob_params(body: CommonRequest) -> dict[str, int | None]:
    """SamplingParams.logprobs / prompt_logprobs: how many most likely tokens to report (None: off)."""
    if isinstance(body, ChatRequest):
        return {"logprobs": (body.top_logprobs or 0) if body.logprobs else None}
    return {"logprobs": body.logprobs, "prompt_logprobs": body.logprobs if body.echo else None}


async def generate(
    ctx: ServerContext,
    request: Request,
    body: CommonRequest,
    encode: Callable[[], tuple[list[int], str | None]],
    max_tokens: int | None,
    chat: bool,
    extra_stop: tuple[str, ...] = (),
) -> Any:
    """Tokenize (in a worker thread: the prompt's ids, and its text if echoed), submit, and
    answer: a StreamingResponse, or the final response unless the client disconnects first."""

    async def start() -> tuple[Slot, list[int], str | None, dict]:
        slot = ctx.bridge.reserve()
        try:
            ids, echo = await run_in_threadpool(encode)
            params = sampling_params(ctx, body, len(ids), max_tokens, extra_stop)
            try:
                rid = await slot.submit(ids, params)
            except ValueError as e:
                raise APIError(400, str(e), code="invalid_value") from None
        except BaseException:
            slot.close()
            raise
        head = {
            "id": ("chatcmpl-" if chat else "cmpl-") + rid.removeprefix("req-"),
            "created": int(time.time()),
            "model": ctx.model_name,
        }
        return slot, ids, echo, head

    if body.stream:
        slot, ids, echo, head = await start()
        events = stream_events(ctx, slot, head, ids, echo, body, chat)
        return StreamingResponse(
            events, media_type="text/event-stream", background=BackgroundTask(slot.close)
        )

    async def complete():
        slot, ids, echo, head = await start()
        final = None
        async with aclosing(slot.outputs()) as outputs:
            async for out in outputs:
                final = out
        usage = Usage.of(len(ids), len(final.token_ids))
        tok, asked = ctx.tokenizer, final.logprobs is not None
        if chat:
            choice = ChatChoice(
                message=ChatMessage(content=final.text or ""),
                logprobs=chat_logprobs(tok, final.logprobs) if asked else None,
                finish_reason=final.finish_reason,
            )
            return ChatCompletionResponse(**head, choices=[choice], usage=usage)
        logprobs = None
        if asked:
            logprobs, _ = completion_logprobs(tok, final.logprobs, len(echo or ""))
            if echo is not None:
                logprobs = prompt_logprobs(tok, final) + logprobs
        text = (echo or "") + (final.text or "")
        choice = CompletionChoice(text=text, logprobs=logprobs, finish_reason=final.finish_reason)
        return CompletionResponse(**head, choices=[choice], usage=usage)

    return await unless_disconnected(request, complete())


async def stream_events(
    ctx: ServerContext,
    slot: Slot,
    head: dict,
    ids: list[int],
    echo: str | None,
    body: CommonRequest,
    chat: bool,
):
    """Server-sent events: the echoed prompt (completions with echo), the text as it settles
    (TextDeltas) with the log-probabilities of the tokens since the last piece, the finish reason
    (with those of the tokens left), the usage if asked for, then [DONE]; a failure in the middle
    is an error event before [DONE]."""
    tok, sent, offset = ctx.tokenizer, 0, len(echo or "")  # tokens whose logprobs were sent; their text's end

    def chunk(text: str | None, finish_reason: str | None = None, role: bool = False, logprobs=None) -> str:
        if chat:
            delta = Delta(role="assistant" if role else None, content=text)
            choice = ChatChunkChoice(delta=delta, logprobs=logprobs, finish_reason=finish_reason)
            return sse(ChatCompletionChunk(**head, choices=[choice]))
        choice = CompletionChoice(text=text or "", logprobs=logprobs, finish_reason=finish_reason)
        return sse(CompletionResponse(**head, choices=[choice]))

    def new_logprobs(out) -> CompletionLogprobs | ChatLogprobs | None:
        nonlocal sent, offset
        if out.logprobs is None or len(out.logprobs) == sent:
            return None
        entries, sent = out.logprobs[sent:], len(out.logprobs)
        if chat:
            return chat_logprobs(tok, entries)
        logprobs, offset = completion_logprobs(tok, entries, offset)
        return logprobs

    if chat:
        yield chunk("", role=True)
    deltas, final = TextDeltas(slot.params.stop), None
    try:
        async with aclosing(slot.outputs()) as outputs:
            async for final in outputs:
                if echo is not None:
                    yield chunk(
                        echo, logprobs=prompt_logprobs(tok, final) if final.logprobs is not None else None
                    )
                    echo = None
                piece = deltas.update(final.text, final.finished)
                if piece:
                    yield chunk(piece, logprobs=new_logprobs(final))
    except (RequestFailed, EngineUnavailable) as e:
        yield sse(bridge_error(e).body())
        yield SSE_DONE
        return
    yield chunk(None, final.finish_reason, logprobs=new_logprobs(final))
    if body.stream_options and body.stream_options.include_usage:
        usage = Usage.of(len(ids), len(final.token_ids))
        yield sse((ChatCompletionChunk if chat else CompletionResponse)(**head, choices=[], usage=usage))
    yield SSE_DONE


# ---------------------------------------------------------------------------------- log-probabilities
def token_texts(tokenizer, ids: Iterable[int]) -> dict[int, tuple[str, int]]:
    """Per distinct token id: its text decoded alone (special tokens by their name), and the
    characters it adds to a decoded output (0 for special tokens, which decoding leaves out)."""
    unique = list(dict.fromkeys(ids))
    alone = [[i] for i in unique]
    named = tokenizer.tokenizer.decode_batch(alone, skip_special_tokens=False)
    output = tokenizer.tokenizer.decode_batch(alone, skip_special_tokens=True)
    return {i: (name, len(text)) for i, name, text in zip(unique, named, output)}


def completion_logprobs(
    tokenizer, entries: list[TokenLogprob | None], offset: int, ids: list[int] | None = None
) -> tuple[CompletionLogprobs, int]:
    """A completion's logprobs of tokens `ids` (default: the entries' tokens), whose text starts
    at `offset` of the choice's text, and where their text ends; an entry None (the first prompt
    token) has null logprobs."""
    ids = [e.token_id for e in entries] if ids is None else ids
    texts = token_texts(tokenizer, itertools.chain(ids, (t for e in entries if e for t, _ in e.top)))
    offsets = list(itertools.accumulate((texts[i][1] for i in ids), initial=offset))
    logprobs = CompletionLogprobs(
        tokens=[texts[i][0] for i in ids],
        token_logprobs=[None if e is None else e.logprob for e in entries],
        top_logprobs=[
            None if e is None else {**{texts[t][0]: lp for t, lp in e.top}, texts[i][0]: e.logprob}
            for i, e in zip(ids, entries)
        ],
        text_offset=offsets[:-1],
    )
    return logprobs, offsets[-1]


def prompt_logprobs(tokenizer, out) -> CompletionLogprobs:
    """The echoed prompt's logprobs (its text starts the choice's text)."""
    return completion_logprobs(tokenizer, out.prompt_logprobs, 0, out.prompt_token_ids)[0]


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> ChatLogprobs:
    """A chat choice's logprobs of the tokens of `entries`, each with its top_logprobs."""
    texts = token_texts(
        tokenizer, itertools.chain.from_iterable([e.token_id, *(t for t, _ in e.top)] for e in entries)
    )

    def named(token_id: int, logprob: float) -> dict:
        token = texts[token_id][0]
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                **named(e.token_id, e.logprob), top_logprobs=[TopLogprob(**named(*t)) for t in e.top]
            )
            for e in entries
        ]
    )


def bridge_error(e: Exception) -> APIError:
    """The client's error for an exception of the engine bridge."""
    if isinstance(e, Overloaded):
        return APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded")
    if isinstance(e, EngineUnavailable):
        return unavailable(str(e))
    return server_error(str(e), code="request_failed")


async def unless_disconnected(request: Request, work: Coroutine) -> Any:
    """Await `work` unless the client disconnects first; then cancel it (which aborts its engine
    request) and answer nothing (499: the client closed the request)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return Response(status_code=499)


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------------------------- guard
class RequestGuard:
    """ASGI middleware run before any route: the API key on /v1 routes (401 before the body is
    read), then the body read in full up to max_body_bytes (413 beyond) and handed on."""

    def __init__(self, app, ctx: ServerContext, max_body_bytes: int, api_key: str | None) -> None:
        self.app, self.ctx, self.max_body_bytes = app, ctx, max_body_bytes
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body = self.refuse_key(scope) or await self.read_body(scope, receive)
        if body is None:  # the client left
            return
        if isinstance(body, APIError):
            self.ctx.errors += 1
            return await body.response()(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:  # after the body: what the client does next (http.disconnect)
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def refuse_key(self, scope) -> APIError | None:
        if self.api_key is None or not (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            return None
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key):
            return None
        message = (
            "Incorrect API key provided."
            if given
            else "You didn't provide an API key. You need to provide your API key in an Authorization "
            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
        return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_body(self, scope, receive) -> bytes | APIError | None:
        """The whole body, an APIError (413), or None when the client left while sending it."""
        limit = self.max_body_bytes
        too_large = APIError(
            413,
            f"The request body is larger than this server's limit of {limit} bytes",
            code="request_too_large",
        )
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return too_large
            if not message.get("more_body", False):
                return b"".join(chunks)
