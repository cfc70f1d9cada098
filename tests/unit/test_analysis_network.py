"""Topology sizing (ISCA Table 3) and node-limited routing traffic."""

import math
import random

import pytest

from dsv3.analysis import network
from dsv3.analysis.network import NetworkError

TABLE3 = [  # endpoints, switches, links, cost M$, k$ per endpoint
    (lambda: network.fat_tree2(64), 2_048, 96, 2_048, 9, 4.39),
    (lambda: network.multi_plane_fat_tree(64, 8), 16_384, 768, 16_384, 72, 4.39),
    (lambda: network.fat_tree3(64), 65_536, 5_120, 131_072, 491, 7.5),
    (lambda: network.slim_fly(64), 32_928, 1_568, 32_928, 146, 4.4),
    (lambda: network.dragonfly(64, groups=511), 261_632, 16_352, 384_272, 1_522, 5.8),
]


@pytest.mark.parametrize("build, endpoints, switches, links, cost_m, per_endpoint_k", TABLE3)
def test_table3(build, endpoints, switches, links, cost_m, per_endpoint_k):
    t = build()
    assert (t.endpoints, t.switches, t.links) == (endpoints, switches, links)
    assert t.cost() / 1e6 == pytest.approx(cost_m, rel=0.03)
    assert t.cost_per_endpoint() / 1e3 == pytest.approx(per_endpoint_k, rel=0.03)


def test_slim_fly_picks_the_largest_mms_graph_that_fits():
    assert network.slim_fly_radix(28) == 42  # q = 4*7 + 0
    assert network.slim_fly_radix(29) == 43 and network.slim_fly_radix(27) == 41
    assert network.slim_fly(64).name == "Slim Fly (q=28)"  # q=29 needs 43 + 22 = 65 ports


def test_full_dragonfly_global_links_connect_every_group_pair_once():
    t = network.dragonfly(64)
    g = 32 * 16 + 1
    assert t.links == g * 32 * 31 // 2 + g * (g - 1) // 2


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: network.fat_tree2(63), "even switch radix >= 2, got radix=63"),
        (lambda: network.fat_tree3(2), "radix >= 4"),
        (lambda: network.slim_fly(4), r"Slim Fly needs radix >= 8 \(q = 3\)"),
        (lambda: network.dragonfly(2), "Dragonfly needs radix >= 3"),
        (lambda: network.dragonfly(64, groups=600), r"groups=600 must be in \[2, a\*h\+1 = 513\]"),
        (lambda: network.multi_plane_fat_tree(64, 0), "planes=0"),
        (lambda: network.slim_fly_radix(30), "q % 4 != 2"),
        (lambda: network.fat_tree2(64).cost(-1.0), "prices must be >= 0"),
        (lambda: network.transfer_time_us(1, 0), "bandwidth_gbps=0 must be > 0"),
        (lambda: network.node_limited_traffic(256, 8, 8, 9), r"max_nodes=9 must be in \[1, n_nodes=8\]"),
        (lambda: network.node_limited_traffic(256, 7, 8), "divide n_experts=256"),
        (lambda: network.node_limited_traffic(256, 8, 40, 1), "top_k=40"),
    ],
)
def test_bad_parameters_are_named(call, message):
    with pytest.raises(NetworkError, match=message):
        call()


def test_node_limited_traffic_bounds_and_expectation():
    t = network.node_limited_traffic(256, 8, 8, 4)
    assert (t.bound_per_expert, t.bound_per_node) == (8, 4)  # the paper's 8t -> Mt
    assert t.copies_per_expert == pytest.approx(8 * 7 / 8)
    expected_nodes = 4 * (1 - math.comb(96, 8) / math.comb(128, 8))
    assert t.copies_per_node == pytest.approx(expected_nodes * 7 / 8)
    assert t.bytes_per_token(7168, 1) == pytest.approx(t.copies_per_node * 7168)
    assert network.node_limited_traffic(256, 8, 8, 1).copies_per_node == pytest.approx(7 / 8)


def test_node_limited_traffic_matches_a_simulation():
    rng = random.Random(0)
    n_experts, n_nodes, k, m = 64, 8, 6, 3
    per_node, trials, remote = n_experts // n_nodes, 20_000, 0
    for _ in range(trials):
        nodes = rng.sample(range(n_nodes), m)
        experts = rng.sample([node * per_node + j for node in nodes for j in range(per_node)], k)
        source = rng.randrange(n_nodes)
        remote += len({e // per_node for e in experts} - {source})
    expected = network.node_limited_traffic(n_experts, n_nodes, k, m).copies_per_node
    assert remote / trials == pytest.approx(expected, rel=0.02)
