"""`dsv3 serve`: an OpenAI-compatible HTTP server over the Engine (FastAPI + uvicorn).

    dsv3 serve --checkpoint runs/tiny --port 8000
    curl localhost:8000/v1/completions -d '{"model": "tiny", "prompt": "def f(x):", "max_tokens": 20}'

The server is split the way vLLM's OpenAI entrypoint is:
    protocol.py  request and response bodies (pydantic) and OpenAI-style errors
    bridge.py    the engine thread and the asyncio side of it (continuous batching)
    routes.py    the endpoints, one function each
    server.py    this file: the command line, and `create_app`, which puts them together

Errors are OpenAI's JSON shape {"error": {"message", "type", "param", "code"}}: 400 for
malformed JSON, wrong types, out-of-range values, invalid Unicode, unsupported options (n > 1, best_of,
suffix, ...) and prompts that do not fit (code "context_length_exceeded"); 401 without the
API key; 404 for an unknown model or route; 413 for a body over --max-body-bytes; 429 when
--max-concurrent requests are in flight; 500 when the engine failed a request; 503 when the
engine has stopped or the server is shutting down.

Before a route sees a request, routes.RequestGuard checks the API key (--api-key or
$DSV3_API_KEY; every /v1 route then needs `Authorization: Bearer <key>`; /health, /metrics and
/docs stay open, as in vLLM: health checks and Prometheus scrapes need no secret, and /metrics
holds only counters) and reads the body up to --max-body-bytes.

Shutdown: SIGTERM or SIGINT stops accepting connections and answers new requests 503 (and
/health 503, so that a load balancer moves on); the requests in flight finish, and those still
running after --shutdown-grace seconds are ended (a streamed one with an error event and
[DONE], another with a 503); then the engine thread stops and the process exits 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from dataclasses import dataclass

log = logging.getLogger("dsv3.serve")

API_KEY_ENV = "DSV3_API_KEY"
DEFAULT_MAX_BODY_BYTES = 4 * 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dsv3.infer.cli import add_engine_arguments
    from dsv3.infer.disaggregate import add_arguments as add_disaggregation_arguments
    from dsv3.infer.distributed import add_arguments as add_expert_parallel_arguments

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
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest request body; larger ones get 413 (default: {DEFAULT_MAX_BODY_BYTES})",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}; "
        "the environment variable keeps the key out of the process list)",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=20.0,
        help="seconds that requests in flight get to finish after SIGTERM (default: 20)",
    )
    parser.add_argument(
        "--max-seq-len", type=int, default=None, help="context per sequence (default: the model's)"
    )
    parser.add_argument(
        "--num-blocks", type=int, default=None, help="latent cache blocks (default: a full batch)"
    )
    parser.add_argument("--cache-dtype", choices=("auto", "bf16", "fp8"), default="auto")
    add_engine_arguments(parser)
    add_expert_parallel_arguments(parser)
    add_disaggregation_arguments(parser)


@dataclass
class Limits:
    max_concurrent: int = 64  # requests in flight (running + waiting + being tokenized); beyond -> 429
    max_prompt_tokens: int | None = None  # None: the engine's context - 1
    max_tokens_limit: int | None = None  # None: the engine's context - 1
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # beyond -> 413

    def validate(self) -> None:
        for name in ("max_concurrent", "max_prompt_tokens", "max_tokens_limit", "max_body_bytes"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}={v!r}: must be an integer >= 1")


# ---------------------------------------------------------------------------------- the app
def create_app(engine, tokenizer, model_name: str, limits: Limits | None = None, api_key: str | None = None):
    """The FastAPI app serving `engine` (an Engine) with `tokenizer` (a ChatTokenizer). The engine
    thread starts and stops with the app's lifespan; `app.state.bridge` is its EngineBridge."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from dsv3.infer.bridge import EngineBridge, EngineUnavailable, Overloaded, RequestFailed
    from dsv3.infer.protocol import APIError, server_error, validation_error
    from dsv3.infer.routes import RequestGuard, ServerContext, bridge_error, router

    limits = limits or Limits()
    limits.validate()
    context = engine.max_seq_len
    bridge = EngineBridge(engine, limits.max_concurrent)
    ctx = ServerContext(
        bridge,
        tokenizer,
        model_name,
        context,
        max_prompt_tokens=min(limits.max_prompt_tokens or context - 1, context - 1),
        max_tokens_limit=min(limits.max_tokens_limit or context - 1, context - 1),
        vocab_size=engine.cfg.vocab_size,
    )

    @asynccontextmanager
    async def lifespan(app):
        bridge.start()
        yield
        bridge.stop()

    app = FastAPI(title="dsv3", lifespan=lifespan)
    app.state.ctx, app.state.bridge = ctx, bridge
    app.include_router(router)
    app.add_middleware(RequestGuard, ctx=ctx, max_body_bytes=limits.max_body_bytes, api_key=api_key)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        ctx.errors += 1
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return await api_error(request, validation_error(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"{request.method} {request.url.path:.200}: {e.detail}"
        return await api_error(request, APIError(e.status_code, message, code=code))

    async def engine_error(request: Request, e: Exception):
        return await api_error(request, bridge_error(e))

    for bridge_exception in (Overloaded, EngineUnavailable, RequestFailed):
        app.add_exception_handler(bridge_exception, engine_error)

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):
        log.exception("request failed")
        return await api_error(request, server_error(f"internal error: {e}"))

    return app


# ---------------------------------------------------------------------------------- CLI
def bind_warning(host: str, api_key: str | None) -> str | None:
    """The warning for serving beyond this machine without an API key, or None."""
    if api_key:
        return None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = False
    if loopback:
        return None
    return (
        f"warning: serving on {host} without an API key: anyone who can reach this port can use "
        f"the model; set ${API_KEY_ENV} (or --api-key) to require one"
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dsv3.errors import CheckpointError, ConfigError, DataError
    from dsv3.infer.chat import ChatError
    from dsv3.infer.cli import engine_options, load

    try:
        import uvicorn  # noqa: F401
    except ImportError:
        print("error: dsv3 serve needs fastapi and uvicorn: pip install 'dsv3[serve]'", file=sys.stderr)
        return 2
    if args.role is not None:  # prefill/decode disaggregation
        from dsv3.infer.disaggregate import serve

        return serve(args)
    if args.ep is not None:  # expert parallelism over torchrun's ranks
        from dsv3.infer.distributed import serve

        return serve(args)
    try:
        limits, api_key = check_args(args)
        engine, tok = load(args.checkpoint, **engine_options(args), **serving_options(args))
    except (CheckpointError, DataError, ConfigError, ChatError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.model_name or Path(args.checkpoint).resolve().name
    return serve_app(create_app(engine, tok, name, limits, api_key), args, name, engine)


def serving_options(args: argparse.Namespace) -> dict:
    """The engine's batch and cache sizes from `dsv3 serve`'s options."""
    return {
        name: getattr(args, name) for name in ("max_batch_size", "max_seq_len", "num_blocks", "cache_dtype")
    }


def check_args(args: argparse.Namespace) -> tuple[Limits, str | None]:
    """The limits and the API key the command line asks for; ValueError for a bad value."""
    limits = Limits(args.max_concurrent, args.max_prompt_tokens, args.max_tokens_limit, args.max_body_bytes)
    limits.validate()
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: must be in 0..65535")
    if not args.shutdown_grace >= 0:
        raise ValueError(f"--shutdown-grace {args.shutdown_grace}: must be a number of seconds >= 0")
    return limits, args.api_key or os.environ.get(API_KEY_ENV) or None


def serve_app(app, args: argparse.Namespace, name: str, engine) -> int:
    """Serve `app` with uvicorn on --host/--port until SIGTERM or SIGINT."""
    import uvicorn

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if warning := bind_warning(args.host, api_key):
        print(warning, file=sys.stderr, flush=True)
    print(
        f"serving {name!r} ({engine.cfg.num_hidden_layers} layers, context {engine.max_seq_len}) "
        f"on http://{args.host}:{args.port}/v1",
        flush=True,
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            """SIGTERM / SIGINT: drain (see the module docstring); a second SIGINT forces the exit.
            The signal is not re-raised after the shutdown (uvicorn's default), so the exit is 0."""
            if self.should_exit:
                self.force_exit = True
            app.state.bridge.drain_threadsafe(args.shutdown_grace)
            self.should_exit = True

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        timeout_graceful_shutdown=args.shutdown_grace + 5,
    )
    Server(config).run()
    return 0
