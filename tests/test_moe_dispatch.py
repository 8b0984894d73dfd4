"""Dispatch: the sorted plan, capacity, and the strategies against each other."""

import pytest
import torch

from moekit.moe.activations import ACTIVATIONS
from moekit.moe.dispatch import (
    STRATEGIES,
    DispatchPlan,
    Strategy,
    expert_mlp,
    grouped_linear,
    grouped_mm_supported,
)


def test_plan_sorts_pairs_by_expert_and_skips_empty_slots():
    index = torch.tensor([[2, 0], [1, -1], [2, -1], [0, 2]])
    weight = torch.tensor([[0.5, 0.3], [0.9, 0.0], [0.7, 0.0], [0.6, 0.2]])
    plan = DispatchPlan.from_routing(index, weight, num_experts=4)
    assert plan.sizes == [2, 1, 3, 0]
    assert plan.expert.tolist() == [0, 0, 1, 2, 2, 2]
    assert plan.token.tolist() == [0, 3, 1, 0, 2, 3]
    torch.testing.assert_close(plan.weight, torch.tensor([0.3, 0.6, 0.9, 0.5, 0.7, 0.2]))
    assert plan.slot.tolist() == [1, 6, 2, 0, 4, 7]
    assert list(plan.groups()) == [(0, slice(0, 2)), (1, slice(2, 3)), (2, slice(3, 6))]
    assert plan.offsets().tolist() == [2, 3, 6, 6]
    y = torch.arange(6.0).unsqueeze(1)
    combined = plan.combine(y)
    torch.testing.assert_close(
        combined[:, 0], torch.tensor([0.3 * 0 + 0.5 * 3, 0.9 * 2, 0.7 * 4, 0.6 * 1 + 0.2 * 5])
    )


def test_capacity_keeps_the_first_pairs_of_each_expert_in_token_order():
    index = torch.tensor([[0], [0], [0], [1], [0]])
    plan = DispatchPlan.from_routing(index, torch.ones(5, 1), 2, capacity_factor=1.0)
    assert plan.sizes == [3, 1]  # capacity ceil(1.0 * 5 / 2) = 3
    assert plan.token.tolist() == [0, 1, 2, 3]


def test_grouped_mm_needs_aligned_rows():
    plan_x = torch.randn(3, 8)
    assert grouped_mm_supported(plan_x, torch.randn(2, 8, 12)) == hasattr(
        torch.nn.functional, "grouped_mm"
    )
    assert not grouped_mm_supported(plan_x[:, :6], torch.randn(2, 6, 12))
    assert not grouped_mm_supported(plan_x, torch.randn(2, 8, 7))


