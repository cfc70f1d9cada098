"""Pipeline parallelism with torch.distributed.pipelining: stages, 1F1B and DualPipeV.

The Transformer is cut into S stages of consecutive blocks (`split_stages`). A stage is the
(meta) model itself with the parts it does not hold removed, as in torchtitan: a copy whose
`layers` ModuleDict keeps only its blocks (keyed by their index in the full model) and whose
embedding, or norm, head and MTP modules are None. Parameter names stay the full model's, so
checkpoints and weight init see one namespace, and `Transformer.forward` is the stage's forward:

    stage 0:     embed_tokens, layers 0..a          (input_ids [b, T]) -> (h, emb, balance)
    stage s:     layers ..                          (h, emb, balance)  -> (h, emb, balance)
    stage S-1:   layers .., norm, lm_head, mtp      (h, emb, balance)  -> same; the loss function
                                                     finishes with Transformer.losses (norm, head, MTP)

MTP needs Emb(t_{i+1}) on the last stage, far from the embedding. dsv3 sends the embedding output
`emb` [b, T, H] down the pipeline with h: one more activation per hop, and its gradient flows back
to the first stage through the schedule's own backward, so the embedding is trained exactly as on
one device (no second copy to keep tied, no all-reduce between first and last stage). The
sequence-balance losses of every MoE layer travel as `balance` [1] and join the objective on the
last stage. The loss function (`StageLoss`) is `Transformer.losses`, the end of the model's own
forward, weighted per microbatch by parallel/objective.py so that the microbatches sum
to the single-process loss; schedules run with scale_grads=False.

Schedules (pp ranks P, microbatches m >= stages):
  * "1f1b": one stage per rank, warm-up forwards then one-forward-one-backward; bubble (P-1)(F+B).
  * "dualpipev": two stages per rank in a V (rank r holds stages r and 2P-1-r, so the first and
    last stages share rank 0), with backward split into input- and weight-gradients to fill the
    bubble: PyTorch's ScheduleDualPipeV, the single-direction form of DeepSeek's DualPipe.
"""

from __future__ import annotations

import copy

import torch

from dsv3.model.transformer import Transformer


