"""Pipeline parallelism (1F1B and DualPipeV) matches one process (fp32, gloo); stage split rules."""

from __future__ import annotations

import pytest
from _parallel_helpers import assert_same_run, reference, run_layout

from dsv3.parallel.pipeline import split_stages, stage_ids_of_rank


def test_split_stages_and_v_placement():
    assert split_stages(5, 2) == [[0, 1, 2], [3, 4]]
    assert split_stages(4, 4) == [[0], [1], [2], [3]]
    assert [stage_ids_of_rank(r, 2, "dualpipev") for r in range(2)] == [[0, 3], [1, 2]]
    assert [stage_ids_of_rank(r, 2, "1f1b") for r in range(2)] == [[0], [1]]


@pytest.fixture(scope="module")
def ref(root):
    return reference(root, layers=4)  # 4 layers: DualPipeV's 4 stages (2 per rank, V-shaped) hold one each


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev"])
def test_pipeline_matches_one_process(root, ref, schedule):
    assert_same_run(ref, run_layout(root, f"pp_{schedule}", 2, layers=4, pp=2, pp_schedule=schedule))