@pytest.mark.parametrize(("d_in", "d_out"), [(8, 12), (6, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_strategies_agree_on_grouped_linear(d_in, d_out, bias):
    torch.manual_seed(0)
    index = torch.randint(-1, 5, (30, 3))
    plan = DispatchPlan.from_routing(index, torch.rand(30, 3), 5)
    x = torch.randn(plan.num_pairs, d_in, requires_grad=True)
    weight = torch.randn(5, d_in, d_out, requires_grad=True)
    b = torch.randn(5, d_out, requires_grad=True) if bias else None
    params = [x, weight] + ([b] if bias else [])
    grad = torch.randn(plan.num_pairs, d_out)
    results = {}
    for name in STRATEGIES:
        y = grouped_linear(x, weight, b, plan, name)
        results[name] = (y, torch.autograd.grad(y, params, grad, retain_graph=True))
    expected = torch.stack(
        [x[p] @ weight[e] + (b[e] if bias else 0) for p, e in enumerate(plan.expert.tolist())]
    )
    for y, grads in results.values():
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        for g, g_ref in zip(grads, results["loop"][1], strict=True):
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_loop_expert_mlp_matches_composed_autograd(activation):
    torch.manual_seed(1)
    act = ACTIVATIONS[activation]
    index = torch.randint(-1, 4, (20, 2))
    weight = torch.rand(20, 2, requires_grad=True)
    plan = DispatchPlan.from_routing(index, weight, 4)
    x = torch.randn(20, 8, requires_grad=True)
    w1, b1 = torch.randn(4, 8, 12, requires_grad=True), torch.randn(4, 12, requires_grad=True)
    w2, b2 = torch.randn(4, 12, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    params = [x, w1, b1, w2, b2, weight]
    grad = torch.randn(20, 8)
    fused = expert_mlp(x, w1, b1, w2, b2, act, plan, "loop")
    composed = Strategy.mlp(STRATEGIES["loop"], x, w1, b1, w2, b2, act, plan, x.dtype)
    torch.testing.assert_close(fused, composed, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(fused, params, grad, retain_graph=True)
    want = torch.autograd.grad(composed, params, grad)
    for g, g_ref in zip(got, want, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_frozen_experts_get_no_gradient_but_the_router_does():
    torch.manual_seed(2)
    index = torch.randint(0, 3, (10, 2))
    weight = torch.rand(10, 2, requires_grad=True)
    plan = DispatchPlan.from_routing(index, weight, 3)
    w1, w2 = torch.randn(3, 4, 4), torch.randn(3, 4, 4)
    x = torch.randn(10, 4)
    y = expert_mlp(x, w1, None, w2, None, ACTIVATIONS["relu"], plan, "loop")
    (grad,) = torch.autograd.grad(y.sum(), [weight])
    assert grad.abs().sum() > 0


def test_balance_splits_blocks_evenly_and_keeps_their_order():
    from moekit.moe.expert_threads import balance

    bins = balance([5, 1, 4, 2, 3, 3], 2)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(b == sorted(b) for b in bins)
    assert sorted(sum([5, 1, 4, 2, 3, 3][i] for i in b) for b in bins) == [9, 9]


def test_workers_run_single_threaded_and_leave_the_callers_threads_alone():
    from torch.utils.flop_counter import FlopCounterMode

    from moekit.moe import expert_threads

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert expert_threads.num_workers(torch.device("cpu"), 4) == 2
        assert expert_threads.num_workers(torch.device("cpu"), 3) == 1, "too few blocks"
        assert expert_threads.num_workers(torch.device("meta"), 8) == 1
        with expert_threads.in_turn():
            assert expert_threads.num_workers(torch.device("cpu"), 8) == 1
        assert expert_threads.num_workers(torch.device("cpu"), 8) == 2
        with FlopCounterMode(display=False):
            assert expert_threads.num_workers(torch.device("cpu"), 8) == 1, "modes are per thread"
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MOEKIT_EXPERT_WORKERS", "off")
            assert expert_threads.num_workers(torch.device("cpu"), 8) == 1
            patch.setenv("MOEKIT_EXPERT_WORKERS", "sometimes")
            with pytest.raises(ValueError, match="MOEKIT_EXPERT_WORKERS='sometimes'"):
                expert_threads.num_workers(torch.device("cpu"), 8)
        parts = expert_threads.run_blocks(
            lambda blocks: (blocks, torch.get_num_threads(), torch.is_grad_enabled()),
            list("abcd"),
            [4, 3, 2, 1],
            2,
        )
        assert torch.get_num_threads() == 2
        assert sorted(b for blocks, _, _ in parts for b in blocks) == list("abcd")
        assert all(n == 1 and not grad for _, n, grad in parts)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loop_blocks_side_by_side_match_blocks_in_turn(dtype):
    torch.manual_seed(3)
    index = torch.randint(-1, 8, (60, 3))
    weight = torch.rand(60, 3, requires_grad=True)
    x = torch.randn(60, 16, requires_grad=True)
    w1, b1 = torch.randn(8, 16, 24, requires_grad=True), torch.randn(8, 24, requires_grad=True)
    w2, b2 = torch.randn(8, 24, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    params = [x, w1, b1, w2, b2, weight]
    grad = torch.randn(60, 16)
    results = {}
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            plan = DispatchPlan.from_routing(index, weight, 8)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                y = expert_mlp(x, w1, b1, w2, b2, ACTIVATIONS["gelu"], plan, "loop")
                h = grouped_linear(plan.gather(x), w1, b1, plan, "loop")
            results[n] = (y, h, torch.autograd.grad((y, h), params, (grad, h.detach())))
    finally:
        torch.set_num_threads(threads)
    (y1, h1, g1), (y2, h2, g2) = results[1], results[2]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y2, y1, **tol)
    torch.testing.assert_close(h2, h1, rtol=0, atol=0)
    for a, b in zip(g2, g1, strict=True):
        torch.testing.assert_close(a, b, **tol)
