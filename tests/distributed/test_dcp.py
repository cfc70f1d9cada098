"""Distributed checkpoints (DCP): saved with ep=4, resumed with ep=2 and on one process with the same
next-step loss as the uninterrupted run; exported to the Hugging Face layout."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from _launch import run_distributed
from _parallel_helpers import EQUIV_STEPS, LOSS_RTOL, config, reference, run_layout, train_parallel

from dsv3.train.checkpoint import LATEST, step_name
from dsv3.train.distributed import wants_distributed


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("dcp")


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


@pytest.mark.parametrize("world, ep", [(2, 2), (1, 1)])
def test_resume_in_another_layout_gives_the_same_next_step(root, ep4, world, ep):
    records, _ = ep4
    resume_copy(root, f"resumed_ep{ep}", 3)
    assert wants_distributed(config(root, f"resumed_ep{ep}", resume=True))  # a DCP checkpoint picks torchrun's path
    cfg = config(root, f"resumed_ep{ep}", ep=ep, resume=True, stop_after=1)
    resumed = run_distributed(train_parallel, world, dataclasses.asdict(cfg))[0]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # metrics.jsonl kept up to the checkpoint, then step 4
    want, got = records[3], resumed[3]
    for key in ("loss", "mtp_loss", "balance_loss", "grad_norm"):
        assert abs(want[key] - got[key]) <= LOSS_RTOL * abs(want[key]), (key, want[key], got[key])


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
