"""EPLB: max/mean load across GPUs before and after redundant-expert placement.

Before = the plain expert-parallel layout (E/G consecutive experts per GPU, no copies); after =
`dsv3.parallel.eplb.rebalance_experts` with each expert's tokens split evenly over its copies.
Three load sets:

  * DeepSeek's published EPLB example (2 layers, 12 experts, 4 groups, 16 slots, 2 nodes, 8 GPUs;
    12 experts do not split over 8 GPUs, so "before" is not defined there);
  * loads measured from the trained tiny model (runs/demo, written by `make run`: 3 MoE layers + 1 MTP layer,
    16 experts in 4 groups) on Python source it was not trained on, placed on 2 nodes x 2 GPUs
    with 4 extra slots (20 = 5 per GPU);
  * a DeepSeek-V3 prefill-sized synthetic case: 58 layers x 256 experts in 8 groups, log-normal
    loads (sigma 1), 288 slots on 4 nodes x 8 GPUs (8 + 1 redundant per GPU, as in V3R sec. 3.4).

    python benchmarks/eplb.py [--model runs/demo/hf] [--tokens 8192]
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import TRAINED_RUN, save_result  # noqa: E402
from dsv3.parallel.eplb import gpu_loads, imbalance, rebalance_experts  # noqa: E402

EXAMPLE = torch.tensor(
    [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ]
)


def measure_tiny_loads(model_dir: str, n_tokens: int) -> torch.Tensor:
    """Router loads [routers, E] of the trained model over n_tokens of stdlib source."""
    from tokenizers import Tokenizer

    from dsv3.model.moe import update_router_bias
    from dsv3.model.transformer import Transformer

    model = Transformer.from_pretrained(model_dir)
    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    text = Path(sysconfig.get_paths()["stdlib"], "argparse.py").read_text()
    ids = torch.tensor(tok.encode(text).ids[: n_tokens + 1])
    seq = 512
    n = (len(ids) - 1) // seq * seq
    update_router_bias(model, 0.0)  # zero the counters
    with torch.no_grad():
        model(ids[:n].view(-1, seq), labels=ids[1 : n + 1].view(-1, seq))  # labels: MTP runs too
    return torch.stack(list(update_router_bias(model, 0.0).values()))  # [routers, E]


def place(name: str, loads: torch.Tensor, n_physical: int, n_groups: int, n_nodes: int, n_gpus: int) -> dict:
    p = rebalance_experts(loads, n_physical, n_groups, n_nodes, n_gpus)
    after = imbalance(gpu_loads(loads, p.physical_to_logical, p.replica_counts, n_gpus))
    E = loads.shape[1]
    before = imbalance(loads.double().view(len(loads), n_gpus, -1).sum(-1)) if E % n_gpus == 0 else None
    row = {
        "case": name,
        "layout": f"{E} experts, {n_groups} groups -> {n_physical} slots on {n_nodes} nodes x {n_gpus // n_nodes} GPUs",
        "after_max_over_mean": [round(v, 4) for v in after.tolist()],
        "after_mean": round(after.mean().item(), 4),
        "before_max_over_mean": None if before is None else [round(v, 4) for v in before.tolist()],
        "before_mean": None if before is None else round(before.mean().item(), 4),
        "physical_to_logical": p.physical_to_logical.tolist() if len(loads) <= 4 else None,
    }
    b = "n/a" if before is None else f"{row['before_mean']:.3f}"
    print(f"| {name} | {row['layout']} | {b} | {row['after_mean']:.3f} |")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(TRAINED_RUN / "hf"))
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    print("| loads | placement | max/mean before (mean over layers) | after |")
    print("|---|---|---|---|")
    rows = [place("published example", EXAMPLE, 16, 4, 2, 8)]
    if Path(args.model).exists():
        tiny = measure_tiny_loads(args.model, args.tokens)
        rows.append(place(f"trained tiny, {args.tokens} tokens", tiny, 20, 4, 2, 4))
        rows[-1]["loads"] = tiny.tolist()
    g = torch.Generator().manual_seed(0)
    synthetic = torch.randn(58, 256, generator=g).exp() * 1000
    rows.append(place("V3-sized log-normal", synthetic, 288, 8, 4, 32))
    print("published example, layer 0 placement:", rows[0]["physical_to_logical"][0])
    print(f"wrote {save_result('eplb', {'rows': rows})}")


if __name__ == "__main__":
    main()
