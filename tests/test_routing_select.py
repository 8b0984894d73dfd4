"""Selection rules against per-token loop oracles, and hypothesis properties of top-p/top-k."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.routing import select_top_k, select_top_p
from moekit.routing.select import mass_tolerance, select_all


def random_probs(n: int, num_experts: int, seed: int = 0, temperature: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, num_experts, generator=g) * temperature).softmax(-1)


def oracle_top_p(row: list[float], p: float, min_k: int = 1, max_k: int | None = None):
    """The rule of REFERENCE.md, one token at a time in plain Python."""
    order = sorted(range(len(row)), key=lambda e: -row[e])
    chosen, mass = [], 0.0
    for e in order:
        if mass > p and len(chosen) >= min_k:
            break
        chosen.append(e)
        mass += row[e]
    if max_k is not None:
        chosen = chosen[:max_k]
    return chosen


def as_sets(index, weight):
    rows = []
    for idx, w in zip(index.tolist(), weight.tolist(), strict=True):
        rows.append({e: wi for e, wi in zip(idx, w, strict=True) if e >= 0})
    return rows


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("renormalize", [False, True])
def test_top_k_matches_loop_oracle(k, renormalize):
    probs = random_probs(40, 7, seed=k)
    index, weight = select_top_k(probs, k, renormalize)
    assert index.shape == weight.shape == (40, k)
    for row, got in zip(probs.tolist(), as_sets(index, weight), strict=True):
        chosen = sorted(range(7), key=lambda e: -row[e])[:k]
        total = sum(row[e] for e in chosen) if renormalize else 1.0
        assert set(got) == set(chosen)
        for e in chosen:
            assert got[e] == pytest.approx(row[e] / total, rel=1e-5)


@pytest.mark.parametrize(
    ("p", "min_k", "max_k"), [(0.4, 1, None), (0.75, 1, None), (0.3, 2, None), (0.9, 1, 3)]
)
@pytest.mark.parametrize("renormalize", [False, True])
def test_top_p_matches_loop_oracle(p, min_k, max_k, renormalize):
    probs = random_probs(64, 8, seed=3, temperature=2.0)
    index, weight = select_top_p(probs, p, min_k, max_k, renormalize)
    expected = [oracle_top_p(row, p, min_k, max_k) for row in probs.tolist()]
    assert index.shape[1] == (max_k or max(len(c) for c in expected))
    for row, chosen, got in zip(probs.tolist(), expected, as_sets(index, weight), strict=True):
        total = sum(row[e] for e in chosen) if renormalize else 1.0
        assert set(got) == set(chosen)
        for e in chosen:
            assert got[e] == pytest.approx(row[e] / total, rel=1e-5)
    assert (weight[index < 0] == 0).all()
    valid = index >= 0
    assert (valid[:, 1:] <= valid[:, :-1]).all(), "selected slots form a prefix"


def test_select_all_is_dense():
    probs = torch.rand(5, 4)
    index, weight = select_all(probs, renormalize=True)
    assert (index == torch.arange(4)).all()
    torch.testing.assert_close(weight.sum(-1), torch.ones(5))


probs_rows = st.integers(2, 12).flatmap(
    lambda e: st.lists(
        st.lists(st.floats(0.01, 10.0), min_size=e, max_size=e), min_size=1, max_size=6
    )
)


def to_probs(rows) -> torch.Tensor:
    t = torch.tensor(rows, dtype=torch.float64)
    return (t / t.sum(-1, keepdim=True)).float()


@settings(max_examples=50, deadline=None)
@given(rows=probs_rows, p=st.floats(0.05, 0.95))
def test_top_p_properties(rows, p):
    probs = to_probs(rows)
    index, _ = select_top_p(probs, p)
    k = (index >= 0).sum(-1)
    sorted_probs = probs.sort(-1, descending=True).values
    cumulative = sorted_probs.cumsum(-1)
    bound = p + mass_tolerance(probs)  # p, up to the rounding of a float32 cumulative sum
    for i in range(probs.shape[0]):
        ki = int(k[i])
        assert (ki == 1) == bool(sorted_probs[i, 0] > bound)
        if ki < probs.shape[1]:
            assert cumulative[i, ki - 1] > bound, "selected mass exceeds p"
        if ki > 1:
            assert cumulative[i, ki - 2] <= bound, "the mass without the last expert is <= p"
        kept = index[i, :ki]
        others = torch.ones(probs.shape[1], dtype=torch.bool).index_fill(0, kept, False)
        if others.any():
            assert probs[i, kept].min() >= probs[i, others].max(), "the most probable are kept"


@settings(max_examples=40, deadline=None)
@given(num_experts=st.integers(1, 32), p=st.floats(0.01, 1.0))
def test_top_p_uniform_gives_floor_pe_plus_one(num_experts, p):
    probs = torch.full((3, num_experts), 1.0 / num_experts)
    index, _ = select_top_p(probs, p)
    expected = min(math.floor(p * num_experts) + 1, num_experts)
    assert ((index >= 0).sum(-1) == expected).all()


@pytest.mark.parametrize(("num_experts", "p"), [(15, 0.4), (10, 0.9), (30, 0.1), (16, 0.25)])
def test_top_p_uniform_at_an_exact_boundary(num_experts, p):
    probs = torch.full((2, num_experts), 1.0 / num_experts).softmax(-1)
    index, _ = select_top_p(probs, p)
    assert ((index >= 0).sum(-1) == round(p * num_experts) + 1).all()


def test_top_p_of_no_tokens():
    index, weight = select_top_p(torch.empty(0, 6), 0.5, min_k=2)
    assert index.shape == weight.shape == (0, 2)


@settings(max_examples=40, deadline=None)
@given(rows=probs_rows, p=st.floats(0.05, 1.0), data=st.data())
def test_top_p_honours_min_k_and_max_k(rows, p, data):
    probs = to_probs(rows)
    num_experts = probs.shape[1]
    min_k = data.draw(st.integers(1, num_experts))
    max_k = data.draw(st.integers(min_k, num_experts))
    index, _ = select_top_p(probs, p, min_k=min_k, max_k=max_k)
    k = (index >= 0).sum(-1)
    assert index.shape[1] == max_k
    assert ((k >= min_k) & (k <= max_k)).all()
    unbounded = (select_top_p(probs, p)[0] >= 0).sum(-1)
    torch.testing.assert_close(k, unbounded.clamp(min_k, max_k))


@settings(max_examples=40, deadline=None)
@given(rows=probs_rows, data=st.data(), renormalize=st.booleans())
def test_top_k_properties(rows, data, renormalize):
    probs = to_probs(rows)
    k = data.draw(st.integers(1, probs.shape[1]))
    index, weight = select_top_k(probs, k, renormalize)
    assert index.shape == (probs.shape[0], k)
    assert (index >= 0).all()
    assert all(len(set(r)) == k for r in index.tolist())
    kept = probs.gather(1, index)
    rest = probs.masked_fill(torch.zeros_like(probs, dtype=torch.bool).scatter(1, index, True), -1)
    assert (kept.min(-1).values >= rest.max(-1).values).all()
    if renormalize:
        torch.testing.assert_close(weight.sum(-1), torch.ones(probs.shape[0]))
    else:
        torch.testing.assert_close(weight, kept)


def test_top_p_with_sigmoid_scores_keeps_all_when_mass_never_exceeds_p():
    scores = torch.tensor([[0.1, 0.2, 0.05], [0.9, 0.5, 0.4]])
    index, weight = select_top_p(scores, 0.8, renormalize=True)
    assert (index[0] >= 0).sum() == 3
    assert (index[1] >= 0).sum() == 1
    np.testing.assert_allclose(weight.sum(-1).numpy(), [1.0, 1.0], rtol=1e-6)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: select_top_k(p, 0), "k must be"),
        (lambda p: select_top_k(p, 5), r"k must be an int in \[1, 4\]"),
        (lambda p: select_top_p(p, 0.0), "p must be"),
        (lambda p: select_top_p(p, 1.5), "p must be"),
        (lambda p: select_top_p(p, 0.5, min_k=3, max_k=2), "max_k"),
        (lambda p: select_top_p(p, 0.5, max_k=9), "max_k must be"),
    ],
)
def test_selection_argument_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.rand(2, 4))
