"""Decode speed and memory: the dsv3 Engine against llama.cpp on the same checkpoint.

Both sides run the same weights, in F32 (default) or BF16 (--dtype bf16, what `--dtype auto`
picks on a CPU with fast BF16 GEMMs): dsv3 from the checkpoint folder in that dtype, llama.cpp
from the GGUF file `dsv3 convert --to gguf --gguf-type f32|bf16` writes of it, its KV cache in
the same dtype (`-ctk/-ctv`), like dsv3's latent cache. Each measurement is one fresh process: dsv3 through
this script's `--worker` mode (Engine, greedy, eos ignored), llama.cpp through its
`llama-batched-bench`, llama.cpp's own decode benchmark, whose S_TG is decode tokens/s after the
prompts are in the cache. The grid is threads {1, 2} x context {short, 512 prompt tokens} x
streams {1, 16}: with 16 streams dsv3 decodes 16 requests in one continuous batch and llama.cpp
decodes 16 sequences in one batch (its parallel mode); the single-stream llama.cpp rate is in the
same table. Per repeat every cell runs dsv3 then llama.cpp (interleaved, so machine noise hits
both alike); the table reports medians over the repeats, the ratio dsv3/llama.cpp as the median
of the per-repeat ratios (each pair ran back to back, which cancels slow drifts in the machine's
load better than a ratio of medians), and each process's peak RSS (VmHWM).

Models: the tiny preset from a training run (--tiny, default runs/demo, what `make run` writes)
and the small preset with random weights (built here, with the tiny run's tokenizer). llama.cpp:
--llama-bin or $LLAMA_CPP_BIN, the folder with llama-batched-bench (benchmarks/README.md says
how to build it). Results go to benchmarks/results/decode_vs_llamacpp.json (F32) and
decode_vs_llamacpp_bf16.json, rewritten after every repeat.

    python benchmarks/decode_vs_llamacpp.py --llama-bin ../llama.cpp/build/bin --compile [--dtype bf16]
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

sys.path.insert(0, str(Path(__file__).parent))
from common import TRAINED_RUN, save_result  # noqa: E402

SHORT_CONTEXT = 16


def run_measured(cmd: list[str]) -> tuple[str, float]:
    """Run `cmd`; its stdout and peak RSS in MB: VmHWM of /proc/<pid>/status, read every 20 ms
    while it runs (ru_maxrss would not do: Linux carries the forking parent's RSS into the child's)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        status, peak_kb = Path(f"/proc/{proc.pid}/status"), 0
        while proc.poll() is None:
            try:
                line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
                peak_kb = max(peak_kb, int(line.split()[1]))
            except (OSError, StopIteration):
                pass
            time.sleep(0.02)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {err.read().decode()[-2000:]}")
        out.seek(0)
        return out.read().decode(), peak_kb / 1024


DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def dsv3_decode(
    model: Path,
    threads: int,
    context: int,
    streams: int,
    gen: int,
    compile: bool = False,
    freeze: bool = True,
    dtype: str = "f32",
) -> tuple[float, float]:
    cmd = [sys.executable, __file__, "--worker", str(model), "--threads", str(threads), "--dtype", dtype]
    cmd += ["--context", str(context), "--streams", str(streams), "--gen", str(gen)]
    cmd += ["--compile"] if compile else []
    cmd += [] if freeze else ["--no-freeze"]
    out, rss = run_measured(cmd)
    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"], rss


def llama_decode(
    bin_dir: Path, gguf: Path, threads: int, context: int, streams: int, gen: int, dtype: str = "f32"
) -> tuple[float, float]:
    cmd = [str(bin_dir / "llama-batched-bench"), "-m", str(gguf), "-t", str(threads), "-tb", str(threads)]
    cmd += [
        "-c",
        str(streams * (context + gen) + 16),
        "-b",
        "2048",
        "-ub",
        "512",
        "-ctk",
        dtype,
        "-ctv",
        dtype,
    ]
    cmd += ["-npp", str(context), "-ntg", str(gen), "-npl", str(streams), "--output-format", "jsonl"]
    out, rss = run_measured(cmd)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows[-1]["speed_tg"], rss


