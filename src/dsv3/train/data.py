"""Training data: sources -> byte-level BPE tokenizer -> token cache (numpy memmaps) -> splits.

Corpus. The records of the `--data` specs, in order (dsv3.train.sources: text files and folders,
JSON Lines, Parquet, `datasets` folders, cached hf: datasets, each optionally weighted), streamed
record by record and cut after `max_bytes` bytes of input. Documents are text; chats
(records with `messages`) are rendered with the chat template and learned on their assistant turns
(dsv3.train.sft).

Tokenizer. A byte-level BPE (HF `tokenizers`) trained on the corpus on first use, with the special
tokens <|bos|> = 0 and <|eos|> = 1 (the ids ModelConfig expects), cached under the cache folder by
corpus fingerprint and vocab size; or a user's `tokenizer.json`.

Token cache. Every document becomes [bos] + tokens + [eos] (a chat: its rendered tokens, which the
template frames) and is appended to one of two splits, train or validation: document i goes to
validation when floor((i + 1) * f) > floor(i * f), i.e. every 1/f-th document is held out, whole.
A split is a flat uint16 (uint32 for vocabularies >= 65536) file of token ids (`train.bin`), the
int64 offsets where its documents start (`train.starts`), and, when the corpus holds chats, a uint8
mask of the tokens that may be targets (`train.learned`: 1 on assistant turns and on all text). The
files are written in one streaming pass (a progress bar shows bytes and documents) into a temporary
folder renamed into place, and then opened as memory maps, so a corpus larger than memory costs no
RAM. meta.json holds the counts per source, with its bad records (counted, the first few named). The
tokenizer and each token cache are built holding a lock file beside them (`<name>.lock`): runs
started together on one cache folder build each once, and the others wait for it and reuse it. The
mixture weights are not part of the cache: changing them reuses it.

Splits. `TokenCache.split(seq_len)` decides, before training starts, what training and validation
read (dsv3.train.packing.Stream). The document split above is used when the validation split holds
at least one window (seq_len + 1 tokens). With too few documents for that (one file; 99 files at
f = 0.01), validation is instead the last max(ceil(f * N), seq_len + 1) tokens of the training split
(N its length), cut inside a document, and the few validation tokens go unused. Data too small to
leave training one window as well is a DataError naming the sources, the token counts and the window
seq_len needs. Training reads one part, the whole split, or in a mixture one part per source (its
documents are contiguous), each of which must hold a window; validation reads the whole split.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsv3.checkpoint import write_file_atomically, write_folder_atomically
from dsv3.errors import DataError
from dsv3.infer.chat import DEFAULT_CHAT_TEMPLATE
from dsv3.progress import progress
from dsv3.tokenizer import TokenizerInfo, train_tokenizer
from dsv3.train.packing import Part, Stream
from dsv3.train.sft import encode_chats, plain_text
from dsv3.train.sources import READING_RULES, Record, Source, count, mixture, skipped_summary

CACHE_FORMAT = 2  # token caches of another layout are not reused
RECORDS_PER_BATCH = 64  # records tokenized at a time
EXAMPLES_SHOWN = 3  # bad records named per source
BACKFILL_CHUNK = 1 << 20


# ----------------------------------------------------------------------------------------- corpus
class Corpus:
    """The records named by a list of `--data` specs, in order, and the specs' mixture weights."""

    def __init__(self, specs: list[str], max_bytes: int | None = None, text_field: str = "text") -> None:
        if not specs:
            raise DataError("no data sources given")
        names, self.weights = mixture(list(specs))
        self.specs, self.max_bytes, self.text_field = list(specs), max_bytes, text_field
        self.sources = [Source(name, text_field) for name in names]

    def records(self) -> Iterator[tuple[int, Record]]:
        """(source index, record), in order, until max_bytes of input are read. A source whose
        records are all bad, or that has none, is a DataError naming it and its first bad record."""
        budget = math.inf if self.max_bytes is None else self.max_bytes
        for index, source in enumerate(self.sources):
            good, bad, first_bad = 0, 0, None
            for record in source.records():
                if budget <= 0:
                    return
                budget -= record.size
                if record.problem is None:
                    good += 1
                else:
                    bad, first_bad = bad + 1, first_bad or record
                yield index, record
            if first_bad is not None and not good:
                raise DataError(
                    f"every record of data source {source.spec} is bad ({count(bad, 'record')}); the first, "
                    f"{first_bad.where}: {first_bad.problem}"
                )
            if not good:
                raise DataError(f"data source {source.spec} holds no records")

    def __iter__(self) -> Iterator[str]:
        """The texts, chats as plain text with role markers: what a tokenizer is trained on."""
        for _, record in self.records():
            if record.text is not None:
                yield record.text
            elif record.messages is not None:
                yield plain_text(record.messages)

    @property
    def size(self) -> int:
        """Bytes of input to read."""
        total = sum(source.size for source in self.sources)
        return total if self.max_bytes is None else min(total, self.max_bytes)

    def fingerprint(self) -> str:
        """Changes whenever a file (read or skipped) or a dataset is added, removed or modified, or
        the way they are read; not with the mixture weights."""
        names = [source.spec for source in self.sources]
        h = hashlib.sha256(json.dumps([names, self.max_bytes, self.text_field, READING_RULES]).encode())
        for source in self.sources:
            for line in source.describe():
                h.update(f"{line}\n".encode())
        return h.hexdigest()[:16]

    def skipped_summary(self) -> str:
        """E.g. "skipped 2 binary files (a.bin, b.bin) and 1 empty file (c.txt)"; "" if none."""
        return skipped_summary(
            {kind: [p for s in self.sources for p in s.skipped[kind]] for kind in ("binary", "empty")}
        )


