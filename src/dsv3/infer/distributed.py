"""Serving over the ranks of an expert-parallel group: one front end, one lockstep loop per rank.

    torchrun --nproc-per-node 4 -m dsv3 serve --checkpoint runs/small --ep 4 --port 8000 \
        [--redundant-experts 4 --eplb-interval 60] [--fp8-dispatch] [--ep-overlap]
    torchrun --nproc-per-node 2 -m dsv3 generate --checkpoint runs/tiny --ep 2 --prompt "def f(x):"

Every rank runs a `LockstepEngine` (infer/lockstep.py): attention, dense layers and shared experts
replicated (data-parallel attention: each rank decodes its own sequences), 1/ep of the routed
experts, and a step that takes part in every MoE all-to-all whether or not it has tokens. The
experts sit in E + R slots placed by EPLB (parallel/eplb_live.py): --redundant-experts R copies
of hot experts, and --eplb-interval S re-places them every S seconds from the loads measured
while serving (rank 0 orders it; every rank moves weights between two steps). --fp8-dispatch
sends the dispatched rows in FP8; --ep-overlap decodes in two micro-batches whose all-to-alls
hide behind each other's compute (parallel/overlap.py).

The front end is rank 0. It runs the unchanged HTTP server (routes, bridge: one engine thread)
over a `ClusterFront`, which offers the Engine's interface (add_request, abort, step, stats) for
the whole group. Why rank 0 and not a router process in front of per-rank servers: the ranks
must meet once per step anyway (the lockstep agreement), so the requests ride on that meeting
for free; one process tokenizes and validates, holds the API key and the concurrency limit, and
sees the load of every rank when it places a request; a separate router would add a hop and a
second copy of all that state, and would still need the per-step meeting. What it costs: rank 0
also runs the HTTP event loop (tokenizing is off the engine thread already), and the requests
and outputs travel as pickled objects over the (CPU) control group once per step.

One cluster step, on every rank at once (the control group is gloo, also beside NCCL):

    rank 0 -> all   Orders: the new requests with the rank each goes to (the one with the fewest
                    unfinished requests), the aborts, whether to step, whether to stop
    every rank      adds its requests, applies the aborts, runs one LockstepEngine.step()
    all -> rank 0   Report: its outputs, its number of unfinished requests, its stats

Rank 0 then hands the outputs to the bridge. The other ranks (`run_worker`) loop on orders until
told to stop. While nothing is in flight, rank 0 sends an empty order every `heartbeat_s`
seconds, so that the waiting ranks never reach the collective timeout. Any failure of a
collective (a rank died, or stopped answering for DSV3_COLLECTIVE_TIMEOUT_S) raises
`ClusterLost` on the ranks that notice it: they are out of step for good, so the engine thread
stops, the server answers 503 and exits with status 1, and a worker exits with status 1, each
with a one-line message naming the rank and the cause.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.distributed as dist

from dsv3.infer.engine import RequestOutput
from dsv3.infer.lockstep import LockstepEngine
from dsv3.infer.sampling import SamplingParams
from dsv3.parallel.eplb_live import LiveBalancer, Rebalance

log = logging.getLogger("dsv3.serve")

HEARTBEAT_S = 1.0


class ClusterLost(BaseException):
    """A collective with the other ranks failed: the group is out of step and cannot serve on.
    Not an Exception on purpose: the engine thread must stop, not fail one step and go on."""


@dataclass
class Orders:
    """Rank 0's orders for one cluster step."""

    # (rank, request id, prompt, params) of each new request
    adds: list[tuple[int, str, list[int], SamplingParams]] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    run: bool = False  # step the engines (False: a heartbeat)
    stop: bool = False
    rebalance: bool = False  # re-place the experts from the loads measured so far (EPLB), then step


@dataclass
class Report:
    """One rank's answer to a cluster step."""

    outputs: list[RequestOutput]
    unfinished: int  # running + waiting + outputs owed
    waiting: list[str]  # ids of its waiting requests
    stats: dict
    rebalance: Rebalance | None = None  # what the re-placement did (the same on every rank)


def least_loaded(loads: list[int]) -> int:
    """The rank with the fewest unfinished requests (the lowest on ties)."""
    return min(range(len(loads)), key=loads.__getitem__)


