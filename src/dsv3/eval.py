"""`dsv3 eval`: loss, perplexity and bits per byte of a checkpoint on held-out text.

    dsv3 eval --checkpoint runs/sft --data heldout.jsonl          # any --data that dsv3 train reads
    dsv3 eval --checkpoint runs/tiny --data notes.txt --stride 64 --json

What is scored. The records are read and tokenized as training reads them (dsv3.train.data): a
text document is <|bos|> + its tokens + <|eos|>, a chat its conversation rendered with the chat
template served with the checkpoint. The documents are packed back to back into one stream, and
each token is a target except a document's first (<|bos|>: nothing before it in its document)
and, in a chat, the tokens outside its assistant turns (fine-tuning does not learn to write
them: dsv3.train.sft). Each document is read as if alone, as training reads packed documents
kept apart: attention stays inside it and RoPE positions restart at its first token.

Windows. The model reads the stream in windows of L = --seq-len tokens (default: the sequence
length the checkpoint was trained with, else its max_position_embeddings). Window k feeds tokens
kS .. kS+L-1 (S = --stride, default L) and scores the targets it predicts that no earlier window
scored: all of them in the first window, its last S after. With S = L the windows do not overlap,
as training reads data, and a token is predicted from the 0..L-1 tokens before it in its window
and document. With S < L every token after the first window has at least L - S tokens of
context (within its document), for L / S times the compute: nearer the loss the model would have
with unlimited context. Every target is scored exactly once whatever S.

Numbers. loss = the targets' total negative log-likelihood (nats) / their number; perplexity =
exp(loss); bits per byte = total nats / ln 2 / bytes, where bytes are the UTF-8 bytes of the
scored tokens decoded, special tokens as nothing: a text document's text (its <|eos|> is scored
and adds no byte), a chat's assistant turns. Loss and perplexity compare models that share a
tokenizer; bits per byte compares any. The log-likelihoods are log_softmax of the raw logits in
float64 sums (the model runs in --dtype, float32 by default, so that a number does not depend on
which dtype this machine runs fastest).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsv3.model.loss import IGNORE_INDEX
from dsv3.train.packing import Part, Stream

HEAD_ROWS = 1024  # scored positions whose logits are computed at a time (bounds [rows, vocab] memory)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


DATA_HELP = (
    "held-out data, as dsv3 train reads it: text files or folders, .jsonl, .parquet, a datasets folder, "
    "hf:NAME (cached); records with 'messages' are chats, scored on their assistant turns"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or HF folder")
    parser.add_argument("--data", nargs="+", required=True, metavar="SOURCE", help=DATA_HELP)
    parser.add_argument("--text-field", default="text", help="the field that holds a document's text")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per window (default: the training seq_len, else max_position_embeddings)",
    )
    parser.add_argument(
        "--stride",
        type=int,
        default=None,
        help="tokens between window starts (default: --seq-len, windows that do not overlap); a smaller "
        "stride gives every token after the first window at least seq_len - stride tokens of context",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weights and compute")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


# ------------------------------------------------------------------------------------- documents
@dataclass(frozen=True)
class Documents:
    """The held-out data as one stream of documents, and what it holds."""

    stream: Stream  # tokens, document starts, learned mask (1 where a token may be a target)
    bytes: int  # UTF-8 bytes of the scored tokens, decoded
    bad: list[str]  # the bad records skipped ("where: why")


def read_documents(specs: list[str], tok, template: str, text_field: str = "text") -> Documents:
    """Read and tokenize `specs` as dsv3 train does (tok: a TokenizerInfo, template: the chat
    template); DataError for missing or unusable data."""
    from dsv3.errors import DataError
    from dsv3.train.data import Corpus, encoded_documents

    pieces, learned, bad = [], [], []
    for _, record, doc in encoded_documents(Corpus(specs, text_field=text_field), tok, template):
        if isinstance(doc, str):
            bad.append(f"{record.where}: {doc}")
        elif doc[0]:  # an empty text is no document
            ids, mask = doc
            pieces.append(np.asarray(ids, dtype=np.int64))
            learned.append(np.ones(len(ids), np.uint8) if mask is None else np.asarray(mask, np.uint8))
    if not pieces:
        raise DataError(f"--data {' '.join(specs)} holds no documents to score (its texts are empty)")
    tokens = np.concatenate(pieces)
    starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
    stream = Stream(tokens, starts, np.concatenate(learned), (Part("eval", 0, len(tokens)),))
    scored = np.where(targets(stream), tokens, -1)
    texts = tok.tokenizer.decode_batch(
        [doc[doc >= 0].tolist() for doc in np.split(scored, starts[1:])], skip_special_tokens=True
    )
    return Documents(stream, sum(len(text.encode("utf-8")) for text in texts), bad)


def targets(stream: Stream) -> np.ndarray:
    """[N] bool: the tokens that are scored: learned, and not the first of their document."""
    mask = np.ones(len(stream.tokens), bool) if stream.learned is None else stream.learned == 1
    mask[stream.starts] = False
    return mask


# --------------------------------------------------------------------------------------- scoring
def windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows over a stream of n tokens: (a, b, first) = feed tokens a..b-1 and score
    targets first..b (target j is predicted at position j - 1); "Windows" in the module docstring."""
    out, a, last = [], 0, 0
    while last < n - 1:
        b = min(a + seq_len, n - 1)
        out.append((a, b, last + 1))
        a, last = a + stride, b
    return out


