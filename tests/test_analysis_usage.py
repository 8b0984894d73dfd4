"""Expert usage: counts against a plain loop over records, shares, the task relation, files."""

import pytest
import torch
from analysis_run import trained_run

from moekit.analysis.usage import ExpertUsage, collect_usage, pair_overlap, task_relation
from moekit.cli import main
from moekit.engine import load_model
from moekit.errors import DataError
from moekit.routing.types import Routing, RoutingRecord


def record(index, weight, task_ids=None, valid=None, layer="moe", num_experts=4):
    index, weight = torch.tensor(index), torch.tensor(weight, dtype=torch.float32)
    probs = torch.full((index.shape[0], num_experts), 1.0 / num_experts)
    routing = Routing(probs=probs, logits=probs.log(), index=index, weight=weight)
    ids = None if task_ids is None else torch.tensor(task_ids)
    return RoutingRecord(layer, routing, task_ids=ids, valid=valid)


def random_records(seed, num_tasks=3, num_experts=5, tokens=12, slots=3):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(num_experts, generator=g)[:slots] for _ in range(tokens)])
    index[torch.rand(tokens, slots, generator=g) < 0.3] = -1  # top-p style empty slots
    weight = torch.where(index >= 0, torch.rand(tokens, slots, generator=g), 0.0)
    task_ids = torch.randint(num_tasks, (tokens,), generator=g)
    return record(index.tolist(), weight.tolist(), task_ids.tolist(), num_experts=num_experts)


def test_counts_weights_and_histogram_match_a_plain_loop():
    records = [random_records(seed) for seed in range(4)]
    usage = ExpertUsage(["a", "b", "c"])
    for r in records:
        usage.update([r])
    count = torch.zeros(3, 5, dtype=torch.float64)
    weight = torch.zeros(3, 5, dtype=torch.float64)
    hist = torch.zeros(6, dtype=torch.float64)
    for r in records:
        for i, t in enumerate(r.task_ids.tolist()):
            chosen = {e for e in r.routing.index[i].tolist() if e >= 0}
            hist[len(chosen)] += 1
            for e, w in zip(r.routing.index[i].tolist(), r.routing.weight[i].tolist()):
                if e >= 0:
                    count[t, e] += 1
                    weight[t, e] += w
    layer = usage.layers["moe"]
    torch.testing.assert_close(layer.count, count)
    torch.testing.assert_close(layer.weight, weight)
    torch.testing.assert_close(layer.num_selected, hist)
    shares = layer.share[count.sum(dim=1) > 0].sum(dim=1)
    torch.testing.assert_close(shares, torch.ones_like(shares))
    assert layer.mean_selected() == pytest.approx(float((hist * torch.arange(6)).sum() / 48))


def test_selected_table_of_layers_with_different_expert_counts_has_no_nan(tmp_path):
    usage = ExpertUsage(["a", "b", "c"])
    for seed, (name, experts) in enumerate([("wide", 6), ("moe", 4)]):
        r = random_records(seed, num_experts=experts)
        r.layer = name
        usage.update([r])
    usage.update([record([[0, 1]], [[0.5, 0.5]], layer="small", num_experts=2)])
    frame = usage.selected_frame()
    columns = [c for c in frame.columns if c.startswith("k=")]
    assert columns == [f"k={k}" for k in range(7)]  # up to the widest layer's 6 experts
    assert not frame.isna()[columns].any().any()
    assert all(frame[c].dtype.kind == "i" for c in columns)
    small = frame.set_index("layer").loc["small"]
    assert small["k=2"] == 1 and small[[f"k={k}" for k in range(3, 7)]].sum() == 0
    usage.save(tmp_path)
    assert "nan" not in (tmp_path / "selected.csv").read_text().lower()


def test_invalid_tokens_are_not_counted_and_taskless_layers_have_one_row():
    valid = torch.tensor([True, False])
    usage = ExpertUsage(["a", "b"])
    usage.update([record([[0, 1], [2, 3]], [[0.5, 0.5], [0.5, 0.5]], valid=valid)])
    layer = usage.layers["moe"]
    assert layer.count.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    assert usage.task_names_of("moe") == ["all"]


def test_task_relation_is_symmetric_with_unit_diagonal():
    # 2 tasks x 3 tokens, task-major; token 0: same experts, token 1: half shared, token 2: none
    index = [[0, 1], [0, 1], [0, 1], [0, 1], [0, 2], [2, 3]]
    rec = record(index, [[0.5, 0.5]] * 6, task_ids=[0, 0, 0, 1, 1, 1])
    relation = task_relation([rec], 2)
    torch.testing.assert_close(relation, relation.T)
    torch.testing.assert_close(relation.diagonal(), torch.ones(2, dtype=torch.float64))
    assert relation[0, 1].item() == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_task_relation_needs_task_major_all_task_records():
    mixed = record([[0, 1], [2, 3]], [[0.5, 0.5]] * 2, task_ids=[1, 0])
    assert pair_overlap(mixed, 2) is None
    with pytest.raises(DataError, match="several tasks"):
        task_relation([mixed], 2)


def test_save_load_round_trip(tmp_path):
    usage = ExpertUsage(["a, with comma", "b", "c"], info={"split": "val"})
    usage.update([random_records(0)])
    usage.save(tmp_path)
    loaded = ExpertUsage.load(tmp_path)
    assert loaded.tasks == usage.tasks and loaded.info == {"split": "val"}
    for key in ("count", "weight", "tokens", "num_selected", "overlap", "pairs"):
        torch.testing.assert_close(
            getattr(loaded.layers["moe"], key), getattr(usage.layers["moe"], key)
        )
    frame = usage.to_frame()
    assert list(frame.columns[:5]) == ["layer", "task", "expert", "count", "weight"]
    assert (tmp_path / "usage.csv").is_file() and (tmp_path / "selected.csv").is_file()
    with pytest.raises(DataError, match="moekit usage"):
        ExpertUsage.load(tmp_path / "missing")


def test_collect_usage_and_usage_command_on_a_trained_run(tmp_path_factory, capsys):
    run = trained_run(tmp_path_factory)
    model, cfg, tasks = load_model(run)
    from moekit.analysis.runs import split_loader

    usage = collect_usage(model, split_loader(cfg, "val"), list(tasks))
    layer = usage.layers["moe"]
    assert layer.tokens.tolist() == [16.0, 16.0]  # every image runs every task
    assert layer.count.sum().item() == 2 * 16 * 2  # top-2
    relation = usage.task_relation()
    torch.testing.assert_close(relation.diagonal(), torch.ones(2, dtype=torch.float64))
    capsys.readouterr()
    assert main(["usage", str(run), "--split", "val"]) == 0
    assert "mean_selected" in capsys.readouterr().out
    saved = ExpertUsage.load(run / "usage")
    torch.testing.assert_close(saved.layers["moe"].count, layer.count)
    assert saved.info == {"split": "val", "checkpoint": "best"}
