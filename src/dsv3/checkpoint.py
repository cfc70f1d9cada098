"""Checkpoint folders on disk: written atomically, verified on load, found again after a crash.

One writer for every folder dsv3 saves (model exports, conversions, training checkpoints):
`write_folder_atomically(path, write)` lets `write` fill a temporary sibling `.tmp-<name>-<pid>`,
optionally adds a manifest (size and sha256 of every file), fsyncs the files and the folder and
only then renames it onto `path` (an existing `path` is renamed away first and deleted last). A
crash at any moment leaves `path` as it was; the temporary folders of dead writers are removed by
the next write next to them. Running out of disk space is a `CheckpointError` that says how much
was needed and how much is free, checked before writing when the caller knows the size.

Training checkpoints live under a run's `checkpoints/` folder:

    step_00000200/   the trainer's files + manifest.json
    step_00000400/   ...
    latest           the text "step_00000400": the only thing that makes a checkpoint current

`save_checkpoint` writes `step_*` with a manifest, then replaces `latest` (temp file, fsync,
rename), then prunes all but the newest `keep` folders. `latest_checkpoint` verifies the folder
`latest` names against its manifest; if that one is damaged (or `latest` is unreadable) it says
so loudly and falls back to the newest intact `step_*` folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from dsv3.errors import CheckpointError

MANIFEST = "manifest.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
_STEP_RE = re.compile(r"step_(\d+)$")


# ---------------------------------------------------------------------------------- atomic folders
def write_folder_atomically(
    path: str | Path,
    write: Callable[[Path], None],
    *,
    manifest: bool = False,
    needed_bytes: int | None = None,
) -> Path:
    """Fill a temporary sibling of `path` with `write(tmp)` and put it in place of `path` atomically
    (see the module docstring). manifest=True records every file's size and sha256 in
    manifest.json (what `verify_checkpoint` checks). needed_bytes: refuse before writing when the
    disk has less free space than that."""
    path = Path(path)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise CheckpointError(f"cannot write {path}: {parent} exists and is not a folder") from None
    _remove_dead_temporaries(parent)
    if needed_bytes is not None:
        free = shutil.disk_usage(parent).free
        if free < needed_bytes:
            raise CheckpointError(_no_space(parent, needed_bytes, free))
    tmp = parent / f"{TMP_PREFIX}{path.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        if manifest:
            files = sorted(p for p in tmp.iterdir() if p.is_file() and p.name != MANIFEST)
            entries = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
            (tmp / MANIFEST).write_text(json.dumps(entries, indent=1))
        for p in tmp.rglob("*"):
            if p.is_file():
                _fsync(p)
        _fsync(tmp)
        if path.exists() or path.is_symlink():
            old = parent / f"{TMP_PREFIX}{path.name}-old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync(parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and _is_out_of_space(e):
            raise CheckpointError(_no_space(parent, needed_bytes, shutil.disk_usage(parent).free)) from e
        raise
    return path


def write_file_atomically(path: Path, content: str | Callable[[Path], None]) -> None:
    """Replace one file atomically: `content` (a text, or a function that writes the temporary
    file it is given) goes to a temporary sibling, which is fsynced and renamed onto `path`."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    try:
        if callable(content):
            content(tmp)
        else:
            tmp.write_text(content)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and _is_out_of_space(e):
            raise CheckpointError(_no_space(path.parent, None, shutil.disk_usage(path.parent).free)) from e
        raise
    _fsync(path.parent)


def _remove_dead_temporaries(parent: Path) -> None:
    """Delete `.tmp-*-<pid>` leftovers of writers that no longer run (killed mid-save)."""
    for leftover in parent.glob(f"{TMP_PREFIX}*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            print(f"removing {leftover} (left by an interrupted save)", flush=True)
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(
                missing_ok=True
            )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_out_of_space(e: BaseException) -> bool:
    """ENOSPC anywhere in the exception chain, or the messages torch's and safetensors' writers
    give for it (they do not always keep the OSError)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left" in text or "os error 28" in text or "unexpected pos" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def _no_space(folder: Path, needed: int | None, free: int) -> str:
    need = f"needs ~{needed / 2**20:,.0f} MB, " if needed else ""
    return f"no space left on {folder}: {need}{free / 2**20:,.0f} MB free (nothing already saved was changed)"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------- training checkpoints
def step_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    root: Path, step: int, write: Callable[[Path], None], keep: int, needed_bytes: int | None = None
) -> Path:
    """Write checkpoint `step` under root atomically via `write(folder)`; keep the newest `keep`."""
    final = write_folder_atomically(root / step_name(step), write, manifest=True, needed_bytes=needed_bytes)
    write_file_atomically(root / LATEST, final.name)
    _prune(root, keep, current=final.name)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The current checkpoint folder under root (verified), or None if there is none yet. A damaged
    current checkpoint is reported and the newest intact older one is returned instead."""
    if not root.is_dir():
        return None
    for leftover in sorted(root.glob(f"{TMP_PREFIX}*")):
        print(
            f"ignoring incomplete checkpoint {leftover} (interrupted while saving); removing it", flush=True
        )
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    candidates = sorted((p for p in root.iterdir() if _STEP_RE.match(p.name) and p.is_dir()), reverse=True)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    skipped = []
    try:
        named = pointer.read_text(encoding="utf-8").strip()
        if not _STEP_RE.match(named):
            raise ValueError(f"it holds {named[:40]!r}, not a step_* folder name")
        candidates = [root / named] + [p for p in candidates if p.name < named]
    except (UnicodeDecodeError, ValueError) as e:
        skipped.append(f"{pointer} is unreadable ({e})")
    for folder in candidates:
        try:
            verify_checkpoint(folder)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        if skipped:
            print("WARNING: " + "; ".join(skipped) + f". Falling back to {folder}", flush=True)
        return folder
    raise CheckpointError("no intact checkpoint under " + str(root) + ": " + "; ".join(skipped))


def verify_checkpoint(folder: Path) -> None:
    """Raise CheckpointError naming the first missing, truncated or corrupt file of `folder`."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = [(str(name), int(e["bytes"]), str(e["sha256"])) for name, e in manifest.items()]
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST} is corrupt ({e!r:.80})") from None
    for name, size, digest in entries:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder}: file {name} is missing")
        if path.stat().st_size != size or _sha256(path) != digest:
            raise CheckpointError(f"checkpoint {folder}: file {name} is corrupt (size or sha256 mismatch)")


def _prune(root: Path, keep: int, current: str) -> None:
    folders = sorted(p for p in root.iterdir() if _STEP_RE.match(p.name) and p.is_dir() and p.name != current)
    for old in folders[: max(0, len(folders) - (keep - 1))]:
        shutil.rmtree(old)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
