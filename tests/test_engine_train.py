"""End to end: the tiny two-task config trains through the CLI into a full run directory,
resumes exactly, stops cleanly on NaN, evaluates, and loads back for analysis."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from moekit import config
from moekit.cli import main
from moekit.engine import Trainer, load_model
from moekit.errors import CheckpointError

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "two_task.yaml"
FAST = [
    "data.train.num_samples=64",
    "data.val.num_samples=8",
    "data.test.num_samples=8",
    "train.epochs=4",
    "weighting.type=uncertainty",
]


def train(run_dir, *overrides, resume=False):
    if resume:
        return main(
            ["train", "--resume", str(run_dir), "--set", *overrides]
            if overrides
            else ["train", "--resume", str(run_dir)]
        )
    return main(["train", str(CONFIG), "--run-dir", str(run_dir), "--set", *FAST, *overrides])


def weights(run_dir, which="last"):
    return load_file(str(Path(run_dir) / "checkpoints" / which / "model.safetensors"))


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "straight"
    assert train(run_dir) == 0
    return run_dir


def test_run_directory_is_complete(run4):
    for name in ("config.yaml", "metrics.csv", "summary.json", "train.log"):
        assert (run4 / name).is_file(), name
    for which in ("last", "best"):
        files = {p.name for p in (run4 / "checkpoints" / which).iterdir()}
        assert {
            "model.safetensors",
            "objective.safetensors",
            "optimizer.bin",
            "scheduler.bin",
            "random_states_0.pkl",
            "trainer_state.json",
            "config.yaml",
        } <= files
    saved = yaml.safe_load((run4 / "config.yaml").read_text())
    assert saved == config.load(CONFIG, FAST)
    metrics = pd.read_csv(run4 / "metrics.csv")
    assert list(metrics[["epoch", "split"]].itertuples(index=False, name=None)) == [
        (e, s) for e in range(1, 5) for s in ("train", "val")
    ]
    for column in (
        "loss",
        "cls/accuracy",
        "cls/f1",
        "cls/kappa",
        "seg/dice",
        "seg/iou",
        "seg/dice/per_image",
        "objective",
        "cls/weight",
        "lr/backbone",
    ):
        assert column in metrics.columns, column
    summary = json.loads((run4 / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 4
    val = metrics[metrics.split == "val"]
    assert summary["best"]["value"] == pytest.approx(val["cls/accuracy"].max())
    assert summary["best"]["epoch"] == int(val.loc[val["cls/accuracy"].idxmax(), "epoch"])
    assert summary["final"]["val/seg/dice"] == pytest.approx(val["seg/dice"].iloc[-1])
    figures = {p.name for p in (run4 / "figures").glob("*.png")}
    assert {"loss.png", "cls_accuracy.png", "seg_dice.png", "seg_iou.png", "lr.png"} <= figures
    log = (run4 / "train.log").read_text()
    assert sum(line.count("epoch 4/4") for line in log.splitlines()) == 1


def test_tiny_model_learns(run4):
    metrics = pd.read_csv(run4 / "metrics.csv")
    val = metrics[metrics.split == "val"]
    assert val["loss"].iloc[-1] < 0.7 * val["loss"].iloc[0]
    assert val["seg/dice"].iloc[-1] > 0.5


def test_resume_gives_identical_weights(run4, tmp_path):
    run_dir = tmp_path / "interrupted"
    assert train(run_dir, "+debug.stop_after_epoch=2") == 0
    state = json.loads((run_dir / "checkpoints/last/trainer_state.json").read_text())
    assert state["epoch"] == 2
    assert train(run_dir, "debug.stop_after_epoch=null", resume=True) == 0
    straight, resumed = weights(run4), weights(run_dir)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    a = load_file(str(run4 / "checkpoints/last/objective.safetensors"))
    b = load_file(str(run_dir / "checkpoints/last/objective.safetensors"))
    assert torch.equal(a["weighting.log_vars"], b["weighting.log_vars"])
    pd.testing.assert_frame_equal(
        pd.read_csv(run4 / "metrics.csv").drop(columns="time"),
        pd.read_csv(run_dir / "metrics.csv").drop(columns="time"),
    )


def test_nan_stops_with_one_line_and_keeps_last_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "nan"
    code = train(run_dir, "+debug.inject_nan_at_step=11", "+debug.nan_task=seg")
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("moekit: error: non-finite loss at step 11 (epoch 2, batch 3)")
    assert "task 'seg'" in err[-1] and sum("error" in line for line in err) == 1
    state = json.loads((run_dir / "checkpoints/last/trainer_state.json").read_text())
    assert state == {**state, "epoch": 1, "step": 8}
    model, _, _ = load_model(run_dir, "last")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"


def test_eval_command_and_load_model(run4, capsys):
    capsys.readouterr()
    assert main(["eval", str(run4), "--split", "test", "--checkpoint", "best"]) == 0
    printed = capsys.readouterr().out
    assert "test/cls/accuracy" in printed and "test/seg/dice" in printed
    saved = json.loads((run4 / "eval" / "test-best.json").read_text())["metrics"]
    assert 0.0 <= saved["test/seg/dice"] <= 1.0
    model, cfg, tasks = load_model(run4, "best")
    assert not model.training and list(tasks) == ["cls", "seg"] and cfg["name"] == "two_task"
    best = weights(run4, "best")
    assert all(torch.equal(best[k], v) for k, v in model.state_dict().items())
    out = model(torch.zeros(2, 3, 32, 32))
    assert out.preds["cls"].shape == (2, 3) and out.preds["seg"].shape == (2, 1, 32, 32)


def test_mismatching_config_names_the_key(run4, tmp_path):
    with pytest.raises(CheckpointError, match=r"at 'model.width' \(checkpoint: 8, config: 4\)"):
        Trainer(config.load(run4 / "config.yaml", ["model.width=4"]), resume=run4)
    other = load_model(run4, "last")[0]
    other.heads["cls"][2] = torch.nn.Linear(16, 5)
    from moekit.engine.checkpoint import load_weights

    with pytest.raises(
        CheckpointError, match=r"at 'heads.cls.2.weight' \(checkpoint \[3, 16\], model \[5, 16\]\)"
    ):
        load_weights(other, run4 / "checkpoints/last/model.safetensors")


def test_config_errors_are_one_line(tmp_path, capsys):
    cases = {
        "train.epoch=3": "no such key",
        "+train.epoch=3": "'train.epoch' is not known; did you mean 'epochs'",
        "eval.monitor=val/cls/acc": "'eval.monitor': 'val/cls/acc' is not logged",
        "train.freeze=[decoder]": "matches no parameter",
        "model.type=tiny_mtll": "'model.type': MODELS: unknown type 'tiny_mtll'",
        "weighting={type: fixed}": "WEIGHTINGS 'fixed' needs 'weights'",
    }
    run_dir = tmp_path / "run"
    for override, message in cases.items():
        assert main(["train", str(CONFIG), "--run-dir", str(run_dir), "--set", override]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1], (override, err)
        assert not (run_dir / "config.yaml").exists()  # the directory stays reusable


def test_freezing_keeps_the_backbone(tmp_path):
    cfg = config.load(
        CONFIG, [*FAST, "train.epochs=1", "train.freeze=['backbone\\..*']", "+train.curves=false"]
    )
    initial = Trainer(cfg, run_dir=tmp_path / "a")
    before = {k: v.clone() for k, v in initial.exp.model.state_dict().items()}
    initial.fit()
    after = weights(tmp_path / "a")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    assert not torch.equal(before["heads.cls.2.weight"], after["heads.cls.2.weight"])


def test_routing_schedule_switches_at_the_fraction(tmp_path, monkeypatch):
    import moekit.moe

    calls = []

    def set_routing(model, router_cfg, layers=None):
        calls.append((router_cfg, layers))
        return 3

    monkeypatch.setattr(moekit.moe, "set_routing", set_routing)
    cfg = config.load(CONFIG, [*FAST, "+train.curves=false"])
    cfg["routing_schedule"] = [{"until": 0.5, "router": "softmax"}, {"router": "top_p", "p": 0.5}]
    Trainer(cfg, run_dir=tmp_path / "r").fit()
    assert calls == [({"type": "softmax"}, None), ({"type": "top_p", "p": 0.5}, None)]
    log = (tmp_path / "r" / "train.log").read_text()
    assert "epoch 3: routing_schedule[1] -> 3 MoE layers" in log


def test_gradient_accumulation_halves_the_steps(tmp_path):
    cfg = config.load(
        CONFIG, [*FAST, "train.epochs=1", "train.grad_accum=2", "+train.curves=false"]
    )
    summary = Trainer(cfg, run_dir=tmp_path / "acc").fit()
    assert summary["steps"] == 4  # 64 samples, batches of 8, two batches per step


def test_moe_model_with_phase_switch_and_mutual_information(tmp_path):
    moe = [
        "+model.moe={num_experts: 3, router: {type: softmax}}",
        "aux_losses=[{type: mutual_information, weight: 0.01}]",
        "routing_schedule=[{until: 0.5, router: softmax}, {router: top_p, p: 0.6}]",
    ]
    cfg = config.load(CONFIG, [*FAST, "train.epochs=2", "+train.curves=false", *moe])
    summary = Trainer(cfg, run_dir=tmp_path / "moe").fit()
    assert summary["final"]["train/aux/mutual_information"] < 0
    model, _, _ = load_model(tmp_path / "moe", "last")
    assert model.moe.router_config["type"] == "top_p" and model.moe.router_config["p"] == 0.6
    records = model(torch.zeros(2, 3, 32, 32)).routing
    assert [r.layer for r in records] == ["moe"] and records[0].task_ids.tolist() == [0, 0, 1, 1]


EXACT_BATCHES = [
    "data.train.num_samples=16",
    "data.train.label_fraction={cls: 1.0, seg: 1.0}",
    "tasks.seg.loss=[bce]",  # per-sample losses: a batch's mean is the mean of its halves
    "optimizer={type: sgd, lr: 0.5, momentum: 0.0}",
    "scheduler={type: constant}",
    "train.epochs=1",
    "train.clip_grad=null",
    "+train.curves=false",
]


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    def final(*overrides):
        cfg = config.load(CONFIG, [*FAST, *EXACT_BATCHES, *overrides])
        Trainer(cfg, run_dir=tmp_path / str(len(list(tmp_path.iterdir())))).fit()
        return weights(sorted(tmp_path.iterdir())[-1])

    big = final("data.batch_size=8")
    accumulated = final("data.batch_size=4", "train.grad_accum=2")
    assert big.keys() == accumulated.keys()
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], atol=1e-6, rtol=1e-5)


def test_gradient_clipping_bounds_each_step(tmp_path):
    cfg = config.load(
        CONFIG, [*FAST, *EXACT_BATCHES, "data.train.num_samples=8", "train.clip_grad=0.001"]
    )
    trainer = Trainer(cfg, run_dir=tmp_path / "clip")
    before = {k: v.clone() for k, v in trainer.exp.model.state_dict().items()}
    assert trainer.fit()["steps"] == 1
    after = weights(tmp_path / "clip")
    step = torch.sqrt(sum(((after[k] - before[k]) ** 2).sum() for k in before))
    assert 0 < float(step) <= 0.5 * 0.001 * (1 + 1e-4), "SGD step = lr x clipped gradient"


def test_a_failed_setup_leaves_no_auto_named_run(tmp_path, capsys):
    out = tmp_path / "runs"
    args = ["train", str(CONFIG), "--set", f"+output_dir={out}", "train.freeze=[decoder]"]
    assert main(args) == 2
    assert "matches no parameter" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_ctrl_c_marks_the_run_interrupted(tmp_path, monkeypatch):
    cfg = config.load(CONFIG, [*FAST, "+train.curves=false"])
    trainer = Trainer(cfg, run_dir=tmp_path / "stop")
    real = trainer._train_epoch

    def stop_in_epoch_two(epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(epoch)

    monkeypatch.setattr(trainer, "_train_epoch", stop_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    summary = json.loads((tmp_path / "stop" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs_completed"] == 1
