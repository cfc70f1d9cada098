"""The bridge between the HTTP handlers (asyncio) and the one thread that runs the Engine.

The Engine is not thread-safe, so exactly one thread owns it. Handlers talk to it through a
command queue (a new request with the place its outputs go, an abort, "end everything"); the
thread takes the commands between steps, runs `engine.step()` while anything is unfinished, and
hands every RequestOutput to the asyncio.Queue of its request through that request's event loop
(`call_soon_threadsafe`). Requests that arrive together are therefore decoded in the same
forward passes (continuous batching), and the event loop never waits on the model.

A handler holds a `Slot`: one of `max_concurrent` places (more are refused with `Overloaded`,
before any work such as tokenizing is done), then the request it submitted, whose outputs it
reads with `Slot.outputs()`. Leaving that iterator early (the client went away, the handler was
cancelled) aborts the request; the place is free again once the engine has let it go.

Failures stay with the requests they concern. A request the engine refuses fails alone
(ValueError: the handler answers 400). A step that raises fails the requests it was decoding,
which share its forward pass (each gets `RequestFailed`; the ones still waiting stay queued);
they are aborted in the engine, which frees their cache blocks, and the thread serves on. Only
if cleaning up fails too does the thread stop: `alive` turns False and every request gets
`EngineUnavailable`. `drain` (graceful shutdown) refuses new requests and, after a grace
period, ends the ones still in flight with `EngineUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger("dsv3.serve")


class EngineUnavailable(RuntimeError):
    """The engine is not running (stopped, broken) or the server is shutting down."""


class Overloaded(RuntimeError):
    """max_concurrent requests are in flight."""


class RequestFailed(RuntimeError):
    """The engine could not finish this request (a step failed, or the server ended it)."""


class EngineBridge:
    def __init__(self, engine, max_concurrent: int = 64, rate_window_s: float = 10.0) -> None:
        self.engine = engine
        self.max_concurrent = max_concurrent
        self.stats: dict[str, Any] = dict(engine.stats())
        self.counts = dict.fromkeys(("in_flight", "accepted", "rejected", "failed_steps"), 0)
        self.error: BaseException | None = None  # what stopped the engine thread
        self.draining = False
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, Callable[[Any], None]] = {}  # request id -> deliver, engine thread only
        self._stopping = False
        self._ended: EngineUnavailable | None = None  # set by end_all: later requests fail with it
        self._history: deque[tuple[float, int]] = deque()  # (time, generation_tokens_total)
        self._window = rate_window_s
        self._thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle (event loop)
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._stopping

    def drain(self, grace_s: float) -> None:
        """Refuse new requests now; end the ones still in flight after grace_s seconds."""
        if self.draining:
            return
        self.draining = True
        message = f"the server is shutting down and could not finish this request within {grace_s:g} s"
        asyncio.get_running_loop().call_later(grace_s, self.end_all, message)

    def drain_threadsafe(self, grace_s: float) -> None:
        """`drain` from a signal handler or another thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.drain, grace_s)

    def end_all(self, message: str) -> None:
        """End every request in flight, and any submitted later, with EngineUnavailable(message)."""
        self._put(("end_all", EngineUnavailable(message)))

    @property
    def pending(self) -> int:
        """Commands (new requests, aborts) not yet taken by the engine thread."""
        return self._commands.qsize()

    def tokens_per_second(self) -> float:
        h = self._history
        return (h[-1][1] - h[0][1]) / (h[-1][0] - h[0][0]) if len(h) > 1 and h[-1][0] > h[0][0] else 0.0

    # ------------------------------------------------------------------ requests (event loop)
    def reserve(self) -> Slot:
        """A place for one request; EngineUnavailable or Overloaded."""
        if not self.alive:
            raise EngineUnavailable("the engine is not running")
        if self.draining:
            raise EngineUnavailable("the server is shutting down")
        if self.counts["in_flight"] >= self.max_concurrent:
            self.counts["rejected"] += 1
            raise Overloaded(f"{self.max_concurrent} requests are in flight, the server's limit; retry later")
        self.counts["in_flight"] += 1
        return Slot(self)

    def _put(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            while not self._stopping:
                self._take_commands()
                if not self.engine.has_unfinished():
                    self._record()
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except Exception as e:
                    self._fail_step(e)
                    continue
                self._record()  # before delivering: a client that got its answer sees it in /metrics
                for out in outputs:
                    self._deliver(out.request_id, out, out.finished)
        except BaseException as e:  # cleaning up failed too: fail every open request, /health turns 503
            log.exception("engine loop stopped")
            self.error = e
            for rid in list(self._sinks):
                self._deliver(rid, EngineUnavailable(f"the engine stopped: {e}"), True)
            self._fail_commands(EngineUnavailable(f"the engine stopped: {e}"))

    def _queued(self):
        """The commands queued so far, taken one by one."""
        while True:
            try:
                yield self._commands.get_nowait()
            except queue.Empty:
                return

    def _take_commands(self) -> None:
        for cmd in self._queued():
            if cmd[0] == "abort":
                self.engine.abort(cmd[1])
            elif cmd[0] == "end_all":
                self._ended = cmd[1]
                self._end(list(self._sinks), cmd[1])
            else:
                _, prompt_ids, params, deliver, fut = cmd
                if self._ended is not None:
                    fut.set_exception(self._ended)
                    continue
                try:
                    rid = self.engine.add_request(prompt_ids, params, request_id=f"req-{uuid.uuid4().hex}")
                except Exception as e:  # ValueError: a bad request; anything else: a failed one
                    fut.set_exception(e)
                    continue
                self._sinks[rid] = deliver
                fut.set_result(rid)

    def _fail_step(self, error: Exception) -> None:
        """A step raised: fail the requests it was decoding; the waiting ones stay queued."""
        log.exception("engine step failed; failing the requests it was decoding")
        self.counts["failed_steps"] += 1
        waiting = {r.id for r in self.engine.waiting}
        failed = RequestFailed(f"the engine failed while decoding this request: {error!r}")
        self._end([rid for rid in self._sinks if rid not in waiting], failed)

    def _end(self, request_ids: list[str], error: Exception) -> None:
        for rid in request_ids:
            self.engine.abort(rid)  # frees its cache blocks; its "abort" output goes nowhere
            self._deliver(rid, error, True)

    def _fail_commands(self, error: BaseException) -> None:
        for cmd in self._queued():
            if cmd[0] == "add":
                cmd[-1].set_exception(error)

    def _deliver(self, rid: str, item: Any, finished: bool) -> None:
        deliver = self._sinks.pop(rid, None) if finished else self._sinks.get(rid)
        if deliver is None or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(deliver, item)
        except RuntimeError:  # the event loop is closed (server shutting down)
            pass

    def _record(self) -> None:
        stats = dict(self.engine.stats())
        now = time.monotonic()
        self._history.append((now, stats["generation_tokens_total"]))
        while len(self._history) > 2 and now - self._history[1][0] > self._window:
            self._history.popleft()
        self.stats = stats


class Slot:
    """One request's place in the bridge: submit once, then read its outputs."""

    def __init__(self, bridge: EngineBridge) -> None:
        self.bridge = bridge
        self.request_id: str | None = None
        self.params = None  # the SamplingParams submitted
        self._queue: asyncio.Queue = asyncio.Queue()
        self._held = True  # counted in in_flight until the engine is done with it
        self._finished = False

    async def submit(self, prompt_ids: list[int], params) -> str:
        """Queue the request in the engine; its id, or the engine's ValueError (then the place
        is given back)."""
        fut: Future = Future()
        self.params = params
        self.bridge._put(("add", prompt_ids, params, self._deliver, fut))
        try:
            self.request_id = await asyncio.wrap_future(fut)
        except BaseException:
            fut.add_done_callback(self._abort_if_added)  # cancelled while the engine was adding it
            self.close()
            raise
        self.bridge.counts["accepted"] += 1
        return self.request_id

    def _abort_if_added(self, fut: Future) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.bridge._put(("abort", fut.result()))

    def _deliver(self, item) -> None:
        """In the event loop: an output or the exception that ended the request."""
        self._queue.put_nowait(item)
        if getattr(item, "finished", True):
            self._release()

    def _release(self) -> None:
        if self._held:
            self._held = False
            self.bridge.counts["in_flight"] -= 1

    async def outputs(self) -> AsyncIterator:
        """The request's RequestOutputs up to the finished one (RequestFailed / EngineUnavailable
        raised if the engine ended it); leaving early aborts it."""
        try:
            while not self._finished:
                out = await self._queue.get()
                if isinstance(out, BaseException):
                    self._finished = True
                    raise out
                self._finished = out.finished
                yield out
        finally:
            self.close()

    def close(self) -> None:
        """Done with this request: abort it if still running, give the place back if never submitted."""
        if self.request_id is None:
            self._release()
        elif not self._finished:
            self._finished = True
            self.bridge._put(("abort", self.request_id))
