"""Prefill/decode disaggregation: one worker computes the prompt, another decodes the rest.

Prefill is compute-bound (a whole prompt per forward), decode memory-bound (one token per
sequence per forward over the whole cache); DeepSeek-V3 runs them on separate deployments so
that neither slows the other (V3R sec. 3.4). The hand-over is small because MLA caches only the
latent: per token and layer c_kv [kv_lora_rank] and k_pe [qk_rope_head_dim] (70,272 B per
token for V3 in BF16), a fraction of what expanded per-head K/V would need.

    dsv3 serve --checkpoint D --role decode --peer 127.0.0.1:29600          # decode worker
    dsv3 serve --checkpoint D --role prefill --peer 127.0.0.1:29600 --port 8000  # HTTP front + prefill

The prefill worker serves HTTP. A request is prefilled there (`PrefillEngine`: the Engine's
admission and batched, chunked prefill; it samples the first token, and with MTP the first
draft), then *handed off*: its latent cache, every layer's slots for positions 0..n-1 as stored
(BF16/FP32, or FP8 codes + scales), and its state (tokens, sampling parameters, generator
state, repetition mask, draft, log-probabilities) travel to the decode worker as one message,
and its blocks are freed. The decode worker (`DecodeEngine`) writes the latents into blocks of
its own cache and continues the sequence as if it had prefilled it: the output is the one a
single worker gives (greedy and seeded sampling alike). Its outputs flow back to the prefill
worker, which hands them to its HTTP bridge; aborts flow the other way.

Wire: a TCP connection, messages of [8-byte length][JSON header][8-byte length][safetensors
blob] (no pickle: a peer can send only tensors and JSON). `sent_bytes` counts the latents
handed off; per prompt token that is the cache's bytes per token (the analyzer's figure,
`dsv3 analyze deployment`), with MTP one layer more.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import queue
import socket
import struct
import sys
import threading
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from dsv3.infer.chat import IncrementalText
from dsv3.infer.engine import Engine, RequestOutput, _Request
from dsv3.infer.sampling import SamplingParams, TokenLogprob

ROLE_HELP = (
    "prefill: serve HTTP, prefill prompts and hand them to the decode worker at --peer; "
    "decode: continue the sequences the prefill worker sends (listens on --peer)"
)
PEER_HELP = "where the decode worker listens for the prefill worker (default: %(default)s)"
ROLES = ("prefill", "decode")


@dataclass
class Handoff:
    """A prefilled request on its way to a decode worker: JSON-able state + tensors."""

    state: dict
    tensors: dict[str, torch.Tensor]

    @property
    def latent_bytes(self) -> int:
        """Bytes of the latent cache carried (per layer c_kv, its FP8 scales if any, k_pe)."""
        return sum(t.numel() * t.element_size() for k, t in self.tensors.items() if k.startswith("cache."))


# ------------------------------------------------------------------------------ the two engines
class PrefillEngine(Engine):
    """An Engine that only prefills: a request whose prompt is in the cache and whose first
    token is sampled leaves the engine as a Handoff (in `handoffs`), its blocks freed. With
    compile=True its prefill runs compiled, warmed up by `warmup()` as the Engine's."""

    def __init__(self, model, **engine_kwargs):
        super().__init__(model, **engine_kwargs)
        self.handoffs: list[Handoff] = []
        self.handed_off = dict(requests=0, prompt_tokens=0, latent_bytes=0)

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        outputs, self._outbox = self._outbox, []
        self._admit([])
        prefilling = [r for r in self.running if r.num_cached < r.prefill_to]
        if prefilling:
            self._prefill(prefilling, outputs)
        for r in [r for r in self.running if r.num_cached >= r.prefill_to and r.finish_reason is None]:
            handoff = export_request(self, r)
            self.handoffs.append(handoff)
            self.handed_off["requests"] += 1
            self.handed_off["prompt_tokens"] += r.num_cached
            self.handed_off["latent_bytes"] += handoff.latent_bytes
            self._finish(r)
        return outputs

    def warmup(self) -> None:
        """Engine.warmup (the compiled prefill's graphs), its requests' handoffs dropped."""
        handoffs, handed_off = len(self.handoffs), dict(self.handed_off)
        super().warmup()
        del self.handoffs[handoffs:]
        self.handed_off = handed_off


