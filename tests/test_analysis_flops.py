"""FLOPs: hand counts for a dense MLP, an MoE MLP at top-k and attention; FlopCounterMode."""

import json

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from moekit.analysis import flops as flops_module
from moekit.analysis.flops import (
    active_parameters,
    count_flops,
    count_parameters,
    flops_report,
    reference_macs,
    routing_records,
)
from moekit.analysis.runs import only_task, untrained_model
from moekit.cli import main
from moekit.data.multitask_shapes import multitask_shapes_tasks
from moekit.moe import MoEAttention, MoEMLP
from moekit.registry import MODELS, import_builtins
from moekit.types import ModelOutput, tasks_from_config

import_builtins()
TINY_CONFIG = "configs/tiny/two_task.yaml"


class Wrap(nn.Module):
    """A layer as a model: ``inputs -> ModelOutput(preds={'y': ...}, routing=[...])``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, inputs, task_mask=None):
        out = self.layer(inputs)
        if isinstance(out, tuple):
            return ModelOutput({"y": out[0]}, [out[1]])
        return ModelOutput({"y": out})


def test_dense_mlp_hand_count():
    tokens, dim, hidden = 2 * 10, 16, 64
    model, x = Wrap(Mlp(dim, hidden)), torch.randn(2, 10, dim)
    expected = tokens * (dim * hidden + hidden * dim)
    assert count_flops(model, x).total == expected
    assert reference_macs(model, x) == expected


@pytest.mark.parametrize("dim,hidden", [(16, 24), (18, 10)])  # grouped_mm, loop (unaligned)
def test_moe_mlp_hand_count_counts_only_the_selected_experts(dim, hidden):
    torch.manual_seed(0)
    experts, k, tokens = 6, 2, 2 * 12
    layer = MoEMLP(dim=dim, hidden=hidden, num_experts=experts, router={"type": "topk", "k": k})
    x = torch.randn(2, 12, dim)
    count = count_flops(Wrap(layer), x)
    router = tokens * dim * experts
    expected = tokens * k * (dim * hidden + hidden * dim) + router
    assert count.total == expected
    assert reference_macs(Wrap(layer), x) == expected  # per-expert mm, torch's formulas
    assert not count.unknown_ops
    expected_op = (
        "_grouped_mm" if dim % 4 == 0 and hidden % 4 == 0 else "PythonOp._LoopGroupedLinear"
    )
    assert expected_op in count.per_operator


class Attention(nn.Module):
    """SDPA of ``q [B, h, L, d]`` against ``k, v [B, h, S, d]``, all expanded from the input."""

    def __init__(self, heads: int, length: int, source: int, d: int) -> None:
        super().__init__()
        self.shape = (heads, length, source, d)

    def forward(self, x):
        heads, length, source, d = self.shape
        q = x.view(-1, 1, 1, 1).expand(-1, heads, length, d)
        kv = x.view(-1, 1, 1, 1).expand(-1, heads, source, d)
        return F.scaled_dot_product_attention(q, kv, kv)


def test_attention_hand_count():
    batch, heads, length, source, d = 2, 3, 7, 5, 8
    model, x = Wrap(Attention(heads, length, source, d)), torch.randn(batch)
    expected = batch * heads * length * source * (d + d)
    assert count_flops(model, x).total == expected
    assert reference_macs(model, x) == expected  # the math backend's two bmm


def test_moe_attention_counts_selected_heads_only():
    torch.manual_seed(0)
    batch, length, dim, experts, k, head = 2, 6, 16, 5, 2, 8
    layer = MoEAttention(dim, experts, head, router={"type": "topk", "k": k}).eval()
    x = torch.randn(batch, length, dim)
    count = count_flops(Wrap(layer), x)
    tokens, pairs = batch * length, batch * length * k
    attention = batch * (length * k) * length * (head + head)  # every sample has L*k pairs
    expected = tokens * dim * experts + tokens * dim * 2 * head + 2 * pairs * dim * head
    assert count.total == expected + attention
    assert reference_macs(Wrap(layer), x) == expected + attention


VIT = {
    "type": "modsquad_vit",
    "img_size": 16,
    "patch_size": 4,
    "dim": 16,
    "depth": 2,
    "num_heads": 2,
    "moe_attention_every": 1,
    "moe_mlp_every": 1,
    "attention": {"num_experts": 5, "router": {"type": "topk", "k": 2}},
    "mlp": {"num_experts": 6, "hidden": 12, "router": {"type": "topk", "k": 2}},
}


def small_vit(hidden=12):
    """Experts of hidden size 12 run ``_grouped_mm`` under fvcore; 10 (unaligned) the loop."""
    torch.manual_seed(0)
    cfg = {**VIT, "mlp": {**VIT["mlp"], "hidden": hidden}}
    return MODELS.build(cfg, tasks=tasks_from_config({"tasks": multitask_shapes_tasks()}))


def test_flop_counter_mode_agrees_on_a_modsquad_vit():
    model, x = small_vit(), torch.randn(2, 3, 16, 16)
    count = count_flops(model, x)
    assert count.matmul_total == reference_macs(model, x)
    assert count.total > count.matmul_total  # norms and upsampling are counted by fvcore too
    assert {"blocks.0.attn", "blocks.1.mlp", "heads.depth"} <= set(count.per_module)
    assert model.training  # the mode is restored


@pytest.mark.parametrize("handle", ["sdpa_flops", "grouped_mm_flops", "loop_linear_flops"])
def test_the_cross_check_catches_a_wrong_handle(monkeypatch, handle):
    """The reference shares no formula with the handles: halving one shows as a mismatch."""
    model, x = small_vit(10 if handle == "loop_linear_flops" else 12), torch.randn(2, 3, 16, 16)
    right = count_flops(model, x)
    assert handle != "grouped_mm_flops" or "_grouped_mm" in right.per_operator
    assert handle != "loop_linear_flops" or "PythonOp._LoopGroupedLinear" in right.per_operator
    right = right.matmul_total
    wrong = getattr(flops_module, handle)
    monkeypatch.setattr(flops_module, handle, lambda i, o: wrong(i, o) // 2)
    assert count_flops(model, x).matmul_total < right == reference_macs(model, x)


def test_active_parameters_use_the_mean_selected_experts():
    torch.manual_seed(0)
    layer = MoEMLP(dim=8, hidden=8, num_experts=4, router={"type": "topk", "k": 2})
    model = Wrap(layer)
    x = torch.randn(3, 8)
    per_expert = (8 * 8 + 8) * 2
    expected = count_parameters(model) - 4 * per_expert + 2 * per_expert
    assert active_parameters(model, routing_records(model, x)) == expected


def test_per_task_counts_only_that_tasks_head_and_gate_row():
    overrides = ["+model.moe={num_experts: 4, router: {type: topk, k: 2}}"]
    model, _, tasks = untrained_model(TINY_CONFIG, overrides)
    x, batch = torch.randn(2, 3, 32, 32), 2
    report = flops_report(model, x, list(tasks), per_task=True)
    num_tasks, dim, experts = model.moe.router.gate.weight.shape
    for task, other in (("cls", "seg"), ("seg", "cls")):
        alone = report["per_task"][task]
        mask = only_task(list(tasks), task, batch, "cpu")
        masked = count_flops(model, x, mask)  # the other head masked out, but all T gates run
        assert masked.per_module["moe.router.gate"] == batch * dim * num_tasks * experts
        assert alone["flops"] == masked.total - (num_tasks - 1) * batch * dim * experts
        assert alone["params"] == (
            count_parameters(model) - count_parameters(model.heads[other]) - dim * experts
        )
        full_active = active_parameters(model, routing_records(model, x, mask))
        assert alone["active_params"] == (
            full_active - count_parameters(model.heads[other]) - dim * experts
        )
        assert alone["counted"] == "this task's head and gate rows"
    assert report["per_task"]["cls"]["params"] != report["per_task"]["seg"]["params"]
    assert model.heads.keys() == {"cls", "seg"}  # counted on a copy


def test_flops_command_json_on_a_config(capsys):
    overrides = ["+model.moe={num_experts: 4, router: {type: topk, k: 2}}"]
    args = ["flops", TINY_CONFIG, "--input-size", "32", "32", "--per-task", "--json", "--set"]
    assert main([*args, *overrides]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"params", "flops", "per_module", "per_task", "unit"} <= set(report)
    assert isinstance(report["params"], int) and isinstance(report["flops"], int)
    assert set(report["per_task"]) == {"cls", "seg"}
    assert report["per_module"]["moe"]["flops"] > 0
    assert report["input_shape"] == [1, 3, 32, 32]
    assert main(["flops", TINY_CONFIG, "--batch", "2", "--check", "--per-task"]) == 0
    out = capsys.readouterr().out
    assert "multiply-adds" in out and "FlopCounterMode" in out
