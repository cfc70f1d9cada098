"""`dsv3 generate`: continue a prompt, or chat, with a checkpoint; tokens stream to the terminal.

    dsv3 generate --checkpoint runs/tiny --prompt "def fibonacci(n):" --max-tokens 80
    dsv3 generate --checkpoint runs/tiny --chat            # interactive: one line per user turn
    dsv3 generate --checkpoint runs/tiny --prompt "..." --temperature 0 --mtp

`--checkpoint` may be a run folder (its latest checkpoint, else its hf/ export), a checkpoint
folder, or any Hugging Face-layout folder (config.json, safetensors, tokenizer.json; FP8 too).
One-shot mode prints the prompt, prefixed with <|bos|> as in training, and its continuation as
it is generated. Chat mode (--chat, or no --prompt) keeps the conversation and renders it with
the chat template stored with the tokenizer (dsv3.infer.chat); `/reset` clears it, `/exit` or
end of input quits. Both run through the serving Engine (latent cache, absorbed decode, MTP
drafting with --mtp); a stats line (tokens/s, MTP acceptance) goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dsv3.infer.distributed import add_arguments as add_expert_parallel_arguments

    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or HF folder")
    parser.add_argument("--prompt", default=None, help="text to continue (without it: interactive chat)")
    parser.add_argument(
        "--chat", action="store_true", help="chat mode (--prompt, if given, is the first turn)"
    )
    parser.add_argument("--system", default=None, help="system prompt for chat mode")
    parser.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style (1 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")
    add_engine_arguments(parser)
    add_expert_parallel_arguments(parser)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine options `dsv3 generate` and `dsv3 serve` share."""
    from dsv3.device import DTYPE_CHOICES

    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="weights and compute: auto (BF16 only where this CPU's BF16 GEMMs are faster, measured "
        "once and cached), bfloat16 or float32",
    )
    parser.add_argument(
        "--weights",
        choices=("auto", "fp8", "bf16", "fp32"),
        default="auto",
        help="auto: an FP8 checkpoint's weights stay FP8, dequantized per GEMM (else --dtype); fp8: "
        "also quantize other checkpoints at load; bf16/fp32: dequantize at load to that dtype",
    )
    parser.add_argument("--mtp", action="store_true", help="MTP self-speculative decoding")
    parser.add_argument(
        "--mtp-drafts",
        type=int,
        default=1,
        help="with --mtp: tokens drafted per step, the MTP module run again on its own output for "
        "each after the first (V3's one module; default 1; the output is the same either way)",
    )
    parser.add_argument(
        "--draft-vocab",
        type=int,
        default=None,
        help="with --mtp: draft among this many most frequent tokens, the lowest ids of a BPE "
        "vocabulary (default: an eighth of the vocabulary; the output is the same either way)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (faster tokens; a minute of compiling at start, cached)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="feed long prompts in chunks of this many tokens, interleaved with decoding",
    )


def engine_options(args: argparse.Namespace) -> dict:
    """`load`'s keyword arguments from the options of `add_engine_arguments`."""
    names = ("dtype", "weights", "mtp", "mtp_drafts", "draft_vocab", "compile", "prefill_chunk")
    if args.draft_vocab is not None and not args.mtp:
        raise ValueError(
            f"--draft-vocab {args.draft_vocab} is for --mtp's drafts: add --mtp or drop --draft-vocab"
        )
    if args.mtp_drafts != 1 and not args.mtp:
        raise ValueError(
            f"--mtp-drafts {args.mtp_drafts} is for --mtp's drafts: add --mtp or drop --mtp-drafts"
        )
    return {name: getattr(args, name) for name in names}


def load(
    checkpoint: str | Path,
    tokenizer: str | Path | None = None,
    dtype: str = "auto",
    weights: str = "auto",
    engine_class=None,
    **engine_kwargs,
):
    """(Engine, ChatTokenizer) for a checkpoint; the tokenizer is checked before the weights load.
    dtype "auto" picks the compute dtype by measuring this machine's GEMMs at decode shapes;
    weights (dsv3.fp8.resident) keeps FP8 weights FP8, or names the dtype to dequantize them to.
    engine_class: an Engine subclass to build instead (disaggregated prefill/decode workers)."""
    from dsv3.config import ModelConfig
    from dsv3.device import choose_dtype, gemm_shapes, measure_decode_gemms
    from dsv3.hf import resolve_model_folder
    from dsv3.infer.chat import ChatTokenizer
    from dsv3.infer.engine import Engine

    folder = resolve_model_folder(Path(checkpoint))
    cfg = ModelConfig.from_hf(folder)
    tok = ChatTokenizer.from_folder(folder, cfg.vocab_size, tokenizer)
    torch_dtype = None  # weights="bf16"/"fp32" name the dtype themselves
    if not (weights in ("bf16", "fp32") and dtype == "auto"):
        shapes = gemm_shapes(cfg, tokens=engine_kwargs.get("max_batch_size", 8))
        choice = choose_dtype(dtype, shapes, measure=measure_decode_gemms)
        print(f"dtype: {choice.describe()}", file=sys.stderr, flush=True)
        if choice.warning():
            print(f"warning: {choice.warning()}", file=sys.stderr, flush=True)
        torch_dtype = choice.dtype
    engine = (engine_class or Engine).from_pretrained(
        folder,
        dtype=torch_dtype,
        weights=weights,
        decode=tok.decode,
        eos_token_id=tok.eos_id,
        **engine_kwargs,
    )
    if engine.compiled:
        print("compiling the decode and prefill steps ...", file=sys.stderr, flush=True)
        engine.warmup()
    return engine, tok