class DecodeEngine(Engine):
    """An Engine that continues handed-off requests: `import_request` queues one; each step first
    admits the queued ones (oldest first, while the batch and the cache have room) straight into
    decoding, then runs the Engine's step."""

    def __init__(self, model, **engine_kwargs):
        super().__init__(model, **engine_kwargs)
        self.arriving: list[Handoff] = []

    def import_request(self, handoff: Handoff) -> str:
        rid = handoff.state["id"]
        if rid in self._requests or any(h.state["id"] == rid for h in self.arriving):
            raise ValueError(f"request_id={rid!r} is already in use by an unfinished request")
        self.arriving.append(handoff)
        return rid

    def abort(self, request_id: str) -> None:
        for h in self.arriving:
            if h.state["id"] == request_id:
                self.arriving.remove(h)
                params = SamplingParams(**h.state["params"])
                self._outbox.append(
                    RequestOutput(
                        request_id,
                        h.state["prompt"],
                        h.state["output"],
                        [],
                        None,
                        True,
                        "abort",
                        [] if params.logprobs is not None else None,
                    )
                )
                return
        super().abort(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.arriving) or super().has_unfinished()

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        while self.arriving and len(self.running) < self.max_batch_size:
            h = self.arriving[0]
            n = (
                len(h.state["prompt"]) + len(h.state["output"]) - 1
            )  # cached positions: all but the pending token
            if not self.cache.ensure(h.state["id"], n + self.positions_per_decode):
                break
            self.arriving.pop(0)
            self.running.append(import_request(self, h, n))
        return super().step()


# ------------------------------------------------------------------------------ state <-> handoff
def _cache_tensors(cache) -> dict[str, list[torch.Tensor]]:
    groups = {"kv": cache.kv, "pe": cache.pe}
    if cache.kv_scale is not None:
        groups["kv_scale"] = cache.kv_scale
    return groups


def export_request(engine: Engine, r: _Request) -> Handoff:
    """A prefilled request's latents (slots of positions 0..num_cached-1, every layer, as stored)
    and state."""
    slots = engine.cache.view([r.id], [0], r.num_cached, read=False).write_idx  # [n]
    tensors = {
        f"cache.{name}.{layer}": t[slots].contiguous()
        for name, per_layer in _cache_tensors(engine.cache).items()
        for layer, t in enumerate(per_layer)
    }
    tensors["generator"] = r.generator.get_state()
    if r.seen is not None:
        tensors["seen"] = r.seen.cpu()
    if r.draft_q is not None:
        tensors["draft_q"] = r.draft_q.cpu()
    state = dict(
        id=r.id,
        prompt=r.prompt,
        output=r.output,
        params=_params_json(r.params),
        draft=r.draft,
        logprobs=[dataclasses.asdict(lp) for lp in r.logprobs],
        prompt_logprobs=None
        if r.prompt_logprobs is None
        else [None if lp is None else dataclasses.asdict(lp) for lp in r.prompt_logprobs],
    )
    return Handoff(state, tensors)


def import_request(engine: Engine, h: Handoff, n: int) -> _Request:
    """Write a handoff's latents into the blocks `engine.cache` holds for it (positions 0..n-1)
    and rebuild its request, ready to decode its pending token."""
    s, t = h.state, h.tensors
    slots = engine.cache.view([s["id"]], [0], n, read=False).write_idx
    for name, per_layer in _cache_tensors(engine.cache).items():
        for layer, pool in enumerate(per_layer):
            pool[slots] = t[f"cache.{name}.{layer}"].to(pool.device)
    generator = torch.Generator()
    generator.set_state(t["generator"])
    params = SamplingParams(**s["params"])
    r = _Request(
        s["id"],
        s["prompt"],
        params,
        generator,
        next(engine._ids),
        output=list(s["output"]),
        num_cached=n,
        prefill_to=n,
        draft=s["draft"],
    )
    r.seen = t["seen"].to(engine.device) if "seen" in t else None
    r.draft_q = t["draft_q"].to(engine.device) if "draft_q" in t else None
    r.logprobs = [_logprob(lp) for lp in s["logprobs"]]
    r.prompt_logprobs = (
        None
        if s["prompt_logprobs"] is None
        else [None if lp is None else _logprob(lp) for lp in s["prompt_logprobs"]]
    )
    if engine.decode is not None and r.output:  # the text state the prefill worker had: replay its tokens
        r.text = IncrementalText(engine.decode, params.stop)
        for i in range(1, len(r.output) + 1):
            r.text.add(r.output[:i])
    engine._requests[r.id] = r
    return r


