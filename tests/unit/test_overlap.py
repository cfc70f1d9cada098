"""The overlap schedules in one process, with a dispatcher that records its split phases: the
shared expert runs while the routed tokens are "on the wire" (between dispatch_begin and
dispatch_end), the two decode micro-batches interleave as DeepSeek's decode overlap does, and
both give the plain forward's numbers (MicroBatchDecode against the engine's own decode)."""

import torch

from dsv3 import ModelConfig, Transformer
from dsv3.infer.engine import Engine, SamplingParams
from dsv3.model.moe import LocalDispatcher, MoE
from dsv3.parallel.expert_parallel import PendingCombine, PendingDispatch
from dsv3.parallel.overlap import MicroBatchDecode, OverlappedMoE
from fixtures import ENGINE

CFG = {**ENGINE, "num_nextn_predict_layers": 0}


class RecordingDispatcher(LocalDispatcher):
    """LocalDispatcher with the split phases of ExpertParallelDispatcher, logging each call
    with the number of tokens it carries (which micro-batch)."""

    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def dispatch_begin(self, x, indices, n_experts):
        self.log.append(("dispatch_begin", self.name, len(x)))
        return PendingDispatch(*super().dispatch(x, indices, n_experts))

    def dispatch_end(self, pending):
        self.log.append(("dispatch_end", self.name, len(pending.rows)))
        return pending.rows, pending.offs, pending.state

    def combine_begin(self, y_sorted, weights, state):
        self.log.append(("combine_begin", self.name, len(weights)))
        return PendingCombine(super().combine(y_sorted, weights, state), None, None)

    def combine_end(self, pending):
        self.log.append(("combine_end", self.name, len(pending.rows)))
        return pending.rows


def _model(log):
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_dict(CFG)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.15 if p.dim() > 1 else 1 + 0.2 * torch.randn_like(p))
    for i, block in m.layers.items():
        if isinstance(block.mlp, MoE):
            block.mlp.dispatcher = RecordingDispatcher(log, f"layer{i}")
    return m


def test_overlapped_moe_runs_the_shared_expert_while_tokens_travel_and_changes_nothing():
    log = []
    moe = _model(log).layers["1"].mlp
    moe.train()
    x = torch.randn(2, 5, CFG["hidden_size"], requires_grad=True)
    y_plain, _ = moe(x)
    y_plain.sum().backward()
    grads = [p.grad.clone() for p in moe.parameters()]
    moe.zero_grad()
    moe.__class__ = OverlappedMoE
    moe.shared_experts.register_forward_hook(lambda *_: log.append(("shared", "layer1", 10)))
    log.clear()
    y, aux = moe(x, with_aux=True)
    y.sum().backward()
    assert [e[0] for e in log] == ["dispatch_begin", "shared", "dispatch_end", "combine_begin", "combine_end"]
    assert torch.equal(y, y_plain) and aux is not None
    assert all(torch.equal(p.grad, g) for p, g in zip(moe.parameters(), grads))


def test_micro_batch_decode_interleaves_the_halves_and_equals_the_plain_decode():
    log = []
    model = _model(log)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [9] * 5]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
    want = Engine(model, max_batch_size=3, block_size=4).generate(prompts, params)
    overlapped = Engine(model, max_batch_size=3, block_size=4)
    overlapped._decode_forward = MicroBatchDecode(model)
    log.clear()
    got = overlapped.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    logprob = lambda outs: torch.tensor([lp.logprob for o in outs for lp in o.logprobs])  # noqa: E731
    torch.testing.assert_close(logprob(got), logprob(want), rtol=0, atol=1e-5)
    # a decode forward of 3 rows: halves A (2 rows) and B (1 row) take turns; each one's rows are in
    # flight while the other computes, and A starts the next MoE layer before B's outputs are back
    start = next(i for i, e in enumerate(log) if e[:2] == ("dispatch_begin", "layer1") and e[2] == 2)
    assert log[start : start + 10] == [
        ("dispatch_begin", "layer1", 2),
        ("dispatch_begin", "layer1", 1),
        ("dispatch_end", "layer1", 4),
        ("combine_begin", "layer1", 2),
        ("dispatch_end", "layer1", 2),
        ("combine_begin", "layer1", 1),
        ("combine_end", "layer1", 2),
        ("dispatch_begin", "layer2", 2),
        ("combine_end", "layer1", 1),
        ("dispatch_begin", "layer2", 1),
    ]
