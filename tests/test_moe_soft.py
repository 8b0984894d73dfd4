"""Soft MoE against a plain loop over slots and tokens (values and gradients), its masking
properties, the task-slotted form, extraction surgery, records and FLOPs."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit.analysis.flops import count_flops, reference_macs
from moekit.errors import ConfigError
from moekit.moe import SoftMoE, keep_task_routers, set_routing
from moekit.registry import MOE_LAYERS
from moekit.types import ModelOutput


def loop_reference(layer: SoftMoE, x, task_ids=None, valid=None, kept=None):
    """Soft MoE written out slot by slot and token by token (Puigcerver et al., ICLR 2024).

    ``kept``: the experts a pruned copy holds (the combine softmax runs over every slot; the
    other experts' slots contribute nothing); ``layer`` is the unpruned layer."""
    rows, length, dim = x.shape
    experts, p = layer.router.num_experts, layer.slots_per_expert
    kept = list(range(experts)) if kept is None else kept
    scale = layer.router.scale

    def logit(xi, phi_j):
        if scale is None:
            return xi @ phi_j
        return scale * (xi / xi.norm().clamp_min(1e-12)) @ (phi_j / phi_j.norm().clamp_min(1e-12))

    out = []
    for r in range(rows):
        task = 0 if task_ids is None else int(task_ids[r])
        phi = layer.router.gate.weight[task]
        tokens = [i for i in range(length) if valid is None or bool(valid[r, i])]
        slot_outputs = {}
        for j in range(experts * p):
            e = j // p
            if e not in kept:
                continue
            weights = torch.softmax(torch.stack([logit(x[r, i], phi[:, j]) for i in tokens]), 0)
            slot = sum(w * x[r, i] for w, i in zip(weights, tokens, strict=True))
            if layer.task_embed is not None:
                slot = slot + layer.task_embed[task]
            slot_outputs[j] = layer.fc2.expert(e, layer.act(layer.fc1.expert(e, slot)))
        row = []
        for i in range(length):
            if i not in tokens:
                row.append(torch.zeros(dim))
                continue
            combine = torch.softmax(
                torch.stack([logit(x[r, i], phi[:, j]) for j in range(experts * p)]), 0
            )
            row.append(sum(combine[j] * y for j, y in slot_outputs.items()))
        out.append(torch.stack(row))
    return torch.stack(out)


def assert_same_grads(output, reference, inputs):
    grad = torch.randn_like(reference)
    got = torch.autograd.grad(output, inputs, grad, retain_graph=True)
    want = torch.autograd.grad(reference, inputs, grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def random_valid(rows, length, generator):
    valid = torch.rand(rows, length, generator=generator) > 0.4
    valid[:, 0] = True
    return valid


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("num_tasks,slots", [(1, 1), (1, 2), (3, 2)])
def test_soft_moe_matches_loop_reference(normalize, masked, num_tasks, slots):
    torch.manual_seed(0)
    layer = SoftMoE(6, 10, 3, slots, num_tasks=num_tasks, normalize=normalize)
    x = torch.randn(4, 5, 6, requires_grad=True)
    task_ids = torch.tensor([0, 2, 1, 2]) % num_tasks if num_tasks > 1 else None
    valid = random_valid(4, 5, torch.Generator().manual_seed(1)) if masked else None
    y, record = layer(x, task_ids, valid=valid)
    want = loop_reference(layer, x, task_ids, valid)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    params = [x, *(p for p in layer.parameters())]
    assert_same_grads(y, want, params)
    assert record.routing.probs.shape == (20, 3)


def test_task_slotted_rows_are_the_tasks_own_outputs():
    """One sequence run as rows of different tasks: each row uses only its task's slots and
    embedding, so it equals the one-task layer holding that task's parameters."""
    torch.manual_seed(0)
    layer = SoftMoE(8, 12, 4, 2, num_tasks=3)
    x = torch.randn(1, 6, 8).expand(3, -1, -1)
    y, record = layer(x, torch.tensor([0, 1, 2]))
    assert not torch.allclose(y[0], y[1])
    for task in range(3):
        single = copy.deepcopy(layer)
        keep_task_routers(single, task)
        assert single.num_tasks == 1 and single.router.gate.weight.shape[0] == 1
        alone, _ = single(x[:1], torch.tensor([0]))
        torch.testing.assert_close(alone[0], y[task])
    assert torch.equal(record.task_ids, torch.tensor([0, 1, 2]).repeat_interleave(6))


def test_task_embedding_is_added_to_slot_inputs_only():
    """With the task embedding the slots' inputs move; the logits (dispatch, combine) do not."""
    torch.manual_seed(0)
    layer = SoftMoE(8, 12, 2, 1, num_tasks=2)
    x = torch.randn(2, 5, 8)
    ids = torch.tensor([0, 1])
    before, record = layer(x, ids)
    with torch.no_grad():
        layer.task_embed[1] += 1.0
    after, record_after = layer(x, ids)
    torch.testing.assert_close(before[0], after[0])
    assert not torch.allclose(before[1], after[1])
    torch.testing.assert_close(record.routing.probs, record_after.routing.probs)


@given(
    rows=st.integers(1, 3),
    length=st.integers(1, 7),
    slots=st.integers(1, 3),
    normalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_dispatch_and_combine_are_distributions(rows, length, slots, normalize, seed):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = SoftMoE(4, 6, 3, slots, normalize=normalize)
    x = torch.randn(rows, length, 4, generator=generator)
    valid = torch.rand(rows, length, generator=generator) > 0.5
    valid[0] = False  # a sequence without valid tokens
    x = x.masked_fill(~valid.unsqueeze(-1), 0.0)
    _, dispatch, combine = layer.weights(x, None, valid)
    has_tokens = valid.any(dim=1)
    sums = dispatch.sum(dim=1)
    torch.testing.assert_close(sums[has_tokens], torch.ones_like(sums[has_tokens]))
    assert torch.equal(sums[~has_tokens], torch.zeros_like(sums[~has_tokens]))
    assert torch.equal(dispatch[~valid], torch.zeros_like(dispatch[~valid]))
    torch.testing.assert_close(combine.sum(dim=-1), torch.ones(rows, length))


@given(
    rows=st.integers(1, 3),
    length=st.integers(2, 6),
    num_tasks=st.integers(1, 3),
    filler=st.sampled_from(["random", "huge", "nan"]),
    seed=st.integers(0, 2**16),
)
def test_masked_tokens_are_never_read(rows, length, num_tasks, filler, seed):
    """Masked tokens get zero output and zero gradient, and the other tokens' outputs do not
    depend on what the masked positions hold (even NaN)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = SoftMoE(4, 6, 2, 2, num_tasks=num_tasks)
    task_ids = torch.randint(0, num_tasks, (rows,), generator=generator)
    valid = torch.rand(rows, length, generator=generator) > 0.5
    valid[:, 0] = True
    x = torch.randn(rows, length, 4, generator=generator)
    other = {
        "random": torch.randn(rows, length, 4, generator=generator) * 100,
        "huge": torch.full((rows, length, 4), 1e30),
        "nan": torch.full((rows, length, 4), float("nan")),
    }[filler]
    changed = torch.where(valid.unsqueeze(-1), x, other).requires_grad_(True)
    y, _ = layer(x, task_ids, valid=valid)
    y_changed, _ = layer(changed, task_ids, valid=valid)
    torch.testing.assert_close(y_changed, y)
    assert torch.equal(y[~valid], torch.zeros_like(y[~valid]))
    (grad,) = torch.autograd.grad(y_changed.sum(), changed)
    assert torch.equal(grad[~valid], torch.zeros_like(grad[~valid]))
    assert torch.isfinite(grad).all()


def test_record_is_the_combine_mass_per_expert():
    torch.manual_seed(0)
    layer = SoftMoE(6, 8, 3, 2, num_tasks=2)
    x = torch.randn(2, 4, 6)
    valid = torch.tensor([[True, True, False, True], [True, False, True, True]])
    task_ids = torch.tensor([1, 0])
    modality_ids = torch.tensor([0, 0, 1, 1]).repeat(2, 1)
    _, record = layer(x, task_ids, modality_ids=modality_ids, valid=valid)
    _, _, combine = layer.weights(x.masked_fill(~valid.unsqueeze(-1), 0), task_ids, valid)
    routing = record.routing
    torch.testing.assert_close(routing.probs, combine.view(8, 3, 2).sum(-1))
    torch.testing.assert_close(routing.probs.sum(-1), torch.ones(8))
    torch.testing.assert_close(routing.logits.softmax(-1), routing.probs)
    flat_valid = valid.reshape(-1)
    assert torch.equal(routing.index[flat_valid], torch.arange(3).expand(6, 3))
    assert (routing.index[~flat_valid] == -1).all() and (routing.weight[~flat_valid] == 0).all()
    torch.testing.assert_close(routing.weight[flat_valid], routing.probs[flat_valid])
    assert torch.equal(record.modality_ids, torch.tensor([0, 0, 1, 1, 0, 0, 1, 1]))
    assert torch.equal(record.task_ids, torch.tensor([1, 1, 1, 1, 0, 0, 0, 0]))
    assert torch.equal(record.valid, flat_valid)


def test_keep_experts_drops_the_removed_experts_slots():
    torch.manual_seed(0)
    layer = SoftMoE(6, 8, 4, 2)
    x = torch.randn(2, 5, 6)
    full = copy.deepcopy(layer)
    layer.keep_experts([0, 2])
    assert layer.fc1.weight.shape[0] == 2 and layer.num_experts == 2
    y, record = layer(x)
    torch.testing.assert_close(y, loop_reference(full, x, kept=[0, 2]), rtol=1e-5, atol=1e-6)
    assert torch.equal(record.routing.index[0], torch.tensor([0, 2]))
    assert record.routing.probs.shape == (10, 4)


def test_registry_config_and_contract_errors():
    layer = MOE_LAYERS.build(
        {"type": "soft_moe", "hidden": 8, "num_experts": 2, "slots_per_expert": 3},
        dim=4,
        num_tasks=2,
    )
    assert isinstance(layer, SoftMoE) and layer.router.gate.weight.shape == (2, 4, 6)
    with pytest.raises(ValueError, match="needs task_ids"):
        layer(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="one task id per sequence"):
        layer(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ConfigError, match="slots_per_expert"):
        SoftMoE(4, 8, 2, 0)
    with pytest.raises(ConfigError, match="no selection rule"):
        set_routing(torch.nn.Sequential(layer), {"type": "topk", "k": 1})


class Wrap(torch.nn.Module):
    def __init__(self, layer, task_ids=None):
        super().__init__()
        self.layer, self.task_ids = layer, task_ids

    def forward(self, inputs, task_mask=None):
        y, record = self.layer(inputs, self.task_ids)
        return ModelOutput({"y": y}, [record])


@pytest.mark.parametrize("num_tasks,normalize", [(1, True), (3, False)])
def test_flops_hand_count(num_tasks, normalize):
    rows, length, dim, hidden, experts, p = 3, 10, 16, 24, 4, 2
    slots = experts * p
    layer = SoftMoE(dim, hidden, experts, p, num_tasks=num_tasks, normalize=normalize)
    task_ids = torch.tensor([0, 2, 1]) if num_tasks > 1 else None
    model, x = Wrap(layer, task_ids), torch.randn(rows, length, dim)
    logits = dispatch = combine = rows * length * dim * slots
    experts_cost = rows * slots * 2 * dim * hidden
    expected = logits + dispatch + combine + experts_cost
    count = count_flops(model, x)
    assert count.matmul_total == expected
    assert reference_macs(model, x) == expected
