"""Routing losses against numpy oracles and their defining properties."""

import math

import numpy as np
import pytest
import torch

from moekit.losses import conditional_mutual_information, mutual_information
from moekit.losses.aux_balance import cv_squared, switch_balance, z_loss
from moekit.registry import AUX_LOSSES
from moekit.routing import Routing, RoutingRecord
from moekit.routing.select import select_top_k

EPS = 1e-8


def numpy_mi(probs: np.ndarray, task_ids: np.ndarray, num_tasks: int) -> float:
    """Mod-Squad eq. 5 with P(E|T) the mean soft assignment of task T's tokens."""
    p_t = np.array([(task_ids == t).mean() for t in range(num_tasks)])
    p_e_t = np.stack(
        [
            probs[task_ids == t].mean(0) if (task_ids == t).any() else np.zeros(probs.shape[1])
            for t in range(num_tasks)
        ]
    )
    joint = p_e_t * p_t[:, None]
    p_e = joint.sum(0)
    return float((joint * (np.log(joint + EPS) - np.log(np.outer(p_t, p_e) + EPS))).sum())


def numpy_cmi(probs, modality_ids, task_ids, num_modalities, num_tasks) -> float:
    total = 0.0
    for t in range(num_tasks):
        in_task = task_ids == t
        if not in_task.any():
            continue
        p_m = np.array([(modality_ids[in_task] == m).mean() for m in range(num_modalities)])
        p_e_m = np.stack(
            [
                probs[in_task & (modality_ids == m)].mean(0)
                if (in_task & (modality_ids == m)).any()
                else np.zeros(probs.shape[1])
                for m in range(num_modalities)
            ]
        )
        joint = p_e_m * p_m[:, None]
        p_e = joint.sum(0)
        mi = (joint * (np.log(joint + EPS) - np.log(np.outer(p_m, p_e) + EPS))).sum()
        total += in_task.mean() * mi
    return float(total)


def random_probs(n, num_experts, seed=0, temperature=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, num_experts, generator=g) * temperature).softmax(-1)


def record(probs, task_ids=None, layer="blocks.1.mlp", k=2, **kwargs):
    logits = probs.log()
    index, weight = select_top_k(probs, k)
    return RoutingRecord(layer, Routing(probs, logits, index, weight), task_ids, **kwargs)


@pytest.mark.parametrize("seed", range(3))
def test_mutual_information_matches_numpy_eq5(seed):
    probs = random_probs(50, 6, seed)
    task_ids = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(seed))
    mi = mutual_information(probs, task_ids, 4)
    assert mi.dtype == torch.float32
    assert mi.item() == pytest.approx(numpy_mi(probs.numpy(), task_ids.numpy(), 4), abs=1e-6)


def test_mutual_information_is_zero_when_routing_ignores_the_task():
    probs = random_probs(10, 5).repeat(3, 1)
    task_ids = torch.arange(3).repeat_interleave(10)
    assert abs(mutual_information(probs, task_ids, 3).item()) < 1e-6


def test_mutual_information_is_entropy_of_tasks_with_disjoint_experts():
    task_ids = torch.tensor([0] * 6 + [1] * 3 + [2] * 3)
    probs = torch.zeros(12, 6)
    for i, t in enumerate(task_ids.tolist()):
        probs[i, 2 * t : 2 * t + 2] = torch.tensor([0.3, 0.7] if i % 2 else [0.6, 0.4])
    p_t = np.array([0.5, 0.25, 0.25])
    h_t = float(-(p_t * np.log(p_t)).sum())
    assert mutual_information(probs, task_ids, 3).item() == pytest.approx(h_t, abs=1e-5)


def test_single_task_batch_gives_zero():
    probs = random_probs(20, 4)
    assert mutual_information(probs, torch.full((20,), 2), 5).item() == pytest.approx(0, abs=1e-6)
    loss = AUX_LOSSES.build({"type": "mutual_information"})
    assert loss([record(probs)]).item() == 0.0


def test_fake_two_rank_reduction_equals_the_global_batch():
    probs = random_probs(40, 5, seed=4).requires_grad_()
    task_ids = torch.tensor([0, 1, 2, 1] * 10)
    full = mutual_information(probs, task_ids, 3, reduce=None)
    (full_grad,) = torch.autograd.grad(full, probs)
    halves = [slice(0, 25), slice(25, 40)]
    from moekit.losses.aux_mutual_information import group_statistics

    stats = [group_statistics(probs[h].detach(), task_ids[h], 3) for h in halves]
    for rank, rows in enumerate(halves):
        other = stats[1 - rank]
        seen = []

        def fake_all_reduce(local, other=other, seen=seen):
            seen.append(local.shape)
            return local + other

        local_probs = probs[rows].detach().requires_grad_()
        mi = mutual_information(local_probs, task_ids[rows], 3, reduce=fake_all_reduce)
        assert seen == [(3, 6)], "one reduction of the [T, E + 1] statistics"
        assert mi.item() == pytest.approx(full.item(), abs=1e-6)
        (grad,) = torch.autograd.grad(mi, local_probs)
        torch.testing.assert_close(grad, full_grad[rows], rtol=1e-4, atol=1e-6)
        local_only = mutual_information(probs[rows], task_ids[rows], 3, reduce=None)
        assert local_only.item() != pytest.approx(full.item(), abs=1e-4)


