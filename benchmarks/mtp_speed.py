"""Does MTP self-speculative decoding pay off? Greedy decoding at batch 1 with and without `--mtp`
on the trained tiny model, the same prompts, interleaved, with identical outputs required.

    python benchmarks/mtp_speed.py [--checkpoint runs/demo] [--compile] [--dtype float32] [--tokens 128]
                                   [--repeats 5] [--draft-vocab K] [--mtp-drafts k] [--evict-mb N]
                                   [--name mtp_speed]

Each repeat decodes every prompt once without and once with MTP (alternating which goes first) in
one process per variant-pair, after a warm-up. Two rates, both wall clock: end to end (prefill
included, as a user sees it) and decode (the tokens after the first over the time after the first
token, as llama-bench's tg and a server's time per output token count it). Prints the CPU, the
acceptance rate, tokens per forward and the median ratios MTP / plain. The V3 report's figure is
1.8x at 85-90% acceptance of the second token; a model trained for minutes accepts fewer drafts.

Two diagnostics come with it. The cost of a decode forward of each variant: the time after the
first token over the decode forwards, so the ratio MTP / plain says how many plain steps an MTP
step (two-token verify, MTP block, draft head) costs; 1.25x at t tokens per forward needs it at
t / 1.25 or less, before the prefill dilutes the gain. And how often greedy MTP would be
accepted on real text: over the first 256 tokens of other stdlib modules (mostly training text),
teacher-forced, the share of positions where MTP's draft for t_{i+2} (from h_i and the true t_{i+1})
is the main model's own greedy choice at i+1. Greedy generation of a small model soon repeats
itself, where drafts are easier than on text, so the two acceptance rates can differ a lot.

Where an MTP step's time goes: the run then replays the compiled calls of real decode steps of
the MTP engine, interleaved (`step_costs`): a plain one-token step, the verify alone and the whole
MTP step, so it prints what the verify's extra tokens and the MTP module each cost in plain steps
(on a 4-block model the module is a fifth of the blocks; on V3 one in 62).

Whether the weights stay in the cache decides much. Tiny's (~22 MB in BF16, 10 MB read per
token) fit in a server CPU's L3, so plain decoding reads them from the cache, while an MTP step
reads more (the verify's second token's experts, the MTP module) and may spill; a real model
reads every step from memory. `--evict-mb N` writes N MB between steps (untimed, in both
variants) to measure that case on a small model. The run prints the weights' sizes and the L3's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import TRAINED_RUN, cache_size, machine, save_result  # noqa: E402


def texts(n: int, offset: int = 0) -> list[str]:
    """n stdlib modules, every 17th from `offset` (ones the model did not train on more than on
    any other; held-out ones are fine too: it only changes the acceptance)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[offset::17][:n]
    return [f.read_text(errors="replace") for f in files]


