"""The IDRiD results table, prediction overlays, the demo's checks and the shipped configs."""

import argparse
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from moekit import config
from moekit.analysis.predictions import TASK_COLOURS, balanced_picks, image_label, task_colours
from moekit.commands.demo import check_config, replica_state
from moekit.config import SHIPPED_CONFIGS, shipped_path
from moekit.data.idrid import LAYOUT
from moekit.errors import ConfigError, DataError
from moekit.projects.idrid.table import (
    REFERENCE_SOURCE,
    majority_row,
    markdown,
    reference_rows,
    result_row,
    table1,
    write_results,
)
from moekit.types import Task, tasks_from_config

IDRID = SHIPPED_CONFIGS / "idrid"
TASKS = tasks_from_config(config.load(IDRID / "demo.yaml"))


def metrics(split="test", **values):
    return {f"{split}/{k}": v for k, v in values.items()}


def test_table1_keeps_one_decimal_and_dashes_for_missing_tasks():
    cls_only = {k: TASKS[k] for k in ("rg", "mer")}
    rows = [
        result_row(
            "mtl",
            metrics(**{"rg/accuracy": 0.5, "mer/accuracy": 0.45, "OD/iou": 0.8, "OD/dice": 0.889}),
            TASKS,
            "test",
            "run a",
        ),
        result_row("cls", metrics(**{"rg/accuracy": 0.6, "mer/accuracy": 0.7}), cls_only, "test"),
    ]
    table = table1(rows, TASKS)
    assert table.loc[0, "mer"] == "45.0" and table.loc[0, "OD"] == "0.80/0.89"
    assert table.loc[1, "OD"] == "-" and table.loc[1, "rg"] == "60.0"
    text = markdown(table)
    assert "| 45.0 " in text and "| 45 " not in text  # tabulate must not re-parse the cells
    assert "| - " in text


def test_reference_rows_are_labelled_and_match_reference_md():
    rows = reference_rows()
    assert (
        {r["source"] for r in rows}
        == {REFERENCE_SOURCE}
        == {"reported by the IDRiD paper, real IDRiD"}
    )
    table = table1(rows, TASKS).set_index("model")
    assert table.loc["ResNet-50 (single-task)", "rg"] == "54.3"
    assert table.loc["ResNet-50 (single-task)", "OD"] == "-"
    assert table.loc["DeepLabV3+ (single-task)", "EX"] == "0.16/0.27"
    assert table.loc["Multi-Task MoE", "mer"] == "78.6"
    assert table.loc["Multi-Task MoE", "MA"] == "0.20/0.34"


def test_majority_row_is_the_share_of_the_most_frequent_class():
    row = majority_row({"rg": [0, 2, 2, 4], "mer": [1, 1, 1, 0, 2]}, "test")
    assert row["rg acc"] == 50.0 and row["mer acc"] == 60.0
    assert math.isnan(majority_row({"rg": []}, "test")["rg acc"])


def test_write_results_into_a_chosen_folder(tmp_path):
    rows = [
        result_row("a", metrics(**{"rg/accuracy": 0.25}), TASKS, "test", "x"),
        *reference_rows(),
    ]
    write_results(tmp_path / "out", rows, TASKS, ["a note"])
    text = (tmp_path / "out" / "results.md").read_text()
    assert text.startswith("| model") and text.rstrip().endswith("a note")
    frame = pd.read_csv(tmp_path / "out" / "results.csv")
    assert len(frame) == 4 and list(frame["source"])[1:] == [REFERENCE_SOURCE] * 3


class Sourced:
    def __init__(self, sources):
        self.sources = sources

    def __len__(self):
        return len(self.sources)


def test_balanced_picks_take_every_source_in_turn():
    ds = Sourced(["grading"] * 40 + ["segmentation"] * 20)  # grading first, as in IdridDataset
    picks = balanced_picks(ds, 4)
    assert [ds.sources[i] for i in picks] == ["grading", "segmentation"] * 2
    assert picks[0] == 0 and picks[2] == 39  # spread over each source
    few = Sourced(["grading"] * 10 + ["segmentation"])
    assert sorted(ds_source for ds_source in (few.sources[i] for i in balanced_picks(few, 4))) == [
        "grading",
        "grading",
        "grading",
        "segmentation",
    ]
    assert balanced_picks(Sourced(["a"] * 9), 3) == [0, 4, 8]
    assert len(set(balanced_picks(few, 11))) == 11


