"""Expert-parallel serving in 2 and 4 gloo processes against the single-process Engine.

Every rank holds 1/ep of the routed experts and decodes its own sequences; rank 0 places the
requests (joining between steps, ending at different steps) and collects the outputs. Greedy
and seeded sampled outputs must equal the single-process Engine's, with and without MTP, when
the requests are spread over the ranks and when one rank gets all of them (the others idle in
every step's collectives), with chunked prefill and a batch limit that makes requests wait.
"""

import pytest
from _ep_serving import drive, ep_engine, reference, requests
from _launch import run_distributed

REQUESTS = requests()


def _serve(rank, world_size, mtp, assign_to, batch, chunk):
    import torch.distributed as dist

    from dsv3.infer.distributed import ClusterFront, least_loaded, run_worker

    engine = ep_engine(mtp, max_batch_size=batch, prefill_chunk=chunk)
    if rank:
        run_worker(engine)
        dist.barrier()
        return {"engine": engine.stats()}
    front = ClusterFront(engine, assign=(lambda loads: assign_to) if assign_to is not None else least_loaded)
    tokens = drive(front, REQUESTS)
    stats = front.stats()
    front.close()
    dist.barrier()
    return {"tokens": tokens, "cluster": stats, "engine": engine.stats()}


def _scenarios(rank, world_size):
    """Every scenario of one world size in one launch (starting processes dominates the time)."""
    runs = {
        "spread": (False, None, 4, None),
        "spread_mtp": (True, None, 4, 5),
        "one_rank_busy_mtp": (True, world_size - 1, 3, None),
    }
    return {name: _serve(rank, world_size, *args) for name, args in runs.items()}


@pytest.fixture(scope="module")
def ref():
    return {mtp: reference(REQUESTS, mtp) for mtp in (False, True)}


@pytest.fixture(scope="module", params=[2, 4])
def ranks(request):
    return request.param, run_distributed(_scenarios, request.param, env={"DSV3_COLLECTIVE_TIMEOUT_S": "60"})


@pytest.mark.parametrize("name,mtp", [("spread", False), ("spread_mtp", True), ("one_rank_busy_mtp", True)])
def test_outputs_equal_single_process_engine(ranks, ref, name, mtp):
    world, results = ranks
    assert results[0][name]["tokens"] == ref[mtp]
    assert len({tuple(t) for t in ref[mtp]}) > len(REQUESTS) // 2  # not a degenerate constant output


def test_requests_spread_over_ranks(ranks):
    world, results = ranks
    served = [r["spread"]["engine"]["prompt_tokens_total"] for r in results]
    assert all(served) and sum(served) == sum(len(p) for p, _ in REQUESTS)
    cluster = results[0]["spread"]["cluster"]
    assert cluster["ranks"] == world and cluster["prompt_tokens_total"] == sum(served)
    assert cluster["generation_tokens_total"] == sum(len(t) for t in results[0]["spread"]["tokens"])


def test_idle_ranks_take_part_in_every_step(ranks):
    """All requests on the last rank: the others decode nothing and run only idle passes."""
    world, results = ranks
    busy = [r["one_rank_busy_mtp"]["engine"] for r in results]
    assert busy[-1]["prompt_tokens_total"] == sum(len(p) for p, _ in REQUESTS)
    for stats in busy[:-1]:
        assert stats["prompt_tokens_total"] == 0 and stats["forward_passes"] == 0 and stats["idle_passes"] > 0
    assert busy[-1]["idle_passes"] > 0  # its decodes that ended with every sequence finished skip the draft