def worker(args) -> None:
    """One dsv3 measurement in this process: prefill `streams` prompts of `context` tokens, then
    time `gen` decode steps of the whole batch; prints tokens/s as JSON."""
    from dsv3.infer.engine import Engine, SamplingParams

    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(
        args.worker,
        dtype=DTYPES[args.dtype],
        max_batch_size=args.streams,
        max_seq_len=args.context + args.gen + 2,
        compile=args.compile,
        freeze=not args.no_freeze,
    )
    engine.warmup()  # compiles the decode step (--compile; cached on disk across runs), not timed
    vocab = engine.cfg.vocab_size
    greedy = dict(temperature=0, ignore_eos=True)
    engine.generate([[0, 5, 6, 7]], SamplingParams(max_tokens=4, **greedy))  # warm-up
    rng = torch.Generator().manual_seed(0)
    for _ in range(args.streams):
        prompt = [0] + torch.randint(2, vocab, (args.context - 1,), generator=rng).tolist()
        engine.add_request(prompt, SamplingParams(max_tokens=args.gen + 1, **greedy))
    engine.step()  # admits and prefills every stream (each samples its first token)
    started = time.perf_counter()
    for _ in range(args.gen):
        engine.step()
    elapsed = time.perf_counter() - started
    assert not engine.has_unfinished()
    print(json.dumps({"tokens_per_s": args.streams * args.gen / elapsed}))


def prepare_models(
    tiny_run: Path, work: Path, names: list[str], gguf_type: str = "f32", log=print
) -> dict[str, tuple[Path, Path]]:
    """{name: (checkpoint folder, GGUF file of `gguf_type`)} of `names`: the trained tiny run
    ("tiny") and a random small model ("small")."""
    from dsv3 import ModelConfig, Transformer
    from dsv3.hf import resolve_model_folder
    from dsv3.infer.convert import convert

    tiny = resolve_model_folder(tiny_run)
    small = work / "small"
    if "small" in names and not small.exists():
        torch.manual_seed(0)
        Transformer(ModelConfig.from_preset("small")).save_pretrained(small)
        (small / "tokenizer.json").write_bytes((tiny / "tokenizer.json").read_bytes())
    models = {}
    for name, folder in (("tiny", tiny), ("small", small)):
        if name not in names:
            continue
        gguf = work / f"{name}-{gguf_type}.gguf"
        convert(
            folder,
            gguf,
            "gguf",
            overwrite=True,
            gguf_type=gguf_type,
            log=lambda m, name=name: log(f"  [{name}] {m}"),
        )
        models[name] = (folder, gguf)
    return models