def split_stages(num_layers: int, num_stages: int) -> list[list[int]]:
    """Consecutive layer indices per stage, sizes differing by at most one (earlier stages larger)."""
    base, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for s in range(num_stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return [list(range(bounds[s], bounds[s + 1])) for s in range(num_stages)]


def stage_ids_of_rank(rank: int, pp: int, schedule: str) -> list[int]:
    """The stages a pp rank holds: [rank] for 1F1B, [rank, 2P-1-rank] (V shape) for DualPipeV."""
    return [rank, 2 * pp - 1 - rank] if schedule == "dualpipev" else [rank]


class StageLoss:
    """The schedule's loss_fn: this microbatch's weighted share of the objective (parallel/objective.py).

    Set `split`, `mtp_lambda` and `scale` (1 / gradient-accumulation steps) before each schedule
    step; each microbatch's shares of the three losses are appended to `parts` for the metrics."""

    def __init__(self, last_stage: Transformer, mtp_depth: int):
        self.stage, self.mtp_depth = last_stage, mtp_depth
        self.split, self.mtp_lambda, self.scale, self.parts = None, 0.0, 1.0, []

    def __call__(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        from dsv3.parallel.objective import target_counts

        h, emb, balance = outputs
        ce, mtp, bal = self.stage.losses(h, emb, balance, labels)  # bal [1]
        terms = self.split.terms(target_counts(labels, self.mtp_depth), ce, mtp, bal.sum())
        self.parts.append([0.0 if t is None else t.item() for t in terms])
        return self.split.objective(terms, self.mtp_lambda) * self.scale


def build_pipeline(
    model: Transformer, pp_rank: int, pp: int, schedule: str
) -> tuple[list[int], list[Transformer]]:
    """The stages this pp rank holds: copies of `model` (meta, so copying is free) without the
    parts they do not hold."""
    num_stages = pp * (2 if schedule == "dualpipev" else 1)
    layers = split_stages(model.cfg.num_hidden_layers, num_stages)
    ids = stage_ids_of_rank(pp_rank, pp, schedule)
    return ids, [stage_of(model, layers[s], first=s == 0, last=s == num_stages - 1) for s in ids]


def stage_of(model: Transformer, layer_ids: list[int], first: bool, last: bool) -> Transformer:
    """A copy of `model` holding only `layer_ids`, the embedding if first, the head and MTP if last."""
    stage = copy.deepcopy(model)
    for i in list(stage.layers):
        if int(i) not in layer_ids:
            del stage.layers[i]
    if not first:
        stage.embed_tokens = None
    if not last:
        stage.norm, stage.lm_head, stage.mtp = None, None, None
    return stage


def build_schedule(stage_modules, stage_ids, dims, microbatch, dtype, pp_group, device, loss):
    """PipelineStage objects and the schedule running them (losses summed: scale_grads=False).

    Shapes are given statically (microbatch = (b, T) sequences per microbatch, activations in
    `dtype`): the runtime shape inference would run an extra forward whose routers count tokens."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

    b, T = microbatch
    H = stage_modules[0].cfg.hidden_size
    act = tuple(
        torch.empty(shape, dtype=dt, device="meta", requires_grad=True)  # grads flow back through all
        for shape, dt in (((b, T, H), dtype), ((b, T, H), dtype), ((1,), torch.float32))
    )
    ids = torch.empty(b, T, dtype=torch.long, device="meta")
    stages = [
        PipelineStage(
            m,
            s,
            dims.num_stages,
            device,
            input_args=(ids,) if s == 0 else act,
            output_args=act,
            group=pp_group,
        )
        for m, s in zip(stage_modules, stage_ids)
    ]
    loss = loss or _no_loss  # every rank needs a loss_fn: it is what tells the schedule to run backward
    if dims.pp_schedule == "dualpipev":
        return ScheduleDualPipeV(stages, dims.microbatches, loss_fn=loss, scale_grads=False)
    return Schedule1F1B(stages[0], dims.microbatches, loss_fn=loss, scale_grads=False)


@torch.no_grad()
def forward_only(pm, x: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor | None:
    """Evaluation without a schedule (DualPipeV has no forward-only mode): the stages run one
    after another on the whole local batch, activations sent point to point. Returns the
    next-token loss on the rank holding the last stage, None elsewhere."""
    import torch.distributed as dist

    group = pm.mesh["pp"].get_group()
    me, pp, n = pm.mesh["pp"].get_local_rank(), pm.dims.pp, pm.dims.num_stages
    owner = [
        next(r for r in range(pp) if s in stage_ids_of_rank(r, pp, pm.dims.pp_schedule)) for s in range(n)
    ]
    by_id = dict(zip(pm.stage_ids, pm.modules))
    acts = None
    for s in range(n):
        if owner[s] != me:
            continue
        if s > 0 and owner[s - 1] != me:  # receive (h, emb, balance) from the previous stage
            module = by_id[s]
            b, T = labels.shape if labels is not None else x.shape
            H = module.cfg.hidden_size
            dtype = next(module.parameters()).dtype
            acts = (torch.empty(b, T, H, dtype=dtype), torch.empty(b, T, H, dtype=dtype), torch.empty(1))
            for t in acts:
                dist.recv(t, group_src=owner[s - 1], group=group)
        acts = by_id[s](x) if s == 0 else by_id[s](*acts)
        if s == n - 1:
            return by_id[s].losses(*acts, labels)[0]
        if owner[s + 1] != me:
            for t in acts:
                dist.send(t.contiguous(), group_dst=owner[s + 1], group=group)
    return None


def _no_loss(outputs, target):
    raise RuntimeError("the loss runs only on the rank holding the last stage")
