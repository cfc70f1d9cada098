"""Data sources: what `--data` names, read as a stream of records (never a whole corpus in memory).

A source spec is one of
  * "stdlib"            the `.py` files of the Python standard library that ships with the
                        interpreter: ~30 MB of real text on every machine, no download;
  * a text file         one document (any file not named below);
  * `*.jsonl`, `*.json` JSON Lines: one JSON object per line, read a line at a time;
  * `*.parquet`         read a record batch at a time with pyarrow;
  * a folder            written by `datasets`' `save_to_disk` (it holds dataset_info.json and
                        state.json, or dataset_dict.json): read with `load_from_disk` (its "train"
                        split), memory-mapped; any other folder: its text files (TEXT_SUFFIXES), `.jsonl`
                        and `.parquet` files, sorted by path;
  * "hf:NAME[:CONFIG]"  a Hugging Face dataset already in the local cache (never downloaded at run time).
A spec may end in ":WEIGHT", a positive number: the sources of a mixture, drawn in proportion to
their weights (either every source has a weight or none has).

Records. A JSON object, Parquet row or dataset row with a `messages` list is a chat, a conversation
for supervised fine-tuning (dsv3.train.sft); otherwise its document is the string in the text field
(`text`, or the field `--data.text-field` names). A record that cannot be read that way (not JSON, not
an object, no such field, not a string, a malformed conversation, one with no assistant turn to learn)
is bad: it is skipped, counted, and the first few are named in the data summary with where they are
(file:line, or row) and why; a source whose records are all bad is a DataError naming it. A Parquet
file or dataset without the column is a DataError at once, before any reading.

Reading text files. A file is read as UTF-8 (a leading BOM dropped); a byte that is not part of
valid UTF-8 is read as the Latin-1 character of the same value. So Latin-1 and Windows-1252 files
keep their accented letters (no detection guesswork: every byte is a Latin-1 character), and a stray
byte in a UTF-8 file costs one character, not the file. Empty files and binary files are skipped,
counted, and the first few named in the data summary; a file is binary when its first 8000 bytes
hold a NUL (git's rule) or more than 1% of them are control codes that text does not use.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import sysconfig
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv3.errors import DataError
from dsv3.train.sft import chat_problem

TEXT_SUFFIXES = frozenset(
    {".txt", ".md", ".rst", ".py", ".c", ".h", ".cpp", ".rs", ".js", ".ts", ".html", ".tex"}
)
JSON_LINES_SUFFIXES = frozenset({".jsonl", ".json"})
# Record files a folder is walked for; not .json, which in folders of code is configuration.
FOLDER_RECORD_SUFFIXES = frozenset({".jsonl", ".parquet"})
# How files become text (module docstring). Part of the corpus fingerprint, so tokenizers and token
# caches made under other rules are not reused.
READING_RULES = (
    "utf-8-sig, other bytes as latin-1; empty files and binary files (NUL, >1% controls) skipped; "
    "records: messages = chat, else the text field"
)
BINARY_SAMPLE_BYTES = 8000  # git looks for a NUL in this many leading bytes
BINARY_CONTROL_FRACTION = 0.01
# Bytes that occur in text: the printable range of any 8-bit encoding plus \a \b \t \n \v \f \r ESC.
TEXT_BYTES = bytes(sorted({7, 8, 9, 10, 11, 12, 13, 27} | set(range(0x20, 0x100)) - {0x7F}))
LATIN1_FOR_INVALID_UTF8 = "dsv3-latin1-for-invalid-utf8"
ROWS_PER_READ = 256  # Parquet and dataset rows read at a time
DATA_EXTRA = "pip install 'dsv3[data]'"


def _latin1_for_invalid_utf8(error: UnicodeError) -> tuple[str, int]:
    """Codec error handler: the bytes a UTF-8 decoder rejects, read one character per byte as Latin-1."""
    assert isinstance(error, UnicodeDecodeError)
    return error.object[error.start : error.end].decode("latin-1"), error.end


codecs.register_error(LATIN1_FOR_INVALID_UTF8, _latin1_for_invalid_utf8)


def read_text_file(path: Path) -> str:
    """A text file's contents: UTF-8, with bytes that are not valid UTF-8 read as Latin-1."""
    return path.read_bytes().decode("utf-8-sig", errors=LATIN1_FOR_INVALID_UTF8)


# ------------------------------------------------------------------------------ specs and weights
def split_weight(spec: str) -> tuple[str, float | None]:
    """A spec's name and mixture weight: a.jsonl:0.7 -> (a.jsonl, 0.7); a.jsonl and hf:NAME:CONFIG
    have none. A weight that is not a positive number is a DataError naming the flag."""
    head, colon, tail = spec.rpartition(":")
    if not colon or not head or Path(spec).exists():
        return spec, None
    try:
        weight = float(tail)
    except ValueError:
        return spec, None  # not a weight: part of the name (hf:NAME:CONFIG)
    if not (weight > 0 and math.isfinite(weight)):
        raise DataError(
            f"--data {spec}: the mixture weight {tail} must be a positive number, as in --data {head}:0.3"
        )
    return head, weight