def _params_json(p: SamplingParams) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(p).items()}


def _logprob(d: dict) -> TokenLogprob:
    return TokenLogprob(d["token_id"], d["logprob"], tuple(tuple(pair) for pair in d["top"]))


def _output_json(o: RequestOutput) -> dict:
    return dataclasses.asdict(o)


def _output(d: dict) -> RequestOutput:
    d = dict(d)
    d["logprobs"] = None if d["logprobs"] is None else [_logprob(lp) for lp in d["logprobs"]]
    d["prompt_logprobs"] = (
        None
        if d["prompt_logprobs"] is None
        else [None if lp is None else _logprob(lp) for lp in d["prompt_logprobs"]]
    )
    return RequestOutput(**d)


# ------------------------------------------------------------------------------ the wire
def send_message(sock: socket.socket, header: dict, tensors: dict[str, torch.Tensor] | None = None) -> int:
    """One message; returns the bytes written."""
    head = json.dumps(header).encode()
    blob = save_tensors(tensors) if tensors else b""
    frame = struct.pack("<Q", len(head)) + head + struct.pack("<Q", len(blob)) + blob
    sock.sendall(frame)
    return len(frame)


def recv_message(sock: socket.socket) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The next message, or None when the peer closed the connection."""
    size = _recv_exact(sock, 8)
    if size is None:
        return None
    header = json.loads(_recv_exact(sock, struct.unpack("<Q", size)[0]) or b"null")
    blob_size = struct.unpack("<Q", _recv_exact(sock, 8) or b"\0" * 8)[0]
    blob = _recv_exact(sock, blob_size) if blob_size else b""
    return header, (load_tensors(blob) if blob else {})


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class PeerLost(RuntimeError):
    """The other worker closed the connection or died."""


# ------------------------------------------------------------------------------ the two workers
class PrefillFront:
    """On the prefill worker: the Engine's interface (for the HTTP bridge or the CLI) over the
    local PrefillEngine and the decode worker behind `sock`."""

    def __init__(self, engine: PrefillEngine, sock: socket.socket, poll_s: float = 0.05):
        self.local, self.sock, self.poll_s = engine, sock, poll_s
        self.cfg, self.max_seq_len, self.decode = engine.cfg, engine.max_seq_len, engine.decode
        self.waiting = engine.waiting
        self.remote: set[str] = set()  # handed off, not finished
        self.sent_bytes = 0  # whole messages, headers included
        self.lost: PeerLost | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True, name="dsv3-decode-link")
        self._reader.start()

    def check_request(self, prompt_token_ids, params) -> list[int]:
        return self.local.check_request(prompt_token_ids, params)

    def add_request(self, prompt_token_ids, params, request_id=None) -> str:
        return self.local.add_request(prompt_token_ids, params, request_id)

    def abort(self, request_id: str) -> None:
        if request_id in self.remote:
            self._send({"type": "abort", "id": request_id})
        else:
            self.local.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.local.has_unfinished() or bool(self.remote) or not self._inbox.empty()

    def step(self) -> list[RequestOutput]:
        outputs = self.local.step() if self.local.has_unfinished() else []
        for h in self.local.handoffs:
            self.remote.add(h.state["id"])
            self._send({"type": "sequence", "state": h.state}, h.tensors)
        self.local.handoffs.clear()
        wait = self.poll_s if not outputs and not self.local.has_unfinished() else 0
        while True:
            try:
                item = self._inbox.get(timeout=wait) if wait else self._inbox.get_nowait()
            except queue.Empty:
                break
            wait = 0
            if isinstance(item, PeerLost):
                self.lost = item
                raise item
            if item.finished:
                self.remote.discard(item.request_id)
            outputs.append(item)
        return outputs

    def stats(self) -> dict:
        s = self.local.stats()
        h = self.local.handed_off
        s.update(
            num_running=s["num_running"] + len(self.remote),
            handed_off_requests=h["requests"],
            handed_off_prompt_tokens=h["prompt_tokens"],
            handed_off_latent_bytes=h["latent_bytes"],
            handoff_bytes_per_token=h["latent_bytes"] / h["prompt_tokens"] if h["prompt_tokens"] else None,
            handoff_wire_bytes=self.sent_bytes,
        )
        return s

    def close(self) -> None:
        try:
            self._send({"type": "stop"})
        except PeerLost:
            pass
        self.sock.close()

    def _send(self, header: dict, tensors=None) -> None:
        try:
            self.sent_bytes += send_message(self.sock, header, tensors)
        except OSError as e:
            raise PeerLost(f"the decode worker is gone ({e})") from e

    def _read(self) -> None:
        while True:
            try:
                message = recv_message(self.sock)
            except OSError:
                message = None
            if message is None:
                self._inbox.put(PeerLost("the decode worker closed the connection"))
                return
            for d in message[0]["outputs"]:
                self._inbox.put(_output(d))


def run_decode_worker(engine: DecodeEngine, sock: socket.socket, idle_s: float = 0.05) -> None:
    """On the decode worker: continue what the prefill worker sends until it says stop or goes
    away; after each step, send the outputs back."""
    inbox: queue.Queue = queue.Queue()

    def read() -> None:
        while True:
            try:
                message = recv_message(sock)
            except OSError:
                message = None
            inbox.put(message)
            if message is None or message[0]["type"] == "stop":
                return

    threading.Thread(target=read, daemon=True, name="dsv3-prefill-link").start()
    while True:
        try:
            message = inbox.get(timeout=idle_s) if not engine.has_unfinished() else inbox.get_nowait()
        except queue.Empty:
            message = ()
        while message != ():
            if message is None or message[0]["type"] == "stop":
                return
            header, tensors = message
            if header["type"] == "sequence":
                engine.import_request(Handoff(header["state"], tensors))
            elif header["type"] == "abort":
                engine.abort(header["id"])
            try:
                message = inbox.get_nowait()
            except queue.Empty:
                message = ()
        if engine.has_unfinished():
            outputs = engine.step()
            if outputs:
                send_message(sock, {"type": "outputs", "outputs": [_output_json(o) for o in outputs]})


# ------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`dsv3 serve --role prefill|decode --peer HOST:PORT`."""
    group = parser.add_argument_group("prefill/decode disaggregation")
    group.add_argument("--role", choices=ROLES, help=ROLE_HELP)
    group.add_argument("--peer", default="127.0.0.1:29600", metavar="HOST:PORT", help=PEER_HELP)