def test_every_lesion_has_its_own_colour_and_grades_their_names():
    colours = task_colours(TASKS)
    assert list(colours) == ["MA", "HE", "EX", "SE", "OD"]
    assert len(set(colours.values())) == 5
    assert all(c[:2] != (1.0, 0.9) for c in TASK_COLOURS)  # no yellow: EX is painted yellow
    rg = TASKS["rg"]
    assert image_label(rg, torch.tensor(2), True) == "2 moderate"
    assert image_label(rg, torch.tensor([0.0, 0.1, 0.0, 3.0, 0.0]), False) == "3 severe"
    plain = Task.from_config("x", {"kind": "multiclass", "num_classes": 3})
    assert image_label(plain, torch.tensor(1), True) == "1"


def test_demo_refuses_a_partial_replica(tmp_path):
    assert replica_state(tmp_path / "none") == "absent"
    (tmp_path / LAYOUT.grading).mkdir()
    with pytest.raises(DataError, match=r"but not .A\. Segmentation."):
        replica_state(tmp_path)
    (tmp_path / LAYOUT.segmentation).mkdir()
    assert replica_state(tmp_path) == "complete"


def test_demo_checks_its_config_before_writing_the_replica(tmp_path, monkeypatch):
    from moekit.commands import demo

    data = tmp_path / "replica"
    monkeypatch.chdir(tmp_path)  # the default config path resolves to the checkout
    bad_overrides = {
        "+train.epoch=3": "train.epoch",
        "+model.num_expert=2": "num_expert",
        "+eval.threshold=2": "eval.threshold",
        "model.router.type=top_q": "top_q",
    }
    for override, named in bad_overrides.items():
        args = argparse.Namespace(
            config=demo.DEMO_CONFIG, data=str(data), run_dir=None, overrides=[override]
        )
        with pytest.raises(ConfigError, match=named):
            demo.run(args)
        assert not data.exists()  # nothing written
    check_config(config.load(IDRID / "demo.yaml"))


def test_default_config_paths_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shipped_path("configs/idrid/demo.yaml") == IDRID / "demo.yaml"
    assert shipped_path("configs/idrid/nope.yaml") == Path("configs/idrid/nope.yaml")
    (tmp_path / "configs" / "idrid").mkdir(parents=True)
    (tmp_path / "configs" / "idrid" / "demo.yaml").write_text("x: 1\n")
    assert shipped_path("configs/idrid/demo.yaml") == Path("configs/idrid/demo.yaml")  # local wins


def test_seed_config_lists_every_gate_term_with_its_weight():
    cfg = config.load(IDRID / "mtl_r50_topp.yaml")
    weights = {term["type"]: term["weight"] for term in cfg["aux_losses"]}
    assert weights == {
        "gate_l1": 1.0,
        "usage_entropy": 1.0,
        "routing_entropy": 0.0,
        "kl_uniform": 0.0,
    }
    assert cfg["model"]["aspp"]["dropout"] == 0.0
    assert cfg["model"]["router"]["bias"] is True
    text = (IDRID / "mtl_r50_topp.yaml").read_text()
    assert "routing_entropy -1.0" in text and "paper" in text and "code" in text


def test_baselines_use_the_seed_image_sizes():
    for name, size in (("single_task_cls", [178, 268]), ("single_task_seg", [1424, 2144])):
        cfg = config.load(IDRID / f"{name}.yaml")
        assert {tuple(cfg["data"][s]["image_size"]) for s in ("train", "val", "test")} == {
            tuple(size)
        }
    assert config.load(IDRID / "mtl_r50_topp.yaml")["data"]["train"]["image_size"] == [712, 1072]


def test_cpu_fragment_is_pure_sizing():
    fragment = config.read_yaml(IDRID / "_cpu.yaml")
    assert set(fragment) <= {"data", "model", "optimizer", "scheduler", "train"}
    assert "aux_losses" not in fragment and "routing_schedule" not in fragment
