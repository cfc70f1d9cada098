"""Scaling out: training tokens/s against the number of ranks, and the time spent in all-to-all.

Weak scaling of the tiny preset (shrunk with --layers) under expert parallelism: every rank keeps
the same per-rank batch, the experts are split over all ranks (ep = dp_shard = ranks, dense parts
FSDP-sharded), so ideal scaling is tokens/s proportional to the ranks. Each step's wall time is
split into the EP all-to-alls (dispatch and combine, forward and backward; every call to
torch.distributed.all_to_all_single timed) and the rest (compute, FSDP all-gathers and
reduce-scatters, the optimizer).

    python benchmarks/scaling.py                       # CPU: gloo, 1/2/4 processes, 1 thread each
    torchrun --nproc-per-node 8 benchmarks/scaling.py --device cuda --layers 4 --batch 8 --seq 512
        # GPUs: one run per world size (NCCL); rows are appended to the results file

On CPU the processes share the machine's cores, so the numbers measure the software overhead of
the parallel layout more than a real cluster's scaling; on GPUs (NCCL, one GPU per process) the
same script measures the real thing. Results: benchmarks/results/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "distributed"))  # the gloo/nccl launcher


def run_rank(rank: int, world: int, args: dict) -> dict:
    import torch.distributed as dist

    from dsv3.config import ModelConfig
    from dsv3.model.transformer import Transformer
    from dsv3.parallel.mesh import ParallelDims, build_mesh
    from dsv3.parallel.parallelize import parallelize, reference_weights

    device = torch.device(f"cuda:{rank}" if args["device"] == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    cfg = ModelConfig.from_preset("tiny", num_hidden_layers=args["layers"])
    dims = ParallelDims(ep=world).resolve(world)
    dims.validate(cfg)
    mesh = build_mesh(dims, device.type)
    with torch.device("meta"):
        model = Transformer(cfg)
    pm = parallelize(model, dims, mesh, device=device, init=reference_weights(cfg, 0))
    net = pm.modules[0]
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    a2a_seconds = [0.0]
    original = dist.all_to_all_single

    def timed(*a, **kw):
        sync()
        start = time.perf_counter()
        out = original(*a, **kw)
        sync()
        a2a_seconds[0] += time.perf_counter() - start
        return out

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    dist.all_to_all_single = timed
    gen = torch.Generator().manual_seed(rank)
    steps, a2a = [], []
    for i in range(args["warmup"] + args["steps"]):
        x = torch.randint(0, cfg.vocab_size, (args["batch"], args["seq"] + 1), generator=gen).to(device)
        dist.barrier()
        sync()
        a2a_seconds[0] = 0.0
        start = time.perf_counter()
        out = net(x[:, :-1], labels=x[:, 1:])
        (out.loss + 0.3 * out.mtp_loss + out.balance_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= args["warmup"]:
            steps.append(time.perf_counter() - start)
            a2a.append(a2a_seconds[0])
    dist.all_to_all_single = original
    return {"step_s": steps, "a2a_s": a2a}


def main() -> None:
    from _launch import run_distributed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--layers", type=int, default=2, help="tiny preset with this many layers")
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    args = vars(parser.parse_args())
    if "WORLD_SIZE" in os.environ:  # under torchrun (GPUs): this world size only
        import torch.distributed as dist

        dist.init_process_group("nccl" if args["device"] == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        per_rank = [None] * world
        dist.all_gather_object(per_rank, run_rank(int(os.environ.get("LOCAL_RANK", rank)), world, args))
        dist.destroy_process_group()
        if rank == 0:
            report(args, [summarize(args, world, per_rank)], append=True)
        return
    if args["device"] == "cuda":
        parser.error("--device cuda runs under torchrun (one process per GPU), see the module docstring")
    report(args, [summarize(args, world, run_distributed(run_rank, world, args)) for world in args["ranks"]])


def summarize(args: dict, world: int, per_rank: list[dict]) -> dict:
    # a step ends when the slowest rank ends: the max over ranks, then the median over steps
    step = statistics.median(max(r["step_s"][i] for r in per_rank) for i in range(args["steps"]))
    a2a = statistics.median(max(r["a2a_s"][i] for r in per_rank) for i in range(args["steps"]))
    tokens = world * args["batch"] * args["seq"]
    return {
        "device": args["device"],
        "ranks": world,
        "ep": world,
        "step_s": step,
        "tokens_per_s": tokens / step,
        "all_to_all_s": a2a,
        "all_to_all_fraction": a2a / step,
        "other_s": step - a2a,
    }


def report(args: dict, rows: list[dict], append: bool = False) -> None:
    from common import RESULTS, save_result

    if append and (RESULTS / "scaling.json").is_file():
        old = json.loads((RESULTS / "scaling.json").read_text())["rows"]
        rows = [r for r in old if r.get("device") == args["device"] and r["ranks"] != rows[0]["ranks"]] + rows
    rows.sort(key=lambda r: r["ranks"])
    base = rows[0]["tokens_per_s"] / rows[0]["ranks"]
    print(
        f"{'ranks':>5} {'tokens/s':>10} {'speed-up':>9} {'efficiency':>10} {'step ms':>8} {'all-to-all ms':>14} {'a2a %':>6}"
    )
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
        r["efficiency"] = r["tokens_per_s"] / (base * r["ranks"])
        print(
            f"{r['ranks']:>5} {r['tokens_per_s']:>10,.0f} {r['speedup']:>8.2f}x {100 * r['efficiency']:>9.0f}% "
            f"{1e3 * r['step_s']:>8.1f} {1e3 * r['all_to_all_s']:>14.1f} {100 * r['all_to_all_fraction']:>5.1f}%"
        )
    path = save_result("scaling", {"config": args, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
