"""Per-task extraction: layer surgery, expert choice, model extraction, the prune command."""

import copy
import json

import pytest
import torch
from analysis_run import trained_run
from torch import nn

from moekit.analysis.extraction import (
    check_rule,
    experts_to_keep,
    prune_model,
    pruned_config,
    usage_row,
)
from moekit.analysis.extraction_report import PAPER_THRESHOLDS, TaskExtraction
from moekit.analysis.runs import only_task
from moekit.analysis.usage import ExpertUsage, collect_usage
from moekit.cli import main
from moekit.data.multitask_shapes import multitask_shapes_tasks
from moekit.engine import load_model
from moekit.errors import ConfigError
from moekit.moe import MoEAttention, MoEMLP, MoEModules
from moekit.registry import MODELS, import_builtins
from moekit.routing.types import Routing, RoutingRecord
from moekit.types import Batch, tasks_from_config

import_builtins()


def selected_experts(layer, x, task_ids=None):
    _, record = layer(x, task_ids)
    return sorted({e for e in record.routing.index.flatten().tolist() if e >= 0})


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_keeping_the_selected_experts_reproduces_the_layer(kind):
    torch.manual_seed(0)
    router = {"type": "topk", "k": 2}
    layer = (
        MoEMLP(dim=8, hidden=12, num_experts=6, router=router, num_tasks=2)
        if kind == "mlp"
        else MoEAttention(dim=8, num_experts=6, head_dim=4, router=router, num_tasks=2)
    ).eval()
    x, task_ids = torch.randn(3, 5, 8), torch.tensor([1, 1, 1])
    with torch.no_grad():
        full, _ = layer(x, task_ids)
        used = selected_experts(layer, x, task_ids)
        layer.keep_task(1)
        layer.keep_experts(used)
        small, record = layer(x)
    torch.testing.assert_close(small, full, atol=1e-6, rtol=1e-6)
    assert layer.num_experts == len(used) and layer.expert_ids == used
    assert all(p.shape[0] == len(used) for p in layer.expert_parameters())
    assert layer.router.gate.weight.shape[0] == 1 and layer.router.num_experts == 6
    assert set(record.routing.index.flatten().tolist()) <= {-1, *used}  # router ids


def test_an_extracted_layer_selects_the_best_kept_experts_with_full_softmax_weights():
    torch.manual_seed(0)
    layer = MoEMLP(dim=8, hidden=8, num_experts=5, router={"type": "topk", "k": 2}).eval()
    x = torch.randn(40, 8)
    kept = [0, 1, 3]
    with torch.no_grad():
        probs = layer.router(x).probs
        assert (probs.topk(2).indices == 2).any()  # some tokens preferred a removed expert
        layer.keep_experts(kept)
        y, record = layer(x)
        expected = torch.zeros_like(y)
        for i in range(len(x)):
            best = sorted(kept, key=lambda e: -float(probs[i, e]))[:2]
            for e in best:  # the kept experts' full-softmax probabilities, not renormalized
                h = layer.act(layer.fc1.expert(kept.index(e), x[i]))
                expected[i] += probs[i, e] * layer.fc2.expert(kept.index(e), h)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(record.routing.probs, probs)  # scores over all 5 experts
    assert record.routing.num_selected().tolist() == [2] * len(x)
    assert set(record.routing.index.flatten().tolist()) <= set(kept)
    with pytest.raises(ValueError, match="already removed"):
        layer.keep_experts([2])
    with pytest.raises(ValueError, match=r"subset of 0\.\.4"):
        layer.keep_experts([5])


@pytest.mark.parametrize(
    "router",
    [
        {"type": "topk", "k": 3},
        {"type": "topk", "k": 3, "renormalize": True},
        {"type": "top_p", "p": 0.5},
        {"type": "top_p", "p": 0.5, "max_k": 3, "renormalize": True},
        {"type": "softmax"},
    ],
)
def test_every_rule_selects_among_the_kept_experts_only(router):
    torch.manual_seed(1)
    layer = MoEMLP(dim=8, hidden=8, num_experts=6, router=router).eval()
    x = torch.randn(30, 8)
    kept = [1, 2, 4, 5]
    with torch.no_grad():
        layer.keep_experts(kept)
        _, record = layer(x)
    routing = record.routing
    masked = routing.probs.masked_fill(~torch.isin(torch.arange(6), torch.tensor(kept)), 0.0)
    index, weight = layer.router.select(masked)  # the rule on the kept experts' scores
    weight = torch.where(index >= 0, weight, 0.0)
    assert set(routing.index.flatten().tolist()) <= {-1, *kept}
    assert (routing.num_selected() >= 1).all()
    torch.testing.assert_close(
        routing.dense_weight(), torch.zeros(30, 7).scatter_add_(1, index % 7, weight)[:, :6]
    )


