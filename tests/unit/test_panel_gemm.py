"""The panel kernel (model/panel_gemm.py) against plain PyTorch: GEMMs of a few rows, the routed
experts of a layer, its packing, its errors, and what happens where it cannot be built."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3.model import cpu_kernels, panel_gemm
from dsv3.model.moe import GroupedExperts

pytestmark = pytest.mark.skipif(
    not panel_gemm.can_pack(torch.empty(0, 2)), reason="the panel kernel cannot be built here"
)

DTYPES = [torch.float32, torch.bfloat16]


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T in float64 from the same (rounded) inputs."""
    return x.double() @ w.double().T


def _bound(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What FP32 accumulation in another order, then rounding to dtype, may be off by."""
    magnitude = x.double().abs() @ w.double().abs().T
    ulp = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8}[dtype]
    return magnitude * (x.shape[1] * 2.0**-23 + ulp) + 1e-30


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 11),  # tiles of 4 rows and their remainders
    n=st.integers(1, 75),  # panels of 16 columns, groups of 4 panels, and their remainders
    half_k=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_linear_equals_the_product(rows, n, half_k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 2 * half_k, generator=g).to(dtype)
    w = torch.randn(n, 2 * half_k, generator=g).to(dtype)
    y = panel_gemm.linear(x, panel_gemm.pack(w), n)
    assert y.dtype == dtype and y.shape == (rows, n)
    assert ((y.double() - _reference(x, w)).abs() <= _bound(x, w, dtype)).all()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, heads, n, k", [(16, 8, 256, 64), (5, 3, 40, 18), (1, 1, 16, 2)])
def test_per_head_equals_each_heads_product(rows, heads, n, k, dtype, threads):
    """Head g's rows x[:, g] times its own W_g: the einsum of MLA's absorbed path, here on a strided
    x as attention hands it (a split of the query heads) and on a contiguous one."""
    g = torch.Generator().manual_seed(rows + heads)
    x = torch.randn(rows, heads, k + 6, generator=g).to(dtype)[..., 2 : k + 2]  # rows and heads strided
    w = torch.randn(heads, n, k, generator=g).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = panel_gemm.per_head(x, panel_gemm.pack(w), n)
        contiguous = panel_gemm.per_head(x.contiguous(), panel_gemm.pack(w), n)
    finally:
        torch.set_num_threads(before)
    assert got.dtype == dtype and got.shape == (rows, heads, n) and torch.equal(got, contiguous)
    for h in range(heads):
        assert ((got[:, h].double() - _reference(x[:, h], w[h])).abs() <= _bound(x[:, h], w[h], dtype)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_lays_out_panels_of_16_columns(dtype):
    """Panel p, step k, lane j holds W[16p + j, k] (FP32) or the pair W[16p + j, 2k:2k + 2] (BF16);
    columns past N are zero."""
    w = torch.arange(20 * 6, dtype=torch.float32).view(20, 6).to(dtype)
    packed = panel_gemm.pack(w)
    if dtype == torch.bfloat16:
        assert packed.shape == (2, 3, 16, 2)
        assert torch.equal(packed[1, 2, 3], w[19, 4:6]) and torch.equal(packed[0, 1, 5], w[5, 2:4])
    else:
        assert packed.shape == (2, 6, 16)
        assert packed[1, 4, 3] == w[19, 4] and packed[0, 1, 5] == w[5, 1]
    assert not packed[1, ..., 4:, :].any() if dtype == torch.bfloat16 else not packed[1, :, 4:].any()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "counts",
    [[3, 0, 5, 1, 0, 7, 2, 4], [0, 1, 0, 0, 2, 0, 1, 0], [0] * 8, [0, 0, 0, 0, 0, 0, 0, 13]],
)
def test_expert_mlp_equals_the_loop(counts, dtype, threads):
    """All experts in one call equal one F.linear pair per expert; in BF16, each op's result is
    rounded as the eager loop rounds it, so the outputs agree to the last bit but for the order
    of the FP32 sums."""
    torch.manual_seed(0)
    experts = GroupedExperts(8, 40, 24)  # H = 40 and 2I = 48: panels that do not fill a group
    torch.nn.init.normal_(experts.gate_up_proj, std=0.3)
    torch.nn.init.normal_(experts.down_proj, std=0.3)
    experts.to(dtype)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), 40).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            ref = experts.forward_reference(x, offs)
            got = panel_gemm.expert_mlp(
                x, offs, panel_gemm.pack(experts.gate_up_proj), panel_gemm.pack(experts.down_proj), 24
            )
    finally:
        torch.set_num_threads(before)
    assert got.dtype == dtype and got.shape == ref.shape
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1 / 128, atol=1e-3)
    torch.testing.assert_close(got, ref, **tol)
    if dtype == torch.bfloat16 and got.numel():  # most values equal exactly
        assert (got == ref).float().mean() > 0.9


def _routed_reference(x, indices, weights, experts, shared=None):
    """sum_k w_k FFN_k(x) (+ the shared MLP) in float64 from the same weights, each SwiGLU output
    rounded to x's dtype as the kernel rounds it (a GEMM's input)."""

    def ffn(row, gate_up, down):
        gate, up = (gate_up.double() @ row.double()).chunk(2)
        return down.double() @ (F.silu(gate) * up).to(x.dtype).double()

    out = torch.zeros(x.shape, dtype=torch.float64)
    for n in range(x.shape[0]):
        for k in range(indices.shape[1]):
            e = int(indices[n, k])
            out[n] += float(weights[n, k]) * ffn(x[n], experts.gate_up_proj[e], experts.down_proj[e])
        if shared is not None:
            out[n] += ffn(
                x[n], torch.cat([shared.gate_proj.weight, shared.up_proj.weight]), shared.down_proj.weight
            )
    return out


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, with_shared", [(1, True), (3, False), (7, True)])
def test_routed_experts_equal_the_weighted_sum_of_the_chosen_ffns(tokens, with_shared, dtype, threads):
    """One call from the router's choice (several tokens sharing experts, one token choosing
    the same expert twice) equals the weighted sum of each chosen expert's FFN, plus the shared
    MLP given as its three packed Linears; the shared inter size 40 leaves a panel part-filled."""
    from dsv3.model.moe import MLP

    torch.manual_seed(tokens)
    experts = GroupedExperts(8, 48, 24)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.3)
    torch.nn.init.normal_(experts.down_proj, std=0.3)
    experts.to(dtype)
    shared = MLP(48, 40).to(dtype) if with_shared else None
    x = torch.randn(tokens, 48).to(dtype)
    indices = torch.randint(0, 8, (tokens, 3))
    indices[0, 1] = indices[0, 0]
    weights = torch.rand(tokens, 3)
    packed_shared = (
        tuple(panel_gemm.pack(m.weight) for m in (shared.gate_proj, shared.up_proj, shared.down_proj))
        if with_shared
        else None
    )
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = panel_gemm.routed_experts(
            x,
            indices,
            weights,
            panel_gemm.pack(experts.gate_up_proj),
            panel_gemm.pack(experts.down_proj),
            24,
            packed_shared,
        )
    finally:
        torch.set_num_threads(before)
    with torch.no_grad():
        ref = _routed_reference(x, indices, weights, experts, shared)
    assert got.dtype == torch.float32 and got.shape == x.shape
    # FP32 accumulation in another order; a SwiGLU output on a BF16 rounding boundary may round the
    # other way (one BF16 ulp of one input of the down product)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(got.double(), ref, **tol)
    if dtype == torch.bfloat16:
        assert ((got.double() - ref).abs() < 1e-4).float().mean() > 0.9


def test_routed_experts_name_a_bad_choice():
    gate_up, down = panel_gemm.pack(torch.randn(2, 8, 4)), panel_gemm.pack(torch.randn(2, 4, 4))
    x, weights = torch.randn(1, 4), torch.ones(1, 2)
    with pytest.raises(RuntimeError, match=r"expert index 2 is not in \[0, 2\)"):
        panel_gemm.routed_experts(x, torch.tensor([[0, 2]]), weights, gate_up, down, 4)
    with pytest.raises(RuntimeError, match="int64 indices"):
        panel_gemm.routed_experts(x, torch.tensor([[0, 1]], dtype=torch.int32), weights, gate_up, down, 4)
    with pytest.raises(RuntimeError, match="down must be packed from 6 inputs"):
        panel_gemm.routed_experts(x, torch.tensor([[0, 1]]), weights, gate_up, down, 6)


def test_bad_operands_are_named():
    w = torch.randn(32, 8)
    with pytest.raises(RuntimeError, match="x has 6 columns, the packed weight 8 inputs"):
        panel_gemm.linear(torch.randn(2, 6), panel_gemm.pack(w), 32)
    with pytest.raises(RuntimeError, match="dtype"):
        panel_gemm.linear(torch.randn(2, 8).bfloat16(), panel_gemm.pack(w), 32)
    with pytest.raises(RuntimeError, match="not packed by panel_gemm.pack"):
        panel_gemm.linear(torch.randn(2, 8), w, 32)
    with pytest.raises(RuntimeError, match="n=40 does not fit 2 panels"):
        panel_gemm.linear(torch.randn(2, 8), panel_gemm.pack(w), 40)
    gate_up, down = panel_gemm.pack(torch.randn(2, 8, 4)), panel_gemm.pack(torch.randn(2, 4, 4))
    with pytest.raises(RuntimeError, match="offs ends at 3, x has 2 rows"):
        panel_gemm.expert_mlp(torch.randn(2, 4), torch.tensor([1, 3], dtype=torch.int32), gate_up, down, 4)
    with pytest.raises(RuntimeError, match="a weight packed per head"):
        panel_gemm.per_head(torch.randn(2, 3, 8), panel_gemm.pack(torch.randn(2, 16, 8)), 16)
    with pytest.raises(RuntimeError, match="offs must be int32"):
        panel_gemm.expert_mlp(torch.randn(2, 4), torch.tensor([1, 2]), gate_up, down, 4)
    with pytest.raises(RuntimeError, match="x has 6 columns, the packed weight 4 inputs"):
        panel_gemm.expert_mlp(torch.randn(2, 6), torch.tensor([1, 2], dtype=torch.int32), gate_up, down, 4)
    heads = panel_gemm.pack(torch.randn(2, 16, 8))
    with pytest.raises(RuntimeError, match="x has 6 columns, the packed weight 8 inputs"):
        panel_gemm.per_head(torch.randn(2, 2, 6), heads, 16)
    with pytest.raises(RuntimeError, match="not packed by panel_gemm.pack"):
        panel_gemm.per_head(torch.randn(2, 2, 8), torch.randn(2, 16, 8), 16)
    with pytest.raises(RuntimeError, match="dtype"):
        panel_gemm.per_head(torch.randn(2, 2, 8).bfloat16(), heads, 16)


def test_an_odd_bf16_input_dimension_is_not_packed():
    assert not panel_gemm.can_pack(torch.empty(4, 7, dtype=torch.bfloat16))
    assert panel_gemm.can_pack(torch.empty(4, 7))
    assert not panel_gemm.can_pack(torch.empty(4, 8, dtype=torch.float16))


def test_a_failed_build_warns_and_leaves_the_library_paths(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpu_kernels.available.__wrapped__() is False
    assert any("could not be built" in str(w.message) and "Ninja" in str(w.message) for w in caught)


def test_a_stale_build_lock_is_removed_before_building(monkeypatch, tmp_path):
    """A build killed midway leaves cpp_extension's lock file, which would make every later build
    wait forever: one older than STALE_LOCK_S goes; a fresh one (a build under way) stays."""
    import os
    import time

    from torch.utils import cpp_extension

    monkeypatch.setenv("DSV3_CACHE", str(tmp_path))
    lock = cpu_kernels.build_folder() / "lock"
    lock.parent.mkdir(parents=True)
    seen = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: seen.append(lock.exists()) or 1 / 0)
    for age, kept in ((cpu_kernels.STALE_LOCK_S + 60, False), (0, True)):
        lock.touch()
        os.utime(lock, (time.time() - age, time.time() - age))
        with pytest.raises(ZeroDivisionError):  # not a build error: raised, not warned
            cpu_kernels.available.__wrapped__()
        assert seen[-1] == kept


def test_expert_weights_read_once_for_their_rows_match_f_linear_on_a_decode_shape():
    """The small preset's expert shapes (H 512, I 256) in BF16, 3 rows: as F.linear computes it."""
    torch.manual_seed(1)
    w = (torch.randn(512, 512) * 0.05).bfloat16()
    x = torch.randn(3, 512).bfloat16()
    torch.testing.assert_close(
        panel_gemm.linear(x, panel_gemm.pack(w), 512).float(), F.linear(x, w).float(), rtol=1 / 128, atol=1e-3
    )


