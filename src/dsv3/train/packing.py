"""Packing a token stream into training windows, and the stateful loader that draws them.

Windows. A stream (one split of the token cache) is cut into non-overlapping windows of seq_len + 1
tokens; a window gives input_ids = w[:-1] and pre-shifted labels = w[1:]. Documents are packed back
to back. Without document masking a row's tokens attend across the documents in it, and where an
input token is <|eos|> its target would be the first token of the next document: that label is
-100, which both removes it from the loss and cuts the model's multi-token-prediction chains there.

Documents kept apart. With document masking (asked for, or always for chat data) a batch also
carries `segments` [B, T]: the index, within its row, of the document each token belongs to
(0, 1, 2, ... from the row's first token), from the document starts the token cache stores. The
model lets a token attend only within its segment and restarts RoPE positions at each one; a label
whose target is in the next segment is -100, so neither the loss nor MTP chains cross documents.

Chats. A chat cache also stores, per token, whether it is learned (dsv3.train.sft: assistant turns
only); every label whose target token is not learned is -100, so a token outside an assistant turn
is never a target and nothing is learned from predicting it.

Mixtures. A stream's parts are the ranges windows are cut from: the whole stream, or one part per
source of a weighted mixture (no window crosses two sources). The Loader keeps, per part, a seeded
random permutation of its windows per epoch and a cursor; each row of a batch comes from the part
whose draws lag furthest behind its share: row n + 1 comes from argmax_p((n + 1) w_p - taken_p).
Every prefix of the run then holds each part within one window of its weight's share (no sampling
noise in the proportions), and the whole state is (seed, epoch and cursor per part): saved in
checkpoints, a resumed run sees exactly the batches it would have seen without the interruption,
and changing the weights on resume changes only the proportions from then on. One part (no
mixture) is today's loader exactly: the permutation of epoch e is seeded with [seed, e].
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dsv3.errors import DataError
from dsv3.model.loss import IGNORE_INDEX

UNIGRAM_CHUNK = 1 << 22  # tokens counted at a time (a memory map is never read whole)


@dataclass(frozen=True)
class Part:
    """A range of a stream that windows are cut from: a mixture's source, or the whole stream."""

    name: str
    start: int
    end: int
    weight: float | None = None  # the mixture weight (None: no mixture)


@dataclass(frozen=True)
class Stream:
    """Token ids, where each document starts, which tokens are learned, and the parts to draw from."""

    tokens: np.ndarray  # [N] token ids (a memory map of the token cache)
    starts: np.ndarray | None  # [D] int64 ascending offsets where documents start (None: not known)
    learned: np.ndarray | None  # [N] uint8: 1 where a token may be a target (None: all; chat caches have it)
    parts: tuple[Part, ...]

    @classmethod
    def of(cls, tokens: np.ndarray) -> Stream:
        """A bare token array: one part, documents not known."""
        return cls(tokens, None, None, (Part("tokens", 0, len(tokens)),))

    @property
    def span(self) -> np.ndarray:
        """The tokens the parts cover, from the first part's start to the last one's end."""
        return self.tokens[self.parts[0].start : self.parts[-1].end]


@dataclass(frozen=True)
class Batch:
    """One batch of windows: what the model's forward takes."""

    input_ids: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64: the next token, or IGNORE_INDEX where nothing is learned
    # [B, T] int64: the document of each token within its row (0, 1, ...); None: documents not kept apart
    segments: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def rows(self, start: int, stop: int) -> Batch:
        """Rows start:stop (a data-parallel rank's share)."""
        seg = None if self.segments is None else self.segments[start:stop]
        return Batch(self.input_ids[start:stop], self.labels[start:stop], seg)

    def to(self, device: torch.device | str) -> Batch:
        seg = None if self.segments is None else self.segments.to(device)
        return Batch(self.input_ids.to(device), self.labels.to(device), seg)