@dataclass
class Generation:
    text: str
    finish_reason: str | None
    num_tokens: int
    first_token_s: float  # prompt -> first token (prefill)
    total_s: float


def stream(engine, prompt_ids: list[int], params, out: TextIO | None = None, prefix: str = "") -> Generation:
    """Run one request through the engine, writing `prefix` (once the engine accepted the
    request) and then the generated text to `out` as it is produced."""
    from dsv3.infer.chat import TextDeltas

    started = time.perf_counter()
    first = None
    rid = engine.add_request(prompt_ids, params)
    if out is not None and prefix:
        out.write(prefix)
    deltas = TextDeltas(tuple(params.stop))
    while True:
        for o in engine.step():
            if o.request_id != rid:
                continue
            first = first if first is not None or not o.token_ids else time.perf_counter() - started
            piece = deltas.update(o.text, o.finished)
            if out is not None and piece:
                out.write(piece)
                out.flush()
            if o.finished:
                total = time.perf_counter() - started
                return Generation(o.text or "", o.finish_reason, len(o.token_ids), first or total, total)


def stats_line(g: Generation, engine_stats: dict) -> str:
    decode_s = g.total_s - g.first_token_s
    rate = (g.num_tokens - 1) / decode_s if g.num_tokens > 1 and decode_s > 0 else float("nan")
    line = (
        f"[{g.num_tokens} tokens in {g.total_s:.2f} s: first token {1e3 * g.first_token_s:.0f} ms, "
        f"then {rate:.1f} tokens/s; finish: {g.finish_reason}"
    )
    if engine_stats.get("mtp_acceptance_rate") is not None:
        line += (
            f"; MTP acceptance {100 * engine_stats['mtp_acceptance_rate']:.1f}% "
            f"({engine_stats.get('tokens_per_forward') or float('nan'):.2f} tokens/forward)"
        )
    return line + "]"


def chat(
    engine, tok, params, first: str | None, system: str | None, inp: TextIO, out: TextIO, err: TextIO
) -> None:
    """Interactive chat: read a user turn per line, stream the assistant's answer."""
    from dataclasses import replace

    history = [{"role": "system", "content": system}] if system else []
    params = replace(params, stop=tuple(params.stop) + tok.stop)
    turn = first
    while True:
        if turn is None:
            err.write("user> ")
            err.flush()
            line = inp.readline()
            if not line:
                break
            turn = line.rstrip("\n")
        text, turn = turn.strip(), None
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = history[:1] if system else []
            continue
        if not text:
            continue
        messages = history + [{"role": "user", "content": text}]
        ids = tok.encode_chat(messages)
        while len(ids) + params.max_tokens > engine.max_seq_len and len(messages) > 2 + bool(system):
            messages = messages[:1] + messages[3:] if system else messages[2:]  # drop the oldest exchange
            ids = tok.encode_chat(messages)
        try:
            g = stream(engine, ids, params, out)
        except ValueError as e:  # e.g. one message longer than the context: say so, keep chatting
            err.write(f"error: {e}\n")
            continue
        out.write("\n")
        out.flush()
        err.write(stats_line(g, engine.stats()) + "\n")
        history = messages + [{"role": "assistant", "content": g.text}]


def sample(
    folder: Path,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    tokenizer: Path | None = None,
) -> str:
    """Load the model in `folder` and return the prompt followed by its sampled continuation."""
    from dsv3.infer.sampling import SamplingParams

    engine, tok = load(folder, tokenizer, max_batch_size=1)
    params = SamplingParams(
        max_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k or 0,
        top_p=1.0 if top_p is None else top_p,
        seed=seed,
    )
    return prompt + stream(engine, tok.encode(prompt), params).text


def run(args: argparse.Namespace) -> int:
    from dsv3.errors import CheckpointError, ConfigError, DataError
    from dsv3.infer.chat import ChatError

    if args.ep is not None:  # expert parallelism over torchrun's ranks
        from dsv3.infer.distributed import generate

        return generate(args)
    params = sampling_params(args)
    try:
        params.validate()
        engine, tok = load(args.checkpoint, args.tokenizer, **engine_options(args), max_batch_size=1)
    except (CheckpointError, DataError, ConfigError, ChatError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return respond(engine, tok, args, params)


def sampling_params(args: argparse.Namespace):
    from dsv3.infer.sampling import SamplingParams

    names = "max_tokens temperature top_p top_k repetition_penalty seed".split()
    return SamplingParams(**{name: getattr(args, name) for name in names})


def respond(engine, tok, args: argparse.Namespace, params) -> int:
    """Chat, or continue --prompt, with a loaded engine; the exit status."""
    from dsv3.errors import CheckpointError, ConfigError, DataError
    from dsv3.infer.chat import ChatError

    try:
        if args.chat or args.prompt is None:
            chat(engine, tok, params, args.prompt, args.system, sys.stdin, sys.stdout, sys.stderr)
            return 0
        g = stream(engine, tok.encode(args.prompt), params, sys.stdout, prefix=args.prompt)
    except (CheckpointError, DataError, ConfigError, ChatError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    print()
    print(stats_line(g, engine.stats()), file=sys.stderr)
    return 0
