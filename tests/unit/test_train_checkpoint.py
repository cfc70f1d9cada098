"""Atomic checkpoints (dsv3.train.checkpoint): crashes mid-save never lose the previous checkpoint."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dsv3.checkpoint import (
    LATEST,
    CheckpointError,
    latest_checkpoint,
    save_checkpoint,
    step_name,
    verify_checkpoint,
)


def writer(payload: str):
    def write(folder: Path) -> None:
        (folder / "weights.bin").write_text(payload)
        (folder / "state.json").write_text('{"ok": true}')

    return write


def test_save_points_latest_at_the_newest_and_keeps_the_last_k(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, writer(f"w{step}"), keep=2)
    assert (tmp_path / LATEST).read_text() == step_name(40)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, step_name(30), step_name(40)]
    latest = latest_checkpoint(tmp_path)
    assert latest == tmp_path / step_name(40) and (latest / "weights.bin").read_text() == "w40"


def test_no_checkpoint_yet_is_none(tmp_path):
    assert latest_checkpoint(tmp_path) is None


def test_exception_mid_save_leaves_previous_checkpoint_current(tmp_path):
    save_checkpoint(tmp_path, 1, writer("good"), keep=3)

    def crash(folder: Path) -> None:
        (folder / "weights.bin").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, 2, crash, keep=3)
    assert not list(tmp_path.glob(".tmp-*"))  # the failed writer removed its temporary folder
    latest = latest_checkpoint(tmp_path)
    assert latest.name == step_name(1) and (latest / "weights.bin").read_text() == "good"


def test_sigkill_mid_save_resumes_from_last_complete(tmp_path, capsys):
    save_checkpoint(tmp_path, 1, writer("good"), keep=3)
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from dsv3.checkpoint import save_checkpoint
        def write(folder):
            (folder / "weights.bin").write_text("partial")
            os.kill(os.getpid(), signal.SIGKILL)
        save_checkpoint(Path({str(tmp_path)!r}), 2, write, keep=3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert list(tmp_path.glob(".tmp-*")), "the killed save should have left its temporary folder"
    latest = latest_checkpoint(tmp_path)
    assert latest.name == step_name(1) and (latest / "weights.bin").read_text() == "good"
    assert "ignoring incomplete checkpoint" in capsys.readouterr().out
    save_checkpoint(tmp_path, 2, writer("retry"), keep=3)  # the step can be saved again afterwards
    assert (latest_checkpoint(tmp_path) / "weights.bin").read_text() == "retry"


def test_complete_but_unpointed_folder_is_replaced_on_next_save(tmp_path):
    save_checkpoint(tmp_path, 1, writer("one"), keep=3)
    save_checkpoint(tmp_path, 2, writer("stale"), keep=3)
    (tmp_path / LATEST).write_text(step_name(1))  # as if killed between the rename and `latest`
    assert latest_checkpoint(tmp_path).name == step_name(1)
    save_checkpoint(tmp_path, 2, writer("fresh"), keep=3)
    assert (latest_checkpoint(tmp_path) / "weights.bin").read_text() == "fresh"


@pytest.mark.parametrize("damage", ["delete", "corrupt", "truncate"])
def test_missing_or_corrupt_file_is_named(tmp_path, damage):
    folder = save_checkpoint(tmp_path, 5, writer("0123456789"), keep=1)
    target = folder / "weights.bin"
    if damage == "delete":
        target.unlink()
    elif damage == "corrupt":
        target.write_text("01234X6789")
    else:
        target.write_text("0123")
    with pytest.raises(CheckpointError, match="weights.bin"):
        verify_checkpoint(folder)
    with pytest.raises(CheckpointError, match="weights.bin"):
        latest_checkpoint(tmp_path)


def test_missing_manifest_means_incomplete(tmp_path):
    folder = save_checkpoint(tmp_path, 5, writer("x"), keep=1)
    (folder / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        verify_checkpoint(folder)