def test_mutual_information_loss_sums_layers_negated_and_filters():
    probs_a, probs_b = random_probs(30, 4, 1), random_probs(30, 4, 2)
    task_ids = torch.randint(0, 3, (30,), generator=torch.Generator().manual_seed(0))
    records = [
        record(probs_a, task_ids, "blocks.1.attn"),
        record(probs_b, task_ids, "blocks.1.mlp"),
    ]
    expected = numpy_mi(probs_a.numpy(), task_ids.numpy(), 3) + numpy_mi(
        probs_b.numpy(), task_ids.numpy(), 3
    )
    loss = AUX_LOSSES.build({"type": "mutual_information", "num_tasks": 3})
    assert loss(records).item() == pytest.approx(-expected, abs=1e-5)
    only_mlp = AUX_LOSSES.build({"type": "mutual_information", "layers": r"\.mlp$"})
    assert only_mlp(records).item() == pytest.approx(
        -numpy_mi(probs_b.numpy(), task_ids.numpy(), 3), abs=1e-5
    )
    assert AUX_LOSSES.build({"type": "mutual_information", "layers": "head"})(records) == 0


def test_mutual_information_loss_respects_valid_and_normalises_sigmoid_scores():
    scores = torch.rand(20, 4)
    task_ids = torch.tensor([0, 1] * 10)
    valid = torch.arange(20) < 12
    loss = AUX_LOSSES.build({"type": "mutual_information"})
    got = loss([record(scores, task_ids, valid=valid)])
    normalised = (scores / scores.sum(-1, keepdim=True))[:12]
    assert got.item() == pytest.approx(
        -numpy_mi(normalised.numpy(), task_ids[:12].numpy(), 2), abs=1e-5
    )


def test_conditional_mutual_information_matches_numpy():
    probs = random_probs(60, 5, seed=7)
    g = torch.Generator().manual_seed(1)
    modality_ids = torch.randint(0, 3, (60,), generator=g)
    task_ids = torch.randint(0, 2, (60,), generator=g)
    got = conditional_mutual_information(probs, modality_ids, task_ids, 3, 2)
    want = numpy_cmi(probs.numpy(), modality_ids.numpy(), task_ids.numpy(), 3, 2)
    assert got.item() == pytest.approx(want, abs=1e-6)
    loss = AUX_LOSSES.build({"type": "conditional_mutual_information"})
    rec = record(probs, task_ids, modality_ids=modality_ids)
    assert loss([rec]).item() == pytest.approx(-want, abs=1e-6)
    assert loss([record(probs, task_ids)]).item() == 0.0


def test_conditional_mi_is_zero_when_experts_ignore_the_modality():
    probs = random_probs(8, 4).repeat(2, 1)
    modality_ids = torch.arange(2).repeat_interleave(8)
    task_ids = torch.zeros(16, dtype=torch.long)
    got = conditional_mutual_information(probs, modality_ids, task_ids, 2, 1)
    assert abs(got.item()) < 1e-6


def test_switch_balance_formula_and_uniform_value():
    probs = random_probs(40, 4, 3)
    index = probs.topk(2, -1).indices
    f = np.bincount(index.reshape(-1).numpy(), minlength=4) / index.numel()
    expected = 4 * (f * probs.mean(0).numpy()).sum()
    assert switch_balance(probs, index, 4).item() == pytest.approx(expected, rel=1e-5)
    uniform = torch.full((8, 4), 0.25)
    assert switch_balance(uniform, torch.arange(4).repeat(2, 1).reshape(8, 1), 4).item() == (
        pytest.approx(1.0)
    )
    loss = AUX_LOSSES.build({"type": "switch_balance", "per_task": True})
    task_ids = torch.tensor([0, 1] * 20)
    per_task = [switch_balance(probs[task_ids == t], index[task_ids == t], 4) for t in (0, 1)]
    rec = RoutingRecord("x", Routing(probs, probs.log(), index, probs.gather(1, index)), task_ids)
    assert loss([rec]).item() == pytest.approx(float(sum(per_task)) / 2, rel=1e-5)


