"""LogFMT-8/10 against E4M3/E5M2 (same 1x128 scaling) and BF16: error and bytes per element.

Data: synthetic residual-branch-like outputs (Student-t, heavy tailed, with a few outlier
channels); a trained dsv3 checkpoint was not available when this was written.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import save_result  # noqa: E402
from dsv3.fp8 import logfmt  # noqa: E402
from dsv3.fp8.quant import ACT, quantize, sqnr_db  # noqa: E402


def e5m2_1x128(x: torch.Tensor) -> torch.Tensor:
    tiles = x.view(x.shape[0], -1, 128)
    scale = tiles.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 57344.0
    return ((tiles / scale).to(torch.float8_e5m2).float() * scale).view_as(x)


def main() -> None:
    torch.manual_seed(0)
    data = {
        "gaussian": torch.randn(1024, 2048),
        "student-t(3) + outliers": torch.distributions.StudentT(3.0).sample((1024, 2048)),
    }
    data["student-t(3) + outliers"][:, :4] *= 50
    rows = []
    for name, x in data.items():
        codecs = {
            "LogFMT-8": (lambda x: logfmt.decode(logfmt.encode(x, 8)), 1 + 8 / 128),
            "LogFMT-10": (lambda x: logfmt.decode(logfmt.encode(x, 10)), 10 / 8 + 8 / 128),
            "E4M3 1x128": (lambda x: quantize(x, ACT).dequantize(), 1 + 4 / 128),
            "E5M2 1x128": (e5m2_1x128, 1 + 4 / 128),
            "BF16": (lambda x: x.bfloat16().float(), 2.0),
        }
        for codec, (fn, nbytes) in codecs.items():
            y = fn(x)
            rel = ((y - x).norm() / x.norm()).item()
            rows.append(
                {
                    "data": name,
                    "codec": codec,
                    "sqnr_db": sqnr_db(x, y),
                    "rel_l2": rel,
                    "bytes_per_elem": nbytes,
                }
            )
    print(f"{'data':25s} {'codec':11s} {'SQNR dB':>8s} {'rel L2 err':>10s} {'bytes/el':>8s}")
    for r in rows:
        print(
            f"{r['data']:25s} {r['codec']:11s} {r['sqnr_db']:8.2f} {r['rel_l2']:10.2e} {r['bytes_per_elem']:8.4f}"
        )
    save_result("fp8_logfmt", {"rows": rows})


if __name__ == "__main__":
    main()
