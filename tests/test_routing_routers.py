"""Routers against a per-token loop oracle; noise, gradients, config errors, phase switches."""

import pytest
import torch
from test_routing_select import oracle_top_p

from moekit.errors import ConfigError, RegistryError
from moekit.registry import ROUTERS
from moekit.routing import Router, Routing

DIM, EXPERTS, TASKS = 6, 5, 3


def build(cfg, num_tasks=TASKS):
    router = ROUTERS.build({**cfg, "dim": DIM, "num_experts": EXPERTS, "num_tasks": num_tasks})
    torch.nn.init.normal_(router.gate.weight, std=0.8)
    return router


def oracle(router, x, task_ids):
    """One token at a time: its task's gate, the score, then the rule on that row alone."""
    rows = []
    for token, task in zip(x, task_ids.tolist(), strict=True):
        logits = token @ router.gate.weight[task]
        if router.gate.bias is not None:
            logits = logits + router.gate.bias[task]
        scores = logits.softmax(-1) if router.score == "softmax" else logits.sigmoid()
        row = scores.tolist()
        if isinstance(router, ROUTERS.get("topk")):
            chosen = sorted(range(EXPERTS), key=lambda e: -row[e])[: router.k]
        elif isinstance(router, ROUTERS.get("top_p")):
            chosen = oracle_top_p(row, router.p, router.min_k, router.max_k)
        else:
            chosen = list(range(EXPERTS))
        total = sum(row[e] for e in chosen) if router.renormalize else 1.0
        rows.append(({e: row[e] / total for e in chosen}, row))
    return rows