def test_importance_cv2_and_z_loss():
    probs = random_probs(30, 5, 5)
    rec = record(probs, k=2)
    importance = rec.routing.dense_weight().sum(0).numpy()
    expected = importance.var() / importance.mean() ** 2
    assert AUX_LOSSES.build("importance")([rec]).item() == pytest.approx(expected, rel=1e-4)
    assert cv_squared(torch.ones(4)).item() == 0.0
    logits = torch.randn(10, 5) * 50
    expected_z = (np.log(np.exp(logits.double().numpy()).sum(-1)) ** 2).mean()
    assert z_loss(logits).item() == pytest.approx(expected_z, rel=1e-5)
    rec = RoutingRecord(
        "x", Routing(logits.softmax(-1), logits, rec.routing.index[:10], rec.routing.weight[:10])
    )
    assert AUX_LOSSES.build("z_loss")([rec]).item() == pytest.approx(expected_z, rel=1e-5)


def test_gate_terms_of_the_idrid_seed():
    scores = torch.rand(6, 4)
    rec = record(scores)
    q = (scores / scores.sum(-1, keepdim=True)).numpy()
    usage = q.mean(0)
    assert AUX_LOSSES.build("gate_l1")([rec]).item() == pytest.approx(scores.mean().item())
    assert AUX_LOSSES.build("usage_entropy")([rec]).item() == pytest.approx(
        float((usage * np.log(usage)).sum()), rel=1e-5
    )
    assert AUX_LOSSES.build("routing_entropy")([rec]).item() == pytest.approx(
        float(-(q * np.log(q)).sum(-1).mean()), rel=1e-5
    )
    kl = float((0.25 * np.log(0.25 / usage)).sum())
    assert AUX_LOSSES.build("kl_uniform")([rec]).item() == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert AUX_LOSSES.build("kl_uniform")([record(torch.full((3, 4), 0.9))]).item() == (
        pytest.approx(0.0, abs=1e-6)
    )
    assert AUX_LOSSES.build("kl_uniform")([record(torch.rand(5, 4) ** 4)]).item() >= 0


def test_losses_are_differentiable_and_empty_record_lists_give_zero():
    logits = torch.randn(12, 4, requires_grad=True)
    probs = logits.softmax(-1)
    index, weight = select_top_k(probs, 2)
    rec = RoutingRecord("l", Routing(probs, logits, index, weight), torch.tensor([0, 1, 2] * 4))
    for name in AUX_LOSSES.names():
        if name == "cam_entropy":  # needs the predictions and the batch: tests/test_cam.py
            continue
        if name == "conditional_mutual_information":
            rec.modality_ids = torch.tensor([0, 1] * 6)
        value = AUX_LOSSES.build(name)([rec])
        assert value.dim() == 0 and torch.isfinite(value)
        (grad,) = torch.autograd.grad(value, logits, retain_graph=True, allow_unused=True)
        assert grad is not None and torch.isfinite(grad).all(), name
        assert AUX_LOSSES.build(name)([]).item() == 0.0
    assert math.isfinite(AUX_LOSSES.build("mutual_information")([rec]).item())


def _two_rank_worker(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    probs = random_probs(40, 5, seed=4).requires_grad_()
    task_ids = torch.tensor([0, 1, 2, 1] * 10)
    rows = slice(0, 25) if rank == 0 else slice(25, 40)
    local = probs[rows].detach().requires_grad_()
    loss = AUX_LOSSES.build({"type": "mutual_information"})
    value = loss([record(local, task_ids[rows] if rank == 0 else task_ids[rows] % 2)])
    value.backward()
    results[rank] = (value.item(), local.grad.clone())
    dist.destroy_process_group()


@pytest.mark.slow
def test_real_two_process_all_reduce(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), results), nprocs=2)
        results = dict(results)
    probs = random_probs(40, 5, seed=4)
    task_ids = torch.tensor([0, 1, 2, 1] * 10)
    task_ids[25:] %= 2  # rank 1 sees only tasks 0 and 1: the task count is agreed globally
    expected = -numpy_mi(probs.numpy(), task_ids.numpy(), 3)
    assert results[0][0] == pytest.approx(expected, abs=1e-5)
    assert results[1][0] == pytest.approx(expected, abs=1e-5)
    full = probs.clone().requires_grad_()
    local_loss = AUX_LOSSES.build({"type": "mutual_information", "reduce": None})
    local_loss([record(full, task_ids)]).backward()
    # each rank's gradient is world_size x its share; DDP's averaging divides it back
    torch.testing.assert_close(results[0][1], 2 * full.grad[:25], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results[1][1], 2 * full.grad[25:], rtol=1e-4, atol=1e-6)