def serve_orders(
    engine: LockstepEngine, orders: Orders, rank: int, balancer: LiveBalancer | None = None
) -> Report:
    """What every rank does with rank 0's orders: add its requests, abort, re-place the experts
    if asked (between two steps: nothing in flight moves), step."""
    rebalance = balancer.rebalance() if orders.rebalance and balancer is not None else None
    for owner, rid, prompt, params in orders.adds:
        if owner == rank:
            engine.add_request(prompt, params, request_id=rid)  # checked on rank 0 already
    for rid in orders.aborts:
        engine.abort(rid)  # ids of other ranks are ignored
    outputs = engine.step() if orders.run else []
    unfinished = len(engine.running) + len(engine.waiting) + len(engine._outbox)
    return Report(outputs, unfinished, [r.id for r in engine.waiting], engine.stats(), rebalance)


def _collective(what: str, rank: int, fn: Callable, *args):
    """Run fn(*args), a part of a cluster step; any failure in it (a dead peer, a timeout, an
    error in this rank's forward) leaves the ranks out of step: ClusterLost naming the cause."""
    try:
        return fn(*args)
    except Exception as e:
        timeout = os.environ.get("DSV3_COLLECTIVE_TIMEOUT_S", "600")
        cause = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise ClusterLost(
            f"rank {rank}: {what} failed ({cause}); the ranks are out of step: another rank has died or "
            f"stopped answering within DSV3_COLLECTIVE_TIMEOUT_S={timeout} s, or this step failed here; exiting"
        ) from e


def run_worker(
    engine: LockstepEngine, group: dist.ProcessGroup | None = None, balancer: LiveBalancer | None = None
) -> None:
    """Ranks > 0: serve rank 0's orders until it says stop (ClusterLost if the group breaks)."""
    rank = dist.get_rank()
    while True:
        box = [None]
        _collective("receiving rank 0's orders", rank, dist.broadcast_object_list, box, 0, group)
        orders: Orders = box[0]
        if orders.stop:
            return
        report = _collective("a step", rank, serve_orders, engine, orders, rank, balancer)
        _collective("reporting to rank 0", rank, dist.gather_object, report, None, 0, group)