def test_keep_top_with_reduce_k_gives_every_token_exactly_k_kept_experts():
    torch.manual_seed(0)
    cfg = {**VIT, "attention": {"num_experts": 10, "router": {"type": "topk", "k": 5}}}
    model = MODELS.build(cfg, tasks=tasks_from_config({"tasks": multitask_shapes_tasks()}))
    model.eval()
    images = [torch.randn(3, 3, 16, 16) for _ in range(2)]
    usage = collect_usage(model, [Batch(x, {}, {}) for x in images], list(multitask_shapes_tasks()))
    for reduce_k in (True, False):
        pruned, specs = prune_model(model, usage, "depth", keep_top=0.3, reduce_k=reduce_k)
        with torch.no_grad():
            records = pruned(images[0]).routing
        for record in records:
            spec = specs[record.layer]
            k = record.routing.index.shape[1]
            expected = min(len(spec["experts"]), layer_k(cfg, record.layer))
            assert k == (expected if reduce_k else layer_k(cfg, record.layer))
            assert record.routing.num_selected().tolist() == [expected] * len(record.routing.index)
            assert set(record.routing.index.flatten().tolist()) <= {-1, *spec["experts"]}
        if reduce_k:
            assert specs["blocks.0.attn"]["router"]["k"] == 3  # ceil(0.3 * 10) experts kept
            reduced = task_outputs(pruned, images, "depth")
    torch.testing.assert_close(task_outputs(pruned, images, "depth"), reduced)


def layer_k(cfg, layer):
    return cfg["attention" if layer.endswith("attn") else "mlp"]["router"]["k"]


def test_module_experts_keep_a_subset():
    torch.manual_seed(0)
    experts = [nn.Linear(4, 3) for _ in range(4)]
    layer = MoEModules(experts, router={"type": "topk", "k": 1}, dim=4).eval()
    x = torch.randn(5, 4)
    with torch.no_grad():
        full, _ = layer(x)
        used = selected_experts(layer, x)
        layer.keep_experts(used)
        torch.testing.assert_close(layer(x)[0], full)
        assert len(layer.experts) == len(used)
        layer.keep_experts(used[:1])  # every sample now selects the one expert left
        z = torch.randn(2, 4)
        out, record = layer(z)
    assert out.shape == (2, 3) and record.routing.index.flatten().tolist() == used[:1] * 2
    torch.testing.assert_close(out, record.routing.weight * layer.experts[0](z))


def test_expert_choice_rules():
    # 50 tokens, top-2: expert e was selected by count[e] of them (usage frequency count / 50)
    count, tokens = torch.tensor([50.0, 0.0, 30.0, 15.0, 5.0]), 50.0
    everyone = list(range(5))

    def theta(value):
        return experts_to_keep(count, everyone, threshold=value, tokens=tokens)

    assert theta(0.0) == [0, 2, 3, 4]  # the never-selected expert goes
    assert theta(0.1) == [0, 2, 3, 4]  # 5 / 50 = 10% of the tokens
    assert theta(0.2) == [0, 2, 3]
    assert theta(0.5) == [0, 2]  # used by at least half the tokens
    assert theta(0.9) == [0]  # used by (nearly) every token
    sets = {tuple(theta(t)) for t in PAPER_THRESHOLDS}
    assert len(sets) == 4  # the paper's 0.5 and 0.9 are different rules
    assert experts_to_keep(torch.tensor([0.0, 1.0]), [0, 1], threshold=1.0, tokens=5) == [1]
    assert experts_to_keep(count, everyone, keep_top=0.4) == [0, 2]
    assert experts_to_keep(count, everyone, keep_top=1.0) == everyone
    assert experts_to_keep(count, [1, 3, 4], keep_top=0.3) == [3]
    with pytest.raises(ConfigError, match="number of tokens"):
        experts_to_keep(count, everyone, threshold=0.1)
    with pytest.raises(ConfigError, match="exactly one"):
        check_rule(None, None)
    with pytest.raises(ConfigError, match=r"0\.4 = 40%"):
        check_rule(None, 40)


