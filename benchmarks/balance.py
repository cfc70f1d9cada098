"""Auxiliary-loss-free balancing, shown: the same tiny run with the router-bias update on and off.

DeepSeek-V3 balances its experts without an auxiliary loss: after every optimizer step each MoE
layer's router bias moves by gamma against the sign of its expert's load error
(b_i -= gamma * sign(load_i - mean load)); the bias changes which experts are picked, not their
gate weights. The measure is MaxVio per MoE layer = (max_i load_i - mean load) / mean load over the
tokens of a step (0 = perfectly even; V3R section 4.5.1).

This script trains the `tiny` preset twice through `dsv3 train`'s Trainer with the demo's recipe
(`dsv3.demo.demo_config`): identical seed, initial weights and batches, the only difference being
bias_gamma = the demo's value (0.01) versus 0. It prints the final MaxVio of both (last logged step
and the mean over the last quarter of the steps) and writes one PNG (`write_report` with the
gamma-0 run as baseline): both MaxVio curves, both loss curves, and the layer x expert load heat
maps at the end of each run. With the update on, MaxVio at the end is much lower.

    python benchmarks/balance.py [--steps 40] [--batch 4] [--seq 128] [--out runs/balance]

Shorter than the demo (small batches) so that both runs fit in a couple of minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save_result  # noqa: E402
from dsv3.demo import demo_config  # noqa: E402
from dsv3.train.metrics import read_metrics, write_report  # noqa: E402
from dsv3.train.trainer import Trainer  # noqa: E402


def train(out: Path, gamma: float, args: argparse.Namespace) -> dict:
    cfg = demo_config(str(out), args.seed, args.steps).updated(
        {
            "batch_size": args.batch,
            "seq_len": args.seq,
            "bias_gamma": gamma,
            "log_every": 1,
            "eval_every": args.steps,
            "eval_batches": 2,
            "save_every": args.steps,
            "report": False,
        }
    )
    start = time.perf_counter()
    Trainer(cfg).fit()
    records = read_metrics(out / "metrics.jsonl")
    tail = records[-max(1, len(records) // 4) :]
    return {
        "bias_gamma": gamma,
        "final_maxvio": records[-1]["maxvio"],
        "final_maxvio_per_layer": records[-1]["maxvio_per_layer"],
        "tail_mean_maxvio": sum(r["maxvio"] for r in tail) / len(tail),
        "first_maxvio": records[0]["maxvio"],
        "final_loss": records[-1]["loss"],
        "val_loss": records[-1].get("val_loss"),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--gamma", type=float, default=None, help="bias update speed when on (default: the demo's)"
    )
    ap.add_argument("--out", default="runs/balance", help="folder for both runs and the PNG (replaced)")
    args = ap.parse_args()
    gamma = args.gamma if args.gamma is not None else demo_config("", 0, 1).bias_gamma
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    runs = {}
    for name, g in (("on", gamma), ("off", 0.0)):
        runs[name] = train(out / f"gamma_{name}", g, args)
        r = runs[name]
        print(
            f"bias update {name:3s} (gamma {g:g}): MaxVio {r['first_maxvio']:.2f} (step 1) -> "
            f"{r['final_maxvio']:.2f} (step {args.steps}; mean of last quarter {r['tail_mean_maxvio']:.2f}), "
            f"loss {r['final_loss']:.3f}, {r['seconds']:.0f} s",
            flush=True,
        )
    png = write_report(
        out / "gamma_on" / "metrics.jsonl",
        out / "balance.png",
        title=f"tiny preset, {args.steps} steps x {args.batch}x{args.seq} tokens: router-bias update on vs off",
        baseline=out / "gamma_off" / "metrics.jsonl",
        label=f"gamma {gamma:g}",
        baseline_label="gamma 0",
    )
    on, off = runs["on"]["final_maxvio"], runs["off"]["final_maxvio"]
    print(f"final MaxVio: on {on:.2f} vs off {off:.2f} ({off / max(on, 1e-9):.1f}x lower with the update)")
    print(f"report: {png}")
    path = save_result("balance", {"args": vars(args), "runs": runs, "report": str(png)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
