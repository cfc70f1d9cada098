"""FSDP2 and HSDP (with and without expert parallelism) match one process (fp32, gloo), and FSDP's
BF16 mixed precision tracks the BF16 single-process run."""

from __future__ import annotations

from _parallel_helpers import assert_same_run, reference, run_layout


def test_fsdp_over_two_ranks_matches_one_process(root, ref):
    # with activation checkpointing: recomputing attention must not change a thing
    assert_same_run(ref, run_layout(root, "fsdp2", 2, dp_shard=2, activation_checkpoint=True))


def test_hsdp_with_expert_parallelism_matches_one_process(root, ref):
    # 4 ranks: 2 replicas x 2 shards; the experts split over the 2 shard ranks (efsdp = 1)
    assert_same_run(ref, run_layout(root, "hsdp_ep2", 4, dp_shard=2, ep=2))


def test_fsdp_in_bf16_tracks_the_bf16_single_process_run(root):
    """dtype=bfloat16: FSDP gathers parameters in BF16 and reduces gradients in FP32 (fp32 master
    weights), where one process autocasts its FP32 weights. Matmuls see the same BF16 weights
    either way; norms and the router see BF16-rounded weights under FSDP (a relative 2^-9), so
    the losses agree to BF16 precision, not bitwise: within 1% per step (a few BF16 ulps of the
    loss), far below what a wrong gradient scale or a missing reduction would move them."""
    want, _ = reference(root / "bf16", dtype="bfloat16")
    got, _ = run_layout(root, "fsdp2_bf16", 2, dp_shard=2, dtype="bfloat16")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(want, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-2 * a["loss"], (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 5e-2 * a["grad_norm"], (a["step"], a, b)
