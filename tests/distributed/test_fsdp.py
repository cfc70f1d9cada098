"""FSDP2 and HSDP (with and without expert parallelism) match one process (fp32, gloo)."""

from __future__ import annotations

import pytest
from _parallel_helpers import assert_same_run, reference, run_layout


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp_train")


@pytest.fixture(scope="module")
def ref(root):
    return reference(root)


def test_fsdp_over_two_ranks_matches_one_process(root, ref):
    # with activation checkpointing: recomputing attention must not change a thing
    assert_same_run(ref, run_layout(root, "fsdp2", 2, dp_shard=2, activation_checkpoint=True))


def test_hsdp_with_expert_parallelism_matches_one_process(root, ref):
    # 4 ranks: 2 replicas x 2 shards; the experts split over the 2 shard ranks (efsdp = 1)
    assert_same_run(ref, run_layout(root, "hsdp_ep2", 4, dp_shard=2, ep=2))
