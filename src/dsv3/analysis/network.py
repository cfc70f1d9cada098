"""Cluster networks sized from the switch radix k, their cost, and MoE all-to-all traffic.

Topologies (ISCA Table 3; "links" are switch-to-switch cables, endpoint cables not counted):

    two-level fat tree (FT2)   k leaves with k/2 hosts and k/2 uplinks, k/2 spines:
                               endpoints k^2/2, switches 3k/2, links k^2/2
    multi-plane FT2 (MPFT)     P independent FT2 planes, one NIC of each host per plane: x P
    three-level fat tree (FT3) endpoints k^3/4, switches 5k^2/4, links k^3/2
    Slim Fly (MMS graph)       2 q^2 routers of network radix k' = (3q - delta)/2 (q = 4w + delta,
                               delta in {-1, 0, 1}), p = ceil(k'/2) endpoints each, links 2 q^2 k'/2;
                               the largest q with k' + p <= k (the MMS construction itself needs a
                               prime-power q; sizing does not)
    Dragonfly                  groups of a routers, each with p endpoints and h global links
                               (balanced: a = 2p = 2h, radix p + h + a - 1 <= k); g <= a h + 1 groups;
                               links a(a-1)/2 per group + a h g / 2 global (cabled ports)

Cost = switches x switch price + links x link price (defaults ~$83k and ~$504: the prices that
reproduce the paper's totals).

Node-limited routing (V3R): a token picks K of E routed experts spread over N nodes; sending one
copy per expert crosses the scale-out network K (N-1)/N times on average; sending one copy per
target node and fanning out over NVLink crosses it E[distinct nodes] (N-1)/N times, with

    E[distinct nodes] = M (1 - C((M-1) e, K) / C(M e, K)),  e = E/N experts per node,

for experts drawn uniformly from the M nodes a token may reach (M = N: no node limit).
The bound the paper quotes is K -> M copies per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsv3.errors import UserError

SWITCH_PRICE = 83_000.0  # $ per 64-port switch
LINK_PRICE = 504.0  # $ per switch-to-switch link (cable + optics)


class NetworkError(UserError):
    """A topology or traffic parameter out of range."""


@dataclass(frozen=True)
class Topology:
    name: str
    endpoints: int
    switches: int
    links: int

    def cost(self, switch_price: float = SWITCH_PRICE, link_price: float = LINK_PRICE) -> float:
        if switch_price < 0 or link_price < 0:
            raise NetworkError(f"prices must be >= 0, got switch {switch_price}, link {link_price}")
        return self.switches * switch_price + self.links * link_price

    def cost_per_endpoint(self, switch_price: float = SWITCH_PRICE, link_price: float = LINK_PRICE) -> float:
        return self.cost(switch_price, link_price) / self.endpoints


def _even_radix(k: int, minimum: int, topology: str) -> None:
    if not (isinstance(k, int) and k >= minimum and k % 2 == 0):
        raise NetworkError(f"{topology} needs an even switch radix >= {minimum}, got radix={k!r}")


def fat_tree2(k: int) -> Topology:
    _even_radix(k, 2, "two-level fat tree")
    return Topology("FT2", k * k // 2, 3 * k // 2, k * k // 2)


def multi_plane_fat_tree(k: int, planes: int) -> Topology:
    if not (isinstance(planes, int) and planes >= 1):
        raise NetworkError(f"planes={planes!r} must be a positive integer")
    ft = fat_tree2(k)
    return Topology(f"MPFT ({planes} planes)", planes * ft.endpoints, planes * ft.switches, planes * ft.links)


def fat_tree3(k: int) -> Topology:
    _even_radix(k, 4, "three-level fat tree")
    return Topology("FT3", k**3 // 4, 5 * k * k // 4, k**3 // 2)


def slim_fly_radix(q: int) -> int:
    """Network radix k' = (3q - delta)/2 of the MMS graph for q = 4w + delta."""
    delta = {0: 0, 1: 1, 3: -1}.get(q % 4)
    if delta is None or q < 3:
        raise NetworkError(
            f"Slim Fly q={q} must be 4w + delta with delta in (-1, 0, 1) and q >= 3 (q % 4 != 2)"
        )
    return (3 * q - delta) // 2