class ClusterFront:
    """On rank 0: the Engine's interface over the engines of all ranks of `group`.

    add_request checks a request with the local engine's rules (ValueError at once, as the
    Engine), gives it to a rank by `assign(loads)` (default: the least loaded) and sends it with
    the next step; step() runs one cluster step and returns the outputs of every rank."""

    def __init__(
        self,
        engine: LockstepEngine,
        group: dist.ProcessGroup | None = None,
        assign: Callable[[list[int]], int] = least_loaded,
        heartbeat_s: float = HEARTBEAT_S,
        on_lost: Callable[[ClusterLost], None] | None = None,
        balancer: LiveBalancer | None = None,
        eplb_interval_s: float | None = None,
    ):
        self.local, self.group, self.assign, self.on_lost = engine, group, assign, on_lost
        self.balancer, self.eplb_interval_s = balancer, eplb_interval_s
        self.rebalances: list[Rebalance] = []
        self._rebalance_due = False
        self._last_rebalance = time.monotonic()
        self.cfg, self.max_seq_len, self.decode = engine.cfg, engine.max_seq_len, engine.decode
        self.size = dist.get_world_size(group)
        self.loads = [0] * self.size  # unfinished requests per rank, as last reported + placed since
        self.lost: ClusterLost | None = None
        self._owner: dict[str, int] = {}  # unfinished request id -> its rank
        self._orders = Orders()
        self._waiting: list[str] = []
        self._stats: list[dict] = [engine.stats()] * self.size
        self._lock = threading.Lock()  # one cluster step at a time (engine thread, heartbeat)
        self._last = time.monotonic()
        self._closed = threading.Event()
        self._heartbeat = threading.Thread(
            target=self._beat, args=(heartbeat_s,), daemon=True, name="dsv3-heartbeat"
        )
        self._heartbeat.start()

    # ------------------------------------------------------------------ the Engine interface
    def add_request(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> str:
        prompt = self.local.check_request(prompt_token_ids, params)
        rid = f"req-{uuid.uuid4().hex}" if request_id is None else str(request_id)
        if rid in self._owner:
            raise ValueError(f"request_id={rid!r} is already in use by an unfinished request")
        rank = self.assign(list(self.loads))
        self.loads[rank] += 1
        self._owner[rid] = rank
        self._orders.adds.append((rank, rid, prompt, params))
        return rid

    def abort(self, request_id: str) -> None:
        if request_id in self._owner:
            self._orders.aborts.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._orders.adds or self._orders.aborts or sum(self.loads))

    @property
    def waiting(self) -> list:
        """The requests no rank has admitted yet (objects with .id, as Engine.waiting)."""
        queued = [rid for _, rid, _, _ in self._orders.adds]
        return [SimpleNamespace(id=rid) for rid in queued + self._waiting]

    def request_rebalance(self) -> None:
        """Re-place the experts before the next step (as --eplb-interval does every S seconds)."""
        self._rebalance_due = True

    def step(self) -> list[RequestOutput]:
        orders, self._orders = self._orders, Orders()
        orders.run = True
        if self.balancer is not None:
            interval = self.eplb_interval_s
            orders.rebalance = self._rebalance_due or (
                interval is not None and time.monotonic() - self._last_rebalance >= interval
            )
        reports = self._exchange(orders)
        if orders.rebalance:
            self._rebalance_due, self._last_rebalance = False, time.monotonic()
            result = reports[0].rebalance
            self.rebalances.append(result)
            log.info(
                "EPLB: %d (token, expert) pairs measured; max/mean rank load %.3f -> %.3f (measured %.3f before); "
                "%d experts moved, %.1f MB",
                result.pairs,
                result.predicted_before,
                result.predicted_after,
                result.measured_before,
                result.experts_moved,
                result.bytes_moved / 1e6,
            )
        self.loads = [r.unfinished for r in reports]
        self._waiting = [rid for r in reports for rid in r.waiting]
        self._stats = [r.stats for r in reports]
        outputs = [o for r in reports for o in r.outputs]
        for o in outputs:
            if o.finished:
                self._owner.pop(o.request_id, None)
        return outputs

    def stats(self) -> dict:
        """The engines' counters summed over the ranks, the rates recomputed from the sums."""
        counters = [k for k, v in self._stats[0].items() if type(v) is int and k != "cache_bytes_per_token"]
        total = {k: sum(s[k] for s in self._stats) for k in counters}
        drafted, forwards = total.get("mtp_drafted", 0), total.get("decode_sequence_forwards", 0)
        total["mtp_acceptance_rate"] = total["mtp_accepted"] / drafted if drafted else None
        total["tokens_per_forward"] = total["decode_tokens"] / forwards if forwards else None
        total["cache_bytes_per_token"] = self._stats[0]["cache_bytes_per_token"]
        total["ranks"] = self.size
        total["requests_per_rank"] = list(self.loads)
        total["eplb_rebalances"] = len(self.rebalances)
        return total

    def close(self) -> None:
        """Tell the other ranks to stop (they return from run_worker)."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self.lost is None:
            self._exchange(Orders(stop=True), reply=False)
        if threading.current_thread() is not self._heartbeat:
            # no thread of ours may be left when the process exits: with the heartbeat still
            # alive, rank 0 aborted at exit now and then ("terminate called without an active
            # exception"). It ends within a quarter period (a collective of a broken group: its timeout)
            self._heartbeat.join(timeout=float(os.environ.get("DSV3_COLLECTIVE_TIMEOUT_S", "600")))

    # ------------------------------------------------------------------ the wire
    def _exchange(self, orders: Orders, reply: bool = True) -> list[Report]:
        with self._lock:
            if self.lost is not None:
                raise self.lost
            if self._closed.is_set() and not orders.stop:
                # a heartbeat that checked `_closed` just before close() took the lock: the other
                # ranks have stopped, so a collective now would never complete (and the process
                # would exit with this thread inside gloo)
                if orders.run:
                    raise RuntimeError("ClusterFront.step() after close()")
                return []
            try:
                _collective("sending orders", 0, dist.broadcast_object_list, [orders], 0, self.group)
                if not reply:
                    return []
                mine = _collective("a step", 0, serve_orders, self.local, orders, 0, self.balancer)
                reports = [None] * self.size
                _collective("collecting the reports", 0, dist.gather_object, mine, reports, 0, self.group)
            except ClusterLost as e:
                self.lost = e
                if self.on_lost is not None:
                    self.on_lost(e)
                raise
            self._last = time.monotonic()
            return reports

    def _beat(self, period: float) -> None:
        """Keep the waiting ranks inside the collective timeout while nothing is in flight."""
        while not self._closed.wait(period / 4):
            if time.monotonic() - self._last < period or self.lost is not None:
                continue
            try:
                self._exchange(Orders())  # run=False: no step, nothing delivered
            except ClusterLost:
                return


# ---------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The expert-parallel options of `dsv3 serve` and `dsv3 generate`."""
    group = parser.add_argument_group("expert parallelism (run under torchrun, one process per rank)")
    group.add_argument(
        "--ep",
        type=int,
        default=None,
        help="ranks to serve over (= torchrun's processes): data-parallel attention, 1/ep of the routed "
        "experts per rank, an all-to-all in every MoE layer",
    )
    group.add_argument(
        "--redundant-experts",
        type=int,
        default=0,
        metavar="R",
        help="extra expert slots: E + R slots over the ranks, copies of the busiest experts placed by EPLB",
    )
    group.add_argument(
        "--fp8-dispatch",
        action="store_true",
        help="send the dispatched activations as E4M3 codes + one scale per 128 channels (as in training); "
        "the combine stays in the compute dtype",
    )
    group.add_argument(
        "--ep-overlap",
        action="store_true",
        help="two micro-batches per decode step, one's all-to-alls hidden behind the other's compute",
    )
    group.add_argument(
        "--eplb-interval",
        type=float,
        default=None,
        metavar="S",
        help="every S seconds re-place the experts from the loads measured since, moving weights between "
        "ranks while serving (default: never)",
    )