def mixture(specs: list[str]) -> tuple[list[str], list[float] | None]:
    """The sources' names and their weights (None when no spec has one); DataError for a mix."""
    parsed = [split_weight(spec) for spec in specs]
    unweighted = [name for name, weight in parsed if weight is None]
    if unweighted and len(unweighted) < len(parsed):
        raise DataError(
            f"--data {' '.join(specs)}: give every source a mixture weight (NAME:WEIGHT) or none; "
            f"{', '.join(unweighted)} has none"
        )
    return [name for name, _ in parsed], None if unweighted else [w for _, w in parsed]  # type: ignore[misc]


# ---------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Record:
    """One document, one conversation, or a bad record (problem set, nothing else)."""

    where: str  # "file:line", "file row N", or the file
    size: int  # bytes of input it came from (progress, max_bytes)
    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    problem: str | None = None  # why the record is bad


def record_from_fields(fields: dict[str, Any], text_field: str, where: str, size: int) -> Record:
    """A JSON object or table row: a chat if it has `messages`, else the text in `text_field`."""
    if "messages" in fields and fields["messages"] is not None:
        problem = chat_problem(fields["messages"])
        if problem:
            return Record(where, size, problem=problem)
        return Record(where, size, messages=fields["messages"])
    if text_field not in fields:
        keys = ", ".join(repr(k) for k in list(fields)[:8])
        return Record(where, size, problem=f"no {text_field!r} field and no 'messages' (fields: {keys})")
    text = fields[text_field]
    if not isinstance(text, str):
        return Record(where, size, problem=f"{text_field!r} is {type(text).__name__}, not a string")
    return Record(where, size, text=text)


# ------------------------------------------------------------------------------------ file parts
class TextFile:
    """One document: a whole text file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size

    def records(self) -> Iterator[Record]:
        yield Record(str(self.path), self.size, text=read_text_file(self.path))

    def describe(self) -> str:
        return _stat(self.path)


class JsonLinesFile:
    """One record per line; blank lines are not records."""

    def __init__(self, path: Path, text_field: str) -> None:
        self.path, self.text_field = path, text_field
        self.size = path.stat().st_size
        with open(path, "rb") as f:
            start = f.read(4096).lstrip()
        if start.startswith(b"["):
            raise DataError(
                f"data file {path} holds a JSON array; dsv3 reads JSON Lines (one object per line): "
                f"convert it, e.g. jq -c '.[]' {path} > {path.with_suffix('.jsonl')}"
            )

    def records(self) -> Iterator[Record]:
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{self.path}:{number}"
                try:
                    fields = json.loads(line)
                except ValueError as e:  # includes undecodable bytes
                    yield Record(where, len(line), problem=f"not valid JSON ({e})")
                    continue
                if not isinstance(fields, dict):
                    yield Record(where, len(line), problem=f"a JSON {type(fields).__name__}, not an object")
                    continue
                yield record_from_fields(fields, self.text_field, where, len(line))

    def describe(self) -> str:
        return _stat(self.path)


class Table(ABC):
    """Rows of a Parquet file or a `datasets` dataset: the `messages` column if there is one, else
    the text column (DataError naming the file and the column when it has neither)."""

    def __init__(self, name: str, columns: list[str], text_field: str, size: int, rows: int) -> None:
        if "messages" in columns:
            self.column = "messages"
        elif text_field in columns:
            self.column = text_field
        else:
            raise DataError(
                f"{name} has no column {text_field!r} (columns: {', '.join(columns)}); name the text column "
                "with --data.text-field, or give chats in a 'messages' column"
            )
        self.name, self.size, self.rows = name, size, rows

    @abstractmethod
    def batches(self) -> Iterator[list[Any]]:
        """The column's values, a few hundred rows at a time."""

    def records(self) -> Iterator[Record]:
        row = 0
        for values in self.batches():
            for value in values:
                # a row's share of the input's bytes, so the sizes add up to the whole
                size = self.size * (row + 1) // max(self.rows, 1) - self.size * row // max(self.rows, 1)
                yield record_from_fields({self.column: value}, self.column, f"{self.name} row {row}", size)
                row += 1


class ParquetFile(Table):
    """A Parquet file, read ROWS_PER_READ rows at a time (pyarrow holds one row group in memory)."""

    def __init__(self, path: Path, text_field: str) -> None:
        pq = _optional("pyarrow.parquet", "pyarrow", f"Parquet file {path}")
        try:
            self.file = pq.ParquetFile(path)
        except Exception as e:  # pyarrow's ArrowInvalid and OSError for a damaged file
            raise DataError(f"data file {path} is not a readable Parquet file: {e}") from e
        self.path = path
        names = self.file.schema_arrow.names
        super().__init__(
            f"Parquet file {path}", names, text_field, path.stat().st_size, self.file.metadata.num_rows
        )

    def batches(self) -> Iterator[list[Any]]:
        for batch in self.file.iter_batches(batch_size=ROWS_PER_READ, columns=[self.column]):
            yield batch.column(0).to_pylist()

    def describe(self) -> str:
        return _stat(self.path)


