"""Staged fine-tuning (``train.stages``): what each stage trains, its own optimizer, the best
checkpoint over all stages, exact resume inside a stage and at a stage boundary, the resume
rules for changed stages, and frozen batch-norm layers in eval mode under every freezing
mechanism."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_faults import metrics, moekit, same_weights
from torch import nn

from moekit import config
from moekit.engine import Trainer
from moekit.engine.config_check import check_config
from moekit.engine.finetune import keep_frozen_batchnorm_in_eval
from moekit.engine.resume import check_changes, stage_refusal
from moekit.engine.stages import parse_stages, stage_of, trainable_names
from moekit.errors import ConfigError
from moekit.sections import settings
from moekit.types import ModelOutput, Task

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny" / "two_task.yaml"
FAST = [
    "data.train.num_samples=24",
    "data.val.num_samples=8",
    "train.curves=false",
    "train.epochs=null",
]
STAGES = (
    "train.stages=[{epochs: 2, trainable: head, optimizer: {lr: 0.05}}, "
    "{epochs: 2, optimizer: {type: sgd, lr: 0.01}, scheduler: {type: constant}}]"
)


def load(*overrides):
    return config.load(CONFIG, [*FAST, STAGES, *overrides])


# ---------------------------------------------------------------- config
def test_epochs_are_the_sum_of_the_stages():
    cfg = load()
    assert settings(cfg, "train")["epochs"] == 4
    stages = parse_stages(cfg)
    assert [(s.start, s.epochs) for s in stages] == [(0, 2), (2, 2)]
    assert [stage_of(stages, e).index for e in range(5)] == [0, 0, 1, 1, 1]
    check_config(cfg)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.epochs=3", "train.epochs"),
        ("train.stages=[{epochs: 0}]", "train.stages[0].epochs"),
        ("train.stages=[{epochs: 1, trainabel: head}]", "did you mean 'trainable'"),
        ("train.stages=[{epochs: 1, trainable: '('}]", "train.stages[0].trainable"),
        ("train.stages=[{epochs: 1, optimizer: {lrr: 1}}]", "train.stages[0].optimizer.lrr"),
    ],
)
def test_stage_mistakes_are_named(override, named):
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        check_config(load(override))


def test_trainable_head_regex_and_all():
    cfg = load()
    head, full = parse_stages(cfg)
    names = ["backbone.0.weight", "backbone.0.bias", "heads.cls.weight", "attention.w"]
    assert trainable_names(head, names) == {"heads.cls.weight", "attention.w"}
    assert trainable_names(full, names) == set(names)
    with pytest.raises(ConfigError, match="no parameter 'backbone"):
        trainable_names(head, ["encoder.weight", "heads.cls.weight"])
    regex = parse_stages(load("train.stages=[{epochs: 1, trainable: 'heads\\..*'}]"))[0]
    assert trainable_names(regex, names) == {"heads.cls.weight"}
    nothing = parse_stages(load("train.stages=[{epochs: 1, trainable: 'head\\..*'}]"))[0]
    with pytest.raises(ConfigError, match="matches no parameter; did you mean"):
        trainable_names(nothing, names)


def test_resume_rules_for_changed_stages(tmp_path):
    assert stage_refusal("train.stages", [1], [1, 2], 1) == "the number of stages"
    assert "finished" in stage_refusal("train.stages.0.optimizer.lr", 1, 2, 1)
    assert stage_refusal("train.stages.1.optimizer.lr", 1, 2, 1) is None
    assert stage_refusal("train.stages.1.epochs", 2, 5, 1) is None
    assert "optimizer state" in stage_refusal("train.stages.1.optimizer.type", "adam", "sgd", 1)
    assert stage_refusal("train.stages.2.optimizer.type", "adam", "sgd", 1) is None
    with pytest.raises(ConfigError, match=r"'train\.stages\.0\.epochs'.*stage 1 has finished"):
        check_changes({"train.stages.0.epochs": (2, 3)}, tmp_path, stage=1)


# ---------------------------------------------------------------- training
class BatchNormNet(nn.Module):
    """A backbone with batch norm, a head, and a parameter that gets gradients but changes no
    output (``spare - spare.detach()`` is exactly 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.heads = nn.ModuleDict({"cls": nn.Linear(4, 3)})
        self.spare = nn.Parameter(torch.zeros(1))

    def forward(self, inputs, task_mask=None):
        logits = self.heads["cls"](self.backbone(inputs).mean((2, 3)))
        return ModelOutput({"cls": logits + (self.spare - self.spare.detach())}, [])


def fit_bn_net(tmp_path, name, **sections):
    tasks = {
        "cls": Task.from_config(
            "cls", {"kind": "multiclass", "num_classes": 3, "loss": ["cross_entropy"]}
        )
    }
    data = {"type": "synthetic_tensors", "num_samples": 16, "image_size": 16, "tasks": ["cls"]}
    net = BatchNormNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = Trainer(
        model=net,
        tasks=tasks,
        train_data={**data, "split": "train"},
        val_data={**data, "split": "val"},
        run_dir=tmp_path / name,
        data={"batch_size": 8},
        optimizer={"type": "adam", "lr": 0.05},
        eval={"monitor": "val/loss", "mode": "min"},
        **sections,
    )
    summary = trainer.fit()
    return before, net.state_dict(), summary


def backbone_unchanged(before, after):
    return all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))


