"""DeepSeekMoE routing, grouped experts against the plain loop, balancing."""

import gc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3 import ModelConfig
from dsv3.model import packed_experts, panel_gemm
from dsv3.model.linear import pack_linears
from dsv3.model.moe import (
    Dispatcher,
    GroupedExperts,
    LocalDispatcher,
    MoE,
    Router,
    max_fused_tokens,
    sequence_balance_loss,
    update_router_bias,
)
from dsv3.model.packed_experts import can_pack, is_current
from dsv3.model.routing import ROUTING_METHODS, RoutingMethod


def _cfg(**kw):
    base = dict(
        hidden_size=32,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        first_k_dense_replace=1,
    )
    return ModelConfig.from_preset("tiny", **{**base, **kw})


def _router(cfg, seed=0):
    r = Router(cfg)
    torch.nn.init.normal_(r.weight, std=0.5, generator=torch.Generator().manual_seed(seed))
    return r


def test_grouped_experts_equal_loop_forward_and_backward():
    torch.manual_seed(0)
    experts = GroupedExperts(8, 32, 16)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    counts = torch.tensor([3, 0, 5, 1, 0, 7, 2, 4])  # empty experts included
    offs = counts.cumsum(0).to(torch.int32)
    x = torch.randn(int(counts.sum()), 32, requires_grad=True)
    grad = torch.randn(int(counts.sum()), 32)
    fast = experts(x, offs)
    (fast * grad).sum().backward()
    g_fast = [t.grad.clone() for t in (x, experts.gate_up_proj, experts.down_proj)]
    for t in (x, experts.gate_up_proj, experts.down_proj):
        t.grad = None
    ref = experts.forward_reference(x, offs)
    (ref * grad).sum().backward()
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    for a, t in zip(g_fast, (x, experts.gate_up_proj, experts.down_proj)):
        torch.testing.assert_close(a, t.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("counts", [[3, 0, 5, 1, 0, 7, 2, 4], [0, 1, 0, 0, 2, 0, 1, 0]])
def test_inference_experts_equal_the_loop(counts):
    """Under no_grad the experts are one torch.library op: grouped GEMMs for many rows, and for
    fewer rows than experts (decoding) only the chosen experts' GEMMs; both equal the loop."""
    torch.manual_seed(0)
    experts = GroupedExperts(8, 32, 16)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), 32)
    with torch.no_grad():
        torch.testing.assert_close(experts(x, offs), experts.forward_reference(x, offs), rtol=1e-5, atol=1e-6)
        compiled = torch.compile(experts, fullgraph=True, backend="aot_eager")  # one node, no graph break
        torch.testing.assert_close(
            compiled(x, offs), experts.forward_reference(x, offs), rtol=1e-5, atol=1e-6
        )


needs_packing = pytest.mark.skipif(
    not can_pack(torch.empty(0)), reason="this torch build has no oneDNN to pack the experts for"
)


def _experts(dtype=torch.float32) -> GroupedExperts:
    torch.manual_seed(0)
    experts = GroupedExperts(8, 32, 16)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    return experts.to(dtype)


@needs_packing
@pytest.mark.parametrize("kernel", ["panel", "onednn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1, 0, 7, 2, 4], [0, 1, 0, 0, 2, 0, 1, 0], [0] * 8])
def test_packed_experts_equal_the_loop(counts, dtype, kernel, monkeypatch):
    """GroupedExperts.pack: the inference op runs on packed copies of the weights, for many rows
    and for few, eagerly and compiled (the handle is an int the graph carries): all the experts in
    one call of the panel kernel, or one oneDNN call per expert with rows and weight where the
    panel kernel cannot be built."""
    if kernel == "panel" and not panel_gemm.can_pack(torch.empty(0, 2, dtype=dtype)):
        pytest.skip("the panel kernel cannot be built here")
    if kernel == "onednn":
        monkeypatch.setattr(panel_gemm, "can_pack", lambda weight: False)
        if dtype == torch.bfloat16 and not can_pack(torch.empty(0, dtype=dtype)):
            pytest.skip("oneDNN has no BF16 kernels on this CPU")
    torch.compiler.reset()  # each case compiles the same forward: stay under the recompile limit
    experts = _experts(dtype)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), 32).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        ref = experts.float().forward_reference(x.float(), offs)
        experts.to(dtype)
        assert experts.pack()
        with torch.profiler.profile() as prof:
            packed = experts(x, offs)
        calls = [e.name for e in prof.events()]
        if kernel == "panel":
            assert calls.count("dsv3_panel::expert_mlp") == 1
        else:
            assert calls.count(torch.ops.mkldnn._linear_pointwise.default.name()) == 2 * sum(
                c > 0 for c in counts
            )
        torch.testing.assert_close(packed.float(), ref, **tol)
        compiled = torch.compile(experts, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x, offs).float(), ref, **tol)