def report(samples: dict[tuple, dict[str, list]], args, models: dict, repeats_done: int) -> Path:
    """Medians and paired ratios of the repeats so far: print the table, write the results file
    (after every cell, so an interrupted run keeps what it measured)."""
    rows = []
    for cell, by_side in samples.items():
        if not by_side["dsv3"]:  # not measured yet
            continue
        name, threads, context, streams = cell
        dsv3_tps = statistics.median(s[0] for s in by_side["dsv3"])
        llama_tps = statistics.median(s[0] for s in by_side["llama"])
        paired = statistics.median(d[0] / ll[0] for d, ll in zip(by_side["dsv3"], by_side["llama"]))
        rows.append(
            {
                "model": name,
                "threads": threads,
                "context": context,
                "streams": streams,
                "dsv3_tokens_per_s": round(dsv3_tps, 1),
                "llama_cpp_tokens_per_s": round(llama_tps, 1),
                "ratio_dsv3_over_llama_cpp": round(paired, 3),
                "dsv3_peak_rss_mb": round(statistics.median(s[1] for s in by_side["dsv3"])),
                "llama_cpp_peak_rss_mb": round(statistics.median(s[1] for s in by_side["llama"])),
                "dsv3_samples": [round(s[0], 1) for s in by_side["dsv3"]],
                "llama_cpp_samples": [round(s[0], 1) for s in by_side["llama"]],
            }
        )
    single = {
        (r["model"], r["threads"], r["context"]): r["llama_cpp_tokens_per_s"]
        for r in rows
        if r["streams"] == 1
    }
    for row in rows:
        key = (row["model"], row["threads"], row["context"])
        row["ratio_dsv3_over_llama_cpp_single_stream"] = (
            round(row["dsv3_tokens_per_s"] / single[key], 3) if key in single else None
        )
    print(
        f"\n{'model':6s} {'thr':>3s} {'ctx':>4s} {'strm':>4s} {'dsv3 tok/s':>10s} {'llama tok/s':>11s} "
        f"{'ratio':>6s} {'vs llama 1-strm':>15s} {'dsv3 MB':>8s} {'llama MB':>8s}"
    )
    for r in rows:
        print(
            f"{r['model']:6s} {r['threads']:3d} {r['context']:4d} {r['streams']:4d} {r['dsv3_tokens_per_s']:10.1f} "
            f"{r['llama_cpp_tokens_per_s']:11.1f} {r['ratio_dsv3_over_llama_cpp']:6.3f} "
            f"{str(r['ratio_dsv3_over_llama_cpp_single_stream']):>15s} {r['dsv3_peak_rss_mb']:8d} {r['llama_cpp_peak_rss_mb']:8d}"
        )
    path = save_result(
        args.name or "decode_vs_llamacpp" + ("" if args.dtype == "f32" else f"_{args.dtype}"),
        {
            "llama_cpp": {
                "bin": str(args.llama_bin),
                "build": args.llama_label,
                "tool": f"llama-batched-bench, -ctk {args.dtype} -ctv {args.dtype}",
            },
            "weights": f"{args.dtype.upper()} on both sides (GGUF written by dsv3 convert --to gguf)",
            "dsv3_decode_step": "compiled (Engine(compile=True))" if args.compile else "eager",
            "tiny_checkpoint": str(models.get("tiny", ("",))[0]),
            "small_checkpoint": "preset small, random weights (torch.manual_seed(0))",
            "gen_tokens_per_stream": args.gen,
            "repeats": repeats_done,
            "rows": rows,
        },
    )
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--llama-bin", default=os.environ.get("LLAMA_CPP_BIN"), help="folder with llama-batched-bench"
    )
    p.add_argument(
        "--llama-label", default="", help="which llama.cpp build (commit), recorded with the results"
    )
    p.add_argument("--tiny", default=str(TRAINED_RUN), help="a trained tiny-preset run or checkpoint folder")
    p.add_argument(
        "--work", default=str(Path(tempfile.gettempdir()) / "dsv3_vs_llamacpp"), help="models go here"
    )
    p.add_argument("--models", nargs="+", default=["tiny", "small"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--contexts", nargs="+", type=int, default=[SHORT_CONTEXT, 512])
    p.add_argument("--streams", nargs="+", type=int, default=[1, 16])
    p.add_argument("--gen", type=int, default=32, help="decode steps timed per measurement")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="f32", help="weights and cache, both sides")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--name",
        help="results file name in benchmarks/results/ (default: decode_vs_llamacpp[_bf16]), for a subset run",
    )
    p.add_argument(
        "--compile", action="store_true", help="dsv3 with its compiled decode step (Engine(compile=True))"
    )
    p.add_argument("--no-freeze", action="store_true", help=argparse.SUPPRESS)  # decode_freezing.py
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--context", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.streams = args.streams[0] if isinstance(args.streams, list) else args.streams
        args.threads = args.threads[0] if isinstance(args.threads, list) else args.threads
        return worker(args)
    if not args.llama_bin or not (Path(args.llama_bin) / "llama-batched-bench").is_file():
        sys.exit(
            "error: pass --llama-bin (or set LLAMA_CPP_BIN) to llama.cpp's build/bin folder holding "
            "llama-batched-bench; benchmarks/README.md shows how to build it"
        )
    if not Path(args.tiny).is_dir():
        sys.exit(
            f"error: --tiny {args.tiny} does not exist; run `make run` (writes runs/demo) or pass a trained tiny run"
        )
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"converting to GGUF ({args.dtype}) ...")
    models = prepare_models(Path(args.tiny), work, args.models, args.dtype)
    cells = [(m, t, c, s) for m in models for t in args.threads for c in args.contexts for s in args.streams]
    samples: dict[tuple, dict[str, list]] = {cell: {"dsv3": [], "llama": []} for cell in cells}
    for r in range(args.repeats):
        for cell in cells:
            name, threads, context, streams = cell
            folder, gguf = models[name]
            samples[cell]["dsv3"].append(
                dsv3_decode(folder, threads, context, streams, args.gen, args.compile, dtype=args.dtype)
            )
            samples[cell]["llama"].append(
                llama_decode(Path(args.llama_bin), gguf, threads, context, streams, args.gen, args.dtype)
            )
            d, ll = samples[cell]["dsv3"][-1], samples[cell]["llama"][-1]
            print(
                f"[{r + 1}/{args.repeats}] {name:5s} t={threads} ctx={context:4d} streams={streams:2d}: "
                f"dsv3 {d[0]:8.1f} tok/s ({d[1]:6.0f} MB)  llama.cpp {ll[0]:8.1f} tok/s ({ll[1]:6.0f} MB)",
                flush=True,
            )
            path = report(samples, args, models, repeats_done=r + 1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