@pytest.mark.slow
@pytest.mark.parametrize(
    "freezing",
    [
        {"train": {"epochs": 2, "curves": False, "freeze": ["backbone\\..*"]}},
        {  # stopped after the frozen first half
            "train": {"epochs": 2, "curves": False},
            "freeze_schedule": [{"until": 0.5, "freeze": ["backbone\\..*"]}, {"freeze": []}],
            "debug": {"stop_after_epoch": 1},
        },
        {"train": {"curves": False, "stages": [{"epochs": 2, "trainable": "head"}]}},
    ],
    ids=["train.freeze", "freeze_schedule", "stages"],
)
def test_frozen_batchnorm_keeps_its_running_statistics(tmp_path, freezing):
    before, after, _ = fit_bn_net(tmp_path, "run", **freezing)
    assert backbone_unchanged(before, after)  # running mean and variance, batches tracked
    assert not torch.equal(before["heads.cls.weight"], after["heads.cls.weight"])


def test_the_hook_follows_requires_grad():
    net = BatchNormNet().train()
    assert keep_frozen_batchnorm_in_eval(net) == 1
    assert keep_frozen_batchnorm_in_eval(net) == 0  # installed once
    bn = net.backbone[1]
    net.backbone.requires_grad_(False)
    net(torch.randn(2, 3, 8, 8))
    assert not bn.training and int(bn.num_batches_tracked) == 0
    net.train()
    net.backbone.requires_grad_(True)
    net(torch.randn(2, 3, 8, 8))
    assert bn.training and int(bn.num_batches_tracked) == 1


@pytest.mark.slow
def test_the_best_checkpoint_is_chosen_over_all_stages(tmp_path):
    stages = [
        {"epochs": 2, "trainable": "all"},
        {"epochs": 2, "trainable": "spare", "optimizer": {"lr": 0.5}},  # changes no output
    ]
    before, after, summary = fit_bn_net(tmp_path, "run", train={"curves": False, "stages": stages})
    rows = pd.read_csv(tmp_path / "run/metrics.csv")
    val = rows[rows.split == "val"].set_index("epoch")["loss"]
    assert summary["best"]["epoch"] == int(val.idxmin()) <= 2  # not reset by stage 2
    assert val[3] == val[4] == val[2]  # stage 2 trains a parameter that changes no output
    assert not torch.equal(before["spare"], after["spare"])
    best = json.loads((tmp_path / "run/checkpoints/best/trainer_state.json").read_text())
    assert (best["epoch"], best["stage"]) == (summary["best"]["epoch"], 0)
    assert [s["best_epoch"] for s in summary["stages"]] == [summary["best"]["epoch"], 3]
    last = json.loads((tmp_path / "run/checkpoints/last/trainer_state.json").read_text())
    assert (last["epoch"], last["stage"]) == (4, 1)


def test_a_finetune_mode_and_stages_do_not_mix(tmp_path):
    cfg = load("+finetune={mode: heads, init: null}")
    with pytest.raises(ConfigError, match="finetune"):
        Trainer(cfg, run_dir=tmp_path / "run")


# ---------------------------------------------------------------- exact resume
def stage_args(run_dir, *overrides):
    return ["train", CONFIG, "--run-dir", run_dir, "--set", *FAST, STAGES, *overrides]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted two-stage run in a child process (3 steps per epoch)."""
    run_dir = tmp_path_factory.mktemp("stages") / "run"
    result = moekit(*stage_args(run_dir))
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    ("at", "where"),
    [(8, (2, 8, 2, 1)), (6, (1, 6, 3, 0))],
    ids=["inside-stage-2", "last-step-of-stage-1"],
)
def test_sigterm_inside_a_stage_resumes_bit_exactly(straight, tmp_path, at, where):
    run_dir = tmp_path / "run"
    result = moekit(*stage_args(run_dir), act="term", at=at)
    assert result.returncode == 143, result.stderr
    state = json.loads((run_dir / "checkpoints/last/trainer_state.json").read_text())
    assert (state["epoch"], state["step"], state["batch"], state["stage"]) == where
    resumed = moekit("train", "--resume", run_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert same_weights(run_dir, straight)
    pd.testing.assert_frame_equal(metrics(run_dir), metrics(straight))


@pytest.mark.slow
def test_resume_refuses_a_change_to_a_finished_stage(straight):
    result = moekit("train", "--resume", straight, "--set", "train.stages.0.epochs=3")
    assert result.returncode == 2
    assert "stage 1 has finished" in result.stderr.strip().splitlines()[-1]