def _address(peer: str) -> tuple[str, int]:
    from dsv3.errors import ConfigError

    host, _, port = peer.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--peer {peer!r}: must be HOST:PORT with a port in 1..65535, e.g. 127.0.0.1:29600")
    return host, int(port)


def serve(args: argparse.Namespace) -> int:
    """`dsv3 serve --role ...`: the decode worker listens and decodes; the prefill worker
    connects to it and serves HTTP."""
    from pathlib import Path

    from dsv3.errors import UserError
    from dsv3.infer import server
    from dsv3.infer.chat import ChatError
    from dsv3.infer.cli import engine_options, load

    engine_kwargs = dict(
        max_batch_size=args.max_batch_size,
        max_seq_len=args.max_seq_len,
        num_blocks=args.num_blocks,
        cache_dtype=args.cache_dtype,
    )
    try:
        limits, api_key = server.check_args(args)
        address = _address(args.peer)
        if args.compile:
            raise UserError("--compile with --role: the disaggregated engines run eagerly; drop --compile")
        if args.ep is not None:
            raise UserError("--role with --ep: a disaggregated worker is one process here; drop --ep")
        engine_class = PrefillEngine if args.role == "prefill" else DecodeEngine
        engine, tok = load(
            args.checkpoint, None, **engine_options(args), engine_class=engine_class, **engine_kwargs
        )
    except (UserError, ChatError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.role == "decode":
        with socket.create_server(address) as listener:
            print(
                f"decode worker: waiting for the prefill worker on {args.peer}", file=sys.stderr, flush=True
            )
            sock, peer = listener.accept()
        print(f"decode worker: prefill worker {peer[0]}:{peer[1]} connected", file=sys.stderr, flush=True)
        run_decode_worker(engine, sock)
        return 0
    try:
        sock = socket.create_connection(address, timeout=60)
        sock.settimeout(None)
    except OSError as e:
        print(
            f"error: --peer {args.peer}: no decode worker answers there ({e}); start "
            f"`dsv3 serve --role decode --peer {args.peer}` first",
            file=sys.stderr,
        )
        return 2
    front = PrefillFront(engine, sock)
    name = args.model_name or Path(args.checkpoint).resolve().name
    status = server.serve_app(server.create_app(front, tok, name, limits, api_key), args, name, front)
    front.close()
    return status
