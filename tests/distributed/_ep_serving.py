"""Shared by the expert-parallel serving tests: a small MoE model every rank builds identically,
prompts of mixed lengths, the single-process Engine's outputs as the reference, and the
cluster run (ClusterFront on rank 0, run_worker on the others) driven step by step with
requests joining mid-run."""

from __future__ import annotations

import torch
import torch.distributed as dist

from dsv3 import ModelConfig, Transformer
from dsv3.infer.engine import Engine, SamplingParams
from fixtures import ENGINE

CFG = ENGINE


def model() -> Transformer:
    """The same weights in every process; large enough that greedy paths diverge on any error."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_dict(CFG)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.15 if p.dim() > 1 else 1 + 0.2 * torch.randn_like(p))
    return m


def requests(n: int = 10, seed: int = 1) -> list[tuple[list[int], SamplingParams]]:
    """Mixed prompt lengths and max_tokens (requests end at different steps); greedy, and every
    third one sampled with its own seed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(
            0, CFG["vocab_size"], (int(torch.randint(1, 24, (), generator=g)),), generator=g
        )
        temperature = 0.8 if i % 3 == 2 else 0.0
        params = SamplingParams(
            max_tokens=4 + 3 * (i % 4), temperature=temperature, seed=100 + i, ignore_eos=True
        )
        out.append((prompt.tolist(), params))
    return out


def reference(reqs, drafts: int) -> list[list[int]]:
    """The single-process Engine, all requests at once; drafts: MTP drafts per step (0: no MTP)."""
    engine = Engine(
        model(), max_batch_size=len(reqs), block_size=4, mtp=drafts > 0, mtp_drafts=max(drafts, 1)
    )
    return [o.token_ids for o in engine.generate([p for p, _ in reqs], [sp for _, sp in reqs])]


def drive(
    front, reqs, join_every: int = 2, per_join: int = 3, rebalance_every: int | None = None
) -> list[list[int]]:
    """Rank 0: feed the requests a few at a time between steps, run to the end; tokens in order.
    rebalance_every: re-place the experts (EPLB) before every that many steps."""
    ids, final, pending, steps = [], {}, list(reqs), 0
    while pending or front.has_unfinished():
        if rebalance_every and steps % rebalance_every == rebalance_every - 1:
            front.request_rebalance()
        if pending and steps % join_every == 0:
            for prompt, params in pending[:per_join]:
                ids.append(front.add_request(prompt, params))
            pending = pending[per_join:]
        for out in front.step():
            if out.finished:
                final[out.request_id] = out.token_ids
        steps += 1
    return [final[i] for i in ids]


def ep_engine(drafts: int, redundant: int | None = None, skew: float = 0.0, **kw):
    """(this rank's LockstepEngine over the test model with its experts split over the world, the
    LiveBalancer or None). drafts: MTP drafts per step (0: no MTP); redundant: place E + redundant slots with EPLB (else the training
    layout); skew: add this to the selection bias of the last expert of every router."""
    from dsv3.infer.lockstep import LockstepEngine
    from dsv3.model.moe import named_routers
    from dsv3.parallel.eplb_live import LiveBalancer, apply_expert_placement, initial_placement, moe_layers
    from dsv3.parallel.expert_parallel import apply_expert_parallel

    m = model()
    with torch.no_grad():
        for _, router in named_routers(m):
            router.e_score_correction_bias[-1] += skew
    balancer = None
    if redundant is None:
        apply_expert_parallel(m, dist.group.WORLD)
    else:
        ep, E = dist.get_world_size(), CFG["n_routed_experts"]
        placement = initial_placement(len(moe_layers(m)), E, redundant, CFG["n_group"], ep)
        apply_expert_placement(m, dist.group.WORLD, placement)
        balancer = LiveBalancer(m, dist.group.WORLD, placement)
    engine = LockstepEngine(
        m,
        max_batch_size=kw.pop("max_batch_size", 4),
        block_size=4,
        mtp=drafts > 0,
        mtp_drafts=max(drafts, 1),
        **kw,
    )
    return engine, balancer


def holds_placed_experts(engine, balancer) -> bool:
    """Whether this rank's expert weights are those of its slots in the balancer's placement, and
    its packed copies (where the engine packed them) those weights'."""
    from dsv3.model.packed_experts import can_pack, is_current
    from dsv3.parallel.eplb_live import moe_layers

    full, rank = moe_layers(model()), dist.get_rank()
    for layer, (moe, ref) in enumerate(zip(moe_layers(engine.model), full)):
        S = moe.experts.n_experts
        mine = balancer.placement.physical_to_logical[layer, rank * S : (rank + 1) * S]
        if not (
            torch.equal(moe.experts.gate_up_proj, ref.experts.gate_up_proj[mine])
            and torch.equal(moe.experts.down_proj, ref.experts.down_proj[mine])
        ):
            return False
        packed = moe.experts.packed
        if can_pack(moe.experts.down_proj) and not (
            packed >= 0 and is_current(packed, moe.experts.gate_up_proj, moe.experts.down_proj)
        ):
            return False
    return True