def test_products_large_enough_to_split_across_threads_equal_one_threads():
    """Products with more than MIN_THREAD_BYTES of work per thread run in pieces on torch's threads
    (smaller ones stay on the calling thread); each output is computed the same way either way."""
    torch.manual_seed(2)
    w = torch.randn(1024, 512).bfloat16()  # 16 groups of 4 panels, 64 KB each
    x = torch.randn(3, 512).bfloat16()
    heads = torch.randn(8, 256, 64).bfloat16()
    xh = torch.randn(16, 8, 64).bfloat16()
    experts = GroupedExperts(4, 512, 256).to(torch.bfloat16)  # the small preset's expert shapes
    torch.nn.init.normal_(experts.gate_up_proj, std=0.05)
    torch.nn.init.normal_(experts.down_proj, std=0.05)
    offs = torch.tensor([2, 3, 3, 6], dtype=torch.int32)
    xe = torch.randn(6, 512).bfloat16()
    gate_up, down = panel_gemm.pack(experts.gate_up_proj), panel_gemm.pack(experts.down_proj)

    def run():
        return (
            panel_gemm.linear(x, panel_gemm.pack(w), 1024),
            panel_gemm.per_head(xh, panel_gemm.pack(heads), 256),
            panel_gemm.expert_mlp(xe, offs, gate_up, down, 256),
        )

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    torch.testing.assert_close(one[0].float(), F.linear(x, w).float(), rtol=1 / 128, atol=1e-2)
    with torch.no_grad():
        torch.testing.assert_close(
            one[2].float(), experts.forward_reference(xe, offs).float(), rtol=1 / 128, atol=1e-3
        )
