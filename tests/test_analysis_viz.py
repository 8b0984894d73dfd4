"""Figures: moekit viz on a trained run, heatmaps of single-gate layers, pruning curves."""

import pandas as pd
import pytest
import torch
from analysis_run import trained_run

from moekit.analysis import figures
from moekit.analysis.figures import plot_pruning_curve, plot_usage_heatmaps
from moekit.analysis.predictions import dense_map, display_image
from moekit.analysis.usage import ExpertUsage
from moekit.cli import main
from moekit.engine import curves
from moekit.routing.types import Routing, RoutingRecord
from moekit.types import Task


def test_viz_writes_every_figure(tmp_path_factory, capsys):
    run = trained_run(tmp_path_factory)
    assert main(["viz", str(run), "--images", "3"]) == 0
    printed = capsys.readouterr().out
    figures = run / "figures"
    for name in (
        "usage_moe.png",
        "task_relation.png",
        "experts_selected.png",
        "predictions.png",
        "loss.png",
        "seg_dice.png",
    ):
        assert (figures / name).is_file(), name
        assert str(figures / name) in printed
    assert (run / "usage" / "usage.safetensors").is_file()


def test_single_gate_layers_share_one_heatmap(tmp_path):
    usage = ExpertUsage(["rg", "ma"])
    for layer in ("heads.rg", "heads.ma"):
        index = torch.tensor([[0], [2], [2]])
        probs = torch.full((3, 3), 1 / 3)
        routing = Routing(probs, probs.log(), index, torch.ones(3, 1))
        usage.update([RoutingRecord(layer, routing)])
    written = plot_usage_heatmaps(usage, tmp_path)
    assert [p.name for p in written] == ["usage_single_gate_layers.png"]


@pytest.fixture
def axis_labels(monkeypatch):
    """The y labels and titles figures set (recorded from matplotlib's Axes)."""
    from matplotlib.axes import Axes

    seen = {"ylabel": [], "title": []}
    for name in seen:
        setter = getattr(Axes, f"set_{name}")

        def record(self, text, *args, _setter=setter, _name=name, **kwargs):
            seen[_name].append(str(text))
            return _setter(self, text, *args, **kwargs)

        monkeypatch.setattr(Axes, f"set_{name}", record)
    return seen


def test_one_agg_setup_and_labelled_training_curves(tmp_path, axis_labels):
    assert figures.pyplot is curves.pyplot
    metrics = tmp_path / "metrics.csv"
    metrics.write_text(
        "epoch,split,loss,seg/dice,lr/default\n1,train,2.0,0.1,0.1\n2,val,1.5,0.3,\n"
    )
    written = curves.plot_curves(metrics, tmp_path)
    assert [p.name for p in written] == ["loss.png", "seg_dice.png", "lr.png"]
    assert axis_labels["ylabel"] == ["loss", "dice", "learning rate"]


@pytest.mark.parametrize(
    "metric,higher,text",
    [("test/seg/dice", True, "higher is better"), ("test/seg/loss", None, "lower is better")],
)
def test_pruning_curve_says_which_way_is_better(tmp_path, axis_labels, metric, higher, text):
    frame = pd.DataFrame(
        {
            "task": "seg",
            "metric": metric,
            "params_before": 1000,
            "metric_before": 0.9,
            "threshold": [0.0],
            "keep_top": [None],
            "params_after": [800],
            "metric_after": [0.9],
        }
    )
    if higher is not None:
        frame["higher_is_better"] = higher
    plot_pruning_curve(frame, tmp_path / "curve.png")
    assert text in axis_labels["ylabel"][-1] and text in axis_labels["title"][-1]


def test_pruning_curve(tmp_path):
    frame = pd.DataFrame(
        {
            "task": "seg",
            "metric": "test/seg/dice",
            "params_before": 1000,
            "metric_before": 0.9,
            "threshold": [0.0, 0.5, None],
            "keep_top": [None, None, 0.5],
            "params_after": [800, 500, 600],
            "metric_after": [0.9, 0.7, 0.8],
        }
    )
    assert plot_pruning_curve(frame, tmp_path / "curve.png").stat().st_size > 10_000


def test_display_and_label_maps():
    image = display_image(torch.zeros(3, 4, 4))  # ImageNet-normalised zeros -> the mean colour
    assert image.shape == (4, 4, 3) and abs(image[0, 0, 0] - 0.485) < 1e-6
    assert display_image(torch.rand(1, 4, 4)).shape == (4, 4, 3)
    seg = Task("s", "segmentation", 1, (), ())
    logits = torch.tensor([[[-1.0, 2.0]]])
    assert dense_map(seg, logits, is_target=False).tolist() == [[0, 1]]
    semseg = Task("m", "segmentation", 3, (), ())
    assert dense_map(semseg, torch.tensor([[0, 2]]), is_target=True).tolist() == [[0, 2]]


@pytest.mark.parametrize(
    "key, name",
    [
        ("val/seg/dice", "val_seg_dice.png"),
        ("Δt (%)", "delta_t_pct.png"),
        ("params θ=1% (M)", "params_theta_1pct_M.png"),
        ("I(T;E)", "I_T_E.png"),
    ],
)
def test_figure_names_spell_out_symbols(key, name):
    from moekit.engine.curves import figure_name

    assert figure_name(key) == name
