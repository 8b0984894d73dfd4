"""MoE layers against naive references: each token through each selected expert separately,
summed with its weight. Outputs and gradients, for every router kind and dispatch strategy."""

import math

import pytest
import torch
from torch import nn

from moekit.errors import ConfigError
from moekit.moe import MoEAttention, MoEMLP, MoEModules, moe_layers, name_moe_layers, set_routing
from moekit.moe.dispatch import STRATEGIES
from moekit.registry import MOE_LAYERS
from moekit.routing import RoutingRecord

ROUTERS = {
    "topk": {"type": "topk", "k": 2},
    "top_p": {"type": "top_p", "p": 0.6},
    "dense": {"type": "softmax"},
    "noisy": {"type": "noisy_topk", "k": 3, "renormalize": True},
    "sigmoid_top_p": {"type": "top_p", "p": 0.8, "score": "sigmoid", "renormalize": True},
}


def sharpen(layer, std=1.0):
    """Peaked gates, so top-p selects a variable number of experts."""
    nn.init.normal_(layer.router.gate.weight, std=std)
    return layer


def naive_mlp(layer: MoEMLP, tokens, routing):
    out = []
    for i in range(tokens.shape[0]):
        acc = torch.zeros(layer.dim)
        for e, w in zip(routing.index[i].tolist(), routing.weight[i], strict=True):
            if e >= 0:
                h = layer.act(layer.fc1.expert(e, tokens[i]))
                acc = acc + w * layer.fc2.expert(e, h)
        out.append(acc)
    return torch.stack(out)


def naive_attention(layer: MoEAttention, x, routing):
    batch, length, _ = x.shape
    out = []
    for i in range(batch * length):
        b = i // length
        key, value = layer.kv(x[b]).chunk(2, -1)
        acc = torch.zeros(layer.dim)
        for e, w in zip(routing.index[i].tolist(), routing.weight[i], strict=True):
            if e >= 0:
                q = layer.q_proj.expert(e, x[b, i % length])
                attention = torch.softmax(key @ q / math.sqrt(layer.head_dim), 0) @ value
                acc = acc + w * layer.out_proj.expert(e, attention)
        out.append(acc)
    return torch.stack(out).view_as(x)


def assert_same_grads(output, reference, inputs):
    grad = torch.randn_like(reference)
    got = torch.autograd.grad(output, inputs, grad, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(reference, inputs, grad, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None or g.abs().max() == 0
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("router", list(ROUTERS))
def test_moe_mlp_matches_naive_reference_multitask(strategy, router):
    torch.manual_seed(0)
    layer = sharpen(MoEMLP(8, 12, 5, ROUTERS[router], num_tasks=3, strategy=strategy)).eval()
    x = torch.randn(3, 6, 8, requires_grad=True)
    task_ids = torch.tensor([0, 2, 1])
    y, record = layer(x, task_ids)
    assert y.shape == x.shape
    assert isinstance(record, RoutingRecord) and record.layer == "MoEMLP"
    assert torch.equal(record.task_ids, task_ids.repeat_interleave(6))
    reference = naive_mlp(layer, x.reshape(-1, 8), record.routing).view_as(x)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-6)
    assert_same_grads(y, reference, [x, *layer.parameters()])


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_moe_mlp_top_p_selects_a_variable_number_and_training_noise(strategy):
    torch.manual_seed(1)
    layer = sharpen(MoEMLP(8, 4, 6, ROUTERS["top_p"], strategy=strategy), std=2.0)
    tokens = torch.randn(40, 8, requires_grad=True)
    y, record = layer(tokens)
    counts = record.routing.num_selected()
    assert counts.min() < counts.max(), "top-p selected a variable number of experts"
    reference = naive_mlp(layer, tokens, record.routing)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-6)
    assert_same_grads(y, reference, [tokens, *layer.parameters()])


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_moe_mlp_with_empty_experts_gives_them_zero_gradient(strategy):
    torch.manual_seed(2)
    layer = MoEMLP(8, 4, 6, {"type": "topk", "k": 1}, strategy=strategy)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0, 0, 1] = 5.0  # every token with x0 > 0 picks expert 1
        layer.router.gate.weight[0, 0, 4] = -5.0  # and with x0 < 0 expert 4
    tokens = torch.randn(20, 8, requires_grad=True)
    y, record = layer(tokens)
    assert set(record.routing.index.unique().tolist()) == {1, 4}
    reference = naive_mlp(layer, tokens, record.routing)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    for e in (0, 2, 3, 5):
        assert layer.fc1.weight.grad[e].abs().max() == 0
        assert layer.fc2.bias.grad[e].abs().max() == 0


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("router", ["topk", "top_p", "dense"])
def test_moe_attention_matches_naive_reference(strategy, router):
    torch.manual_seed(3)
    layer = MoEAttention(8, 5, 4, ROUTERS[router], num_tasks=2, strategy=strategy)
    sharpen(layer).eval()
    x = torch.randn(2, 5, 8, requires_grad=True)
    y, record = layer(x, torch.tensor([1, 0]))
    reference = naive_attention(layer, x, record.routing)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-6)
    assert_same_grads(y, reference, [x, *layer.parameters()])