class PackedTokens:
    """A stream seen as windows of seq_len + 1 tokens, numbered part after part."""

    def __init__(
        self,
        stream: Stream | np.ndarray,
        seq_len: int,
        eos_id: int,
        split: str = "train",
        document_masking: bool = False,
    ) -> None:
        stream = Stream.of(stream) if isinstance(stream, np.ndarray) else stream
        self.stream, self.seq_len, self.eos_id = stream, seq_len, eos_id
        self.segmented = document_masking or stream.learned is not None
        if self.segmented and stream.starts is None:
            raise ValueError("document masking needs a stream with its document starts (TokenCache.split)")
        self.counts = np.array([max(0, (p.end - p.start - 1) // seq_len) for p in stream.parts])  # [P]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])  # [P + 1]: first window of each part
        if len(self) == 0:
            raise DataError(
                f"the {split} split has {sum(p.end - p.start for p in stream.parts)} tokens, fewer than "
                f"seq_len + 1 = {seq_len + 1}; add data, shorten --seq-len or change --val-fraction"
            )

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def weights(self) -> list[float] | None:
        """The parts' mixture weights, or None."""
        weights = [p.weight for p in self.stream.parts]
        return None if None in weights else weights  # type: ignore[return-value]

    def window_starts(self, indices: np.ndarray) -> np.ndarray:
        """Where windows `indices` start in the stream [len(indices)]."""
        part = np.searchsorted(self.offsets, indices, side="right") - 1
        first = np.array([p.start for p in self.stream.parts])
        return first[part] + (indices - self.offsets[part]) * self.seq_len

    def batch(self, indices: np.ndarray) -> Batch:
        """Windows `indices` as a Batch [len(indices), seq_len] (see the module docstring)."""
        T, s = self.seq_len, self.stream
        starts = self.window_starts(np.asarray(indices, dtype=np.int64))
        windows = np.stack([s.tokens[i : i + T + 1] for i in starts]).astype(np.int64)  # [B, T + 1]
        x, y = windows[:, :-1], windows[:, 1:].copy()
        if s.learned is not None:
            y[np.stack([s.learned[i + 1 : i + T + 1] for i in starts]) == 0] = IGNORE_INDEX
        segments = None
        if self.segmented:
            docs = np.searchsorted(s.starts, starts[:, None] + np.arange(T + 1), side="right")  # [B, T + 1]
            seg = docs - docs[:, :1]
            y[seg[:, 1:] != seg[:, :-1]] = IGNORE_INDEX
            segments = torch.from_numpy(seg[:, :-1].astype(np.int64))
        else:
            y[x == self.eos_id] = IGNORE_INDEX
        return Batch(torch.from_numpy(x.copy()), torch.from_numpy(y), segments)


class Loader:
    """Seeded, stateful batches over PackedTokens: per part, an epoch is one random permutation of
    its windows; a mixture's rows are drawn from the parts by weight (module docstring). Each of
    `ranks` data-parallel ranks gets its contiguous rows of the same global batch."""

    def __init__(self, data: PackedTokens, batch_size: int, seed: int, rank: int = 0, ranks: int = 1) -> None:
        self.data, self.batch_size, self.seed, self.rank, self.ranks = data, batch_size, seed, rank, ranks
        weights = data.weights or [1.0] * len(data.counts)
        self.shares = np.asarray(weights, dtype=np.float64) / sum(weights)  # [P]
        self.epochs = [0] * len(data.counts)
        self.cursors = [0] * len(data.counts)
        self._perms: list[np.ndarray | None] = [None] * len(data.counts)

    def _permutation(self, part: int) -> np.ndarray:
        key = (
            [self.seed, self.epochs[part]] if len(self.epochs) == 1 else [self.seed, part, self.epochs[part]]
        )
        return self.data.offsets[part] + np.random.default_rng(key).permutation(self.data.counts[part])

    def _take(self, part: int, n: int) -> np.ndarray:
        """The next n windows of one part, continuing into new epochs."""
        picked: list[np.ndarray] = []
        while n:
            perm = self._perms[part]
            if perm is None:
                perm = self._perms[part] = self._permutation(part)
            take = perm[self.cursors[part] : self.cursors[part] + n]
            picked.append(take)
            n -= len(take)
            self.cursors[part] += len(take)
            if self.cursors[part] == len(perm):
                self.epochs[part], self.cursors[part], self._perms[part] = self.epochs[part] + 1, 0, None
        return np.concatenate(picked)

    def _schedule(self) -> np.ndarray:
        """The part each row of the next batch comes from [batch_size]."""
        taken = np.array(
            [e * c + k for e, c, k in zip(self.epochs, self.data.counts, self.cursors)], dtype=np.float64
        )
        drawn = taken.sum()
        rows = np.empty(self.batch_size, dtype=np.int64)
        for row in range(self.batch_size):
            rows[row] = np.argmax((drawn + 1) * self.shares - taken)
            taken[rows[row]] += 1
            drawn += 1
        return rows

    def next_batch(self) -> Batch:
        """This rank's rows of the next global batch."""
        if len(self.epochs) == 1:
            indices = self._take(0, self.batch_size)
        else:
            rows = self._schedule()
            indices = np.empty(self.batch_size, dtype=np.int64)
            for part in np.unique(rows):
                indices[rows == part] = self._take(int(part), int((rows == part).sum()))
        per = self.batch_size // self.ranks
        return self.data.batch(indices[self.rank * per : (self.rank + 1) * per])

    def state_dict(self) -> dict[str, int | list[int]]:
        if len(self.epochs) == 1:
            return {"seed": self.seed, "epoch": self.epochs[0], "cursor": self.cursors[0]}
        return {"seed": self.seed, "epoch": list(self.epochs), "cursor": list(self.cursors)}

    def load_state_dict(self, state: dict[str, int | list[int]]) -> None:
        epochs, cursors = state["epoch"], state["cursor"]
        saved = len(epochs) if isinstance(epochs, list) else 1
        if saved != len(self.epochs) or isinstance(epochs, list) != (len(self.epochs) > 1):
            raise DataError(
                f"the checkpoint's data position is for {saved} mixture source(s) and this run reads "
                f"{len(self.epochs)}: resume with the --data it was started with"
            )
        self.seed = int(state["seed"])  # type: ignore[arg-type]
        self.epochs = [int(e) for e in (epochs if isinstance(epochs, list) else [epochs])]
        self.cursors = [int(c) for c in (cursors if isinstance(cursors, list) else [cursors])]
        self._perms = [None] * len(self.epochs)


def validation_batches(data: PackedTokens, batch_size: int, max_batches: int) -> Iterator[Batch]:
    """The first max_batches batches of the validation windows, in order (the same every evaluation)."""
    n = min(len(data), batch_size * max_batches)
    for start in range(0, n, batch_size):
        yield data.batch(np.arange(start, min(start + batch_size, n)))


def unigram_entropy(data: Stream | np.ndarray, vocab_size: int) -> float:
    """Cross entropy (nats/token) of the best context-free model of the training targets: the
    baseline learning must beat. A mixture's parts count by their weights, chats by their learned
    tokens only; the stream is read in chunks."""
    stream = Stream.of(data) if isinstance(data, np.ndarray) else data
    mixed = np.zeros(vocab_size, dtype=np.float64)
    for part in stream.parts:
        counts = np.zeros(vocab_size, dtype=np.float64)
        for lo in range(part.start, part.end, UNIGRAM_CHUNK):
            chunk = np.asarray(stream.tokens[lo : min(lo + UNIGRAM_CHUNK, part.end)])
            if stream.learned is not None:
                chunk = chunk[np.asarray(stream.learned[lo : lo + len(chunk)]) == 1]
            counts += np.bincount(chunk, minlength=vocab_size)
        if counts.sum():
            mixed += (1.0 if part.weight is None else part.weight) * counts / counts.sum()
    p = mixed[mixed > 0] / mixed.sum()
    return float(-(p * np.log(p)).sum())
