"""Decode throughput: the dsv3 Engine (paged latent cache, absorbed MLA) against Hugging Face
transformers' DeepseekV3ForCausalLM on the same weights, at batch 1 and 8 and contexts of 512 and
4096 tokens, next to this machine's memory-bandwidth limit; then MTP speculative decoding on the
trained tiny model (acceptance rate, tokens per forward).

For each (batch, context) both sides prefill the same random prompts once, then decode greedily
in interleaved windows (dsv3 `--window` steps, HF `--window` steps, repeated `--rounds` times),
so machine noise hits both alike; tokens/s are medians over the windows. The HF side is the loop
that `generate` runs: one forward per token with its DynamicCache. transformers 5.24 caches the
same latent as dsv3 but expands it to per-head K/V over the whole context at every step
(`expand_kv`); dsv3 decodes through the absorbed path and never materializes per-head K/V.

The bandwidth limit: a large copy's GB/s (read + write), and the bytes a decode step must read:
the weights it touches (dense parts, and the routed experts a batch of B tokens reaches,
E x (1 - (1 - K/E)^B) of them in expectation) plus B x context x the latent cache bytes per token.

    python benchmarks/decode.py [--window 8 --rounds 5 --gen-threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import TRAINED_RUN, save_result  # noqa: E402
from dsv3 import ModelConfig, Transformer  # noqa: E402
from dsv3.infer.engine import Engine, SamplingParams  # noqa: E402

TRAINED = TRAINED_RUN / "hf"  # written by `make run`


def copy_bandwidth_gbs(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Best GB/s of a large tensor copy, counting the read and the write."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


def bytes_read_per_step(model: Transformer, batch: int, context: int, cache_bytes_per_token: int) -> float:
    cfg = model.cfg
    routed = sum(p.numel() * p.element_size() for n, p in model.layers.named_parameters() if ".experts." in n)
    other = sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if not n.startswith(("mtp.", "embed_tokens.")) and ".experts." not in n
    )
    touched = 1 - (1 - cfg.num_experts_per_tok / cfg.n_routed_experts) ** batch
    return other + touched * routed + batch * context * cache_bytes_per_token


class Dsv3Side:
    def __init__(self, model, prompts, max_seq_len):
        self.engine = Engine(model, max_batch_size=len(prompts), max_seq_len=max_seq_len, block_size=16)
        for p in prompts:
            self.engine.add_request(
                p, SamplingParams(max_tokens=max_seq_len - len(p), temperature=0, ignore_eos=True)
            )
        self.engine.step()  # prefill all (and their first tokens)

    def decode(self, steps: int) -> float:
        t = time.perf_counter()
        for _ in range(steps):
            self.engine.step()
        return time.perf_counter() - t

    def cache_bytes(self) -> int:
        return self.engine.stats()["cache_bytes_used"]


class HFSide:
    def __init__(self, hf, prompts):
        self.hf = hf
        with torch.no_grad():
            out = hf(torch.tensor(prompts), use_cache=True, logits_to_keep=1)  # same lengths: no padding
        self.cache, self.next = out.cache, out.logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def decode(self, steps: int) -> float:
        t = time.perf_counter()
        for _ in range(steps):
            out = self.hf(self.next, cache=self.cache, use_cache=True)
            self.cache, self.next = out.cache, out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - t

    def cache_bytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers)


def decode_table(args) -> list[dict]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    max_ctx = max(args.contexts)
    gen = args.window * (args.rounds + 1) + 2
    cfg = ModelConfig.from_preset("tiny", num_nextn_predict_layers=0, max_position_embeddings=max_ctx + gen)
    model = Transformer(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    bandwidth = copy_bandwidth_gbs()
    print(f"copy bandwidth {bandwidth:.1f} GB/s; {torch.get_num_threads()} threads")
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            prompts = torch.randint(0, cfg.vocab_size, (batch, context)).tolist()
            sides = {"dsv3": Dsv3Side(model, prompts, context + gen), "hf": HFSide(hf, prompts)}
            for side in sides.values():  # warm-up window
                side.decode(2)
            times = {k: [] for k in sides}
            for _ in range(args.rounds):
                for name, side in sides.items():
                    times[name].append(side.decode(args.window))
            tps = {k: batch * args.window / statistics.median(v) for k, v in times.items()}
            per_token = sides["dsv3"].engine.cache.bytes_per_token
            limit = batch * bandwidth * 1e9 / bytes_read_per_step(model, batch, context, per_token)
            heads, dqk, dv = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
            ctx_now = context + args.window * (args.rounds + 1)
            row = {
                "batch": batch,
                "context": context,
                "tokens_per_s": tps,
                "ratio_dsv3_over_hf": tps["dsv3"] / tps["hf"],
                "window_s": times,
                "bandwidth_limit_tokens_per_s": limit,
                "cache_bytes": {k: s.cache_bytes() for k, s in sides.items()},
                "cache_bytes_allocated_dsv3": sides["dsv3"].engine.cache.nbytes,
                "hf_expanded_kv_bytes_per_layer_per_step": batch * ctx_now * heads * (dqk + dv) * 4,
            }
            rows.append(row)
            print(
                f"B={batch} ctx={context}: dsv3 {tps['dsv3']:,.1f} tok/s | HF {tps['hf']:,.1f} tok/s | "
                f"{row['ratio_dsv3_over_hf']:.2f}x | limit {limit:,.0f} tok/s | cache dsv3 "
                f"{row['cache_bytes']['dsv3'] / 2**20:.1f} MiB, HF {row['cache_bytes']['hf'] / 2**20:.1f} MiB "
                f"+ {row['hf_expanded_kv_bytes_per_layer_per_step'] / 2**20:.1f} MiB expanded K/V per layer-step",
                flush=True,
            )
            del sides
    return rows


def mtp_acceptance(args) -> dict | None:
    if not (TRAINED / "config.json").is_file():
        print(f"{TRAINED} not found: MTP acceptance skipped")
        return None
    from dsv3.tokenizer import load_tokenizer

    tok = load_tokenizer(TRAINED, 8192)
    texts = [
        "import os\n",
        "def __init__(self",
        "class ",
        "    return ",
        "# Copyright",
        "for i in range(",
        "if __name__ == ",
        "    def test_",
    ]
    prompts = [[tok.bos_id] + tok.tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    params = SamplingParams(max_tokens=args.mtp_tokens, temperature=0, ignore_eos=True)
    result = {}
    for mtp in (False, True):
        engine = Engine.from_pretrained(TRAINED, max_seq_len=256, max_batch_size=1, mtp=mtp)
        t = time.perf_counter()
        outs = [engine.generate([p], params)[0].token_ids for p in prompts]  # batch 1, one prompt at a time
        result["mtp" if mtp else "plain"] = {
            "seconds": time.perf_counter() - t,
            **engine.stats(),
            "outputs": outs,
        }
    same = result["mtp"]["outputs"] == result["plain"]["outputs"]
    s = result["mtp"]
    print(
        f"MTP on {TRAINED} (greedy, {len(prompts)} prompts x {args.mtp_tokens} tokens, batch 1): acceptance "
        f"{s['mtp_acceptance_rate']:.1%}, {s['tokens_per_forward']:.2f} tokens/forward, output identical to plain "
        f"greedy: {same}; wall {result['plain']['seconds']:.2f} s plain vs {s['seconds']:.2f} s MTP"
    )
    for r in result.values():
        r.pop("outputs")
    return {**result, "identical_to_plain": same, "prompts": texts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--window", type=int, default=8, help="decode steps per timed window")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved windows per side")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--mtp-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with torch.no_grad():
        rows = decode_table(args)
        mtp = mtp_acceptance(args)
    path = save_result("decode", {"args": vars(args), "rows": rows, "mtp": mtp})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
