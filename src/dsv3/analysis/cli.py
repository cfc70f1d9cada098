"""`dsv3 analyze`: the co-design analyzer on the command line.

    dsv3 analyze paper [--json | --markdown] [--plots DIR]    every ISCA section-5 table vs the paper
    dsv3 analyze kv-cache --config v3-671b --vs qwen2.5-72b [--dtype bf16] [--plot kv.png]
    dsv3 analyze flops --config path/to/config.json [--seq-len 4096] [--context 4096]
    dsv3 analyze inference-limit --hardware H800 [--link scale-out] [--batch 32 --context 4096]
    dsv3 analyze network [--radix 64] [--experts 256 --nodes 8 --top-k 8 --max-nodes 4]
    dsv3 analyze memory --config v3-671b --pp 16 --ep 64 --dp 128 [--recompute] [--hardware H800]
    dsv3 analyze deployment --config v3-671b --hardware H800 --ep 320 --redundant-experts 64

--config takes a preset (tiny, small, v2-lite, v3-671b), a bundled reference model
(deepseek-v3, deepseek-v2, qwen2.5-72b, llama-3.1-405b, llama-3.1-8b, mixtral-8x7b) or a
Hugging Face config.json (or its folder). --hardware takes a catalog name or "cpu" (measured);
--hardware-file adds entries. JSON schemas are documented in `dsv3.analysis.report`.

Bad input (an unknown model or accelerator, a malformed config.json, an out-of-range figure) is
reported as `error: <what is wrong>` on one line, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

DEFAULT_MODEL = "v3-671b"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")

    def command(name: str, help_text: str, plot: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        out = p.add_mutually_exclusive_group()
        out.add_argument("--json", action="store_true", help="print JSON (schema in dsv3.analysis.report)")
        out.add_argument("--markdown", action="store_true", help="print Markdown tables")
        p.add_argument("--hardware-file", help='JSON file with extra accelerators: {"accelerators": [...]}')
        if plot:
            p.add_argument("--plot", metavar="PNG", help="also write a plot to this PNG file")
        return p

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default=DEFAULT_MODEL, help="preset, reference model or config.json")

    p = command(
        "paper", "every table of ISCA 2025 section 5 recomputed beside the printed values", plot=False
    )
    p.add_argument("--plots", metavar="DIR", help="write the three plots (KV cache, TPOT, network cost) here")

    for name, help_text in (
        ("kv-cache", "KV cache bytes per token and per sequence"),
        ("flops", "FLOPs per token"),
    ):
        p = command(name, help_text)
        model_args(p)
        p.add_argument(
            "--vs", action="append", default=[], metavar="MODEL", help="add a model to compare (repeatable)"
        )
        p.add_argument("--dtype", default="bf16", help="KV cache dtype: fp32, bf16, fp16, fp8, int8")
        p.add_argument("--seq-len", type=int, default=4096, help="training sequence length")
        p.add_argument("--context", type=int, help="decode context for inference FLOPs (default: seq len)")

    p = command("inference-limit", "expert-parallel decode limit (ISCA 2.3.2) and decode roofline")
    model_args(p)
    p.add_argument("--hardware", default="H800", help="catalog accelerator, or 'cpu' to measure this machine")
    p.add_argument(
        "--link",
        choices=("scale-out", "scale-up"),
        default="scale-out",
        help="all-to-all over the NICs (across nodes) or the scale-up fabric (NVLink domain)",
    )
    p.add_argument("--bandwidth", type=float, help="override the per-device bandwidth, GB/s")
    p.add_argument("--tokens-per-device", type=int, default=32)
    p.add_argument("--micro-batches", type=int, default=2, help="overlapped micro-batches (1: no overlap)")
    p.add_argument(
        "--latency-us", type=float, default=0.0, help="latency per all-to-all (Table 5: IB 2.8-3.7)"
    )
    p.add_argument("--compute-us", type=float, default=0.0, help="compute per layer per micro-batch")
    p.add_argument("--mtp-acceptance", type=float, default=0.0, help="MTP draft acceptance (paper: 0.8-0.9)")
    p.add_argument("--dispatch-bytes", type=float, default=1.0, help="bytes per value dispatched (FP8: 1)")
    p.add_argument("--combine-bytes", type=float, default=2.0, help="bytes per value combined (BF16: 2)")
    p.add_argument("--batch", type=int, default=32, help="roofline: sequences decoded together")
    p.add_argument("--context", type=int, default=4096, help="roofline: cached tokens per sequence")
    p.add_argument("--devices", type=int, default=1, help="roofline: devices sharing the model")
    p.add_argument("--weight-dtype", default="bf16", help="roofline: bf16 or fp8 weights")

    p = command(
        "deployment", "expert-parallel serving: memory and traffic per rank, EP decode limit", plot=False
    )
    model_args(p)
    p.add_argument("--hardware", default="H800", help="catalog accelerator, or 'cpu' to measure this machine")
    p.add_argument("--ep", type=int, default=32, help="expert-parallel ranks")
    p.add_argument("--redundant-experts", type=int, default=0, help="extra expert slots (EPLB copies)")
    p.add_argument("--weight-dtype", default="fp8", help="fp8 (embeddings BF16), bf16 or fp32")
    p.add_argument("--cache-dtype", default="bf16", help="latent cache: fp32, bf16 or fp8")
    p.add_argument("--no-mtp", dest="mtp", action="store_false", help="without the MTP module (its layer)")
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence for the cache budget")
    p.add_argument("--tokens-per-rank", type=int, default=32, help="tokens each rank decodes per step")
    p.add_argument("--link", choices=("scale-out", "scale-up"), default="scale-out")
    p.add_argument("--bandwidth", type=float, help="override the per-rank bandwidth, GB/s")
    p.add_argument("--dispatch-bytes", type=float, default=1.0, help="bytes per value dispatched (FP8: 1)")
    p.add_argument("--combine-bytes", type=float, default=2.0, help="bytes per value combined (BF16: 2)")
    p.add_argument("--memory-reserve", type=float, default=0.1, help="fraction of HBM kept for activations")
    p.add_argument("--latency-us", type=float, default=0.0, help="latency per all-to-all")
    p.add_argument(
        "--compute-us", type=float, help="a MoE layer's compute for the rank's tokens (default: roofline)"
    )
    p.add_argument("--mtp-acceptance", type=float, default=0.0, help="MTP draft acceptance (paper: 0.8-0.9)")

    p = command("network", "topology sizes and costs; node-limited routing traffic")
    p.add_argument("--radix", type=int, default=64, help="switch ports")
    p.add_argument("--planes", type=int, default=8, help="planes of the multi-plane fat tree")
    p.add_argument("--dragonfly-groups", type=int, help="default: the maximum a*h+1")
    p.add_argument("--switch-price", type=float, default=83_000.0)
    p.add_argument("--link-price", type=float, default=504.0)
    p.add_argument("--experts", type=int, default=256, help="routed experts")
    p.add_argument("--nodes", type=int, default=8, help="nodes the experts are spread over")
    p.add_argument("--top-k", type=int, default=8, help="routed experts per token")
    p.add_argument("--max-nodes", type=int, default=4, help="node limit M of the routing")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--dispatch-bytes", type=float, default=1.0)

    p = command("memory", "training memory per GPU for a parallel layout", plot=False)
    model_args(p)
    for flag, default in (
        ("--tp", 1),
        ("--pp", 1),
        ("--ep", 1),
        ("--dp", 1),
        ("--zero", 1),
        ("--micro-batch", 1),
    ):
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--recompute", action="store_true", help="full per-layer activation recomputation")
    p.add_argument("--hardware", help="compare with this accelerator's memory")


def run(args: argparse.Namespace) -> int:
    from dsv3.analysis import hardware
    from dsv3.errors import UserError

    try:
        catalog = hardware.load_catalog(args.hardware_file)
        handler = HANDLERS[args.analysis]
        tables, payload, plots = handler(args, catalog)
    except UserError as e:  # ConfigError, HardwareError, LimitError, NetworkError
        print(f"error: {e}", file=sys.stderr)
        return 2
    _emit(args, tables, payload)
    for path in plots:
        print(f"wrote {path}", file=sys.stderr)
    return 1 if payload.get("all_ok") is False else 0


def _emit(args: argparse.Namespace, tables: list, payload: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(payload, indent=2))
    elif args.markdown:
        print("\n".join(t.to_markdown() for t in tables))
    else:
        from rich.console import Console

        console = Console()
        if not console.is_terminal:  # pipes and files: wide enough for the paper table
            console = Console(width=200)
        for t in tables:
            console.print(t.to_rich())


# ---------------------------------------------------------------------------------- handlers
def _paper(args, catalog):
    from pathlib import Path

    from dsv3.analysis import costs, hardware, report

    rows = report.paper_comparisons(hardware.load_catalog())  # the paper's inputs: the built-in catalog
    payload = {"rows": [r.to_dict() for r in rows], "all_ok": all(r.status != "MISMATCH" for r in rows)}
    plots = []
    if args.plots:
        out = Path(args.plots)
        archs = [costs.load_architecture(n) for n in report.TABLE1]
        v3 = costs.load_architecture("deepseek-v3")
        marks = {"H800 IB": 50.0, "NVL72": 900.0}
        plots = [
            report.plot_kv_cache(archs, out / "kv_cache.png"),
            report.plot_tpot_vs_bandwidth(v3, out / "tpot_vs_bandwidth.png", marks),
            report.plot_cost_per_endpoint(out / "cost_per_endpoint.png", 83_000.0, 504.0),
        ]
    return [report.paper_table(rows)], payload, plots


def _summaries(args) -> tuple[list, list[dict[str, Any]]]:
    from dsv3.analysis import costs, report

    archs = [costs.load_architecture(m) for m in [args.config, *args.vs]]
    return archs, [report.model_summary(a, args.dtype, args.seq_len, args.context) for a in archs]


def _model_payload(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    payload = dict(summaries[0])
    if len(summaries) > 1:
        payload["compared"] = summaries[1:]
    return payload


def _kv_cache(args, catalog):
    from dsv3.analysis import report

    archs, summaries = _summaries(args)
    plots = [report.plot_kv_cache(archs, args.plot, args.dtype)] if args.plot else []
    return (
        [report.kv_cache_table(summaries), report.params_table(summaries[0])],
        _model_payload(summaries),
        plots,
    )


def _flops(args, catalog):
    from dsv3.analysis import report

    _, summaries = _summaries(args)
    return [report.flops_table(summaries), report.params_table(summaries[0])], _model_payload(summaries), []


def _inference_limit(args, catalog):
    from dsv3.analysis import costs, hardware, limits, report

    arch = costs.load_architecture(args.config)
    hw = hardware.resolve(args.hardware, catalog)
    links = {"scale-out": hw.scaleout_gbps, "scale-up": hw.scaleup_gbps}
    bandwidth = args.bandwidth if args.bandwidth is not None else links[args.link]
    options = {
        "tokens_per_device": args.tokens_per_device,
        "micro_batches": args.micro_batches,
        "latency_us": args.latency_us,
        "compute_us": args.compute_us,
        "mtp_acceptance": args.mtp_acceptance,
        "dispatch_bytes": args.dispatch_bytes,
        "combine_bytes": args.combine_bytes,
    }
    tables, payload = [], {"model": arch.name, "hardware": hw.name, "bandwidth_gbps": bandwidth}
    if arch.moe is not None:
        lim = limits.ep_decode_limit_for(arch, bandwidth, **options)
        tables.append(report.ep_limit_table({f"{hw.name} {args.link} {bandwidth:g} GB/s": lim}))
        payload["ep_decode_limit"] = asdict(lim)
    roof = limits.decode_roofline(arch, hw, args.batch, args.context, args.weight_dtype, devices=args.devices)
    tables.append(
        report.roofline_table(f"{arch.name} @ {args.devices} x {hw.name}", roof, args.batch, args.context)
    )
    payload["decode_roofline"] = {**asdict(roof), "step_ms": roof.step_ms, "bound": roof.bound}
    plots = []
    if args.plot and arch.moe is not None:
        marks = {f"{n} {args.link}": links[args.link] for n in (hw.name,) if links[args.link] > 0}
        plots = [report.plot_tpot_vs_bandwidth(arch, args.plot, marks, **options)]
    return tables, payload, plots


def _deployment(args, catalog):
    from dsv3.analysis import costs, deployment, hardware

    arch = costs.load_architecture(args.config)
    hw = hardware.resolve(args.hardware, catalog)
    links = {"scale-out": hw.scaleout_gbps, "scale-up": hw.scaleup_gbps}
    options = (
        "redundant_experts weight_dtype cache_dtype mtp context tokens_per_rank dispatch_bytes combine_bytes"
    )
    options += " memory_reserve latency_us compute_us mtp_acceptance"
    bandwidth = args.bandwidth if args.bandwidth is not None else links[args.link]
    d = deployment.deployment(
        arch, hw, args.ep, bandwidth_gbps=bandwidth, **{name: getattr(args, name) for name in options.split()}
    )
    payload = {**asdict(d), "weight_bytes": d.weight_bytes, "fits": d.fits}
    return deployment.deployment_tables(d), payload, []


def _network(args, catalog):
    from dsv3.analysis import network, report

    k = args.radix
    topos = [
        network.fat_tree2(k),
        network.multi_plane_fat_tree(k, args.planes),
        network.fat_tree3(k),
        network.slim_fly(k),
        network.dragonfly(k, args.dragonfly_groups),
    ]
    traffic = network.node_limited_traffic(args.experts, args.nodes, args.top_k, args.max_nodes)
    tables = [
        report.topology_table(topos, args.switch_price, args.link_price),
        report.traffic_table(traffic, args.hidden, args.dispatch_bytes),
    ]
    payload = {t.title: t.to_dict() for t in tables}
    plots = (
        [report.plot_cost_per_endpoint(args.plot, args.switch_price, args.link_price)] if args.plot else []
    )
    return tables, payload, plots


def _memory(args, catalog):
    from dsv3.analysis import costs, hardware, report

    arch = costs.load_architecture(args.config)
    layout = costs.ParallelLayout(
        tp=args.tp,
        pp=args.pp,
        ep=args.ep,
        dp=args.dp,
        zero=args.zero,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        recompute=args.recompute,
    )
    memory = costs.training_memory(arch, layout)
    hbm = hardware.resolve(args.hardware, catalog).hbm_gb if args.hardware else None
    table = report.memory_table(arch.name, memory, hbm)
    payload = {**asdict(memory), "total": memory.total, "layout": asdict(layout), "model": arch.name}
    return [table], payload, []


HANDLERS = {
    "paper": _paper,
    "kv-cache": _kv_cache,
    "flops": _flops,
    "inference-limit": _inference_limit,
    "network": _network,
    "memory": _memory,
    "deployment": _deployment,
}
