"""Training data: corpus -> byte-level BPE tokenizer -> token cache (numpy memmap) -> packed batches.

Corpus. A list of source specs, read in a fixed order:
  * "stdlib"            the `.py` sources (code and docstrings) of the Python standard library that
                        ships with the interpreter: ~30 MB of real text on every machine, no download;
  * a file or folder    your own text (folders are walked for TEXT_SUFFIXES files, sorted);
  * "hf:NAME[:CONFIG]"  a Hugging Face dataset's "text" column, only if `datasets` is installed and
                        the dataset is already cached (we never download at run time).

Reading files. A file is read as UTF-8 (a leading BOM dropped); a byte that is not part of valid
UTF-8 is read as the Latin-1 character of the same value. So Latin-1 and Windows-1252 files keep
their accented letters (no detection guesswork: every byte is a Latin-1 character), and a stray
byte in a UTF-8 file costs one character, not the file. Empty files and binary files are skipped,
counted, and the first few named in the data summary; a file is binary when its first 8000 bytes
hold a NUL (git's rule) or more than 1% of them are control codes that text does not use.

Tokenizer. A byte-level BPE (HF `tokenizers`) trained on the corpus on first use, with the special
tokens <|bos|> = 0 and <|eos|> = 1 (the ids ModelConfig expects), cached under the cache folder by
corpus fingerprint and vocab size; or a user's `tokenizer.json`.

Token cache. Every document becomes [bos] + tokens + [eos] and is appended to one of two flat uint16
(uint32 for vocabularies >= 65536) files, train.bin or val.bin: document i goes to validation when
floor((i + 1) * f) > floor(i * f), i.e. every 1/f-th document is held out, whole. The files are
written once (with a progress bar) into a temporary folder renamed into place, and then opened as
memory maps, so a 10 GB corpus costs no RAM. The tokenizer and each token cache are built holding
a lock file beside them (`<name>.lock`): runs started together on one cache folder build each once,
and the others wait for it and reuse it.

Splits. `TokenCache.split(seq_len)` decides, before training starts, what training and validation
read. The document split above is used when val.bin holds at least one window (seq_len + 1 tokens).
With too few documents for that (one file; 99 files at f = 0.01), validation is instead the last
max(ceil(f * N), seq_len + 1) tokens of train.bin (N its length), cut inside a document, and the few
tokens of val.bin go unused. Data too small to leave training one window as well is a DataError
naming the sources, the token counts and the window seq_len needs.

Packing. The stream is cut into non-overlapping windows of seq_len + 1 tokens; a window gives
input_ids = w[:-1] and pre-shifted labels = w[1:]. Documents are packed back to back, so where an input
token is <|eos|> its target would be the first token of the next document: that label is set to -100,
which both removes it from the loss and cuts the model's multi-token-prediction chains there.

Loader. `Loader` visits the train windows in a seeded random permutation per epoch; its whole state
is (seed, epoch, cursor), saved in checkpoints, so a resumed run sees exactly the batches it would
have seen without the interruption.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import os
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsv3.checkpoint import write_file_atomically, write_folder_atomically
from dsv3.errors import DataError
from dsv3.model.loss import IGNORE_INDEX
from dsv3.tokenizer import TokenizerInfo, train_tokenizer

TEXT_SUFFIXES = frozenset(
    {".txt", ".md", ".rst", ".py", ".c", ".h", ".cpp", ".rs", ".js", ".ts", ".html", ".tex"}
)
# How files become text (module docstring). Part of the corpus fingerprint, so tokenizers and token
# caches made under other rules are not reused.
READING_RULES = "utf-8-sig, other bytes as latin-1; empty files and binary files (NUL, >1% controls) skipped"
BINARY_SAMPLE_BYTES = 8000  # git looks for a NUL in this many leading bytes
BINARY_CONTROL_FRACTION = 0.01
# Bytes that occur in text: the printable range of any 8-bit encoding plus \a \b \t \n \v \f \r ESC.
TEXT_BYTES = bytes(sorted({7, 8, 9, 10, 11, 12, 13, 27} | set(range(0x20, 0x100)) - {0x7F}))
LATIN1_FOR_INVALID_UTF8 = "dsv3-latin1-for-invalid-utf8"
SKIPPED_NAMES_SHOWN = 3


def _latin1_for_invalid_utf8(error: UnicodeError) -> tuple[str, int]:
    """Codec error handler: the bytes a UTF-8 decoder rejects, read one character per byte as Latin-1."""
    assert isinstance(error, UnicodeDecodeError)
    return error.object[error.start : error.end].decode("latin-1"), error.end


codecs.register_error(LATIN1_FOR_INVALID_UTF8, _latin1_for_invalid_utf8)


def read_text_file(path: Path) -> str:
    """A text file's contents: UTF-8, with bytes that are not valid UTF-8 read as Latin-1."""
    return path.read_bytes().decode("utf-8-sig", errors=LATIN1_FOR_INVALID_UTF8)


