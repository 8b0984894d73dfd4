from pathlib import Path

import pandas as pd
import pytest
import torch

from moekit import config
from moekit.cli import main
from moekit.data.replicas.idrid import make_idrid_replica
from moekit.moe import MoEModules
from moekit.registry import MODELS, import_builtins
from moekit.types import tasks_from_config

import_builtins()
CONFIGS = sorted(Path("configs/idrid").glob("[!_]*.yaml"))
DEMO = config.load("configs/idrid/demo.yaml")
TASKS = tasks_from_config(DEMO)


def small_model(**overrides):
    torch.manual_seed(0)
    cfg = {**DEMO["model"], "backbone": {"name": "resnet18"}, **overrides}
    return MODELS.build(cfg, tasks=TASKS)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_idrid_config_resolves_and_builds_its_model(path):
    cfg = config.load(path)
    tasks = tasks_from_config(cfg)
    model = MODELS.build(cfg["model"], tasks=tasks)
    heads = {name: type(head) for name, head in model.heads.items()}
    assert set(heads) == set(tasks) and set(heads.values()) == {MoEModules}
    experts = {len(head.experts) for head in model.heads.values()}
    assert experts == {cfg["model"]["num_experts"]}


def test_outputs_and_only_labelled_heads_run():
    model = small_model().eval()
    images = torch.randn(3, 3, 64, 96)
    grading = torch.tensor([True, True, False])
    mask = {t: grading if t in ("rg", "mer") else ~grading for t in TASKS}
    out = model(images, mask)
    assert out.preds["rg"].shape == (3, 5) and out.preds["mer"].shape == (3, 3)
    assert out.preds["OD"].shape == (3, 1, 64, 96)
    assert torch.count_nonzero(out.preds["rg"][2]) == 0
    assert torch.count_nonzero(out.preds["OD"][:2]) == 0
    assert [r.layer for r in out.routing] == [f"heads.{t}" for t in TASKS]
    assert [r.routing.index.shape[0] for r in out.routing] == [2, 2, 1, 1, 1, 1, 1]
    full = model(images)
    torch.testing.assert_close(full.preds["rg"][:2], out.preds["rg"][:2])
    torch.testing.assert_close(full.preds["OD"][2], out.preds["OD"][2])


def test_sigmoid_dense_phase_weights_are_normalised_scores():
    model = small_model().eval()
    out = model(torch.randn(2, 3, 64, 96))
    routing = out.routing[0].routing
    scores = torch.sigmoid(routing.logits)
    torch.testing.assert_close(routing.probs, scores)
    torch.testing.assert_close(routing.dense_weight(), scores / scores.sum(1, keepdim=True))


def test_top_p_phase_skips_unselected_experts(monkeypatch):
    from moekit.moe import set_routing

    model = small_model().eval()
    set_routing(model, {"type": "top_p", "p": 0.8, "score": "sigmoid", "renormalize": True})
    calls = {i: 0 for i in range(3)}
    for i, expert in enumerate(model.heads["rg"].experts):
        expert.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    with torch.no_grad():  # pooled ReLU features are >= 0: expert 0 scores ~1, the others ~0
        model.heads["rg"].router.gate.weight.copy_(
            torch.tensor([1.0, -1.0, -1.0]).expand_as(model.heads["rg"].router.gate.weight)
        )
    out = model(torch.randn(2, 3, 64, 96))
    record = out.routing[0]
    assert record.routing.num_selected().tolist() == [1, 1]
    assert calls == {0: 1, 1: 0, 2: 0}


@pytest.mark.slow
def test_demo_end_to_end_on_a_small_replica(tmp_path, capsys):
    data = tmp_path / "replica"
    make_idrid_replica(data, 16, 6, 8, 4, size=(192, 128), seed=0)
    run = tmp_path / "run"
    overrides = [f"data.{s}.image_size=[64, 96]" for s in ("train", "val", "test")]
    code = main(
        ["demo", "--data", str(data), "--run-dir", str(run), "--set", "train.epochs=2", *overrides]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| model" in printed and "OD" in printed and "mean_selected" in printed
    results = pd.read_csv(run / "results.csv")
    assert {"rg acc", "mer acc", "OD IoU", "OD Dice", "OD Dice per image"} <= set(results.columns)
    assert (run / "results.md").read_text().startswith("| model")
    selected = pd.read_csv(run / "usage" / "selected.csv")
    assert set(selected["layer"]) == {f"heads.{t}" for t in TASKS}
    assert (run / "figures" / "predictions_test.png").stat().st_size > 10_000
