"""Expert-parallel serving: throughput over 1/2/4 ranks, all-to-all and overlap shares, per-rank
memory, EPLB balance, FP8 dispatch, prefill -> decode hand-off bytes.

    python benchmarks/ep_serving.py [--rounds 3] [--requests 16] [--tiny runs/demo/hf]

Each measurement runs under torchrun (gloo, one thread per rank) and reports rank 0's view:

  throughput  the `small` preset (random weights, float32), 16 concurrent requests (prompt 64,
              32 new tokens, greedy) served by a ClusterFront over ep = 1, 2, 4 ranks (each rank
              decodes its share; experts split), with and without two-micro-batch overlap;
              configurations interleaved round by round, medians reported. A second, profiled
              run gives the share of the step the compute thread spends blocked on all-to-alls
              and the fraction of the all-to-all time hidden (parallel/overlap.overlap_report).
              Per-rank RSS after the model is built (experts allocated only for the rank's slots).
              2 cores cannot run 4 ranks in parallel: more ranks means more processes sharing
              the same cores; the figures show the machinery's cost, not GPU scaling.
  eplb        the trained tiny model (16 experts) on 4 ranks with 4 redundant slots serving
              stdlib source; and the tiny preset with one expert's selection bias raised (in
              every top-k): max/mean rank load measured in a window of steps, re-placed, and
              measured again in the next window.
  fp8         the trained tiny model on 2 ranks, BF16: one forward over held-out text with FP8
              and with BF16 dispatch: dispatch bytes per row and the logits' error.
  handoff     (one process) PrefillEngine -> DecodeEngine over a socket on the trained tiny
              model: latent bytes per prompt token against the analyzer's figure.

The trained tiny model is runs/demo/hf (what `make run` writes), or --tiny.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from common import TRAINED_RUN, save_result  # noqa: E402

PROMPT, NEW = 64, 32


# ------------------------------------------------------------------------------ workers (torchrun)
def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _build(preset_or_dir: str, redundant: int, dtype=torch.float32, **ep):
    """(model with this rank's expert slots only, placement): a preset built on the meta device
    and initialized after slicing, or a trained folder loaded and sliced."""
    from dsv3 import ModelConfig, Transformer
    from dsv3.parallel.eplb_live import apply_expert_placement, initial_placement, moe_layers

    world = dist.get_world_size()
    if Path(preset_or_dir).is_dir():
        model = Transformer.from_pretrained(preset_or_dir, dtype=dtype)
    else:
        with torch.device("meta"):
            model = Transformer(ModelConfig.from_preset(preset_or_dir))
    cfg = model.cfg
    placement = initial_placement(len(moe_layers(model)), cfg.n_routed_experts, redundant, cfg.n_group, world)
    apply_expert_placement(model, dist.group.WORLD, placement, **ep)
    if model.embed_tokens.weight.is_meta:
        model.to_empty(device="cpu")
        model.init_weights(torch.Generator().manual_seed(0))  # the same replicated weights on every rank
        model.cast_(dtype)
    return model, placement


def _requests(n: int, vocab: int, seed: int = 0):
    from dsv3.infer.sampling import SamplingParams

    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    return [(torch.randint(2, vocab, (PROMPT,), generator=g).tolist(), params) for _ in range(n)]


def _serve(engine, requests, balancer=None, rebalance_at=()) -> dict:
    """Rank 0 serves `requests` (all at once) to the end over the group; the others work."""
    from dsv3.infer.distributed import ClusterFront, run_worker

    if dist.get_rank():
        run_worker(engine, balancer=balancer)
        return {}
    front = ClusterFront(engine, balancer=balancer)
    started = time.perf_counter()
    for prompt, params in requests:
        front.add_request(prompt, params)
    steps = tokens = 0
    while front.has_unfinished():
        if steps in rebalance_at:
            front.request_rebalance()
        tokens += sum(len(o.new_token_ids) for o in front.step())
        steps += 1
    elapsed = time.perf_counter() - started
    front.close()
    return {"seconds": elapsed, "tokens": tokens, "steps": steps, "tokens_per_s": tokens / elapsed}


def worker_throughput(args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from dsv3.infer.lockstep import LockstepEngine
    from dsv3.parallel.overlap import overlap_report

    model, _ = _build("small", 0)
    expert_mb = (
        sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n) / 2**20
    )
    rss = _rss_mb()
    reqs = _requests(args.requests, model.cfg.vocab_size)
    mine = len(reqs) // dist.get_world_size() + 1

    def engine():
        return LockstepEngine(model, max_batch_size=mine, max_seq_len=PROMPT + NEW + 2, overlap=args.overlap)

    _serve(engine(), reqs[: dist.get_world_size()])  # warm-up
    result = _serve(engine(), reqs)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled = _serve(engine(), reqs)
    report = overlap_report(prof.events())
    blocked = report["counts_us"] + report["dispatch_us"] + report["combine_us"]
    per_rank = [None] * dist.get_world_size()
    mine = {
        "rss_mb": rss,
        "expert_mb": expert_mb,
        "blocked_share": blocked / 1e6 / (profiled.get("seconds") or 1),
        **report,
    }
    dist.all_gather_object(per_rank, {**mine, "seconds": profiled.get("seconds")})
    seconds = per_rank[0]["seconds"]
    for r in per_rank:
        r["blocked_share"] = (r["counts_us"] + r["dispatch_us"] + r["combine_us"]) / 1e6 / seconds
        r.pop("seconds")
    return {**result, "per_rank": per_rank}


def worker_eplb(args) -> dict:
    """Windows of serving steps, re-placed between them; the history of re-placements."""
    from dsv3.infer.lockstep import LockstepEngine
    from dsv3.model.moe import named_routers
    from dsv3.parallel.eplb_live import LiveBalancer

    source = args.tiny if args.case == "trained" else "tiny"
    model, placement = _build(source, args.redundant)
    if args.case == "skewed":
        with torch.no_grad():
            for _, router in named_routers(model):
                router.e_score_correction_bias[-1] += 4.0  # the last expert in every top-k
    balancer = LiveBalancer(model, dist.group.WORLD, placement)
    if args.case == "trained":
        from tokenizers import Tokenizer

        from dsv3.infer.sampling import SamplingParams

        tok = Tokenizer.from_file(str(Path(args.tiny) / "tokenizer.json"))
        ids = tok.encode(Path(sysconfig.get_paths()["stdlib"], "argparse.py").read_text()).ids
        params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
        reqs = [(ids[i * PROMPT : (i + 1) * PROMPT], params) for i in range(args.requests)]
    else:
        reqs = _requests(args.requests, model.cfg.vocab_size)
    engine = LockstepEngine(model, max_batch_size=len(reqs), max_seq_len=PROMPT + NEW + 2)
    window = NEW // 3
    served = _serve(engine, reqs, balancer, rebalance_at=(window, 2 * window, 3 * window - 1))
    return {**served, "rebalances": [vars(h) for h in balancer.history]}


def worker_fp8(args) -> dict:
    """One forward over held-out text per rank, BF16 vs FP8 dispatch."""
    from tokenizers import Tokenizer

    from dsv3.parallel.expert_parallel import traffic_stats

    tok = Tokenizer.from_file(str(Path(args.tiny) / "tokenizer.json"))
    text = Path(sysconfig.get_paths()["stdlib"], "json", "decoder.py").read_text()
    ids = torch.tensor(tok.encode(text).ids[: 4 * 256]).view(4, 256)[dist.get_rank() :: dist.get_world_size()]
    out = {}
    for fp8 in (False, True):
        model, _ = _build(args.tiny, 0, dtype=torch.bfloat16, fp8_dispatch=fp8)
        with torch.no_grad():
            logits = model(ids).logits.float()
        stats = traffic_stats(model)
        out[fp8] = (
            logits,
            sum(s.dispatch_bytes for s in stats),
            sum(s.pairs_sent for s in stats),
            sum(s.combine_bytes for s in stats),
        )
    (ref, b16, p16, _), (got, b8, p8, c8) = out[False], out[True]
    return {
        "logits_rel_error": ((got - ref).norm() / ref.norm()).item(),
        "top1_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        "bf16_dispatch_bytes_per_row": b16 / p16,
        "fp8_dispatch_bytes_per_row": b8 / p8,
        "ratio": (b8 / p8) / (b16 / p16),
        "combine_bytes_per_row": c8 / p8,
    }


WORKERS = {"throughput": worker_throughput, "eplb": worker_eplb, "fp8": worker_fp8}


def run_worker(args) -> None:
    torch.set_num_threads(1)
    from dsv3.parallel.world import World

    World.join(torch.device("cpu"))
    result = WORKERS[args.worker](args)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def launch(n: int, worker: str, *extra: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(n),
            "--master-port",
            str(29500 + os.getpid() % 1000),
            __file__,
            "--worker",
            worker,
            "--out",
            str(out),
            *extra,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DSV3_FP8_COMPILE": "0"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{worker} on {n} ranks failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


# ------------------------------------------------------------------------------ one process
def handoff(tiny: str) -> dict:
    """Prefill -> decode over a socket pair; latent bytes per prompt token vs the analyzer."""
    import socket
    import threading

    from dsv3 import ModelConfig, Transformer
    from dsv3.analysis.costs import from_model_config
    from dsv3.analysis.deployment import cache_bytes_per_token
    from dsv3.infer.disaggregate import DecodeEngine, PrefillEngine, PrefillFront, run_decode_worker

    model = Transformer.from_pretrained(tiny).eval()
    arch = from_model_config(ModelConfig.from_hf(tiny), "tiny")
    rows = {}
    for cache in ("auto", "bf16", "fp8"):
        a, b = socket.socketpair()
        kw = dict(mtp=True, cache_dtype=cache, max_batch_size=16, max_seq_len=PROMPT + NEW + 2)
        decoder = DecodeEngine(model, **kw)
        worker = threading.Thread(target=run_decode_worker, args=(decoder, b))
        worker.start()
        front = PrefillFront(PrefillEngine(model, **kw), a)
        for prompt, params in _requests(16, model.cfg.vocab_size):
            front.add_request(prompt, params)
        while front.has_unfinished():
            front.step()
        s = front.stats()
        front.close()
        worker.join()
        analyzer_dtype = {"auto": "fp32", "bf16": "bf16", "fp8": "fp8"}[cache]
        rows[cache] = {
            "latent_bytes_per_token": s["handoff_bytes_per_token"],
            "analyzer_bytes_per_token": cache_bytes_per_token(arch, analyzer_dtype, mtp=True),
            "wire_bytes_per_token": s["handoff_wire_bytes"] / s["handed_off_prompt_tokens"],
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tiny", default=str(TRAINED_RUN / "hf"), help="the trained tiny model (HF folder)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "eplb", "fp8", "handoff"])
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--overlap", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=["trained", "skewed"], help=argparse.SUPPRESS)
    parser.add_argument("--redundant", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args)

    results: dict = {
        "requests": args.requests,
        "prompt_tokens": PROMPT,
        "new_tokens": NEW,
        "tiny_model": args.tiny,
    }
    if "throughput" not in args.skip:
        configs = [(1, False), (2, False), (4, False), (2, True), (4, True)]
        runs: dict = {f"ep{n}{'+overlap' if o else ''}": [] for n, o in configs}
        for r in range(args.rounds):
            for n, overlap in configs:  # interleaved: each round runs every configuration once
                name = f"ep{n}{'+overlap' if overlap else ''}"
                extra = ["--requests", str(args.requests)] + (["--overlap"] if overlap else [])
                runs[name].append(launch(n, "throughput", *extra))
                print(f"round {r + 1}: {name} {runs[name][-1]['tokens_per_s']:.1f} tokens/s", flush=True)
        results["throughput"] = {
            name: {
                "tokens_per_s_median": statistics.median(x["tokens_per_s"] for x in xs),
                "tokens_per_s": [x["tokens_per_s"] for x in xs],
                "per_rank_last_round": xs[-1]["per_rank"],
            }
            for name, xs in runs.items()
        }
    if "eplb" not in args.skip:
        results["eplb"] = {
            "trained_tiny_ep4_r4": launch(
                4,
                "eplb",
                "--case",
                "trained",
                "--tiny",
                args.tiny,
                "--redundant",
                "4",
                "--requests",
                str(args.requests),
            ),
            "skewed_tiny_ep4_r4": launch(
                4, "eplb", "--case", "skewed", "--redundant", "4", "--requests", str(args.requests)
            ),
        }
    if "fp8" not in args.skip:
        results["fp8_dispatch"] = launch(2, "fp8", "--tiny", args.tiny)
    if "handoff" not in args.skip:
        results["handoff"] = handoff(args.tiny)
    print(json.dumps({k: v for k, v in results.items()}, indent=1)[:6000])
    print(f"wrote {save_result('ep_serving', results)}")


if __name__ == "__main__":
    main()