@dataclass(frozen=True)
class Scores:
    nats: np.ndarray  # [documents] float64: negative log-likelihood of each document's targets
    tokens: np.ndarray  # [documents] int64: targets scored per document


@torch.no_grad()
def score(model, stream: Stream, seq_len: int, stride: int, batch_size: int = 8, advance=None) -> Scores:
    """Every target of `stream` scored once, in windows (module docstring) of which batch_size go
    through one forward as a right-padded batch; advance(n) gets the targets each forward scored."""
    tokens, starts = stream.tokens, stream.starts
    docs = np.searchsorted(starts, np.arange(len(tokens)), side="right") - 1  # [N] each token's document
    scored = targets(stream)
    nats, counts = np.zeros(len(starts)), np.zeros(len(starts), dtype=np.int64)
    device = model.embed_tokens.weight.device
    spans = windows(len(tokens), seq_len, stride)
    for lo in range(0, len(spans), batch_size):
        batch = spans[lo : lo + batch_size]
        T = max(b - a for a, b, _ in batch)
        ids = np.zeros((len(batch), T), dtype=np.int64)  # padding after a short window: causal, ignored
        labels = np.full((len(batch), T), IGNORE_INDEX, dtype=np.int64)
        segments = np.zeros((len(batch), T), dtype=np.int64)
        for row, (a, b, first) in enumerate(batch):
            ids[row, : b - a] = tokens[a:b]
            segments[row, : b - a] = docs[a:b] - docs[a]  # documents kept apart (attention, RoPE)
            segments[row, b - a :] = docs[b - 1] - docs[a] + 1
            j = np.arange(first, b + 1)  # the targets this window scores
            j = j[scored[j]]
            labels[row, j - 1 - a] = tokens[j]
        out = model(
            torch.from_numpy(ids).to(device), segments=torch.from_numpy(segments).to(device), logits_to_keep=1
        )
        rows, cols = np.nonzero(labels != IGNORE_INDEX)
        hidden = out.hidden[torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)]  # [M, H]
        nll = negative_log_likelihood(model, hidden, torch.from_numpy(labels[rows, cols]).to(device))
        owner = docs[np.array([a for a, _, _ in batch])[rows] + cols + 1]  # the document of each target
        np.add.at(nats, owner, nll)
        np.add.at(counts, owner, 1)
        if advance is not None:
            advance(len(rows))
    return Scores(nats, counts)


