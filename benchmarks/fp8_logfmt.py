"""LogFMT-8/10 against E4M3/E5M2 (same 1x128 scaling) and BF16: error and bytes per element.

Data: the residual-branch outputs (attention and MLP/MoE outputs before the residual add, the
tensors the ISCA paper's LogFMT experiment encodes) of a trained dsv3 model on its validation
data (``--checkpoint``, default the trained tiny model; without one, a few training steps
first), per branch kind; and for comparison synthetic Gaussian and heavy-tailed data.

    python benchmarks/fp8_logfmt.py [--checkpoint DIR] [--batches 2]
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import save_result  # noqa: E402
from dsv3.fp8 import logfmt  # noqa: E402
from dsv3.fp8.quant import ACT, quantize, sqnr_db  # noqa: E402
from fp8_activations import TRAINED, capture, trained_model  # noqa: E402


def e5m2_1x128(x: torch.Tensor) -> torch.Tensor:
    tiles = x.view(x.shape[0], -1, 128)
    scale = tiles.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 57344.0
    return ((tiles / scale).to(torch.float8_e5m2).float() * scale).view_as(x)


CODECS = {
    "LogFMT-8": (lambda x: logfmt.decode(logfmt.encode(x, 8)), 1 + 8 / 128),
    "LogFMT-10": (lambda x: logfmt.decode(logfmt.encode(x, 10)), 10 / 8 + 8 / 128),
    "E4M3 1x128": (lambda x: quantize(x, ACT).dequantize(), 1 + 4 / 128),
    "E5M2 1x128": (e5m2_1x128, 1 + 4 / 128),
    "BF16": (lambda x: x.bfloat16().float(), 2.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=TRAINED)
    parser.add_argument("--batches", type=int, default=2, help="validation batches of 8 x 256 tokens")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, batches = trained_model(args.checkpoint, args.batches)
    _, branches = capture(model.float(), batches)
    data = {}
    for name, y in branches.items():  # pool the layers of each branch kind
        kind = "trained " + name.rsplit(".", 1)[-1]
        data[kind] = torch.cat([data[kind], y]) if kind in data else y
    data["gaussian"] = torch.randn(1024, 2048)
    data["student-t(3) + outliers"] = torch.distributions.StudentT(3.0).sample((1024, 2048))
    data["student-t(3) + outliers"][:, :4] *= 50
    rows = []
    for name, x in data.items():
        for codec, (fn, nbytes) in CODECS.items():
            y = fn(x)
            rows.append(
                {
                    "data": name,
                    "codec": codec,
                    "sqnr_db": sqnr_db(x, y),
                    "token_sqnr_db": sqnr_db(x, y, True),
                    "rel_l2": ((y - x).norm() / x.norm()).item(),
                    "bytes_per_elem": nbytes,
                }
            )
    print(
        f"{'data':25s} {'codec':11s} {'SQNR dB':>8s} {'per-token':>9s} {'rel L2 err':>10s} {'bytes/el':>8s}"
    )
    for r in rows:
        print(
            f"{r['data']:25s} {r['codec']:11s} {r['sqnr_db']:8.2f} {r['token_sqnr_db']:9.2f} "
            f"{r['rel_l2']:10.2e} {r['bytes_per_elem']:8.4f}"
        )
    save_result("fp8_logfmt", {"checkpoint": str(args.checkpoint), "rows": rows})


if __name__ == "__main__":
    main()
