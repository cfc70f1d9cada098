"""FP8 against BF16 end to end, on the held-out split (issue 4, "End to end"):

(a) the same trained weights evaluated with a BF16 forward and with an FP8 forward
    (``convert_to_fp8``) on the same validation batches: relative difference of the mean loss;
(b) runs trained with ``--fp8`` and without, same seed, steps and data: final held-out loss;
(c) three seeds of each: the FP8-vs-BF16 gap per seed against the BF16 seed-to-seed spread, and
    the curves of the differences (benchmarks/results/fp8_end_to_end.png).

    python benchmarks/fp8_end_to_end.py --train        # run the missing runs (hours of CPU)
    python benchmarks/fp8_end_to_end.py                 # (a) + tables from finished runs

The runs live in ``--runs`` (default runs/fp8_end_to_end) as ``{bf16,fp8}_s{seed}``; each is
``dsv3 train`` with the flags in ``RUN_FLAGS`` (tiny preset, 8 x 256 = 2,048 tokens per step).
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, TRAINED_RUN, save_result  # noqa: E402
from fp8_activations import TRAINED, trained_model  # noqa: E402

SEEDS = (0, 1, 2)
RUN_FLAGS = (
    "--preset tiny --batch-size 8 --seq-len 256 --lr 0.002 --schedule cosine --warmup-steps 10 "
    "--bias-gamma 0.01 --eval-every 25 --eval-batches 8 --save-every 100000 --keep 1 --threads 1"
).split()


def same_weights(checkpoint: Path, batches: int) -> dict:
    """(a): mean validation loss of one checkpoint with a BF16 and with an FP8 forward."""
    from dsv3.fp8.linear import convert_to_fp8

    model, data = trained_model(checkpoint, batches)

    @torch.no_grad()
    def losses() -> list[float]:
        out = []
        for x, y in data:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out.append(model(x, labels=y).loss.item())
        return out

    bf16 = losses()
    convert_to_fp8(model)
    fp8 = losses()
    mean_b, mean_f = sum(bf16) / len(bf16), sum(fp8) / len(fp8)
    per_batch = [abs(f - b) / b for f, b in zip(fp8, bf16, strict=True)]
    return {
        "checkpoint": str(checkpoint),
        "batches": len(data),
        "tokens": sum(x.numel() for x, _ in data),
        "bf16_loss": mean_b,
        "fp8_loss": mean_f,
        "rel_diff": (mean_f - mean_b) / mean_b,
        "max_batch_rel_diff": max(per_batch),
    }


def train_missing(runs: Path, steps: int) -> None:
    for kind in ("bf16", "fp8"):
        for seed in SEEDS:
            out = runs / f"{kind}_s{seed}"
            if (out / "hf" / "config.json").exists():
                continue
            cmd = [
                sys.executable,
                "-m",
                "dsv3",
                "train",
                "--out",
                str(out),
                "--steps",
                str(steps),
                *RUN_FLAGS,
                "--seed",
                str(seed),
                *(["--fp8"] if kind == "fp8" else []),
            ]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)


def curves(runs: Path) -> dict[str, dict[int, float]]:
    """Held-out loss per evaluated step of every finished run."""
    from dsv3.train.metrics import read_metrics

    out = {}
    for path in sorted(runs.glob("*_s*/metrics.jsonl")):
        out[path.parent.name] = {r["step"]: r["val_loss"] for r in read_metrics(path) if "val_loss" in r}
    return out


def compare(val: dict[str, dict[int, float]]) -> dict:
    """(b) and (c): final losses, FP8-BF16 gap per seed, BF16 seed-to-seed spread."""
    seeds = [s for s in SEEDS if f"bf16_s{s}" in val and f"fp8_s{s}" in val]
    if not seeds:
        return {}
    final = {name: c[max(c)] for name, c in val.items()}
    gaps = {}
    for s in seeds:  # at the last step both runs evaluated (the final one when both finished)
        b, f = val[f"bf16_s{s}"], val[f"fp8_s{s}"]
        t = max(set(b) & set(f))
        gaps[s] = (f[t] - b[t]) / b[t]
    bf16 = [final[f"bf16_s{s}"] for s in SEEDS if f"bf16_s{s}" in final]
    fp8 = [final[f"fp8_s{s}"] for s in SEEDS if f"fp8_s{s}" in final]
    spread = (max(bf16) - min(bf16)) / min(bf16)
    return {
        "steps": {n: max(c) for n, c in val.items()},
        "final_val_loss": final,
        "gap_per_seed": gaps,
        "max_abs_gap": max(abs(g) for g in gaps.values()),
        "bf16_seed_spread": spread,
        "fp8_seed_spread": (max(fp8) - min(fp8)) / min(fp8),
        "mean_gap": (sum(fp8) / len(fp8) - sum(bf16) / len(bf16)) / (sum(bf16) / len(bf16)),
    }


def plot(val: dict[str, dict[int, float]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, c in val.items():
        style, color = "-" if name.startswith("bf16") else "--", f"C{name.rsplit('_s', 1)[-1]}"
        left.plot(list(c), list(c.values()), style, color=color, label=name.replace("_s", " seed "))
    left.set(title="held-out loss: FP8 (dashed) and BF16 (solid)", xlabel="step", ylabel="nats/token")
    left.legend(fontsize=8)
    for s in SEEDS:
        b, f = val.get(f"bf16_s{s}"), val.get(f"fp8_s{s}")
        if b and f:
            steps = sorted(set(b) & set(f))
            right.plot(
                steps,
                [100 * (f[t] - b[t]) / b[t] for t in steps],
                "o-",
                color=f"C{s}",
                label=f"FP8 - BF16, seed {s}",
            )
        b0 = val.get("bf16_s0")
        if s and b and b0:
            steps = sorted(set(b) & set(b0))
            right.plot(
                steps,
                [100 * (b[t] - b0[t]) / b0[t] for t in steps],
                ":",
                color=f"C{s}",
                label=f"BF16 seed {s} - seed 0",
            )
    right.axhline(0, color="gray", lw=0.5)
    right.set(title="relative difference of held-out loss", xlabel="step", ylabel="%")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=TRAINED, help="trained checkpoint for (a)")
    parser.add_argument("--batches", type=int, default=32, help="validation batches of 8 x 256 for (a)")
    parser.add_argument("--runs", type=Path, default=TRAINED_RUN.parent / "fp8_end_to_end")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--train", action="store_true", help="first run the missing runs")
    args = parser.parse_args()
    result: dict = {"run_flags": " ".join(RUN_FLAGS), "steps": args.steps, "tokens_per_step": 8 * 256}
    if args.train:
        train_missing(args.runs, args.steps)
    if args.checkpoint.exists():
        a = result["same_weights"] = same_weights(args.checkpoint, args.batches)
        print(f"(a) {a['checkpoint']}: {a['batches']} validation batches ({a['tokens']:,} tokens)")
        print(
            f"    BF16 forward {a['bf16_loss']:.5f}  FP8 forward {a['fp8_loss']:.5f}  "
            f"rel. diff {100 * a['rel_diff']:+.4f}% (bound 0.1%)"
        )
    val = curves(args.runs)
    c = result["runs"] = compare(val)
    if c:
        print(f"\n{'run':10s} {'steps':>6s} {'final held-out loss':>20s}")
        for name, loss in c["final_val_loss"].items():
            print(f"{name:10s} {c['steps'][name]:6d} {loss:20.4f}")
        for s, g in c["gap_per_seed"].items():
            print(f"(b) seed {s}: FP8 - BF16 = {100 * g:+.3f}% (paper: within 0.25%)")
        print(
            f"(c) max |FP8 - BF16| over seeds {100 * c['max_abs_gap']:.3f}%, mean gap {100 * c['mean_gap']:+.3f}%; "
            f"BF16 seed-to-seed spread {100 * c['bf16_seed_spread']:.3f}%, FP8 {100 * c['fp8_seed_spread']:.3f}%"
        )
        RESULTS.mkdir(exist_ok=True)
        plot(val, RESULTS / "fp8_end_to_end.png")
        result["curves"] = val
    if (args.runs / "fp8_s0/metrics.jsonl").exists() and (args.runs / "bf16_s0/metrics.jsonl").exists():
        from dsv3.train.metrics import write_report

        png = write_report(
            args.runs / "fp8_s0/metrics.jsonl",
            RESULTS / "fp8_vs_bf16_report.png",
            title="FP8 (--fp8) vs BF16, seed 0",
            baseline=args.runs / "bf16_s0/metrics.jsonl",
            label="FP8",
            baseline_label="BF16",
        )
        print(f"report with both runs: {png}")
    print(f"results: {save_result('fp8_end_to_end', result)}")


if __name__ == "__main__":
    main()