# -------------------------------------------------------------------------------------- tokenizer
def cached_tokenizer(corpus: Corpus, vocab_size: int, cache_dir: Path) -> Path:
    """Path of the tokenizer trained on this corpus, training and caching it on first use."""
    path = cache_dir / f"tokenizer-{corpus.fingerprint()}-{vocab_size}.json"
    if not path.is_file():
        with _building(path):
            if not path.is_file():  # another run may have trained it while we waited
                with progress(
                    f"training a byte-level BPE tokenizer (vocab {vocab_size})", corpus.size, "bytes"
                ) as advance:
                    texts = (advance(len(t.encode())) or t for t in corpus)
                    write_file_atomically(path, train_tokenizer(texts, vocab_size).to_str())
    return path


@contextmanager
def _building(target: Path) -> Iterator[None]:
    """Hold the lock `target`.lock while building `target`: concurrent runs build it once."""
    from filelock import FileLock, Timeout

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(target.parent / f"{target.name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another run that is building {target} ...", flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


# ------------------------------------------------------------------------------------ token cache
@dataclass(frozen=True)
class Split:
    """What training and validation read (see "Splits" in the module docstring)."""

    train: Stream
    val: Stream
    summary: str  # one line: the sources, their size, skipped files, bad records, how validation was chosen


@dataclass(frozen=True)
class TokenCache:
    """The tokenized corpus on disk (module docstring), and the corpus's mixture weights."""

    folder: Path
    weights: tuple[float, ...] | None = None

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.folder / "meta.json").read_text())

    def tokens(self, split: str) -> np.ndarray:
        """The token ids of split "train" or "val" [tokens]."""
        meta = self.meta
        return self._map(f"{split}.bin", meta["dtype"], meta[split])

    def stream(self, split: str) -> Stream:
        """A whole split as one part, with its document starts and learned mask."""
        meta = self.meta
        tokens = self.tokens(split)
        documents = meta["documents"] - meta["val_documents"] if split == "train" else meta["val_documents"]
        starts = self._map(f"{split}.starts", "int64", documents)
        learned = self._map(f"{split}.learned", "uint8", len(tokens)) if meta["chats"] else None
        return Stream(tokens, starts, learned, (Part(split, 0, len(tokens)),))

    def _map(self, name: str, dtype: str, length: int) -> np.ndarray:
        if length == 0:  # numpy cannot map an empty file
            return np.zeros(0, dtype=dtype)
        return np.memmap(self.folder / name, dtype=dtype, mode="r", shape=(length,))

    def split(self, seq_len: int) -> Split:
        """Training and validation streams for windows of seq_len + 1 tokens; DataError if too small."""
        meta = self.meta
        train, val = self.stream("train"), self.stream("val")
        window, fraction, n = seq_len + 1, meta["val_fraction"], len(train.tokens)
        data = self._describe(meta)
        if len(val.tokens) >= window:
            end = n
            how = (
                f"{count(meta['val_documents'], 'whole document')} held out (val_fraction {fraction}), "
                f"{count(len(val.tokens), 'token')}"
            )
        else:
            whole = (
                f"{count(meta['val_documents'], 'whole document')} held out would give {len(val.tokens):,}"
            )
            end = n - max(math.ceil(fraction * n), window)
            val = Stream(train.tokens, train.starts, train.learned, (Part("val", max(end, 0), n),))
            how = (
                f"the last {count(n - max(end, 0), 'token')} (val_fraction {fraction}, at least one window of "
                f"seq_len + 1 = {window}; {whole})"
            )
        if end < window:
            raise DataError(
                f"{data} is too small for seq_len {seq_len}: validation takes {how}, leaving "
                f"{count(max(end, 0), 'token')} for training, which needs at least one window of "
                f"seq_len + 1 = {window}; add text or lower --seq-len"
            )
        parts = self._train_parts(meta, end, window)
        return Split(
            Stream(train.tokens, train.starts, train.learned, parts), val, f"{data}; validation: {how}"
        )

    def _train_parts(self, meta: dict[str, Any], end: int, window: int) -> tuple[Part, ...]:
        """The whole training split, or one part per source of a mixture, each holding a window."""
        if self.weights is None:
            return (Part("train", 0, end),)
        parts, start = [], 0
        for source, weight in zip(meta["sources"], self.weights):
            stop = min(start + source["train_tokens"], end)
            if stop - start < window:
                raise DataError(
                    f"data source {source['spec']}:{weight:g} leaves {count(max(stop - start, 0), 'token')} for "
                    f"training, fewer than one window of seq_len + 1 = {window}; add data to it, lower --seq-len "
                    "or leave it out of the mixture"
                )
            parts.append(Part(source["spec"], start, stop, weight))
            start += source["train_tokens"]
        return tuple(parts)

    def _describe(self, meta: dict[str, Any]) -> str:
        """The data, e.g. `data a.jsonl:0.7 (120 documents, 50,000 tokens), b.parquet:0.3 (...); bad ...`."""
        weights = self.weights or [None] * len(meta["sources"])
        sizes = [
            f"{s['spec']}{'' if w is None else f':{w:g}'} ({count(s['documents'], 'document')}, "
            f"{count(s['train_tokens'] + s['val_tokens'], 'token')})"
            for s, w in zip(meta["sources"], weights)
        ]
        notes = [meta["skipped"]] if meta["skipped"] else []
        for s in meta["sources"]:
            if s["bad"]:
                more = ", ..." if s["bad"] > len(s["bad_examples"]) else ""
                notes.append(
                    f"{count(s['bad'], 'bad record')} in {s['spec']} skipped ({'; '.join(s['bad_examples'])}{more})"
                )
        return "data " + ", ".join(sizes) + "".join(f"; {note}" for note in notes)


