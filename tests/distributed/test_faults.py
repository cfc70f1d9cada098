"""Silent data corruption under data parallelism: a bit flipped in one replica's weights is caught by
the cross-replica checksum (`--sdc-check-every`) at the next check, naming that rank (gloo, 3 ranks)."""

from __future__ import annotations

import dataclasses

from _launch import run_distributed
from _parallel_helpers import config


def _train(rank: int, world: int, cfg_dict: dict) -> str | None:
    from dsv3.train.config import TrainConfig
    from dsv3.train.faults import ReplicaMismatchError
    from dsv3.train.trainer import Trainer

    try:
        Trainer(TrainConfig.from_dict(cfg_dict)).fit()
    except ReplicaMismatchError as e:
        return str(e)
    return None


def test_a_flipped_bit_in_one_replica_is_caught_and_named(root):
    cfg = config(root, "sdc", dp_replicate=3, batch_size=6, steps=4, sdc_check_every=1, save_every=10)
    errors = run_distributed(_train, 3, dataclasses.asdict(cfg), env={"DSV3_FAULT_BITFLIP_AT_STEP": "2"})
    # the check after step 1 passed (replicas agree without a fault); the one after step 2 caught it
    assert all(e is not None and "step 2: the sharded weights of rank(s) [2] differ" in e for e in errors), (
        errors
    )
