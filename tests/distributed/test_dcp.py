"""Distributed checkpoints (DCP): saved with ep=4, resumed with ep=2 and on one process with the same
next-step loss as the uninterrupted run; exported to the Hugging Face layout."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from _launch import run_distributed
from _parallel_helpers import (
    EQUIV_STEPS,
    GRAD_NORM_RTOL,
    LOSS_RTOL,
    config,
    reference,
    run_layout,
    train_parallel,
)

from dsv3.checkpoint import LATEST, step_name


@pytest.fixture(scope="module")
def ep4(root):
    """The uninterrupted ep=4 run; it checkpoints at step 3 (save_every=3) and exports hf/ at the end."""
    return run_layout(root, "ep4", 4, ep=4)


def resume_copy(root, name: str, step: int):
    """A copy of the ep=4 run folder rolled back to its checkpoint at `step`."""
    src, dst = root / "ep4" / "run", root / name / "run"
    shutil.copytree(src, dst)
    (dst / "checkpoints" / LATEST).write_text(step_name(step))
    shutil.rmtree(dst / "checkpoints" / step_name(EQUIV_STEPS))
    return dst


def check_next_step(ep4_records, resumed) -> None:
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # metrics.jsonl kept up to the checkpoint, then 4
    want, got = ep4_records[3], resumed[3]
    for key in ("loss", "mtp_loss", "balance_loss"):
        assert abs(want[key] - got[key]) <= LOSS_RTOL * abs(want[key]), (key, want[key], got[key])
    assert abs(want["grad_norm"] - got["grad_norm"]) <= GRAD_NORM_RTOL * want["grad_norm"]


def test_resume_with_ep2(root, ep4):
    resume_copy(root, "resumed_ep2", 3)
    cfg = config(root, "resumed_ep2", ep=2, resume=True, stop_after=1)
    check_next_step(ep4[0], run_distributed(train_parallel, 2, dataclasses.asdict(cfg))[0])


def test_resume_on_one_process_without_torchrun(root, ep4):
    """`dsv3 train --resume` on a DCP checkpoint in one process: the trainer (a world of size 1)
    reads the shards of the ep=4 run."""
    import torch.distributed as dist

    from dsv3.train.metrics import read_metrics
    from dsv3.train.trainer import Trainer

    run = resume_copy(root, "resumed_1", 3)
    cfg = config(root, "resumed_1", resume=True, stop_after=1, threads=1)
    trainer = Trainer(cfg)
    try:
        assert trainer.dims.world_size == 1
        trainer.fit()
    finally:
        dist.destroy_process_group()
    check_next_step(ep4[0], read_metrics(run / "metrics.jsonl"))


def test_matches_one_process_and_exports_to_hf(root, ep4):
    from dsv3.model.transformer import Transformer

    ref_records, ref_state = reference(root)
    records, state = ep4
    for a, b in zip(ref_records, records):
        assert abs(a["loss"] - b["loss"]) <= LOSS_RTOL * a["loss"]
    exported = Transformer.from_pretrained(root / "ep4" / "run" / "hf").state_dict()
    assert exported.keys() == state.keys()
    for key in state:
        assert torch.equal(exported[key], state[key]), key