def build_token_cache(
    corpus: Corpus,
    tok: TokenizerInfo,
    val_fraction: float,
    cache_dir: Path,
    chat_template: str = DEFAULT_CHAT_TEMPLATE,
) -> TokenCache:
    """Tokenize the corpus once into cache_dir (keyed by corpus, tokenizer, template and split); reuse it after."""
    key = hashlib.sha256(
        f"{CACHE_FORMAT}\0{corpus.fingerprint()}\0{tok.tokenizer.to_str()}\0{val_fraction}\0{chat_template}".encode()
    ).hexdigest()[:16]
    folder = cache_dir / f"tokens-{key}"
    if not (folder / "meta.json").is_file():
        with _building(folder):
            if not (folder / "meta.json").is_file():  # another run may have built it while we waited
                write_folder_atomically(
                    folder, lambda tmp: _tokenize_into(corpus, tok, val_fraction, chat_template, tmp)
                )
    return TokenCache(folder, None if corpus.weights is None else tuple(corpus.weights))


class _SplitWriter:
    """Appends documents to one split's files: token ids, document starts and, once a chat has been
    written, the learned mask (1 for every earlier token, filled in then)."""

    def __init__(self, folder: Path, name: str, dtype: type) -> None:
        self.folder, self.name, self.dtype, self.length = folder, name, dtype, 0
        self.tokens, self.starts = open(folder / f"{name}.bin", "wb"), open(folder / f"{name}.starts", "wb")
        self.learned: Any = None

    def add(self, ids: list[int], learned: np.ndarray | None) -> None:
        if learned is not None:
            self.keep_learned()
        self.starts.write(np.int64(self.length).tobytes())
        self.tokens.write(np.asarray(ids, dtype=self.dtype).tobytes())
        if self.learned is not None:
            self.learned.write((np.ones(len(ids), np.uint8) if learned is None else learned).tobytes())
        self.length += len(ids)

    def keep_learned(self) -> None:
        """Write the learned mask from now on (every token so far is learned: text)."""
        if self.learned is None:
            self.learned = open(self.folder / f"{self.name}.learned", "wb")
            for start in range(0, self.length, BACKFILL_CHUNK):
                self.learned.write(np.ones(min(BACKFILL_CHUNK, self.length - start), np.uint8).tobytes())

    def close(self) -> None:
        for f in (self.tokens, self.starts, self.learned):
            if f is not None:
                f.close()