class DatasetRows(Table):
    """A `datasets.Dataset` (memory-mapped Arrow): saved with save_to_disk, or in the HF cache."""

    def __init__(self, name: str, dataset: Any, text_field: str) -> None:
        super().__init__(name, dataset.column_names, text_field, dataset.data.nbytes, len(dataset))
        self.dataset = dataset.select_columns([self.column])

    def batches(self) -> Iterator[list[Any]]:
        for batch in self.dataset.iter(batch_size=ROWS_PER_READ):
            yield batch[self.column]

    def describe(self) -> str:
        return f"{self.name}\0{self.dataset._fingerprint}"


def _stat(path: Path) -> str:
    st = path.stat()
    return f"{path}\0{st.st_size}\0{st.st_mtime_ns}"


def _optional(module: str, package: str, needed_by: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DataError(
            f"{needed_by} needs the `{package}` package: {DATA_EXTRA} (or pip install {package})"
        ) from e


# ---------------------------------------------------------------------------------------- sources
class Source:
    """One `--data` spec (without its weight): its parts, read in order."""

    def __init__(self, spec: str, text_field: str = "text") -> None:
        self.spec = spec
        self.skipped: dict[str, list[Path]] = {"binary": [], "empty": []}
        if spec.startswith("hf:"):
            self.parts: list[Any] = [DatasetRows(spec, _cached_hf_dataset(spec), text_field)]
            return
        path = Path(spec)
        if spec == "stdlib":
            files = _stdlib_files()
        elif path.is_dir() and _is_saved_dataset(path):
            self.parts = [DatasetRows(f"dataset {path}", _saved_dataset(path), text_field)]
            return
        elif path.is_dir():
            files = _folder_files(path)
        elif path.is_file():
            files = [path]
        else:
            raise DataError(f"data path {path} does not exist (give a file, a folder, 'stdlib' or 'hf:NAME')")
        self.parts = []
        for file in files:
            if file.suffix in JSON_LINES_SUFFIXES:
                self.parts.append(JsonLinesFile(file, text_field))
            elif file.suffix == ".parquet":
                self.parts.append(ParquetFile(file, text_field))
            elif (kind := _file_kind(file)) == "text":
                self.parts.append(TextFile(file))
            else:
                self.skipped[kind].append(file)
        if not self.parts:
            raise DataError(f"data source {spec} contains no documents ({skipped_summary(self.skipped)})")

    def records(self) -> Iterator[Record]:
        for part in self.parts:
            yield from part.records()

    @property
    def size(self) -> int:
        """Bytes of input (files; a dataset's Arrow data)."""
        return sum(part.size for part in self.parts)

    def describe(self) -> list[str]:
        """What the fingerprint of the source hashes: every part, and every skipped file."""
        return [part.describe() for part in self.parts] + [
            _stat(p) for p in [*self.skipped["binary"], *self.skipped["empty"]]
        ]


def skipped_summary(skipped: dict[str, list[Path]], shown: int = 3) -> str:
    """E.g. "skipped 2 binary files (a.bin, b.bin) and 1 empty file (c.txt)"; "" if none."""
    parts = []
    for kind, paths in skipped.items():
        if paths:
            names = ", ".join(str(p) for p in paths[:shown])
            if len(paths) > shown:
                names += f", and {len(paths) - shown} more"
            parts.append(f"{count(len(paths), kind + ' file')} ({names})")
    return "skipped " + " and ".join(parts) if parts else ""


def count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'s' * (n != 1)}"


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def _folder_files(path: Path) -> list[Path]:
    suffixes = TEXT_SUFFIXES | FOLDER_RECORD_SUFFIXES
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not files:
        raise DataError(f"data folder {path} has no text files or records (suffixes {sorted(suffixes)})")
    return files


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


def _is_saved_dataset(path: Path) -> bool:
    return ((path / "dataset_info.json").is_file() and (path / "state.json").is_file()) or (
        path / "dataset_dict.json"
    ).is_file()


def _saved_dataset(path: Path) -> Any:
    datasets = _optional("datasets", "datasets", f"dataset folder {path}")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, ArrowInvalid ...
        raise DataError(f"dataset folder {path} could not be loaded with datasets.load_from_disk: {e}") from e
    return _train_split(loaded, f"dataset folder {path}")


def _cached_hf_dataset(spec: str) -> Any:
    name, _, config = spec[3:].partition(":")
    datasets = _optional("datasets", "datasets", spec)
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # cached data only: no download at run time
    try:
        return datasets.load_dataset(name, config or None, split="train")
    except Exception as e:
        raise DataError(f"{spec}: not available in the local Hugging Face cache ({e})") from e


def _train_split(loaded: Any, name: str) -> Any:
    if hasattr(loaded, "column_names") and isinstance(loaded.column_names, list):
        return loaded  # a Dataset
    if "train" not in loaded:
        raise DataError(f"{name} has no 'train' split (splits: {', '.join(loaded)})")
    return loaded["train"]