def test_moe_attention_accepts_one_flat_sequence_and_per_token_task_ids():
    torch.manual_seed(4)
    layer = MoEAttention(8, 4, 4, {"type": "topk", "k": 2}, num_tasks=2)
    tokens = torch.randn(7, 8)
    task_ids = torch.tensor([0, 1, 1, 0, 0, 1, 0])
    y, record = layer(tokens, task_ids)
    y3, _ = layer(tokens.unsqueeze(0), task_ids.unsqueeze(0))
    torch.testing.assert_close(y, y3[0])
    assert torch.equal(record.task_ids, task_ids)


def test_invalid_tokens_select_nothing_and_are_not_attended():
    torch.manual_seed(5)
    layer = MoEAttention(8, 4, 4, {"type": "topk", "k": 2})
    x = torch.randn(2, 5, 8)
    valid = torch.tensor([[True, True, True, False, False], [True] * 5])
    y, record = layer(x, valid=valid)
    assert (y[0, 3:] == 0).all()
    assert (record.routing.index[3:5] == -1).all()
    assert torch.equal(record.valid, valid.reshape(-1))
    changed = x.clone()
    changed[0, 3:] = 100.0
    torch.testing.assert_close(layer(changed, valid=valid)[0], y)


class Head(nn.Module):
    """A tiny segmentation expert: conv to one logit map."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x, extra=None):
        y = self.conv(x)
        return y if extra is None else y + extra.mean(1, keepdim=True)


@pytest.mark.parametrize("router", ["topk", "top_p", "dense", "sigmoid_top_p"])
def test_moe_modules_matches_naive_reference(router):
    torch.manual_seed(6)
    layer = sharpen(MoEModules([Head() for _ in range(4)], ROUTERS[router], dim=4)).eval()
    calls = []
    for e, expert in enumerate(layer.experts):
        expert.register_forward_hook(lambda m, args, out, e=e: calls.append((e, args[0].shape[0])))
    x = torch.randn(6, 4, 5, 5, requires_grad=True)
    y, record = layer(x)
    layer_calls = list(calls)
    assert y.shape == (6, 1, 5, 5)
    index, weight = record.routing.index, record.routing.weight
    reference = torch.stack(
        [
            sum(
                w * layer.experts[e](x[b : b + 1])[0]
                for e, w in zip(index[b], weight[b], strict=True)
                if e >= 0
            )
            for b in range(6)
        ]
    )
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-6)
    assert_same_grads(y, reference, [x, *layer.parameters()])
    used = index[index >= 0]
    assert sorted(e for e, _ in layer_calls) == used.unique().tolist(), "each expert ran once"
    assert all(n == int((used == e).sum()) for e, n in layer_calls), "on its samples only"


def test_moe_modules_multiple_inputs_gate_input_and_task_ids():
    torch.manual_seed(7)
    layer = MoEModules([Head() for _ in range(3)], {"type": "topk", "k": 2}, num_tasks=2, dim=6)
    x, extra, gate = torch.randn(4, 4, 5, 5), torch.randn(4, 2, 5, 5), torch.randn(4, 6, 3, 3)
    task_ids = torch.tensor([0, 1, 1, 0])
    y, record = layer((x, extra), task_ids, gate_input=gate)
    routing = layer.router(gate.mean((2, 3)), task_ids)
    assert torch.equal(record.routing.index, routing.index)
    b = 2
    expected = sum(
        w * layer.experts[e](x[b : b + 1], extra[b : b + 1])[0]
        for e, w in zip(routing.index[b].tolist(), routing.weight[b], strict=True)
    )
    torch.testing.assert_close(y[b], expected, rtol=1e-5, atol=1e-6)


def test_moe_modules_with_no_valid_sample_returns_zeros():
    layer = MoEModules([Head() for _ in range(3)], {"type": "topk", "k": 2}, dim=4)
    y, record = layer(torch.randn(3, 4, 5, 5), valid=torch.zeros(3, dtype=torch.bool))
    assert y.shape == (3, 1, 5, 5) and (y == 0).all()
    assert (record.routing.index == -1).all()


def test_moe_modules_builds_experts_from_config_and_needs_dim():
    from moekit.registry import EXPERTS

    if "moekit_test_head" not in EXPERTS:
        EXPERTS.register("moekit_test_head")(Head)
    layer = MoEModules(
        {"type": "moekit_test_head", "num_experts": 3, "channels": 2}, {"type": "softmax"}, dim=2
    )
    assert len(layer.experts) == 3 and layer.num_experts == 3
    with pytest.raises(ConfigError, match="dim"):
        MoEModules([Head()], {"type": "softmax"})
    with pytest.raises(ConfigError, match="num_experts"):
        MoEModules({"type": "moekit_test_head"}, {"type": "softmax"}, dim=2)


def test_capacity_factor_drops_pairs_beyond_capacity():
    torch.manual_seed(8)
    layer = MoEMLP(8, 4, 4, {"type": "topk", "k": 1}, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0, :, 0] = 1.0
    tokens = torch.rand(12, 8) + 0.1  # everyone prefers expert 0, capacity ceil(12 / 4) = 3
    y, record = layer(tokens)
    assert (record.routing.index == 0).all()
    kept = (y.abs().sum(-1) > 0).nonzero().squeeze(1)
    assert kept.tolist() == [0, 1, 2], "first come, first served in token order"


def test_router_config_must_not_carry_the_layer_shape():
    with pytest.raises(ConfigError, match="'dim' is set by the MoE layer"):
        MoEMLP(8, 4, 4, {"type": "topk", "k": 1, "dim": 8})
    with pytest.raises(ConfigError, match=r"unknown activation 'gelux'.*'gelu'"):
        MoEMLP(8, 4, 4, {"type": "topk"}, activation="gelux")
    with pytest.raises(ConfigError, match="dispatch strategy 'grouped'"):
        MoEMLP(8, 4, 4, {"type": "topk"}, strategy="grouped")(torch.randn(3, 8))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                MoEAttention(8, 4, 4, {"type": "softmax", "score": "sigmoid"}, num_tasks=2),
                MoEMLP(8, 4, 4, {"type": "softmax", "score": "sigmoid"}, num_tasks=2),
            ]
        )
        self.head = MoEModules([Head(8) for _ in range(3)], {"type": "softmax"}, dim=8)
        name_moe_layers(self)


def test_naming_listing_and_phase_switch_keep_gate_parameters():
    model = Model()
    names = [name for name, _ in moe_layers(model)]
    assert names == ["blocks.0", "blocks.1", "head"]
    assert [layer.name for _, layer in moe_layers(model)] == names
    gates = {name: layer.router.gate.weight for name, layer in moe_layers(model)}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    top_p = {"type": "top_p", "p": 0.8, "score": "sigmoid", "renormalize": True}
    assert set_routing(model, top_p, layers=r"^blocks\.") == 2
    for name, layer in moe_layers(model):
        assert layer.router.gate.weight is gates[name]
    assert type(model.blocks[1].router).__name__ == "TopPRouter"
    assert type(model.head.router).__name__ == "SoftmaxRouter"
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in model.parameters()} == optimized
    _, record = model.blocks[1](torch.randn(2, 3, 8), torch.tensor([0, 1]))
    assert record.layer == "blocks.1"
    assert set_routing(model, {"type": "softmax"}) == 3


def test_set_router_keeps_training_mode_and_registry_entries():
    layer = MoEMLP(8, 4, 4, {"type": "noisy_topk", "k": 2}).eval()
    layer.set_router({"type": "topk", "k": 2})
    assert not layer.router.training
    assert layer.router_config == {"bias": False, "type": "topk", "k": 2}
    biased = MoEMLP(8, 4, 4, {"type": "softmax", "score": "sigmoid", "bias": True})
    biased.set_router({"type": "top_p", "p": 0.8, "score": "sigmoid"})
    assert biased.router.gate.bias is not None, "the gate's bias is kept by default"
    assert {"moe_mlp", "moe_attention", "moe_modules"} <= set(MOE_LAYERS.names())


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_bf16_autocast_runs_and_trains(strategy):
    torch.manual_seed(9)
    layer = MoEMLP(16, 8, 4, {"type": "topk", "k": 2}, strategy=strategy)
    attention = MoEAttention(16, 4, 8, {"type": "top_p", "p": 0.5}, strategy=strategy)
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, record = layer(x)
        z, _ = attention(x)
    assert y.dtype == torch.bfloat16 and z.dtype == torch.bfloat16
    assert record.routing.probs.dtype == torch.float32
    reference, _ = layer(x)
    torch.testing.assert_close(y.float(), reference, rtol=0.05, atol=0.05)
    (y.float().sum() + z.float().sum()).backward()
    assert layer.fc1.weight.grad.dtype == torch.float32
    assert layer.router.gate.weight.grad is not None


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_torch_compile_runs_with_graph_breaks_at_the_plan(strategy):
    torch.manual_seed(10)
    layer = MoEMLP(16, 8, 4, {"type": "topk", "k": 2}, strategy=strategy)
    compiled = torch.compile(layer)
    x = torch.randn(2, 5, 16, requires_grad=True)
    y, _ = compiled(x)
    torch.testing.assert_close(y, layer(x)[0])
    y.sum().backward()
    assert layer.fc1.weight.grad is not None
