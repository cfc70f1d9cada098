"""Expert-parallel MoE layer on 2 and 4 processes: all-to-all time vs expert compute, FP8 vs BF16
dispatch bytes, and cross-node bytes with and without per-node deduplication.

One MoE layer of the `tiny` preset (H 256, 16 experts, top-4, 4 groups) in BF16, each rank
routing its own tokens. The ranks form 2 "nodes" (ranks_per_node = world / 2), so the 4 expert
groups map 2 per node; a second routing with one group per node and topk_group = 1 (M = 1) shows
the node limit at its strongest. Per forward pass the script times, with barriers between them:
dispatch (permutation, count exchange, token all-to-all), the grouped expert GEMMs, combine
(reverse all-to-all, weighted sum). Four dispatchers alternate iteration by iteration: BF16 or
FP8, one row per (token, expert) or once per (token, node) then a fan-out inside the node (two
hops). Bytes are the dispatcher's counters (buffers handed to the all-to-all), summed over ranks;
cross-node bytes are counted from the routing for the one-hop rows and measured on hop 1 for the
two-hop ones.

    python benchmarks/ep_dispatch.py [--tokens 2048] [--iters 7] [--worlds 2 4]

Launches itself with torchrun (gloo on CPU, NCCL on GPU); on a GPU machine run
`torchrun --nproc-per-node N benchmarks/ep_dispatch.py --worker` directly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from common import save_result  # noqa: E402
from dsv3 import ModelConfig  # noqa: E402
from dsv3.analysis.network import node_limited_traffic  # noqa: E402
from dsv3.model.moe import MoE  # noqa: E402
from dsv3.parallel.expert_parallel import apply_expert_parallel  # noqa: E402

PHASES = ("dispatch", "experts", "combine")


def build(cfg: ModelConfig, device: torch.device, **ep_kw) -> MoE:
    torch.manual_seed(0)  # the same weights on every rank, sliced by apply_expert_parallel
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    moe = moe.to(device, torch.bfloat16)
    moe.gate.float()  # the router stays FP32
    apply_expert_parallel(moe, dist.group.WORLD, **ep_kw)
    return moe


def timed_forward(moe: MoE, x: torch.Tensor) -> dict[str, float]:
    """One routed forward, phase by phase (the shared expert is not part of the comparison)."""
    times, sync = {}, (torch.cuda.synchronize if x.is_cuda else lambda: None)

    def mark(name, start):
        sync()
        dist.barrier()
        times[name] = time.perf_counter() - start
        return time.perf_counter()

    t = mark("start", time.perf_counter())
    route = moe.gate(x)
    x_sorted, offs, state = moe.dispatcher.dispatch(x, route.indices, moe.n_routed_experts)
    t = mark("dispatch", t)
    y = moe.experts(x_sorted, offs)
    t = mark("experts", t)
    moe.dispatcher.combine(y, route.weights, state)
    mark("combine", t)
    return times


def summed(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t)


def worker(args: argparse.Namespace) -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(1)
    rpn = max(1, world // 2)
    cfg = ModelConfig.from_preset("tiny")
    x = torch.randn(args.tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(rank))
    x = x.to(device, torch.bfloat16)
    models = {
        "bf16": build(cfg, device, ranks_per_node=rpn, node_dedup=False),
        "fp8": build(cfg, device, ranks_per_node=rpn, node_dedup=False, fp8_dispatch=True),
        "bf16 per node": build(cfg, device, ranks_per_node=rpn),  # two hops, once per node
        "fp8 per node": build(cfg, device, ranks_per_node=rpn, fp8_dispatch=True),
    }
    samples = {name: {p: [] for p in PHASES} for name in models}
    with torch.no_grad():
        for it in range(args.iters + 1):
            for name, moe in models.items():
                times = timed_forward(moe, x)
                if it:  # the first iteration warms up
                    for p in PHASES:
                        samples[name][p].append(times[p])
    per_call = args.iters + 1
    result = {"world_size": world, "ranks_per_node": rpn, "tokens_per_rank": args.tokens}
    for name, moe in models.items():
        s = moe.dispatcher.stats
        med = {p: statistics.median(v) * 1e3 for p, v in samples[name].items()}
        result[name] = {
            **{f"{p}_ms": round(v, 3) for p, v in med.items()},
            "a2a_share": round((med["dispatch"] + med["combine"]) / sum(med.values()), 3),
            "dispatch_bytes_per_call": summed(s.dispatch_bytes) // per_call,
            "combine_bytes_per_call": summed(s.combine_bytes) // per_call,
            "cross_node_bytes_per_call": summed(
                s.cross_node_bytes_dedup if "node" in name else s.cross_node_bytes
            )
            // per_call,
        }
    result["fp8_over_bf16_dispatch_bytes"] = (
        result["fp8"]["dispatch_bytes_per_call"] / result["bf16"]["dispatch_bytes_per_call"]
    )

    # node-limited routing: the preset (2 groups per node, topk_group 2) and one group per node, M = 1
    n_nodes = world // rpn
    routings = {
        "tiny (4 groups, topk_group 2)": cfg,
        "1 group per node, M=1": ModelConfig.from_preset("tiny", n_group=n_nodes, topk_group=1),
    }
    result["node_limited"] = []
    for label, c in routings.items():
        moe = build(c, device, ranks_per_node=rpn)
        with torch.no_grad():
            moe(x[None])
        s = moe.dispatcher.stats
        tokens = args.tokens * world
        row = c.hidden_size * 2
        dedup, per_expert = summed(s.cross_node_bytes_dedup), summed(s.cross_node_bytes)
        # the analyzer's expectation for uniform routing over M = min(topk_group, nodes) nodes
        expect = node_limited_traffic(
            c.n_routed_experts, n_nodes, c.num_experts_per_tok, min(c.topk_group, n_nodes)
        )
        result["node_limited"].append(
            {
                "routing": label,
                "cross_node_bytes_per_expert": per_expert,
                "cross_node_bytes_dedup": dedup,
                "reduction": round(per_expert / dedup, 3) if dedup else None,
                "copies_per_token": [round(per_expert / row / tokens, 3), round(dedup / row / tokens, 3)],
                "uniform_expectation": [round(expect.copies_per_expert, 3), round(expect.copies_per_node, 3)],
            }
        )
    if rank == 0:
        Path(args.out).write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--worker", action="store_true", help="run as one torchrun rank")
    ap.add_argument("--out", default="ep_dispatch_rank0.json")
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    runs = []
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={world}",
                __file__,
                "--worker",
                "--out",
                str(out),
                "--tokens",
                str(args.tokens),
                "--iters",
                str(args.iters),
            ]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            runs.append(json.loads(out.read_text()))

    print(f"MoE layer (tiny preset, BF16), {args.tokens} tokens per rank, median of {args.iters} forwards")
    print(
        "| ranks | dispatch | dispatch ms | experts ms | combine ms | all-to-all share | dispatch bytes | cross-node |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        for name in ("bf16", "fp8", "bf16 per node", "fp8 per node"):
            d = r[name]
            print(
                f"| {r['world_size']} | {name} | {d['dispatch_ms']:.2f} | {d['experts_ms']:.2f} | "
                f"{d['combine_ms']:.2f} | {d['a2a_share']:.0%} | {d['dispatch_bytes_per_call']:,} | "
                f"{d['cross_node_bytes_per_call']:,} |"
            )
    for r in runs:
        print(f"{r['world_size']} ranks: FP8 / BF16 dispatch bytes = {r['fp8_over_bf16_dispatch_bytes']:.6f}")
    print(
        "\n| ranks | routing | cross-node copies/token (per expert, per node) | uniform expectation | reduction |"
    )
    print("|---|---|---|---|---|")
    for r in runs:
        for n in r["node_limited"]:
            print(
                f"| {r['world_size']} | {n['routing']} | {n['copies_per_token']} | "
                f"{n['uniform_expectation']} | {n['reduction']}x |"
            )
    path = save_result("ep_dispatch", {"runs": runs, "args": vars(args)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
