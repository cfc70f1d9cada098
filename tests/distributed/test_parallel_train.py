"""Expert parallelism inside the trainer: the same losses and weights as one process (fp32, gloo)."""

from __future__ import annotations

import pytest
from _parallel_helpers import assert_same_run, reference, run_layout


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ep_train")


@pytest.fixture(scope="module")
def ref(root):
    return reference(root)


@pytest.mark.parametrize("world, ep", [(2, 2), (4, 4)])
def test_expert_parallel_matches_one_process(root, ref, world, ep):
    assert_same_run(ref, run_layout(root, f"ep{ep}", world, ep=ep))
