"""FP8-resident weights against FP32 and BF16 weights: peak memory and decode tokens/s.

The `small` preset with random weights is written once as DeepSeek's FP8 release format
(`hf.save_pretrained(fp8=True)`), then served by the Engine three ways, each in its own process:

    fp32  weights dequantized at load to FP32        (Engine.from_pretrained(weights="fp32"))
    bf16  weights dequantized at load to BF16        (weights="bf16")
    fp8   E4M3 codes + 128x128 scales kept resident, dequantized per GEMM to BF16
          (weights="fp8", dtype=bfloat16; the rest of the model in BF16)

Memory: each process reports its peak resident set (VmHWM; see `peak_rss_mib`) after loading, before any
forward, and again at the end, besides the bytes of the model's parameters and buffers; a
process that only imports torch and dsv3 gives the baseline that is subtracted. Speed: greedy
decode at batch 1 and 8 (prompts of --prompt tokens, prefilled first), timed in windows of
--steps engine steps that alternate between the two batch sizes; tokens/s are medians over the
windows of all repeats, and the processes of the variants are interleaved across --repeats.
The fp8 process also pays torch.compile's start (the dequantization is compiled,
dsv3.fp8.quant), which shows in its final peak.

    python benchmarks/fp8_resident.py [--repeats 2 --windows 3 --steps 8 --threads 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save_result  # noqa: E402
from dsv3 import ModelConfig, Transformer  # noqa: E402
from dsv3 import hf as hf_io  # noqa: E402
from dsv3.device import cpu_model  # noqa: E402

VARIANTS = {"fp32": ("fp32", None), "bf16": ("bf16", None), "fp8": ("fp8", "bfloat16")}
SHOWN_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def peak_rss_mib() -> float:
    """This process's peak resident set in MiB: VmHWM, the high-water mark of its own address
    space. (Linux keeps getrusage's ru_maxrss across execve, so a child would report at least its
    parent's peak at fork; ru_maxrss is the fallback where /proc is missing.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [f for f in SHOWN_FLAGS if f in present]
    except OSError:
        pass
    return []


# ---------------------------------------------------------------------------------- one process
def run_variant(
    variant: str, folder: Path, batches: list[int], prompt: int, steps: int, windows: int
) -> dict:
    """Load `folder` as `variant`, then decode; returns memory and per-window tokens/s."""
    from dsv3.infer.engine import Engine, SamplingParams

    weights, dtype = VARIANTS[variant]
    started = time.perf_counter()
    model = hf_io.load_pretrained(folder, dtype=dtype and getattr(torch, dtype), weights=weights).eval()
    load_s = time.perf_counter() - started
    gc.collect()
    result = {
        "load_s": load_s,
        "peak_rss_after_load_mib": peak_rss_mib(),
        "model_bytes": sum(t.nbytes for t in [*model.parameters(), *model.buffers()]),
        "tokens_per_s": {b: [] for b in batches},
    }
    max_seq_len = prompt + steps * (windows + 1) + 2
    gen = torch.Generator().manual_seed(0)
    engines = {}
    for b in batches:
        engine = Engine(model, max_batch_size=b, max_seq_len=max_seq_len)
        params = SamplingParams(max_tokens=max_seq_len - prompt, temperature=0, ignore_eos=True)
        for _ in range(b):
            engine.add_request(
                torch.randint(0, model.cfg.vocab_size, (prompt,), generator=gen).tolist(), params
            )
        engine.step()  # prefill every sequence, first tokens
        for _ in range(steps):  # warm-up window (compilation, allocator)
            engine.step()
        engines[b] = engine
    for _ in range(windows):
        for b, engine in engines.items():
            t = time.perf_counter()
            for _ in range(steps):
                engine.step()
            result["tokens_per_s"][b].append(b * steps / (time.perf_counter() - t))
    result["peak_rss_end_mib"] = peak_rss_mib()
    return result


def run_in_subprocess(variant: str, args: argparse.Namespace, folder: Path) -> dict:
    options = {
        "--child": variant,
        "--folder": folder,
        "--prompt": args.prompt,
        "--steps": args.steps,
        "--threads": args.threads,
        "--windows": args.windows,
    }
    cmd = [sys.executable, __file__, *(str(x) for kv in options.items() for x in kv), "--batches"]
    cmd += [str(b) for b in args.batches]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- the run
def write_checkpoint(folder: Path) -> ModelConfig:
    from dsv3.fp8.quant import eager

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("small")
    with eager():  # the same codes; no compilation for a one-off quantization
        hf_io.save_pretrained(Transformer(cfg).eval(), folder, fp8=True)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="processes per variant, interleaved")
    ap.add_argument("--windows", type=int, default=3, help="timed windows per batch size per process")
    ap.add_argument("--steps", type=int, default=8, help="engine steps per window")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--child", choices=[*VARIANTS, "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "baseline":
        print(json.dumps({"peak_rss_mib": peak_rss_mib()}))
        return
    if args.child:
        torch.set_num_threads(args.threads)
        print(
            json.dumps(
                run_variant(args.child, args.folder, args.batches, args.prompt, args.steps, args.windows)
            )
        )
        return

    flags = cpu_flags()
    shown = " ".join(flags) or f"none of {SHOWN_FLAGS}"
    print(f"CPU: {cpu_model()}; {os.cpu_count()} cores; flags: {shown}; torch {torch.__version__}")
    print(
        f"note: the cores are shared with other work during this run: speeds are rough ({args.threads} thread)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "small-fp8"
        cfg = write_checkpoint(folder)
        disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(f"small preset, random weights, FP8 checkpoint {disk / 2**20:.0f} MiB")
        runs: dict[str, list[dict]] = {v: [] for v in [*VARIANTS, "baseline"]}
        for r in range(args.repeats):
            order = list(VARIANTS)[r % len(VARIANTS) :] + list(VARIANTS)[: r % len(VARIANTS)]
            for variant in ["baseline", *order]:
                runs[variant].append(run_in_subprocess(variant, args, folder))
                print(f"  repeat {r + 1}/{args.repeats}: {variant} done", flush=True)
    baseline = statistics.median(x["peak_rss_mib"] for x in runs["baseline"])
    rows = {v: summarize(runs[v], baseline, args.batches) for v in VARIANTS}
    print(
        f"\npeak RSS above the import baseline ({baseline:.0f} MiB); tokens/s: medians of "
        f"{args.repeats} processes x {args.windows} windows x {args.steps} steps per batch size"
    )
    columns = ["model_mib", "peak_rss_after_load_mib", "peak_rss_end_mib", "load_s"]
    columns += [f"tokens_per_s_b{b}" for b in args.batches]
    print(f"{'weights':8s}" + "".join(f" {c:>24s}" for c in columns))
    for variant, row in rows.items():
        print(f"{variant:8s}" + "".join(f" {row[c]:24.1f}" for c in columns))
    ratios = {f"fp8/{ref}": {c: rows["fp8"][c] / rows[ref][c] for c in columns} for ref in ("fp32", "bf16")}
    for name, ratio in ratios.items():
        print(f"{name}: " + ", ".join(f"{c} {v:.2f}x" for c, v in ratio.items()))
    path = save_result(
        "fp8_resident",
        {
            "command": " ".join(["python benchmarks/fp8_resident.py", *sys.argv[1:]]),
            "note": "2 CPU cores shared with other work during the run: speeds are rough",
            "cpu_model": cpu_model(),
            "cpu_flags": flags,
            "preset": "small",
            "config": cfg.to_dict(),
            "checkpoint_mib": disk / 2**20,
            "baseline_rss_mib": baseline,
            "args": vars(args) | {"folder": None},
            "variants": {v: {"weights": w, "dtype": d or w} for v, (w, d) in VARIANTS.items()},
            "rows": rows,
            "ratios": ratios,
        },
    )
    print(f"wrote {path}")


def summarize(runs: list[dict], baseline_mib: float, batches: list[int]) -> dict:
    """Medians over a variant's processes (memory above the baseline) and over all its windows."""
    windows = {b: [t for run in runs for t in run["tokens_per_s"][str(b)]] for b in batches}
    return {
        "model_mib": runs[0]["model_bytes"] / 2**20,
        "peak_rss_after_load_mib": statistics.median(r["peak_rss_after_load_mib"] for r in runs)
        - baseline_mib,
        "peak_rss_end_mib": statistics.median(r["peak_rss_end_mib"] for r in runs) - baseline_mib,
        "load_s": statistics.median(r["load_s"] for r in runs),
        **{f"tokens_per_s_b{b}": statistics.median(w) for b, w in windows.items()},
        "windows": windows,
    }


if __name__ == "__main__":
    main()