# ----------------------------------------------------------------------------------------- corpus
class Corpus:
    """The documents named by a list of source specs, in a fixed order (see the module docstring)."""

    def __init__(self, specs: list[str], max_bytes: int | None = None) -> None:
        if not specs:
            raise DataError("no data sources given")
        self.specs = list(specs)
        files: list[Path] = []
        self.datasets: list[tuple[str, Any]] = []
        for spec in specs:
            if spec == "stdlib":
                files += _stdlib_files()
            elif spec.startswith("hf:"):
                self.datasets.append((spec, _load_cached_hf_dataset(spec)))
            else:
                files += _user_files(Path(spec))
        self.files, self.skipped = _text_files(files, max_bytes)
        if not self.files and not self.datasets:
            skipped = self.skipped_summary()
            raise DataError(
                f"data sources {specs} contain no documents" + (f" ({skipped})" if skipped else "")
            )
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self.files) + sum(len(ds) for _, ds in self.datasets)

    def __iter__(self) -> Iterator[str]:
        for path in self.files:
            yield read_text_file(path)
        for _, ds in self.datasets:
            for row in ds:
                yield row["text"]

    def fingerprint(self) -> str:
        """Changes whenever a file (read or skipped) or a dataset is added, removed or modified."""
        h = hashlib.sha256(json.dumps([self.specs, self.max_bytes, READING_RULES]).encode())
        for path in [*self.files, *self.skipped["binary"], *self.skipped["empty"]]:
            st = path.stat()
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        for spec, ds in self.datasets:
            h.update(f"{spec}\0{getattr(ds, '_fingerprint', len(ds))}\n".encode())
        return h.hexdigest()[:16]

    def skipped_summary(self) -> str:
        """E.g. "skipped 2 binary files (a.bin, b.bin) and 1 empty file (c.txt)"; "" if none."""
        parts = []
        for kind, paths in self.skipped.items():
            if paths:
                names = ", ".join(str(p) for p in paths[:SKIPPED_NAMES_SHOWN])
                if len(paths) > SKIPPED_NAMES_SHOWN:
                    names += f", and {len(paths) - SKIPPED_NAMES_SHOWN} more"
                parts.append(f"{_count(len(paths), kind + ' file')} ({names})")
        return "skipped " + " and ".join(parts) if parts else ""


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def _user_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"data folder {path} has no text files (suffixes {sorted(TEXT_SUFFIXES)})")
        return files
    raise DataError(f"data path {path} does not exist (give a file, a folder, 'stdlib' or 'hf:NAME')")


def _text_files(files: list[Path], max_bytes: int | None) -> tuple[list[Path], dict[str, list[Path]]]:
    """The text files among `files`, in order, up to max_bytes in all; and the skipped ones by kind."""
    kept: list[Path] = []
    skipped: dict[str, list[Path]] = {"binary": [], "empty": []}
    total = 0
    for path in files:
        if max_bytes is not None and total >= max_bytes:
            break
        kind = _file_kind(path)
        if kind == "text":
            kept.append(path)
            total += path.stat().st_size
        else:
            skipped[kind].append(path)
    return kept, skipped