def slim_fly(k: int) -> Topology:
    """The largest MMS Slim Fly whose routers (k' network + ceil(k'/2) endpoint ports) fit radix k."""
    fitting = [q for q in range(3, k) if q % 4 != 2 and _slim_fly_ports(q) <= k]
    if not fitting:
        raise NetworkError(f"Slim Fly needs radix >= {_slim_fly_ports(3)} (q = 3), got radix={k}")
    q = max(fitting)
    net = slim_fly_radix(q)
    routers = 2 * q * q
    return Topology(f"Slim Fly (q={q})", routers * math.ceil(net / 2), routers, routers * net // 2)


def _slim_fly_ports(q: int) -> int:
    net = slim_fly_radix(q)
    return net + math.ceil(net / 2)


def dragonfly(k: int, groups: int | None = None) -> Topology:
    """Balanced Dragonfly (a = 2p = 2h) for radix k; `groups` defaults to the maximum a h + 1."""
    p = (k + 1) // 4
    if p < 1:
        raise NetworkError(f"Dragonfly needs radix >= 3 (p = h = 1, a = 2), got radix={k}")
    a, h = 2 * p, p
    g = a * h + 1 if groups is None else groups
    if not (isinstance(g, int) and 2 <= g <= a * h + 1):
        raise NetworkError(f"Dragonfly groups={groups!r} must be in [2, a*h+1 = {a * h + 1}] for radix {k}")
    links = g * a * (a - 1) // 2 + a * h * g // 2
    return Topology(f"Dragonfly (p=h={p}, a={a}, g={g})", a * p * g, a * g, links)


# ---------------------------------------------------------------------------------- MoE traffic
@dataclass(frozen=True)
class RoutingTraffic:
    """Expected scale-out copies of one token's hidden state per MoE layer (dispatch direction)."""

    copies_per_expert: float  # one copy per remote expert
    copies_per_node: float  # one copy per remote node, fanned out over NVLink
    bound_per_expert: int  # the paper's worst case K
    bound_per_node: int  # the paper's worst case M

    def bytes_per_token(self, hidden: int, bytes_per_value: float, deduplicated: bool = True) -> float:
        copies = self.copies_per_node if deduplicated else self.copies_per_expert
        return copies * hidden * bytes_per_value


def node_limited_traffic(
    n_experts: int, n_nodes: int, top_k: int, max_nodes: int | None = None
) -> RoutingTraffic:
    m = n_nodes if max_nodes is None else max_nodes
    if n_nodes < 1 or n_experts % n_nodes:
        raise NetworkError(f"n_nodes={n_nodes} must be >= 1 and divide n_experts={n_experts}")
    if not 1 <= m <= n_nodes:
        raise NetworkError(f"max_nodes={max_nodes} must be in [1, n_nodes={n_nodes}]")
    per_node = n_experts // n_nodes
    if not 1 <= top_k <= m * per_node:
        raise NetworkError(f"top_k={top_k} must be in [1, max_nodes x experts per node = {m * per_node}]")
    distinct = m * (1 - math.comb((m - 1) * per_node, top_k) / math.comb(m * per_node, top_k))
    remote = (n_nodes - 1) / n_nodes
    return RoutingTraffic(top_k * remote, distinct * remote, top_k, min(top_k, m))


def transfer_time_us(nbytes: float, bandwidth_gbps: float, latency_us: float = 0.0) -> float:
    """Time to move `nbytes` over a link of `bandwidth_gbps` (1e9 B/s) after a fixed latency."""
    if not bandwidth_gbps > 0:
        raise NetworkError(f"bandwidth_gbps={bandwidth_gbps!r} must be > 0")
    if nbytes < 0 or latency_us < 0:
        raise NetworkError(f"bytes={nbytes!r} and latency_us={latency_us!r} must be >= 0")
    return nbytes / (bandwidth_gbps * 1e3) + latency_us