CONFIGS = [
    {"type": "softmax"},
    {"type": "softmax", "score": "sigmoid"},
    {"type": "topk", "k": 2},
    {"type": "topk", "k": 3, "renormalize": True, "bias": True},
    {"type": "noisy_topk", "k": 2},
    {"type": "top_p", "p": 0.5},
    {"type": "top_p", "p": 0.8, "score": "sigmoid", "renormalize": True},
    {"type": "top_p", "p": 0.6, "min_k": 2, "max_k": 3, "bias": True},
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_router_matches_per_token_oracle_with_mixed_tasks(cfg):
    torch.manual_seed(0)
    router = build(cfg).eval()
    if router.gate.bias is not None:
        torch.nn.init.normal_(router.gate.bias)
    x = torch.randn(30, DIM)
    task_ids = torch.randint(0, TASKS, (30,))
    with torch.no_grad():
        routing = router(x, task_ids)
    assert isinstance(routing, Routing)
    assert routing.probs.dtype == torch.float32
    assert routing.index.dtype == torch.long
    assert routing.probs.shape == routing.logits.shape == (30, EXPERTS)
    for i, (expected, row) in enumerate(oracle(router, x, task_ids)):
        torch.testing.assert_close(routing.probs[i], torch.tensor(row), rtol=1e-5, atol=1e-6)
        got = {
            int(e): float(w)
            for e, w in zip(routing.index[i], routing.weight[i], strict=True)
            if e >= 0
        }
        assert got.keys() == expected.keys()
        for e, w in expected.items():
            assert got[e] == pytest.approx(w, rel=1e-5, abs=1e-6)
    assert (routing.weight[routing.index < 0] == 0).all()


def test_single_task_router_ignores_task_ids_and_multi_task_needs_them():
    router = build({"type": "topk", "k": 2}, num_tasks=1)
    x = torch.randn(4, DIM)
    torch.testing.assert_close(router(x).probs, router(x, torch.zeros(4, dtype=torch.long)).probs)
    with pytest.raises(ValueError, match="task_ids"):
        build({"type": "topk", "k": 2})(x)


def test_noisy_topk_is_deterministic_in_eval_and_noisy_in_training():
    torch.manual_seed(0)
    router = build({"type": "noisy_topk", "k": 2}, num_tasks=1)
    x = torch.randn(50, DIM)
    router.eval()
    first, second = router(x), router(x)
    torch.testing.assert_close(first.logits, second.logits)
    assert torch.equal(first.index, second.index)
    torch.testing.assert_close(first.logits, x @ router.gate.weight[0])
    router.train()
    noisy = router(x)
    assert not torch.allclose(noisy.logits, first.logits)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_gradient_reaches_every_used_router_parameter(cfg):
    torch.manual_seed(1)
    router = build(cfg).train()
    x = torch.randn(40, DIM)
    task_ids = torch.tensor([0, 2] * 20)
    routing = router(x, task_ids)
    (routing.weight * torch.randn_like(routing.weight)).sum().backward()
    grad = router.gate.weight.grad
    assert grad is not None
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0
    assert grad[1].abs().sum() == 0, "task 1 is absent from the batch"
    if router.gate.bias is not None:
        assert router.gate.bias.grad[[0, 2]].abs().sum() > 0
    if router.noise_gate is not None:
        assert router.noise_gate.weight.grad[[0, 2]].abs().sum() > 0


def test_routers_keep_no_state_between_calls():
    router = build({"type": "top_p", "p": 0.5}).eval()
    x, t = torch.randn(8, DIM), torch.randint(0, TASKS, (8,))
    before = {k: v.clone() for k, v in router.state_dict().items()}
    router(x, t)
    router(torch.randn(3, DIM), torch.zeros(3, dtype=torch.long))
    after = router.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not [name for name, _ in router.named_buffers()]


def test_all_routers_are_router_subclasses_with_a_gate():
    for name in ROUTERS.names():
        router = ROUTERS.build({"type": name, "dim": 4, "num_experts": 4})
        assert isinstance(router, Router)
        assert router.gate.weight.shape == (1, 4, 4)


def test_built_as_in_the_issue():
    router = ROUTERS.build(
        {"type": "top_p", "dim": 384, "num_experts": 16, "p": 0.4, "num_tasks": 1}
    )
    routing = router(torch.randn(10, 384), None)
    assert routing.probs.shape == (10, 16)
    assert routing.index.shape[0] == 10


@pytest.mark.parametrize(
    ("cfg", "error", "message"),
    [
        ({"type": "topk", "k": 9}, ConfigError, r"k must be an int in \[1, 5\]"),
        ({"type": "top_p", "p": 1.2}, ConfigError, r"p must be a number in \(0, 1\]"),
        ({"type": "top_p", "p": 0.5, "max_k": 6}, ConfigError, "max_k"),
        ({"type": "softmax", "score": "tanh"}, ConfigError, "score 'tanh'"),
        ({"type": "topk", "kk": 2}, RegistryError, "did you mean 'k'"),
        ({"type": "top-p"}, RegistryError, "did you mean 'top_p'"),
    ],
)
def test_router_config_errors(cfg, error, message):
    with pytest.raises(error, match=message):
        ROUTERS.build({**cfg, "dim": DIM, "num_experts": EXPERTS})


def test_adopt_keeps_gate_objects_and_checks_compatibility():
    old = build({"type": "noisy_topk", "k": 2})
    new = build({"type": "top_p", "p": 0.5})
    new.adopt(old)
    assert new.gate is old.gate and new.noise_gate is old.noise_gate
    again = build({"type": "noisy_topk", "k": 3})
    again.adopt(new)
    assert again.noise_gate is old.noise_gate
    with pytest.raises(ConfigError, match="noise gate"):
        build({"type": "noisy_topk", "k": 2}).adopt(build({"type": "softmax"}))
    with pytest.raises(ConfigError, match="bias"):
        build({"type": "topk", "bias": True}).adopt(build({"type": "softmax"}))
    with pytest.raises(ValueError, match="shapes"):
        build({"type": "softmax"}, num_tasks=1).adopt(build({"type": "softmax"}))
