"""Does freezing the weights into the compiled decode step pay off? The dsv3 Engine's compiled
decode with Engine(freeze=True) (the default: Inductor packs every nn.Linear weight into
oneDNN/MKL's GEMM layout at compile time) against freeze=False, on the same checkpoint.

Each measurement is one fresh process (decode_vs_llamacpp.py's worker: greedy, eos ignored,
`--gen` decode steps of `--streams` requests timed after their prefill). Per repeat and cell the
two variants run back to back, alternating which goes first; the table gives medians and the
median of the per-repeat ratios frozen / unfrozen (pairs cancel the slow drifts of a shared
machine's load). Results go to benchmarks/results/decode_freezing.json.

    python benchmarks/decode_freezing.py [--tiny runs/demo] [--repeats 5] [--streams 1 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import TRAINED_RUN, machine, save_result  # noqa: E402
from decode_vs_llamacpp import SHORT_CONTEXT, dsv3_decode  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", default=str(TRAINED_RUN), help="a trained tiny-preset run or checkpoint folder")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--context", type=int, default=SHORT_CONTEXT)
    p.add_argument("--streams", nargs="+", type=int, default=[1, 16])
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    from dsv3.hf import resolve_model_folder

    folder = resolve_model_folder(Path(args.tiny))
    print(machine())
    rows = []
    for streams in args.streams:
        runs: dict[bool, list[float]] = {True: [], False: []}
        for r in range(args.repeats):
            for freeze in (True, False) if r % 2 else (False, True):
                tps, _ = dsv3_decode(folder, args.threads, args.context, streams, args.gen, True, freeze)
                runs[freeze].append(tps)
            print(
                f"[{r + 1}/{args.repeats}] streams={streams}: frozen {runs[True][-1]:.1f}, "
                f"unfrozen {runs[False][-1]:.1f} tok/s",
                flush=True,
            )
        rows.append(
            {
                "streams": streams,
                "frozen_tokens_per_s": round(statistics.median(runs[True]), 1),
                "unfrozen_tokens_per_s": round(statistics.median(runs[False]), 1),
                "ratio_frozen_over_unfrozen": round(
                    statistics.median(a / b for a, b in zip(runs[True], runs[False])), 3
                ),
                "frozen_samples": [round(x, 1) for x in runs[True]],
                "unfrozen_samples": [round(x, 1) for x in runs[False]],
            }
        )
        print(
            f"streams={streams}: frozen/unfrozen {rows[-1]['ratio_frozen_over_unfrozen']:.2f}x "
            f"(medians {rows[-1]['frozen_tokens_per_s']} vs {rows[-1]['unfrozen_tokens_per_s']} tok/s)"
        )
    path = save_result(
        "decode_freezing",
        {
            "checkpoint": str(folder),
            "threads": args.threads,
            "context": args.context,
            "gen": args.gen,
            "repeats": args.repeats,
            "rows": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