def test_thresholds_use_the_usage_frequency_of_the_profiling_tokens():
    usage = ExpertUsage(["a", "b"])
    # task b: 4 tokens, top-2: expert 0 used by all 4, expert 1 by 3, expert 2 by 1
    index = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 2], [3, 1]])
    probs = torch.full((5, 4), 0.25)
    routing = Routing(probs, probs.log(), index, torch.full((5, 2), 0.25))
    usage.update([RoutingRecord("moe", routing, task_ids=torch.tensor([1, 1, 1, 1, 0]))])
    count, tokens = usage_row(usage, "moe", "b")
    assert count.tolist() == [4.0, 3.0, 1.0, 0.0] and tokens == 4.0
    assert experts_to_keep(count, [0, 1, 2, 3], threshold=0.75, tokens=tokens) == [0, 1]
    assert experts_to_keep(count, [0, 1, 2, 3], threshold=0.0, tokens=tokens) == [0, 1, 2]


VIT = {
    "type": "modsquad_vit",
    "img_size": 16,
    "patch_size": 4,
    "dim": 16,
    "depth": 2,
    "num_heads": 2,
    "moe_attention_every": 1,
    "moe_mlp_every": 2,
    "attention": {"num_experts": 6, "router": {"type": "noisy_topk", "k": 2}},
    "mlp": {"num_experts": 8, "router": {"type": "topk", "k": 2}},
    "heads": {"semseg": "patch_decoder", "edge": "patch_decoder", "depth": "patch_decoder"},
}


@pytest.fixture(scope="module")
def vit():
    tasks_cfg = multitask_shapes_tasks()
    torch.manual_seed(0)
    model = MODELS.build(VIT, tasks=tasks_from_config({"tasks": tasks_cfg})).eval()
    images = [torch.randn(3, 3, 16, 16) for _ in range(2)]
    usage = collect_usage(model, [Batch(x, {}, {}) for x in images], list(tasks_cfg))
    return model, {"tasks": tasks_cfg, "model": VIT}, images, usage


def task_outputs(model, images, task, full_tasks=None):
    with torch.no_grad():
        outs = []
        for x in images:
            mask = None if full_tasks is None else only_task(full_tasks, task, len(x), "cpu")
            outs.append(model(x, task_mask=mask).preds[task])
    return torch.cat(outs)


def test_modsquad_extraction_at_theta_zero_reproduces_the_task(vit):
    model, cfg, images, usage = vit
    for task in ("shape", "depth"):
        pruned, specs = prune_model(model, usage, task, threshold=0.0)
        full = task_outputs(model, images, task, list(cfg["tasks"]))
        torch.testing.assert_close(task_outputs(pruned, images, task), full, atol=1e-5, rtol=0)
        assert list(pruned.heads) == [task] and pruned.task_embed.shape[0] == 1
        # the saved config rebuilds the same architecture
        new_cfg = pruned_config(cfg, task, specs)
        assert list(new_cfg["tasks"]) == [task]
        rebuilt = MODELS.build(new_cfg["model"], tasks=tasks_from_config(new_cfg))
        rebuilt = rebuilt.to("cpu").eval()  # Module.to works (no method shadows Module._apply)
        rebuilt.load_state_dict(pruned.state_dict())
        torch.testing.assert_close(task_outputs(rebuilt, images, task), full, atol=1e-5, rtol=0)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_modsquad_keep_top_and_reduce_k(vit):
    model, _, _, usage = vit
    theta0, _ = prune_model(model, usage, "edge", threshold=0.0)
    top, specs = prune_model(model, usage, "edge", keep_top=0.25)
    assert {len(s["experts"]) for s in specs.values()} == {2}  # ceil(0.25 * 6), ceil(0.25 * 8)
    count = sum(p.numel() for p in top.parameters())
    assert count < sum(p.numel() for p in theta0.parameters())
    _, reduced = prune_model(model, usage, "edge", keep_top=0.1, reduce_k=True)
    for spec in reduced.values():
        assert len(spec["experts"]) == 1 and spec["router"]["k"] == 1
    assert model.heads.keys() == set(multitask_shapes_tasks())  # the source is unchanged


