"""EPLB placement: hand-derived small cases, invariants on skewed loads, replica routing."""

import pytest
import torch

from dsv3.parallel.eplb import (
    balanced_packing,
    gpu_loads,
    imbalance,
    rebalance_experts,
    replica_indices,
    replicate_experts,
)

# DeepSeek's published EPLB example: 2 layers, 12 experts in 4 groups of 3, 16 slots, 2 nodes, 8 GPUs
EXAMPLE = torch.tensor(
    [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ]
)


def test_published_example_derived_step_by_step():
    """Layer 0 by hand (layer 1 the same way):
    1. group loads g0..g3 = 262, 330, 116, 325; heaviest first into the lighter node with room:
       g1 -> n0, g3 -> n1, g0 -> n1 (325 < 330), g2 -> n0 (n1 full). n0 = [g1, g2] = experts
       3..8, n1 = [g3, g0] = experts 9, 10, 11, 0, 1, 2.
    2. n0 loads 61 104 165 39 4 73, 8 slots for 6: copy 5 (165 -> 82.5 each), then 4 (104 -> 52);
       n1 loads 56 183 86 90 132 40: copy 10 (183 -> 91.5), then 1 (132 -> 66).
    3. n0 replicas 5:82.5 5:82.5 8:73 3:61 4:52 4:52 6:39 7:4 onto 4 GPUs of 2 slots:
       GPU0 [5, 6], GPU1 [5, 7], GPU2 [8, 4], GPU3 [3, 4];
       n1 replicas 10:91.5 10:91.5 0:90 11:86 1:66 1:66 9:56 2:40:
       GPU4 [10, 9], GPU5 [10, 2], GPU6 [0, 1], GPU7 [11, 1]."""
    p = rebalance_experts(EXAMPLE, n_physical=16, n_groups=4, n_nodes=2, n_gpus=8)
    expected = torch.tensor(
        [
            [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
            [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
        ]
    )
    assert torch.equal(p.physical_to_logical, expected)
    assert torch.equal(p.replica_counts[0], torch.tensor([1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1]))
    assert torch.equal(p.replica_counts[1], torch.tensor([1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]))
    _check_consistent(p, n_physical=16)
    # layer 0, expert 4: the original (copy 0) went to GPU3 (slot 7), the extra copy to GPU2 (slot 5)
    assert p.logical_to_physical[0, 4].tolist() == [7, 5]
    after = imbalance(gpu_loads(EXAMPLE, p.physical_to_logical, p.replica_counts, 8))
    # layer 0 GPUs: 121.5 86.5 125 113 | 147.5 131.5 156 152, mean 129.125
    torch.testing.assert_close(after[0], torch.tensor(156 / 129.125, dtype=torch.float64))


def test_global_policy_when_groups_do_not_divide_nodes():
    """3 groups on 2 nodes: one pool. Slots 7, 8 copy expert 0 (60 -> 30 -> 20 each); replicas
    0:20 0:20 0:20 1:10 2:10 3:10 4:5 5:5 onto 2 GPUs of 4: GPU0 [0, 0, 3, 5] = 55,
    GPU1 [0, 1, 2, 4] = 45, against 80 / 20 for three experts per GPU and no copies."""
    loads = torch.tensor([[60, 10, 10, 10, 5, 5]])
    p = rebalance_experts(loads, n_physical=8, n_groups=3, n_nodes=2, n_gpus=2)
    assert p.physical_to_logical.tolist() == [[0, 0, 3, 5, 0, 1, 2, 4]]
    assert p.replica_rank.tolist() == [[0, 2, 0, 0, 1, 0, 0, 0]]
    assert p.replica_counts.tolist() == [[3, 1, 1, 1, 1, 1]]
    assert gpu_loads(loads, p.physical_to_logical, p.replica_counts, 2).tolist() == [[55, 45]]
    _check_consistent(p, n_physical=8)


def test_building_blocks():
    pack, slot = balanced_packing(torch.tensor([[5.0, 1, 4, 2]]), 2)  # 5 -> p0, 4 -> p1, 2 -> p1, 1 -> p0
    assert pack.tolist() == [[0, 0, 1, 1]] and slot.tolist() == [[0, 1, 0, 1]]
    phy2log, rank, counts = replicate_experts(
        torch.tensor([[9.0, 4, 1]]), 6
    )  # copy 0 (9 -> 4.5 -> 3 each), then 1 (4)
    assert phy2log.tolist() == [[0, 1, 2, 0, 0, 1]] and counts.tolist() == [[3, 2, 1]]
    assert rank.tolist() == [[0, 0, 0, 1, 2, 1]]


def _skewed(layers=3, experts=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(layers, experts, generator=g) * 6).exp().round()  # log-uniform, ~400x spread


@pytest.mark.parametrize("n_groups,n_nodes", [(8, 4), (8, 2), (6, 4)])  # last: global policy
def test_skewed_load_gets_more_even(n_groups, n_nodes):
    E, n_gpus, n_physical = 48, 8, 64
    loads = _skewed(experts=E)
    p = rebalance_experts(loads, n_physical, n_groups, n_nodes, n_gpus)
    _check_consistent(p, n_physical)
    before = imbalance(loads.double().view(3, n_gpus, -1).sum(-1))  # contiguous, no copies
    after = imbalance(gpu_loads(loads, p.physical_to_logical, p.replica_counts, n_gpus))
    assert (after < before).all(), (before, after)
    # total load is preserved
    torch.testing.assert_close(
        gpu_loads(loads, p.physical_to_logical, p.replica_counts, n_gpus).sum(-1), loads.double().sum(-1)
    )
    if n_groups % n_nodes == 0:  # hierarchical: a group's experts (and their copies) share a node
        node_of_slot = torch.arange(n_physical) // (n_physical // n_nodes)
        group = p.physical_to_logical // (E // n_groups)
        for layer in range(3):
            for gid in range(n_groups):
                assert len(set(node_of_slot[group[layer] == gid].tolist())) == 1


def _check_consistent(p, n_physical):
    L, E = p.replica_counts.shape
    assert p.physical_to_logical.shape == (L, n_physical)
    assert (p.replica_counts >= 1).all() and (p.replica_counts.sum(-1) == n_physical).all()
    for layer in range(L):
        for e in range(E):
            slots = p.logical_to_physical[layer, e]
            slots = slots[slots >= 0]
            assert len(slots) == p.replica_counts[layer, e]
            assert (p.physical_to_logical[layer, slots] == e).all()
            assert sorted(p.replica_rank[layer, slots].tolist()) == list(range(len(slots)))


def test_replica_indices_round_robin():
    p = rebalance_experts(EXAMPLE, 16, 4, 2, 8)
    l2p, counts = p.logical_to_physical[0], p.replica_counts[0]
    indices = torch.tensor([[4, 0], [4, 5], [4, 2], [4, 0]])  # [N=4, K=2]
    phys = replica_indices(indices, l2p, counts)
    assert torch.equal(p.physical_to_logical[0][phys], indices)  # every choice lands on a copy of it
    assert phys[:, 0].tolist() == [7, 5, 7, 5]  # expert 4's two copies alternate by token index
    assert phys[1, 1] == l2p[5, 1] and phys[0, 1] == phys[3, 1] == l2p[0, 0]
    # many tokens: each copy of a replicated expert gets half
    many = torch.full((1000, 1), 10)
    hits = torch.bincount(replica_indices(many, l2p, counts).flatten(), minlength=16)
    assert hits[l2p[10, 0]] == hits[l2p[10, 1]] == 500


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_physical=10 must be >= the 12 logical experts"):
        rebalance_experts(EXAMPLE, 10, 4, 2, 8)
    with pytest.raises(ValueError, match="n_physical=20 must be a multiple of n_gpus=8"):
        rebalance_experts(EXAMPLE, 20, 4, 2, 8)
    with pytest.raises(ValueError, match="n_groups=5 must divide"):
        rebalance_experts(EXAMPLE, 16, 5, 2, 8)
