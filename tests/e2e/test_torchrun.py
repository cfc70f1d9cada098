"""`torchrun -m dsv3 train` as a user runs it: a rank killed mid-run is restarted by torchrun, resumes
from the last checkpoint and ends with the loss of an uninterrupted run; bad layouts fail first.

The kill is the trainer's test hook DSV3_FAULT_AT_STEP=K (train/distributed.py): on torchrun's
first attempt the last rank SIGKILLs itself right after step K."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from test_train_cli import train_args

from dsv3.train.metrics import read_metrics


def torchrun(
    tmp: Path, nproc: int, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "--max-restarts",
        "1",
        "-m",
        "dsv3",
        *train_args(tmp, "--no-report", *extra),
    ]
    child_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_env, check=False)


def test_killed_rank_resumes_and_ends_with_the_uninterrupted_loss(tmp_path):
    clean = torchrun(tmp_path / "clean", 2, "--ep", "2", "--save-every", "2")
    assert clean.returncode == 0, clean.stderr[-3000:]
    faulty = torchrun(
        tmp_path / "faulty", 2, "--ep", "2", "--save-every", "2", env={"DSV3_FAULT_AT_STEP": "3"}
    )
    assert faulty.returncode == 0, faulty.stderr[-3000:]
    out = faulty.stdout + faulty.stderr
    assert "kills itself" in out and "resumed from" in out and "step_00000002" in out
    want = read_metrics(tmp_path / "clean" / "run" / "metrics.jsonl")
    got = read_metrics(tmp_path / "faulty" / "run" / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))
    assert got[-1]["loss"] == want[-1]["loss"] and got[-1]["val_loss"] == want[-1]["val_loss"]
    assert (tmp_path / "faulty" / "run" / "hf" / "model.safetensors").is_file()


def test_bad_layout_fails_before_work(tmp_path):
    # (every layout rule is unit-tested in tests/distributed/test_parallel_train.py; this is the CLI path)
    bad = torchrun(tmp_path, 2, "--dp-shard", "4")
    assert bad.returncode != 0
    assert "error: world size 2 is not divisible by pp x dp_replicate x dp_shard = 4" in bad.stderr
    assert not (tmp_path / "run").exists()  # nothing was written