def test_idrid_model_extraction_keeps_one_head():
    tasks_cfg = {
        "rg": {"kind": "multiclass", "num_classes": 3, "loss": ["cross_entropy"]},
        "ma": {"kind": "segmentation", "num_classes": 1, "loss": ["bce"]},
    }
    cfg = {
        "type": "mtl_cnn",
        "backbone": {"name": "resnet18"},
        "aspp": {"out_channels": 16},
        "seg_expert": {"channels": 16, "low_proj_channels": 8},
        "cls_expert": {"mid_channels": 16, "hidden": 16},
        "router": {"type": "topk", "k": 1},
    }
    torch.manual_seed(0)
    model = MODELS.build(cfg, tasks=tasks_from_config({"tasks": tasks_cfg})).eval()
    images = [torch.randn(4, 3, 32, 32)]
    usage = collect_usage(model, [Batch(images[0], {}, {})], list(tasks_cfg))
    for task in tasks_cfg:
        pruned, specs = prune_model(model, usage, task, threshold=0.0)
        assert list(pruned.heads) == [task] and list(specs) == [f"heads.{task}"]
        assert (pruned.aspp is None) == (task == "rg")
        full = task_outputs(model, images, task, list(tasks_cfg))
        torch.testing.assert_close(task_outputs(pruned, images, task), full, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def extraction(tmp_path_factory):
    return TaskExtraction(trained_run(tmp_path_factory), "seg", split="test", profile_split="val")


def test_prune_command_at_theta_zero(tmp_path_factory, tmp_path, capsys):
    run = trained_run(tmp_path_factory)
    capsys.readouterr()
    out = tmp_path / "cls"
    args = ["prune", str(run), "--task", "cls", "--threshold", "0", "--out", str(out), "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    for key in (
        "params_before",
        "params_after",
        "flops_before",
        "flops_after",
        "metric_before",
        "metric_after",
        "max_abs_diff",
        "out",
    ):
        assert key in report
    assert report["max_abs_diff"] < 1e-5
    assert report["params_after"] < report["params_before"]
    assert report["metric_after"] == pytest.approx(report["metric_before"])
    assert report["out"] == str(out) and (out / "prune.csv").is_file()
    _, cfg, tasks = load_model(out)
    assert list(tasks) == ["cls"] and cfg["model"]["type"] == "pruned"
    assert main(["eval", str(out), "--split", "val"]) == 0
    assert "val/cls/accuracy" in capsys.readouterr().out
    again = ["prune", str(run), "--task", "cls", "--threshold", "0", "--out", str(out)]
    assert main(again) == 2  # an existing --out is replaced only when asked
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*again, "--overwrite"]) == 0
    table = capsys.readouterr().out
    assert "parameters" in table and "max |output diff|" in table


def test_larger_threshold_keep_top_and_reduce_k_shrink_more(extraction, tmp_path):
    zero = extraction.extract(threshold=0.0, out=tmp_path / "zero")
    assert zero["max_abs_diff"] < 1e-5
    top = extraction.extract(keep_top=0.2, reduce_k=True, out=tmp_path / "top")
    assert top["layers"][0]["k_after"] == top["layers"][0]["experts_after"] == 2
    # pruning a pruned model again
    again = TaskExtraction(tmp_path / "top", "seg", split="test", profile_split="val")
    assert again.extract(threshold=0.0, out=tmp_path / "again")["max_abs_diff"] < 1e-5


def test_thresholds_on_a_known_usage(extraction, tmp_path):
    # seg's usage frequencies in the MoE block: 1.0, 0.75, 0.25 and three unused experts
    usage = copy.deepcopy(extraction.usage)
    stats = usage.layers["moe"]
    seg = usage.tasks.index("seg")
    stats.count[seg] = torch.tensor([16.0, 0.0, 12.0, 0.0, 4.0, 0.0])
    stats.tokens[seg] = 16.0
    usage.save(tmp_path / "usage")
    known = TaskExtraction(extraction.run.path, "seg", "test", "val", usage=tmp_path / "usage")
    reports = {t: known.extract(threshold=t, out=tmp_path / f"theta{t}") for t in (0, 0.5, 0.9)}
    assert {t: r["layers"][0]["kept"] for t, r in reports.items()} == {
        0: [0, 2, 4],
        0.5: [0, 2],
        0.9: [0],
    }
    params = [r["params_after"] for r in reports.values()]
    assert params[0] > params[1] > params[2]
    # k = 2: a token uses both kept experts at θ = 0.5, the one left at θ = 0.9
    assert reports[0.5]["active_params_after"] == reports[0.5]["active_params_before"]
    assert reports[0.9]["active_params_after"] < reports[0.9]["active_params_before"]


def test_sweep_draws_the_pruning_curve(extraction, tmp_path):
    frame, figure = extraction.sweep([0.0, 0.6], [0.5], out=tmp_path / "sweep")
    assert figure.is_file() and figure.stat().st_size > 10_000
    assert list(frame["rule"]) == ["theta0", "theta0.6", "top50"]
    assert (tmp_path / "sweep" / "sweep.csv").is_file()


def test_unknown_task_is_a_one_line_error(tmp_path_factory, capsys):
    run = trained_run(tmp_path_factory)
    capsys.readouterr()
    assert main(["prune", str(run), "--task", "sgm", "--threshold", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(run) in err and "did you mean 'seg'" in err