@needs_packing
def test_packed_experts_follow_weight_changes_and_free_with_their_module():
    """Packed copies are a snapshot: once the weights change in place (an optimizer step) the
    experts compute with the new weights (unpacked) until packed again (which drops the stale copies); pack(False) drops them,
    and they go with their module."""
    experts, counts = _experts(), [0, 2, 0, 1, 0, 0, 3, 0]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), 32)
    with torch.no_grad():
        assert experts.pack()
        handle = experts.packed
        before = experts(x, offs)
        experts.down_proj.mul_(2.0)  # in place, as an optimizer step
        torch.testing.assert_close(experts(x, offs), 2 * before, rtol=1e-5, atol=1e-5)
        assert not is_current(handle, experts.gate_up_proj, experts.down_proj)
        assert experts.pack() and is_current(experts.packed, experts.gate_up_proj, experts.down_proj)
        assert handle not in packed_experts._packs  # packing again drops the stale copies
        torch.testing.assert_close(experts(x, offs), 2 * before, rtol=1e-5, atol=1e-5)
        assert not experts.pack(False) and experts.packed == -1
        assert experts.pack()
    handle = experts.packed
    del experts
    gc.collect()
    assert handle not in packed_experts._packs


@needs_packing
def test_packed_experts_are_not_fooled_by_new_weights_where_the_packed_ones_were():
    """New weight tensors swapped in (as EPLB's re-placement does) may sit at the packed ones' address
    with the same version (0, fresh tensors): the stamp names the storage object, so the experts run
    the new weights unpacked. Two numpy-backed tensors over one buffer stand for the allocator
    handing the freed block back."""
    experts, counts = _experts(), [0, 2, 0, 1, 0, 0, 3, 0]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), 32)
    buffer = experts.down_proj.detach().numpy().copy()
    with torch.no_grad():
        experts.down_proj = torch.nn.Parameter(torch.from_numpy(buffer), requires_grad=False)
        assert experts.pack()
        buffer *= 2.0  # behind torch's back: no version bump
        experts.down_proj = torch.nn.Parameter(torch.from_numpy(buffer), requires_grad=False)
        assert experts.down_proj._version == 0
        torch.testing.assert_close(experts(x, offs), experts.forward_reference(x, offs), rtol=1e-5, atol=1e-5)
        assert not is_current(experts.packed, experts.gate_up_proj, experts.down_proj)


def test_moe_equals_dense_per_token_reference():
    """Dispatch -> grouped experts -> combine equals computing every token's experts directly."""
    cfg = _cfg()
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 5, 32)
    y, _ = moe(x)
    route = moe.gate(x.view(10, 32))
    ref = _dense_reference(moe, x.view(10, 32), route.indices.tolist(), route.weights)
    torch.testing.assert_close(y.view(10, 32), ref, rtol=1e-5, atol=1e-5)


def _dense_reference(moe, x, chosen, weights):
    """x [N, H], chosen[n] the experts of token n, weights [N, K] -> MoE output [N, H], token by token."""
    ref = moe.shared_experts(x)
    for n, experts in enumerate(chosen):
        for w, e in zip(weights[n], experts):
            gate, up = torch.nn.functional.linear(x[n], moe.experts.gate_up_proj[e]).chunk(2)
            ref[n] += w * torch.nn.functional.linear(
                torch.nn.functional.silu(gate) * up, moe.experts.down_proj[e]
            )
    return ref