def check_layout(args: argparse.Namespace, cfg) -> None:
    """ConfigError unless --ep is the world torchrun started and divides the routed experts, and
    the E + R expert slots split over the ranks (checked from the environment and config.json,
    before any process group or weights)."""
    from dsv3.errors import ConfigError
    from dsv3.parallel.eplb_live import check_redundant_experts
    from dsv3.parallel.expert_parallel import check_expert_parallel_layout
    from dsv3.parallel.world import World

    ep, world = args.ep, World.expected_size()
    if ep < 1:
        raise ConfigError(f"--ep {ep}: must be the number of ranks, >= 1")
    if ep != world:
        raise ConfigError(
            f"--ep {ep}: the world has {world} process(es); expert-parallel serving uses every rank: "
            f"run `torchrun --nproc-per-node {ep} -m dsv3 ... --ep {ep}`"
        )
    try:
        check_expert_parallel_layout(cfg.n_routed_experts, cfg.n_group, ep, None)
    except ValueError as e:
        raise ConfigError(f"--ep {ep}: {e}") from None
    try:
        check_redundant_experts(cfg.n_routed_experts, args.redundant_experts, ep)
    except ConfigError as e:
        raise ConfigError(f"--redundant-experts {args.redundant_experts}: {e}") from None
    if args.eplb_interval is not None and not args.eplb_interval > 0:
        raise ConfigError(f"--eplb-interval {args.eplb_interval}: must be a number of seconds > 0")
    if getattr(args, "compile", False):
        raise ConfigError("--compile: the compiled decode step is single-process; drop it with --ep")
    if getattr(args, "weights", "auto") == "fp8":
        raise ConfigError(
            "--weights fp8: FP8-resident experts are single-process; with --ep the weights are "
            "loaded in --dtype (an FP8 checkpoint is dequantized): drop --weights fp8"
        )


@dataclass
class RankSetup:
    """What `start` builds on each rank."""

    engine: LockstepEngine
    tokenizer: object  # ChatTokenizer
    group: dist.ProcessGroup | None  # the control plane (gloo); None: the default group is gloo
    balancer: LiveBalancer