def prompts(tok, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens from the start of stdlib modules."""
    return [tok.encode(t)[:length] for t in texts(n)]


def text_acceptance(model, sequences: list[list[int]]) -> float:
    """Teacher-forced greedy acceptance on text (module docstring): sequences of equal length."""
    ids = torch.tensor(sequences)
    mtp, T = model.mtp[0], ids.shape[1] - 1
    with torch.no_grad():
        out = model(ids[:, :-1])  # out.logits[:, i]: the main model's guess for t_{i+1}
        h, _ = mtp(out.hidden[:, :-1], model.embed_tokens(ids[:, 1:T]), *model.rope(1, T - 1))
        drafts = model.lm_head(mtp.shared_head.norm(h))[..., : mtp.draft_vocab].float().argmax(-1)
        return (drafts == out.logits[:, 1:].float().argmax(-1)).float().mean().item()


def weight_megabytes(engine) -> dict:
    """The model's weights in the engine's dtype, MB, input embedding left out (a token reads one
    row): all of them, those one token reads (its routed experts only), those an MTP pass reads
    besides the head. Where `all` fits in the L3 cache, plain decoding reads its weights from the
    cache, and a step that reads more (a verify's extra experts, the MTP module) may not."""
    counts = engine.model.num_params()
    size = torch.finfo(engine.dtype).bits // 8
    embed = engine.model.embed_tokens.weight.numel()
    mb = {
        "all": counts["total_params"] + counts["mtp_params"] - embed,
        "per_token": counts["activated_params_without_embedding"],
        "mtp_per_pass": counts["mtp_activated_params"],
    }
    return {k: round(v * size / 1e6, 1) for k, v in mb.items()}


def timed_generation(
    engine, prompt: list[int], params, evict: torch.Tensor | None = None
) -> tuple[list[int], float, float, int]:
    """Generate one request alone, step by step -> (its tokens, seconds in all, seconds after its
    first token, decode forwards after the first token). With `evict`, a buffer written between
    steps, outside the timed ones."""
    request = engine.add_request(prompt, params)
    elapsed, first, tokens = 0.0, None, None
    while tokens is None:
        if evict is not None:
            evict.add_(1)
        start = time.perf_counter()
        outputs = engine.step()
        elapsed += time.perf_counter() - start
        for out in outputs:
            if out.request_id != request:
                continue
            if first is None and out.token_ids:
                first, forwards = elapsed, engine.stats()["forward_passes"]
            if out.finished:
                tokens = out.token_ids
    return tokens, elapsed, elapsed - first, engine.stats()["forward_passes"] - forwards


@torch.no_grad()
def step_costs(engine, prompt: list[int], steps: int = 48, rounds: int = 8) -> dict:
    """Where a greedy MTP step's time goes: the engine's step calls (compiled with --compile) on
    the inputs of `steps` real decode steps, replayed in interleaved rounds (medians, us): a plain one-token
    step, the verify alone (the 1 + k tokens through the main model, no MTP module) and the whole
    MTP step (verify, then the MTP module drafting). Their differences are the cost of the
    verify's extra tokens and of the MTP module, in plain steps."""
    from dsv3.infer.cache import int64_tensor
    from dsv3.infer.sampling import SamplingParams

    drafts = engine.mtp_drafts
    request = engine.add_request(
        prompt, SamplingParams(max_tokens=(steps + 2) * (1 + drafts), temperature=0, ignore_eos=True)
    )
    engine.step()  # the prefill
    req, recorded = engine.running[0], []
    for _ in range(steps):  # its cache now holds every position a replayed step writes
        recorded.append((req.num_cached, [req.last_token, *req.draft]))
        engine.step()

    def call(kind: str, start: int, fed: list[int]):
        if kind == "one token":
            fed = fed[:1]
        view = engine.cache.view([request], [start], len(fed), reach=engine.positions_per_decode)
        ids = int64_tensor(fed, engine.device).view(1, -1)
        if kind == "MTP step":
            return engine._fast(engine._greedy_step, engine.model, ids, view, view.start_pos)
        return engine._fast(engine._decode_step, engine.model, ids, view, view.start_pos)

    kinds = ("one token", "verify only", "MTP step")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds + 1):  # round 0 compiles and warms up
        for kind in kinds if r % 2 else kinds[::-1]:
            start = time.perf_counter()
            for step in recorded:
                call(kind, *step)
            if r:
                times[kind].append((time.perf_counter() - start) / len(recorded) * 1e6)
    engine.abort(request)
    engine.step()
    us = {k: statistics.median(v) for k, v in times.items()}
    return {
        "us": {k: round(v, 1) for k, v in us.items()},
        "verify_extra_tokens_in_plain_steps": round(us["verify only"] / us["one token"] - 1, 3),
        "mtp_module_in_plain_steps": round((us["MTP step"] - us["verify only"]) / us["one token"], 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(TRAINED_RUN))
    p.add_argument("--compile", action="store_true", help="compiled decode step (Engine(compile=True))")
    p.add_argument("--tokens", type=int, default=128, help="generated tokens per prompt")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16"))
    p.add_argument(
        "--draft-vocab", type=int, default=None, help="tokens MTP drafts among (default: the engine's)"
    )
    p.add_argument("--mtp-drafts", type=int, default=1, help="MTP drafts per step (chained after the first)")
    p.add_argument(
        "--evict-mb",
        type=int,
        default=0,
        help="write this many MB between decode steps, untimed, so that every step reads the weights "
        "from memory, not from the cache (as a model larger than the cache does)",
    )
    p.add_argument("--name", default="mtp_speed", help="results/<name>.json")
    args = p.parse_args()
    if args.evict_mb < 0:
        p.error(f"--evict-mb must be 0 (no eviction) or a positive number of MB, not {args.evict_mb}")
    from dsv3.infer.cli import load
    from dsv3.infer.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    engines = {
        name: load(args.checkpoint, dtype=args.dtype, compile=args.compile, max_batch_size=1, **mtp)
        for name, mtp in (
            ("plain", {}),
            ("mtp", {"mtp": True, "mtp_drafts": args.mtp_drafts, "draft_vocab": args.draft_vocab}),
        )
    }
    tok = engines["plain"][1]
    work = prompts(tok, args.prompts, 64)
    greedy = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    evict = torch.ones(args.evict_mb * 2**18) if args.evict_mb else None  # 4-byte floats
    outputs = {}
    rates = {k: {"plain": [], "mtp": []} for k in ("end_to_end", "decode")}
    step_ms = {"plain": [], "mtp": []}
    for engine, _ in engines.values():
        engine.generate(work[:1], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm-up
    for r in range(args.repeats):
        order = ("plain", "mtp") if r % 2 == 0 else ("mtp", "plain")
        for name in order:
            engine = engines[name][0]
            runs = [timed_generation(engine, w, greedy, evict) for w in work]
            total, after_first = sum(run[1] for run in runs), sum(run[2] for run in runs)
            rates["end_to_end"][name].append(len(work) * args.tokens / total)
            rates["decode"][name].append(len(work) * (args.tokens - 1) / after_first)
            step_ms[name].append(after_first / sum(run[3] for run in runs) * 1e3)
            outputs[name] = [run[0] for run in runs]
        print(
            f"[{r + 1}/{args.repeats}] end to end: plain {rates['end_to_end']['plain'][-1]:.1f}, "
            f"mtp {rates['end_to_end']['mtp'][-1]:.1f} tok/s; decode: plain {rates['decode']['plain'][-1]:.1f}, "
            f"mtp {rates['decode']['mtp'][-1]:.1f} tok/s; decode forward {step_ms['plain'][-1]:.3f} vs "
            f"{step_ms['mtp'][-1]:.3f} ms"
        )
    identical = outputs["plain"] == outputs["mtp"]
    weights = weight_megabytes(engines["plain"][0])
    stats = engines["mtp"][0].stats()
    ratio, decode_ratio = (
        statistics.median(m / p for m, p in zip(rates[k]["mtp"], rates[k]["plain"]))
        for k in ("end_to_end", "decode")
    )
    step_ratio = statistics.median(m / p for m, p in zip(step_ms["mtp"], step_ms["plain"]))
    costs = step_costs(engines["mtp"][0], work[0])
    on_files = [t for t in (tok.encode(w) for w in texts(4 * args.prompts, offset=5)) if len(t) >= 257]
    on_text = text_acceptance(engines["mtp"][0].model, [t[:257] for t in on_files])
    result = {
        "checkpoint": args.checkpoint,
        "compiled": args.compile,
        "dtype": str(engines["plain"][0].dtype).removeprefix("torch."),
        "threads": args.threads,
        "draft_vocab": args.draft_vocab or "engine default",
        "mtp_drafts": args.mtp_drafts,
        "evict_mb": args.evict_mb,
        "tokens_per_prompt": args.tokens,
        "prompts": len(work),
        "plain_tokens_per_s": round(statistics.median(rates["end_to_end"]["plain"]), 1),
        "mtp_tokens_per_s": round(statistics.median(rates["end_to_end"]["mtp"]), 1),
        "ratio_mtp_over_plain": round(ratio, 3),
        "decode_plain_tokens_per_s": round(statistics.median(rates["decode"]["plain"]), 1),
        "decode_mtp_tokens_per_s": round(statistics.median(rates["decode"]["mtp"]), 1),
        "decode_ratio_mtp_over_plain": round(decode_ratio, 3),
        "mtp_acceptance_rate": round(stats["mtp_acceptance_rate"], 3),
        "tokens_per_forward": round(stats["tokens_per_forward"], 3),
        "identical_output": identical,
        "decode_forward_ms": {k: round(statistics.median(v), 4) for k, v in step_ms.items()},
        "decode_forward_ratio_mtp_over_plain": round(step_ratio, 3),
        "text_acceptance": round(on_text, 3),
        "text_acceptance_sequences": len(on_files),
        "weights_mb": weights,
        "step_costs": costs,
        "samples": rates,
        "decode_forward_ms_samples": step_ms,
    }
    print(
        f"\n{machine()['cpu']}, {args.threads} thread(s): end to end MTP {result['mtp_tokens_per_s']} vs plain "
        f"{result['plain_tokens_per_s']} tok/s = {ratio:.2f}x; decode (after the first token) "
        f"{result['decode_mtp_tokens_per_s']} vs {result['decode_plain_tokens_per_s']} tok/s = "
        f"{decode_ratio:.2f}x; acceptance {result['mtp_acceptance_rate']:.0%}, "
        f"{result['tokens_per_forward']:.2f} tokens/forward; identical output: {identical}\n"
        f"a decode forward costs {step_ratio:.2f} plain ones (1.25x needs <= "
        f"{result['tokens_per_forward'] / 1.25:.2f}); teacher-forced acceptance on text: "
        f"{on_text:.0%} ({len(on_files)} x 256 tokens of other stdlib modules)\n"
        f"weights: {weights['all']} MB, {weights['per_token']} MB read per plain token, MTP module "
        f"{weights['mtp_per_pass']} MB per pass; L3 cache {cache_size(3)}\n"
        f"an MTP step, its calls replayed: 1 plain step + {costs['verify_extra_tokens_in_plain_steps']:.2f} "
        f"(the verify's {args.mtp_drafts} more token(s)) + {costs['mtp_module_in_plain_steps']:.2f} (the MTP "
        f"module drafting) = {costs['us']['MTP step'] / costs['us']['one token']:.2f} plain steps "
        f"({', '.join(f'{k} {v:.0f} us' for k, v in costs['us'].items())})"
    )
    print(f"results: {save_result(args.name, result)}")
    if not identical:
        sys.exit("error: MTP changed the greedy output")


if __name__ == "__main__":
    main()