def _file_kind(path: Path) -> str:
    """The file's kind from its first BINARY_SAMPLE_BYTES bytes: "empty", "binary" or "text"."""
    try:
        with open(path, "rb") as f:
            sample = f.read(BINARY_SAMPLE_BYTES)
    except OSError as e:
        raise DataError(f"data file {path} cannot be read: {e.strerror}") from e
    if not sample:
        return "empty"
    controls = len(sample.translate(None, TEXT_BYTES))
    if b"\0" in sample or controls > BINARY_CONTROL_FRACTION * len(sample):
        return "binary"
    return "text"


def _load_cached_hf_dataset(spec: str) -> Any:
    name, _, config = spec[3:].partition(":")
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{spec}: the `datasets` package is not installed") from e
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # cached data only: no download at run time
    try:
        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as e:
        raise DataError(f"{spec}: not available in the local Hugging Face cache ({e})") from e
    if "text" not in ds.column_names:
        raise DataError(f"{spec}: dataset has no 'text' column (columns: {ds.column_names})")
    return ds


# -------------------------------------------------------------------------------------- tokenizer
def cached_tokenizer(corpus: Corpus, vocab_size: int, cache_dir: Path) -> Path:
    """Path of the tokenizer trained on this corpus, training and caching it on first use."""
    path = cache_dir / f"tokenizer-{corpus.fingerprint()}-{vocab_size}.json"
    if not path.is_file():
        with _building(path):
            if not path.is_file():  # another run may have trained it while we waited
                write_file_atomically(path, train_tokenizer(corpus, vocab_size, len(corpus)).to_str())
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

    train: np.ndarray  # [train tokens]
    val: np.ndarray  # [validation tokens]
    summary: str  # one line: the sources, their size, what was skipped and how validation was chosen


@dataclass(frozen=True)
class TokenCache:
    """The tokenized corpus on disk: train.bin and val.bin (flat token ids) and meta.json."""

    folder: Path

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.folder / "meta.json").read_text())

    def tokens(self, split: str) -> np.ndarray:
        meta = self.meta
        if meta[split] == 0:  # numpy cannot map an empty file
            return np.zeros(0, dtype=meta["dtype"])
        return np.memmap(self.folder / f"{split}.bin", dtype=meta["dtype"], mode="r", shape=(meta[split],))

    def split(self, seq_len: int) -> Split:
        """Training and validation streams for windows of seq_len + 1 tokens; DataError if too small."""
        meta = self.meta
        train, val = self.tokens("train"), self.tokens("val")
        window, fraction = seq_len + 1, meta["val_fraction"]
        skipped = f"; {meta['skipped']}" if meta["skipped"] else ""
        data = (
            f"data {', '.join(meta['sources'])} ({_count(meta['documents'], 'document')}, "
            f"{_count(len(train) + len(val), 'token')}{skipped})"
        )
        if len(val) >= window:
            how = (
                f"{_count(meta['val_documents'], 'whole document')} held out (val_fraction {fraction}), "
                f"{_count(len(val), 'token')}"
            )
        else:
            whole = f"{_count(meta['val_documents'], 'whole document')} held out would give {len(val):,}"
            held_out = max(math.ceil(fraction * len(train)), window)
            train, val = train[:-held_out], train[-held_out:]
            how = (
                f"the last {_count(len(val), 'token')} (val_fraction {fraction}, at least one window of "
                f"seq_len + 1 = {window}; {whole})"
            )
        if len(train) < window:
            raise DataError(
                f"{data} is too small for seq_len {seq_len}: validation takes {how}, leaving "
                f"{_count(len(train), 'token')} for training, which needs at least one window of "
                f"seq_len + 1 = {window}; add text or lower --seq-len"
            )
        return Split(train, val, f"{data}; validation: {how}")


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'s' * (n != 1)}"


