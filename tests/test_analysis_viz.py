"""Figures: moekit viz on a trained run, heatmaps of single-gate layers, pruning curves."""

import numpy as np
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


def _captured_axes(monkeypatch):
    """The lines of every axes of every figure the curves draw (recorded before saving)."""
    drawn: dict[str, list[list]] = {}
    save = curves._save

    def record(fig, path):
        drawn[path.name] = [ax.get_lines() and list(ax.get_lines()) for ax in fig.axes]
        return save(fig, path)

    monkeypatch.setattr(curves, "_save", record)
    return drawn


def test_curves_keep_a_handful_of_lines_per_plot(tmp_path, monkeypatch):
    drawn = _captured_axes(monkeypatch)
    classes = [f"class{c}" for c in range(21)]
    rows = []
    for epoch in (1, 2, 3):
        for split in ("train", "val"):
            row = {"epoch": epoch, "split": split, "loss": 1.0 / epoch, "semseg/miou": 0.3}
            row["semseg/miou/per_image"] = 0.25
            row |= {f"semseg/miou/{c}": 0.01 * i for i, c in enumerate(classes)}
            row |= {f"semseg/miou/per_image/{c}": 0.02 * i for i, c in enumerate(classes)}
            rows.append(row)
    metrics = tmp_path / "metrics.csv"
    pd.DataFrame(rows).to_csv(metrics, index=False)
    written = [p.name for p in curves.plot_curves(metrics, tmp_path)]
    assert written == ["loss.png", "semseg_miou.png", "semseg_miou_per_class.png"]
    assert all(len(lines) <= 2 * curves.MAX_SERIES for axes in drawn.values() for lines in axes)
    main = drawn["semseg_miou.png"][0]
    assert len(main) == 4  # the mean and per image, train and val
    by_label = {line.get_label(): line for line in main}
    assert by_label["miou (train)"].get_color() == by_label["miou (val)"].get_color()
    assert by_label["miou (train)"].get_linestyle() != by_label["miou (val)"].get_linestyle()
    panels = [lines for lines in drawn["semseg_miou_per_class.png"] if lines]
    assert len(panels) == len(classes) and all(len(lines) == 2 for lines in panels)


@pytest.mark.parametrize(
    "values, unit, low, high",
    [
        ([0.5625, 0.5630], True, 0.50775, 0.61775),  # noise in the 4th decimal stays flat
        ([0.99, 1.0], True, 0.895, 1.005),  # widened to 0.1, kept inside [0, 1], 5% margin
        ([0.0, 0.0], True, -0.005, 0.105),
        ([2.0, 5.0], False, 1.85, 5.15),  # a real change keeps its own range
        ([0.01, 0.01], False, 0.00945, 0.01055),  # a constant learning rate: a tenth of it
    ],
)
def test_y_limits_have_a_minimum_span(values, unit, low, high):
    assert curves.y_limits(np.array(values), unit) == pytest.approx((low, high), abs=1e-9)
    assert curves.y_limits(np.array([np.nan]), unit) is None


def test_a_chart_marks_the_best_bar_only_when_it_is_clear_of_the_others():
    from moekit.sweep.results import separated_best

    frame = pd.DataFrame(
        {
            "variant": ["a", "b", "c"],
            "acc": [0.50, 0.70, 0.60],
            "acc std": [0.02, 0.03, 0.02],
        }
    )
    three = {"a": 3, "b": 3, "c": 3}
    assert separated_best(frame, "acc", True, three) == "b"
    assert separated_best(frame, "acc", False, three) == "a"
    assert separated_best(frame, "acc", True, {"a": 1, "b": 1, "c": 1}) is None  # one seed
    close = frame.assign(**{"acc std": [0.02, 0.09, 0.02]})  # 0.61 < 0.62: overlap
    assert separated_best(close, "acc", True, three) is None
    assert separated_best(frame, "acc", None, three) is None


def test_prediction_titles_say_right_wrong_or_unlabelled():
    from moekit.analysis.predictions import image_title

    grade = Task.from_config(
        "rg", {"kind": "multiclass", "num_classes": 3, "class_names": ["none", "mild", "severe"]}
    )
    logits = torch.tensor([0.1, 2.0, 0.3])
    assert image_title(grade, logits, torch.tensor(1)) == "rg: 1 mild ✓"
    assert image_title(grade, logits, torch.tensor(2)) == "rg: 1 mild ✗ (true 2 severe)"
    assert image_title(grade, logits, None) == "rg: 1 mild (no label)"
    age = Task.from_config("age", {"kind": "regression", "num_classes": 1})
    assert image_title(age, torch.tensor([0.61]), torch.tensor([0.58])) == "age: 0.61 (true 0.58)"
