"""Atomic checkpoints: a crash at any moment leaves the previous checkpoint intact and loadable.

Layout under a run's `checkpoints/` folder:

    step_00000200/   config.json, model.safetensors, tokenizer.json   (a Hugging Face-layout folder)
                     optimizer.pt, trainer_state.pt, train_config.json (what exact resume needs)
                     manifest.json                                     (size and sha256 of every file)
    step_00000400/   ...
    latest           the text "step_00000400", the only thing that makes a checkpoint current

Saving (`save_checkpoint`): the caller fills a fresh `.tmp-step_*` folder; we write the manifest,
fsync every file and the folder, rename it to `step_*` (atomic on POSIX), fsync the parent, and only
then replace `latest` (write a temp file, fsync, rename). Older `step_*` folders beyond the newest
`keep` are deleted last. A kill before the final rename of `latest` leaves `latest` pointing at the
previous, complete checkpoint; `latest_checkpoint` reports and removes the leftover `.tmp-*` folder.

Loading (`verify_checkpoint`): every file in the manifest must exist with the recorded size and hash;
otherwise `CheckpointError` names the file, rather than a confusing failure deep in torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

MANIFEST = "manifest.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the folder or file."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(root: Path, step: int, write: Callable[[Path], None], keep: int) -> Path:
    """Write checkpoint `step` under root atomically via `write(folder)`; keep the newest `keep`."""
    final = root / step_name(step)
    write_folder_atomically(final, write)
    _write_file_atomically(root / LATEST, final.name)
    _prune(root, keep, current=final.name)
    return final


def write_folder_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling folder with `write`, add the manifest, fsync, rename onto `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for p in tmp.iterdir():
        _fsync(p)
    _fsync(tmp)
    if final.exists():  # a complete folder never made current (killed before `latest` moved): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(final.parent)


def latest_checkpoint(root: Path) -> Path | None:
    """The current checkpoint folder under root (verified), or None if there is none yet."""
    for leftover in sorted(root.glob(f"{TMP_PREFIX}*")):
        print(
            f"ignoring incomplete checkpoint {leftover} (interrupted while saving); removing it", flush=True
        )
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    folder = root / pointer.read_text().strip()
    verify_checkpoint(folder)
    return folder


def verify_checkpoint(folder: Path) -> None:
    """Raise CheckpointError naming the first missing, truncated or corrupt file of `folder`."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST} is corrupt ({e})") from e
    for name, entry in manifest.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder}: file {name} is missing")
        if path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {folder}: file {name} is corrupt (size or sha256 mismatch)")


def _prune(root: Path, keep: int, current: str) -> None:
    folders = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name != current)
    for old in folders[: max(0, len(folders) - (keep - 1))]:
        shutil.rmtree(old)


def _write_file_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


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