def test_gathered_experts_equal_the_per_token_reference():
    """GroupedExperts.forward_gathered (each token's experts read by index, the combine folded
    in) computes the same sum as token-by-token F.linear, exactly in float64, to FP32 rounding in
    FP32; one token and several, an expert chosen twice."""
    cfg = _cfg()
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        moe.to(dtype)
        x = torch.randn(5, 32, dtype=dtype)
        indices = torch.tensor([[3, 0, 7, 12], [3, 1, 2, 15], [0, 1, 2, 3], [9, 8, 7, 6], [15, 14, 13, 12]])
        weights = torch.rand(5, 4, dtype=torch.float32)
        ref = _dense_reference(moe, x, indices.tolist(), weights) - moe.shared_experts(x)
        with torch.no_grad():
            got = moe.experts.forward_gathered(x, indices, weights)
            one = moe.experts.forward_gathered(x[:1], indices[:1], weights[:1])
        assert got.dtype == torch.promote_types(dtype, torch.float32)
        torch.testing.assert_close(got, ref.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(one, ref[:1].detach(), rtol=tol, atol=tol)


def _random_moe(cfg, dtype) -> MoE:
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return moe.to(dtype)


def _compiled_inference(moe: MoE, tokens: int, dtype) -> tuple[torch.Tensor, torch.Tensor, set[str]]:
    """One compiled inference forward of `tokens` random tokens: (its output, the eager output,
    the targets of the traced graphs' nodes: what ran)."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes})
        return gm.forward

    x = torch.randn(1, tokens, 32).to(dtype)
    torch._dynamo.reset()
    with torch.no_grad():
        eager, _ = moe(x)
        got, _ = torch.compile(moe, dynamic=True, backend=recording_backend)(x)
    return got, eager, set().union(*graphs)


def _tolerance(dtype) -> dict:
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_compiled_inference_step_gathers_the_experts_of_few_tokens(dtype):
    """Compiled without autograd, MoE runs the routed experts gathered while the tokens are at
    most max_fused_tokens (unpacked experts), and through dispatch + expert_mlp + combine above;
    both give the eager MoE's output. What ran is read from the traced graphs."""
    cfg = _cfg()
    moe = _random_moe(cfg, dtype)
    limit = max_fused_tokens(cfg.n_routed_experts, cfg.num_experts_per_tok, panels=False)
    assert limit == 8  # 2 x 16 experts / 4 per token
    for tokens, gathered in ((1, True), (3, True), (limit, True), (limit + 1, False), (20, False)):
        got, eager, ran = _compiled_inference(moe, tokens, dtype)
        assert any("dsv3.expert_mlp" in t for t in ran) != gathered, (tokens, ran)
        torch.testing.assert_close(got.float(), eager.float(), **_tolerance(dtype))


@pytest.mark.skipif(
    not panel_gemm.can_pack(torch.empty(0, 2)), reason="the panel kernel cannot be built here"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_compiled_inference_step_runs_packed_experts_in_one_panel_call(dtype):
    """With its experts and the shared experts' Linears packed, a compiled inference step runs
    them as one routed_experts call (no dispatch, no shared MLP of its own) up to max_fused_tokens,
    and dispatches above; both give the eager MoE's output."""
    cfg = _cfg()
    moe = _random_moe(cfg, dtype)
    assert moe.experts.pack() and pack_linears(moe) == 3
    limit = max_fused_tokens(cfg.n_routed_experts, cfg.num_experts_per_tok, panels=True)
    assert limit == 64  # 16 rows x 16 experts / 4 per token
    for tokens, fused in ((1, True), (5, True), (limit, True), (limit + 1, False)):
        got, eager, ran = _compiled_inference(moe, tokens, dtype)
        assert any("routed_experts" in t for t in ran) == fused, (tokens, ran)
        if fused:  # the shared experts' Linears did not run on their own
            assert not any("dsv3_panel.linear" in t for t in ran), (tokens, ran)
        torch.testing.assert_close(got.float(), eager.float(), **_tolerance(dtype))


class GroupMean(RoutingMethod):
    """A toy routing method: biased selection within the groups of the highest mean choice."""

    name = "group_mean"
    selection_bias = True
    group_score_experts = 1

    def group_scores(self, grouped):
        return grouped.mean(dim=-1)


def test_a_new_routing_method_is_one_class_and_one_registry_entry(monkeypatch):
    """Registered under its name, the toy method is accepted by the config, gets its bias buffer
    and balancing, and routes a MoE forward as a plain per-token reference says it should."""
    monkeypatch.setitem(ROUTING_METHODS, GroupMean.name, GroupMean)
    cfg = _cfg(topk_method="group_mean")  # 16 experts in 4 groups, 2 groups kept, top 4
    assert cfg.routing_method.group_limited
    moe = MoE(cfg).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    bias = torch.randn(16, dtype=torch.float64) * 0.3
    moe.gate.e_score_correction_bias.copy_(bias)
    x = torch.randn(10, 32, dtype=torch.float64)
    y, _ = moe(x.view(2, 5, 32))

    scores = torch.sigmoid(x @ moe.gate.weight.T)  # [N, E]
    chosen = []
    for choice in (scores + bias).tolist():
        groups = torch.tensor(choice).view(4, 4).mean(1).topk(2).indices.tolist()
        allowed = [e for e in range(16) if e // 4 in groups]
        chosen.append(sorted(allowed, key=lambda e: -choice[e])[:4])
    weights = torch.stack([scores[n, c] / scores[n, c].sum() for n, c in enumerate(chosen)])
    ref = _dense_reference(moe, x, chosen, weights * cfg.routed_scaling_factor)
    torch.testing.assert_close(y.view(10, 32), ref)

    moe.train()(x.view(2, 5, 32))
    update_router_bias(moe, 0.01)
    assert not torch.equal(moe.gate.e_score_correction_bias, bias)


def test_bias_changes_selection_but_not_gate_weights():
    cfg = _cfg()
    router = _router(cfg)
    x = torch.randn(64, 32)
    before = router(x)
    router.e_score_correction_bias.copy_(torch.randn(16) * 0.5)
    after = router(x)
    assert not torch.equal(before.indices.sort(1).values, after.indices.sort(1).values)
    # weights are the unbiased scores of the chosen experts, normalized, times the scaling factor
    s = after.scores.gather(1, after.indices)
    torch.testing.assert_close(after.weights, s / s.sum(1, keepdim=True) * cfg.routed_scaling_factor)


def test_negative_bias_never_picks_an_expert_of_a_masked_group():
    """With a 0 mask (the old bug) a masked expert beats kept experts whose biased score is
    negative; with -inf it never can."""
    cfg = _cfg()
    router = _router(cfg)
    router.e_score_correction_bias.fill_(-5.0)  # every biased score < 0
    x = torch.randn(256, 32)
    out = router(x)
    choice = (out.scores + router.e_score_correction_bias).view(256, 4, 4)
    kept = choice.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices  # [N, topk_group]
    groups = out.indices // 4
    assert all(set(g.tolist()) <= set(k.tolist()) for g, k in zip(groups, kept))


def test_weights_sum_to_routed_scaling_factor():
    cfg = _cfg(routed_scaling_factor=2.5)
    out = _router(cfg)(torch.randn(100, 32))
    torch.testing.assert_close(out.weights.sum(1), torch.full((100,), 2.5))


@settings(max_examples=40, deadline=None)
@given(
    n_group=st.sampled_from([1, 2, 4, 8]),
    topk_group_frac=st.floats(0.1, 1.0),
    k=st.integers(1, 6),
    method=st.sampled_from(["noaux_tc", "group_limited_greedy", "greedy"]),
    scoring=st.sampled_from(["sigmoid", "softmax"]),
    seed=st.integers(0, 2**16),
)
def test_router_invariants(n_group, topk_group_frac, k, method, scoring, seed):
    topk_group = max(1, round(topk_group_frac * n_group))
    per_group = 16 // n_group
    if method != "greedy" and k > topk_group * per_group:
        return
    cfg = _cfg(
        n_group=n_group,
        topk_group=topk_group,
        num_experts_per_tok=k,
        topk_method=method,
        scoring_func=scoring,
    )
    router = _router(cfg, seed)
    if method == "noaux_tc":
        router.e_score_correction_bias.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
    out = router(torch.randn(32, 32, generator=torch.Generator().manual_seed(seed)))
    assert out.indices.shape == (32, k)
    assert all(len(set(row.tolist())) == k for row in out.indices)  # k distinct experts
    if method != "greedy":
        assert (out.indices // per_group).unique(dim=None).numel() <= 32 * topk_group
        assert all(len(set((row // per_group).tolist())) <= topk_group for row in out.indices)
    assert (out.weights >= 0).all()


@pytest.mark.parametrize("method", ["noaux_tc", "group_limited_greedy", "greedy"])
def test_a_compiled_inference_step_routes_as_eager_without_topk_calls(method):
    """Inside a compiled inference step the Router's top-k's are rounds of argmax that Inductor
    fuses (routing.k_largest): the same experts in the same order and the same weights as eager,
    for 1 to 16 rows; of equal values the lower index first (torch.topk leaves their order open)."""
    import torch._dynamo

    from dsv3.model.routing import k_largest

    cfg = _cfg(topk_method=method)
    router = _router(cfg).eval()
    if method == "noaux_tc":
        router.e_score_correction_bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    ops = []

    def recording_backend(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward

    compiled = torch.compile(router, backend=recording_backend, dynamic=True)
    with torch.no_grad():
        for rows in (1, 3, 16):
            x = torch.randn(rows, 32, generator=torch.Generator().manual_seed(rows))
            got, want = compiled(x), router(x)
            assert torch.equal(got.indices, want.indices), (rows, got.indices, want.indices)
            assert torch.equal(got.weights, want.weights)
    assert not any("topk" in op for op in ops), ops
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, float("-inf")]])
    with torch.no_grad():
        values, indices = torch.compile(lambda t: k_largest(t, 4), backend="eager")(ties)
    assert indices.tolist() == [[1, 2, 4, 0]] and values.tolist() == [[3.0, 3.0, 3.0, 1.0]]


def test_a_compiled_router_weighs_a_token_alike_beside_other_tokens():
    """MTP's verify routes a token with another beside it where plain decoding routes it alone;
    greedy MTP equals greedy decoding only if the token gets the very same gate weights in both
    compiled graphs. Inductor orders a reduction per graph, so the weights' normalizing sum is a
    chain of adds (summed by a reduction, 12 of these 50 tokens came out an ulp apart here)."""
    import torch._dynamo

    torch._dynamo.reset()
    cfg = ModelConfig.from_preset("small")  # 6 of 32 experts: a sum whose order shows
    router = _router(cfg).eval()
    compiled = torch.compile(lambda x: router(x).weights, dynamic=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(50):
            x = torch.randn(2, cfg.hidden_size, generator=g)
            assert torch.equal(compiled(x[:1])[0], compiled(x)[0])


def test_sequence_balance_loss_matches_formula():
    torch.manual_seed(0)
    B, T, E, K = 2, 6, 8, 2
    scores = torch.rand(B, T, E)
    idx = scores.topk(K, dim=-1).indices
    expected = 0.0
    for b in range(B):
        f = [E / (K * T) * sum(int(i in idx[b, t].tolist()) for t in range(T)) for i in range(E)]
        p = [(scores[b, :, i] / scores[b].sum(-1)).mean().item() for i in range(E)]
        expected += sum(fi * pi for fi, pi in zip(f, p)) / B
    assert sequence_balance_loss(scores, idx).item() == pytest.approx(expected, rel=1e-6)
    # perfectly balanced uniform routing gives exactly 1
    uniform = torch.full((1, 4, 4), 0.25)
    assert sequence_balance_loss(uniform, torch.tensor([[[0], [1], [2], [3]]])).item() == pytest.approx(1.0)


def test_update_router_bias_moves_toward_balance():
    cfg = _cfg()
    moe = MoE(cfg).train()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe(torch.randn(1, 64, 32))
    load = moe.gate.tokens_per_expert.clone()
    assert load.sum() == 64 * 4
    loads = update_router_bias(moe, gamma=0.001)
    torch.testing.assert_close(loads["gate"], load)
    bias = moe.gate.e_score_correction_bias
    assert (bias[load > load.mean()] == -0.001).all() and (bias[load < load.mean()] == 0.001).all()
    assert moe.gate.tokens_per_expert.sum() == 0


def test_balancing_evens_out_a_skewed_router():
    """Repeated bias updates on fixed inputs reduce MaxVio = max load / mean load - 1 (V3R eq. 16)."""
    cfg = _cfg()
    moe = MoE(cfg).train()
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    moe.gate.weight.data[0] += 1.0  # expert 0 attracts everyone
    x = torch.randn(1, 512, 32)

    def violation():
        moe(x)
        load = update_router_bias(moe, 0.0)["gate"]
        return (load.max() / load.mean() - 1).item()

    start = violation()
    for _ in range(200):
        moe(x)
        update_router_bias(moe, 0.01)
    assert start > 0.2 and violation() < 0.5 * start


def test_a_dispatcher_must_implement_the_whole_protocol():
    class DispatchOnly(Dispatcher):
        def dispatch(self, x, indices, n_experts):
            return LocalDispatcher().dispatch(x, indices, n_experts)

    with pytest.raises(TypeError, match="combine"):
        DispatchOnly()


def test_dispatcher_is_a_permutation():
    d = LocalDispatcher()
    x = torch.randn(5, 3)
    idx = torch.tensor([[2, 0], [1, 2], [0, 1], [2, 1], [0, 2]])
    x_sorted, offs, order = d.dispatch(x, idx, 3)
    assert offs.tolist() == [3, 6, 10]
    y = d.combine(x_sorted, torch.ones(5, 2), order)
    torch.testing.assert_close(y, 2 * x)


def test_a_moe_layer_takes_zero_tokens():
    """An idle expert-parallel rank enters every MoE layer with no tokens (it still serves others)."""
    moe = MoE(_cfg()).eval()
    with torch.no_grad():
        y, _ = moe(torch.zeros(0, 1, 32))
    assert y.shape == (0, 1, 32)


def test_local_dispatch_and_combine_equal_plain_indexing_in_values_and_gradients():
    """LocalDispatcher's row gathers (PermuteRows, whose backward is a gather) give what plain
    indexing gives, forward and backward, in FP64; gradcheck on PermuteRows itself."""
    from dsv3.model.moe import LocalDispatcher, PermuteRows

    torch.manual_seed(0)
    N, K, H, E = 7, 3, 5, 4
    indices = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    w = torch.randn(H, H, dtype=torch.float64)
    x = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(N, K, dtype=torch.float64, requires_grad=True)
    dispatcher = LocalDispatcher()
    x_sorted, offs, state = dispatcher.dispatch(x, indices, E)
    y = dispatcher.combine(torch.tanh(x_sorted @ w), weights, state)
    gx, gw = torch.autograd.grad(y.square().sum(), (x, weights))

    order = indices.flatten().argsort(stable=True)  # the reference: plain indexing
    ref_sorted = x[order // K]
    ref = torch.empty_like(ref_sorted)
    ref[order] = torch.tanh(ref_sorted @ w)
    ref_y = (ref.view(N, K, H) * weights.unsqueeze(-1)).sum(1)
    rgx, rgw = torch.autograd.grad(ref_y.square().sum(), (x, weights))
    assert (
        torch.equal(x_sorted, ref_sorted)
        and offs.tolist() == indices.flatten().bincount(minlength=E).cumsum(0).tolist()
    )
    torch.testing.assert_close(y, ref_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, rgx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, rgw, rtol=1e-12, atol=1e-12)
    inverse = state[1]
    assert torch.autograd.gradcheck(lambda t: PermuteRows.apply(t, order, inverse, K), (x,))


def test_training_pads_each_experts_rows_to_the_bucket(monkeypatch):
    """On a CPU the training path's grouped GEMMs see each expert's rows padded with zero rows to
    a multiple of ROW_BUCKET (few shapes: oneDNN's kernels stay cached), and the padding is
    invisible: pad_groups places every row once and only zeros elsewhere, TakeRows takes them
    back (gradcheck), and the experts still equal the loop (test above)."""
    from dsv3.model import moe
    from dsv3.model.moe import ROW_BUCKET, TakeRows, pad_groups

    counts = torch.tensor([3, 0, 5, 1, 0, 7, 2, 4])
    offs = counts.cumsum(0).to(torch.int32)
    x = torch.randn(int(counts.sum()), 6, dtype=torch.float64, requires_grad=True)
    padded, padded_offs, slots = pad_groups(x, offs, 4)
    assert padded_offs.tolist() == [4, 4, 12, 16, 16, 24, 28, 32] and padded_offs.dtype == offs.dtype
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), padded_offs[:-1].long()])
    for e, (lo, hi) in enumerate(zip(starts.tolist(), padded_offs.tolist())):  # group e, rows in order
        rows = x[offs[e] - counts[e] : offs[e]]
        assert torch.equal(padded[lo : lo + len(rows)], rows) and not padded[lo + len(rows) : hi].any()
    assert torch.equal(TakeRows.apply(padded, slots), x)
    assert torch.autograd.gradcheck(lambda t: TakeRows.apply(t, slots), (padded.detach().requires_grad_(),))

    seen = []
    monkeypatch.setattr(
        moe, "_grouped_mm", lambda a, b, o: seen.append(o.tolist()) or torch.zeros(a.shape[0], b.shape[-1])
    )
    moe.GroupedExperts(8, 32, 16)(torch.randn(int(counts.sum()), 32), offs)
    assert seen and all(end % ROW_BUCKET == 0 for o in seen for end in o)