def negative_log_likelihood(model, hidden: torch.Tensor, wanted: torch.Tensor) -> np.ndarray:
    """-log_softmax(head(norm(hidden)))[wanted] per row [M] (float64), HEAD_ROWS rows at a time.
    hidden [M, H]: the last block's outputs; wanted [M]: the tokens they predict."""
    out = np.zeros(len(wanted))
    for i in range(0, len(wanted), HEAD_ROWS):
        logits = model.lm_head(model.norm(hidden[i : i + HEAD_ROWS]))  # [rows, V]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        nll = torch.nn.functional.cross_entropy(logits, wanted[i : i + HEAD_ROWS], reduction="none")
        out[i : i + HEAD_ROWS] = nll.double().cpu().numpy()
    return out


def summary(scores: Scores, num_bytes: int) -> dict[str, float | int]:
    """Scored tokens and bytes, loss (nats/token), perplexity, bits per byte."""
    nats, n = float(scores.nats.sum()), int(scores.tokens.sum())
    return {
        "tokens": n,
        "bytes": num_bytes,
        "loss": nats / n,
        "perplexity": math.exp(nats / n),
        "bits_per_byte": nats / math.log(2) / num_bytes,
    }


# ------------------------------------------------------------------------------------------ CLI
def run(args: argparse.Namespace) -> int:
    from dsv3.errors import UserError

    try:
        result = evaluate(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{result['checkpoint']} on {' '.join(result['data'])}: {result['documents']:,} documents, "
        f"{result['tokens']:,} tokens scored, {result['bytes']:,} bytes"
    )
    print(
        f"loss {result['loss']:.4f} nats/token   perplexity {result['perplexity']:.3f}   bits per byte "
        f"{result['bits_per_byte']:.4f}   (windows of {result['seq_len']} tokens, stride {result['stride']})"
    )
    return 0


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Check the options, read the data, load the weights, score: the result as a dict."""
    from dsv3.config import ModelConfig
    from dsv3.device import resolve_device
    from dsv3.errors import ConfigError, DataError
    from dsv3.hf import resolve_model_folder
    from dsv3.model.transformer import Transformer
    from dsv3.progress import progress
    from dsv3.tokenizer import load_tokenizer
    from dsv3.train.sft import chat_template_for

    folder = resolve_model_folder(args.checkpoint)
    cfg = ModelConfig.from_hf(folder)
    seq_len = args.seq_len or trained_seq_len(folder) or cfg.max_position_embeddings
    stride = args.stride or seq_len
    if not 1 <= seq_len <= cfg.max_position_embeddings:
        raise ConfigError(
            f"--seq-len {seq_len}: must be in [1, max_position_embeddings={cfg.max_position_embeddings}]"
        )
    if not 1 <= stride <= seq_len:
        raise ConfigError(f"--stride {stride}: must be in [1, --seq-len {seq_len}]")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be >= 1")
    if not (args.device in ("auto", "cpu") or args.device.startswith("cuda")):
        raise ConfigError(f"--device {args.device}: must be auto, cpu or cuda[:N]")
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: CUDA is not available on this machine")
    tokenizer = folder / "tokenizer.json"
    docs = read_documents(
        args.data, load_tokenizer(tokenizer, cfg.vocab_size), chat_template_for(tokenizer), args.text_field
    )
    if docs.bad:
        print(f"skipped {len(docs.bad):,} bad records (the first, {docs.bad[0]})", file=sys.stderr)
    total = int(targets(docs.stream).sum())
    if not total:
        raise DataError(f"--data {' '.join(args.data)}: no token to score (documents of one token)")
    model = Transformer.from_pretrained(folder, device=device, dtype=DTYPES[args.dtype]).eval()
    with progress(f"scoring {' '.join(args.data)}", total=total, unit="tokens", stream=sys.stderr) as advance:
        scores = score(model, docs.stream, seq_len, stride, args.batch_size, advance)
    return {
        "checkpoint": str(folder),
        "data": list(args.data),
        "documents": len(docs.stream.starts),
        **summary(scores, docs.bytes),
        "seq_len": seq_len,
        "stride": stride,
    }


def trained_seq_len(folder: Path) -> int | None:
    """The seq_len of the run that wrote this checkpoint (its train_config.json), if it has one."""
    config = folder / "train_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("train", {}).get("data", {}).get("seq_len")