def _tokenize_into(
    corpus: Corpus, tok: TokenizerInfo, val_fraction: float, template: str, folder: Path
) -> None:
    """Write both splits' files and meta.json (counts and bad records per source) into folder."""
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    stats = [
        {"spec": s.spec, "documents": 0, "train_tokens": 0, "val_tokens": 0, "bad": 0, "bad_examples": []}
        for s in corpus.sources
    ]
    documents = val_documents = 0
    train, val = _SplitWriter(folder, "train", dtype), _SplitWriter(folder, "val", dtype)
    try:
        with _progress(corpus) as advance:
            for index, record, doc in encoded_documents(corpus, tok, template):
                stat = stats[index]
                if isinstance(doc, str):
                    stat["bad"] += 1
                    if len(stat["bad_examples"]) < EXAMPLES_SHOWN:
                        stat["bad_examples"].append(f"{record.where}: {doc}")
                elif doc[0]:  # an empty text is no document
                    held_out = int((documents + 1) * val_fraction) > int(documents * val_fraction)
                    (val if held_out else train).add(*doc)
                    stat["documents"] += 1
                    stat["val_tokens" if held_out else "train_tokens"] += len(doc[0])
                    documents, val_documents = documents + 1, val_documents + held_out
                advance(record.size, documents=documents)
        chats = train.learned is not None or val.learned is not None
        if chats:  # both splits get the mask, so both are packed the same way
            train.keep_learned()
            val.keep_learned()
    finally:
        train.close()
        val.close()
    for stat in stats:
        if not stat["documents"]:
            why = (
                f"every record is bad ({count(stat['bad'], 'record')}); the first, {stat['bad_examples'][0]}"
                if stat["bad"]
                else "its texts are empty"
            )
            raise DataError(f"data source {stat['spec']} gives no documents: {why}")
    meta = {
        "format": CACHE_FORMAT,
        "dtype": np.dtype(dtype).name,
        "train": train.length,
        "val": val.length,
        "documents": documents,
        "val_documents": val_documents,
        "val_fraction": val_fraction,
        "chats": chats,
        "sources": stats,
        "skipped": corpus.skipped_summary(),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))


def encoded_documents(corpus: Corpus, tok: TokenizerInfo, template: str):
    """(source index, record, document) for every record of the corpus, tokenized in batches:
    document = (token ids, learned mask or None for text) as `encode_records` makes it, or why the
    record is bad."""
    for batch in _batched(corpus.records(), RECORDS_PER_BATCH):
        yield from (
            (i, r, doc) for (i, r), doc in zip(batch, encode_records([r for _, r in batch], tok, template))
        )


def encode_records(
    records: list[Record], tok: TokenizerInfo, template: str
) -> list[tuple[list[int], np.ndarray | None] | str]:
    """Per record: (token ids, learned mask or None for text), or why it is bad. Text becomes
    bos + tokens + eos; a chat is rendered with `template` (train/sft.py)."""
    texts = [r.text for r in records if r.text is not None]
    chats = [r.messages for r in records if r.messages is not None]
    bos = [] if tok.bos_id is None else [tok.bos_id]
    encoded_texts = iter(tok.tokenizer.encode_batch(texts, add_special_tokens=False))
    encoded_chats = iter(encode_chats(chats, tok, template))  # type: ignore[arg-type]
    out: list[tuple[list[int], np.ndarray | None] | str] = []
    for r in records:
        if r.problem is not None:
            out.append(r.problem)
        elif r.text is not None:
            ids = next(encoded_texts).ids
            out.append((bos + ids + [tok.eos_id] if ids else [], None))
        else:
            out.append(next(encoded_chats))
    return out


def _progress(corpus: Corpus):
    """Progress over the corpus's bytes; yields advance(bytes read, documents=so far)."""
    return progress(
        "tokenizing " + ", ".join(s.spec for s in corpus.sources), total=corpus.size, unit="bytes"
    )


def _batched(items: Iterator[Any], n: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
