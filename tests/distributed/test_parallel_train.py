"""Expert parallelism inside the trainer: the same losses and weights as one process (fp32, gloo)."""

from __future__ import annotations

import pytest
from _parallel_helpers import assert_same_run, run_layout

FP8_LOSS_RTOL = 2e-3  # E4M3 keeps 3 mantissa bits: ~3% per element, averaging out over tokens and experts


@pytest.mark.parametrize("world, ep", [(2, 2), (4, 4)])
def test_expert_parallel_matches_one_process(root, ref, world, ep):
    assert_same_run(ref, run_layout(root, f"ep{ep}", world, ep=ep))


def test_overlapped_dispatch_matches_one_process(root, ref):
    """--ep-overlap: the shared expert runs while the tokens are on the wire; same arithmetic."""
    assert_same_run(ref, run_layout(root, "ep2_overlap", 2, ep=2, ep_overlap=True))


def test_fp8_dispatch_stays_within_fp8_tolerance(root, ref):
    """E4M3 tokens with 1x128 scales on the way to the experts (combine in full precision)."""
    eager = {"DSV3_FP8_COMPILE": "0"}  # the same codes; compiling the quantizer would cost ~30 s per rank
    records, _ = run_layout(root, "ep2_fp8", 2, env=eager, ep=2, fp8_dispatch=True)
    want, got = [r["loss"] for r in ref[0]], [r["loss"] for r in records]
    gaps = [abs(a - b) / a for a, b in zip(want, got)]
    assert max(gaps) <= FP8_LOSS_RTOL, gaps
    assert max(gaps) > 0  # the dispatch really went through FP8


# ------------------------------------------------------------------ layouts checked before any work
def test_parallel_dims_resolve_and_validate():
    from _parallel_helpers import MICRO

    from dsv3.config import ModelConfig
    from dsv3.errors import ConfigError
    from dsv3.parallel.mesh import ParallelDims

    model = ModelConfig.from_preset("tiny", **MICRO)  # 8 experts in 2 groups
    dims = ParallelDims(dp_shard=2, ep=2).resolve(8)
    assert (dims.pp, dims.dp_replicate, dims.dp_shard, dims.efsdp, dims.ep, dims.dp) == (1, 4, 2, 1, 2, 8)
    dims = ParallelDims(ep=2, pp=2).resolve(8)
    assert (dims.dp_replicate, dims.dp_shard, dims.efsdp) == (1, 4, 2)
    dims.validate(model, batch_size=16)
    cases = [
        (
            ParallelDims(dp_shard=3),
            4,
            None,
            "world size 4 is not divisible by pp x dp_replicate x dp_shard = 3",
        ),
        (ParallelDims(dp_shard=2, dp_replicate=1), 4, None, "2 ranks, but the world size is 4"),
        (ParallelDims(ep=3), 3, None, "ep=3 must divide n_routed_experts=8"),
        (ParallelDims(dp_shard=2, ep=4), 4, None, "ep=4 must divide dp_shard=2"),
        (ParallelDims(ep=4, ranks_per_node=1), 4, None, "n_group=2 must be a multiple"),
        (ParallelDims(pp=2, pp_schedule="dualpipev"), 2, None, "needs 4 stages but the model has only"),
        (ParallelDims(ep=2), 2, 3, "batch_size=3 must split into dp=2 ranks"),
    ]
    for dims, world, batch, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            dims.resolve(world).validate(model, batch_size=batch)


def test_trainer_rejects_a_bad_layout_before_any_work(tmp_path, monkeypatch):
    from _parallel_helpers import config

    from dsv3.errors import ConfigError
    from dsv3.train.trainer import Trainer

    monkeypatch.setenv("WORLD_SIZE", "4")  # as under torchrun, before any process group exists
    with pytest.raises(ConfigError, match="ep=3 must divide dp_shard=4"):
        Trainer(config(tmp_path, "bad", ep=3))
    assert not (tmp_path / "bad").exists()