def build_token_cache(corpus: Corpus, tok: TokenizerInfo, val_fraction: float, cache_dir: Path) -> TokenCache:
    """Tokenize the corpus once into cache_dir (keyed by corpus, tokenizer and split); reuse it after."""
    key = hashlib.sha256(
        f"{corpus.fingerprint()}\0{tok.tokenizer.to_str()}\0{val_fraction}".encode()
    ).hexdigest()[:16]
    folder = cache_dir / f"tokens-{key}"
    if not (folder / "meta.json").is_file():
        with _building(folder):
            if not (folder / "meta.json").is_file():  # another run may have built it while we waited
                write_folder_atomically(folder, lambda tmp: _tokenize_into(corpus, tok, val_fraction, tmp))
    return TokenCache(folder)


def _tokenize_into(corpus: Corpus, tok: TokenizerInfo, val_fraction: float, folder: Path) -> None:
    """Write train.bin, val.bin and meta.json (token and document counts, sources) into folder."""
    from rich.progress import track

    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    counts = {"train": 0, "val": 0, "documents": 0, "val_documents": 0}
    with open(folder / "train.bin", "wb") as train_f, open(folder / "val.bin", "wb") as val_f:
        texts = track(_batched(corpus, 64), total=-(-len(corpus) // 64), description="tokenizing corpus")
        for batch in texts:
            for enc in tok.tokenizer.encode_batch(batch, add_special_tokens=False):
                if not enc.ids:
                    continue
                i = counts["documents"]
                split = "val" if int((i + 1) * val_fraction) > int(i * val_fraction) else "train"
                ids = ([tok.bos_id] if tok.bos_id is not None else []) + enc.ids + [tok.eos_id]
                (val_f if split == "val" else train_f).write(np.asarray(ids, dtype=dtype).tobytes())
                counts[split] += len(ids)
                counts["documents"] += 1
                counts["val_documents"] += split == "val"
    meta = {
        "dtype": np.dtype(dtype).name,
        **counts,
        "val_fraction": val_fraction,
        "sources": corpus.specs,
        "skipped": corpus.skipped_summary(),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))


def _batched(texts: Corpus, n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# ------------------------------------------------------------------------------- packing, loader
class PackedTokens:
    """A flat token stream seen as non-overlapping windows of seq_len + 1 tokens."""

    def __init__(self, tokens: np.ndarray, seq_len: int, eos_id: int, split: str = "train") -> None:
        self.tokens, self.seq_len, self.eos_id = tokens, seq_len, eos_id
        if len(self) == 0:
            raise DataError(
                f"the {split} split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                "add data, shorten --seq-len or change --val-fraction"
            )

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and pre-shifted labels [len(indices), seq_len]; -100 after every <|eos|>."""
        T = self.seq_len
        windows = np.stack([self.tokens[i * T : i * T + T + 1] for i in indices]).astype(np.int64)
        x = torch.from_numpy(windows[:, :-1].copy())
        y = torch.from_numpy(windows[:, 1:].copy())
        y[x == self.eos_id] = IGNORE_INDEX
        return x, y


class Loader:
    """Seeded, stateful batches over PackedTokens: an epoch is one random permutation of all windows."""

    def __init__(self, data: PackedTokens, batch_size: int, seed: int) -> None:
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.data))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        picked: list[np.ndarray] = []
        need = self.batch_size
        while need:
            take = self._perm[self.cursor : self.cursor + need]
            picked.append(take)
            need -= len(take)
            self.cursor += len(take)
            if self.cursor == len(self._perm):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._perm = self._permutation()
        return self.data.batch(np.concatenate(picked))

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.cursor = int(state["seed"]), int(state["epoch"]), int(state["cursor"])
        self._perm = self._permutation()


def validation_batches(
    data: PackedTokens, batch_size: int, max_batches: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first max_batches batches of the validation windows, in order (the same every evaluation)."""
    n = min(len(data), batch_size * max_batches)
    for start in range(0, n, batch_size):
        yield data.batch(np.arange(start, min(start + batch_size, n)))


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Cross entropy (nats/token) of the best context-free model: the baseline learning must beat."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
