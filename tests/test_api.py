"""The Python door: Trainer on built objects, build_model, load_run, evaluate, extract_task."""

import pytest
import torch

import moekit
from moekit import config
from moekit.data.collate import collate_samples
from moekit.errors import ConfigError
from moekit.registry import DATASETS
from moekit.types import Task

TASKS = {
    "shape": {
        "kind": "multiclass",
        "num_classes": 4,
        "loss": "cross_entropy",
        "metrics": ["accuracy"],
    },
    "depth": {"kind": "regression", "dense": True, "loss": "l1", "metrics": ["rmse"]},
}
MODEL = {"type": "modsquad_vit", "img_size": 32, "patch_size": 8, "dim": 48, "depth": 2}


def shapes(split, count):
    spec = {"type": "multitask_shapes", "split": split, "num_samples": count, "image_size": 32}
    return DATASETS.build({**spec, "tasks": list(TASKS)})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("api") / "run"
    torch.manual_seed(0)
    model = moekit.build_model({"tasks": TASKS, "model": {**MODEL, "num_heads": 3}})
    trainer = moekit.Trainer(
        model=model,
        tasks=TASKS,
        train_data=shapes("train", 32),
        val_data=shapes("val", 16),
        run_dir=run,
        train={"epochs": 2, "curves": False},
        data={"batch_size": 16},
    )
    summary = trainer.fit()
    return run, model, summary


def test_task_config_round_trip():
    task = Task.from_config("t", {**TASKS["shape"], "class_names": ["a", "b", "c", "d"]})
    assert Task.from_config("t", task.config()) == task


def test_build_model_from_a_mapping_and_from_a_shipped_file():
    model = moekit.build_model({"tasks": TASKS, "model": {**MODEL, "num_heads": 3}})
    assert set(model(torch.randn(2, 3, 32, 32)).preds) == set(TASKS)
    assert type(moekit.build_model("configs/tiny/two_task.yaml")).__name__ == "TinyMTL"


def test_objects_are_recorded_by_class_and_weights_load_into_a_given_model(trained):
    run, model, summary = trained
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
    saved = config.read_yaml(run / "config.yaml")
    assert saved["model"]["python_object"].endswith("modsquad_vit.ModSquadViT")
    assert saved["data"]["train"]["python_object"].endswith("MultiTaskShapes")
    assert saved["tasks"]["shape"]["kind"] == "multiclass"
    with pytest.raises(ConfigError, match=r"config key 'model'.*pass it again"):
        moekit.load_run(run)
    fresh = moekit.build_model({"tasks": TASKS, "model": {**MODEL, "num_heads": 3}})
    loaded, _, tasks = moekit.load_run(run, "last", model=fresh)
    assert loaded is fresh and list(tasks) == list(TASKS)
    for (name, a), b in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_evaluate_matches_the_trainers_validation_row(trained):
    _, model, summary = trained
    values = moekit.evaluate(model, shapes("val", 16), TASKS, batch_size=5)
    final = summary["final"]
    for key in ("loss", "shape/accuracy", "depth/rmse"):
        assert values[key] == pytest.approx(final[f"val/{key}"], rel=1e-5), key


def test_extract_task_at_theta_zero_reproduces_the_task_without_io(trained, tmp_path):
    _, model, _ = trained
    data = shapes("val", 16)
    loader = torch.utils.data.DataLoader(data, batch_size=8, collate_fn=collate_samples)
    usage = moekit.collect_usage(model, loader, list(TASKS))
    small = moekit.extract_task(model, "depth", usage, threshold=0.0)
    images = next(iter(loader)).inputs
    only = {"shape": torch.zeros(8, dtype=torch.bool), "depth": torch.ones(8, dtype=torch.bool)}
    with torch.no_grad():
        full = model.eval()(images, task_mask=only).preds["depth"]
        torch.testing.assert_close(small(images).preds["depth"], full, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert moekit.count_flops(small, images[:1]).total > 0
    assert list(tmp_path.iterdir()) == []  # no file written
