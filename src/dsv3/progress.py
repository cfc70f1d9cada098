"""Progress for every phase a user waits on, so that none is silent: a live rich bar on a terminal,
and a plain line every few seconds when the output is a file or a pipe (a log, CI), which a live
bar would leave empty until the end. The lines come from a timer, so a phase that reports no
progress for a while (a tokenizer computing its merges) still shows it is alive.

    with progress("tokenizing stdlib", total=n_bytes, unit="bytes") as advance:
        for doc in docs:
            ...
            advance(len(doc), documents=i)     # extra fields are shown after the count
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


@contextmanager
def progress(
    what: str, total: float | None = None, unit: str = "", every_s: float = 5.0, stream=None
) -> Iterator[Callable[..., None]]:
    """Yields advance(n=1, **fields). total None: no percentage. unit "bytes": sizes shown in MB."""
    stream = stream or sys.stdout
    if stream.isatty():
        with _rich(what, total, unit, stream) as advance:
            yield advance
        return
    start = time.monotonic()
    state = {"done": 0.0, "fields": {}}

    def line(final: bool = False) -> str:
        done, elapsed = state["done"], time.monotonic() - start
        count = f"{done / 1e6:,.1f} MB" if unit == "bytes" else f"{done:,.0f}{' ' + unit if unit else ''}"
        if total:
            count += f" of {total / 1e6:,.1f} MB" if unit == "bytes" else f" of {total:,.0f}"
            count += f" ({100 * done / total:.0f}%)"
        extra = "".join(
            f", {v:,} {k}" if isinstance(v, int) else f", {k} {v}" for k, v in state["fields"].items()
        )
        return f"{what}: {count}{extra}, {elapsed:.0f} s{' (done)' if final else ''}"

    def advance(n: float = 1, **fields) -> None:
        state["done"] += n
        state["fields"].update(fields)

    def ticker() -> None:
        while not stop.wait(every_s):
            print(line(), file=stream, flush=True)

    stop = threading.Event()
    print(f"{what} ...", file=stream, flush=True)
    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    try:
        yield advance
    finally:
        stop.set()
        thread.join()
    print(line(final=True), file=stream, flush=True)


def tracked(items: Iterable[T], what: str, total: float | None = None, unit: str = "") -> Iterator[T]:
    """Iterate `items`, reporting progress one item at a time."""
    with progress(what, total, unit) as advance:
        for item in items:
            yield item
            advance()


@contextmanager
def _rich(what: str, total: float | None, unit: str, stream) -> Iterator[Callable[..., None]]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = [
        TextColumn(what),
        BarColumn(),
        DownloadColumn() if unit == "bytes" else MofNCompleteColumn(),
        TextColumn("{task.fields[extra]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=Console(file=stream)) as bar:
        task = bar.add_task(what, total=total, extra="")

        def advance(n: float = 1, **fields) -> None:
            extra = "  ".join(f"{v:,} {k}" if isinstance(v, int) else f"{k} {v}" for k, v in fields.items())
            bar.update(task, advance=n, **({"extra": extra} if fields else {}))

        yield advance