def start(args: argparse.Namespace, **engine_kwargs) -> RankSetup:
    """This rank's engine, from the command line: the layout checked first, then the process
    group joined, the dtype measured on rank 0 and shared, the checkpoint loaded and the experts
    of this rank's slots kept (the training layout, or EPLB's with --redundant-experts)."""
    from dsv3.config import ModelConfig
    from dsv3.device import choose_dtype, gemm_shapes, measure_decode_gemms
    from dsv3.hf import load_pretrained, resolve_model_folder
    from dsv3.infer.chat import ChatTokenizer
    from dsv3.parallel.eplb_live import apply_expert_placement, initial_placement, moe_layers
    from dsv3.parallel.world import World

    folder = resolve_model_folder(args.checkpoint)
    cfg = ModelConfig.from_hf(folder)
    check_layout(args, cfg)
    tok = ChatTokenizer.from_folder(folder, cfg.vocab_size, getattr(args, "tokenizer", None))
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    world = World.join(device)
    group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    shapes = gemm_shapes(cfg, tokens=engine_kwargs.get("max_batch_size", 8))
    choice = world.on_rank0(choose_dtype, args.dtype, shapes, device, None, measure_decode_gemms)
    if world.is_main:
        slots = cfg.n_routed_experts + args.redundant_experts
        print(
            f"dtype: {choice.describe()}; expert parallelism over {world.size} ranks, {slots // world.size} "
            f"expert slots each",
            file=sys.stderr,
            flush=True,
        )
    named = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(getattr(args, "weights", "auto"))
    model = load_pretrained(folder, world.device, named or choice.dtype)  # an FP8 checkpoint dequantized
    placement = initial_placement(
        len(moe_layers(model)), cfg.n_routed_experts, args.redundant_experts, cfg.n_group, world.size
    )
    apply_expert_placement(model, dist.group.WORLD, placement, fp8_dispatch=args.fp8_dispatch)
    balancer = LiveBalancer(model, dist.group.WORLD, placement)
    engine = LockstepEngine(
        model,
        group=group,
        overlap=args.ep_overlap,
        decode=tok.decode,
        eos_token_id=tok.eos_id,
        **engine_kwargs,
    )
    return RankSetup(engine, tok, group, balancer)


def _work(setup: RankSetup) -> int:
    """A rank > 0 under the CLI: serve rank 0's orders; 0 when told to stop, 1 if the group broke.
    SIGINT/SIGTERM are left to rank 0, which drains and then sends the stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        run_worker(setup.engine, setup.group, setup.balancer)
    except ClusterLost as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def _user_error(e: Exception) -> int:
    if int(os.environ.get("RANK", "0")) == 0:  # every rank finds the same problem: say it once
        print(f"error: {e}", file=sys.stderr, flush=True)
    return 2


def serve(args: argparse.Namespace) -> int:
    """`dsv3 serve --ep N` on every rank: rank 0 serves HTTP over a ClusterFront, the others work."""
    from pathlib import Path

    from dsv3.errors import UserError
    from dsv3.infer import server
    from dsv3.infer.chat import ChatError

    try:
        limits, api_key = server.check_args(args)
        setup = start(
            args,
            mtp=args.mtp,
            mtp_drafts=args.mtp_drafts,
            prefill_chunk=args.prefill_chunk,
            **server.serving_options(args),
        )
    except (UserError, ChatError, ValueError) as e:
        return _user_error(e)
    if dist.get_rank() > 0:
        return _work(setup)
    if not log.handlers:  # the EPLB lines go to stderr beside uvicorn's
        log.addHandler(logging.StreamHandler())
        log.setLevel(logging.INFO)
    front = _front(setup, args, on_lost=lambda e: os.kill(os.getpid(), signal.SIGTERM))
    name = args.model_name or Path(args.checkpoint).resolve().name
    status = server.serve_app(
        server.create_app(front, setup.tokenizer, name, limits, api_key), args, name, front
    )
    return _finish(front, status)


def generate(args: argparse.Namespace) -> int:
    """`dsv3 generate --ep N` on every rank: rank 0 prompts or chats, the others work."""
    from dsv3.errors import UserError
    from dsv3.infer import cli
    from dsv3.infer.chat import ChatError

    params = cli.sampling_params(args)
    try:
        params.validate()
        setup = start(
            args, mtp=args.mtp, mtp_drafts=args.mtp_drafts, max_batch_size=1, prefill_chunk=args.prefill_chunk
        )
    except (UserError, ChatError, ValueError) as e:
        return _user_error(e)
    if dist.get_rank() > 0:
        return _work(setup)
    front = _front(setup, args)
    try:
        status = cli.respond(front, setup.tokenizer, args, params)
    except ClusterLost:
        status = 1
    return _finish(front, status)


def _front(setup: RankSetup, args: argparse.Namespace, **kwargs) -> ClusterFront:
    return ClusterFront(
        setup.engine, setup.group, balancer=setup.balancer, eplb_interval_s=args.eplb_interval, **kwargs
    )


def _finish(front: ClusterFront, status: int) -> int:
    """Stop the other ranks; status 1 with the reason if the group broke."""
    front.close()
    if front.lost is not None:
        print(f"error: {front.lost}", file=sys.stderr, flush=True)
        return 1
    return status
