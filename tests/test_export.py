"""``moekit export``: artifacts that predict without their run or dataset, give the run's
outputs exactly, extract a task (θ = 0: the full model's outputs), describe themselves, and
programs written only when faithful."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from analysis_run import trained_run
from inference_runs import (
    flagship_run,
    gamma_replica,
    idrid_replica,
    m4oe_run,
    modsquad_run,
    odir_run,
    photographs,
)

import moekit
from moekit.cli import main
from moekit.inference.artifact import (
    CARD_FILE,
    RECORD_FILE,
    artifact_config,
    load_artifact,
    recorded_metrics,
)
from moekit.inference.predict import load_predictor
from moekit.inference.program import FORMATS


def source_photographs(factory, folder):
    root = idrid_replica(factory)
    images = root / "A. Segmentation" / "1. Original Images" / "b. Testing Set"
    return photographs(folder, sorted(images.glob("*.jpg"))[0])


def probabilities(predictor, files):
    """Every task's probabilities of every file, as the predictor computes them."""
    out = []
    for path in files:
        loaded = predictor.load(predictor_item(predictor, path))
        out.append(predictor.probabilities(loaded)[0])
    return out


def predictor_item(predictor, path):
    from moekit.inference.inputs import collect_inputs

    (item,) = collect_inputs([path], predictor.pipeline)
    return item


def export(run, out, *extra):
    return main(["export", str(run), "--out", str(out), *extra])


RUNS = {
    "flagship": flagship_run,
    "modsquad": modsquad_run,
    "tiny_moe": trained_run,
    "odir": odir_run,
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(RUNS))
def test_export_then_load_gives_the_runs_outputs(tmp_path_factory, tmp_path, family):
    """An artifact loaded back predicts exactly what the run predicts, on photographs of three
    sizes (``predict`` on both writes the same table)."""
    run = RUNS[family](tmp_path_factory)
    files = source_photographs(tmp_path_factory, tmp_path / "photos")
    assert export(run, tmp_path / "artifact") == 0
    from_run = load_predictor(run)
    from_artifact = load_artifact(tmp_path / "artifact").predictor()
    assert from_artifact.pipeline == from_run.pipeline
    assert from_artifact.thresholds == from_run.thresholds
    for a, b in zip(probabilities(from_run, files), probabilities(from_artifact, files)):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name
    for name, source in (("run", run), ("artifact", tmp_path / "artifact")):
        out = tmp_path / f"predicted_{name}"
        assert main(["predict", str(source), *map(str, files), "--out", str(out)]) == 0
    tables = [
        pd.read_csv(tmp_path / f"predicted_{n}" / "predictions.csv") for n in ("run", "artifact")
    ]
    pd.testing.assert_frame_equal(tables[0], tables[1])


@pytest.mark.slow
def test_a_multimodal_artifact_gives_the_runs_outputs(tmp_path_factory, tmp_path):
    run = m4oe_run(tmp_path_factory)
    assert export(run, tmp_path / "artifact") == 0
    patients = gamma_replica(tmp_path_factory) / "Glaucoma_grading" / "testing"
    patient = sorted((patients / "multi-modality_images").iterdir())[0]
    files = {"fundus": patient / f"{patient.name}.jpg", "oct": patient / patient.name}
    predictions = [
        predictor.predict_file(files)
        for predictor in (load_predictor(run), load_artifact(tmp_path / "artifact").predictor())
    ]
    for name, result in predictions[0].tasks.items():
        other = predictions[1].tasks[name]
        value = result.probs if result.probs is not None else result.map
        assert np.array_equal(value, other.probs if other.probs is not None else other.map)


@pytest.mark.slow
def test_the_artifact_needs_neither_the_run_nor_the_dataset(
    tmp_path_factory, tmp_path, monkeypatch
):
    """Moved elsewhere, with every dataset and run read made to fail, the artifact predicts."""
    run = flagship_run(tmp_path_factory)
    files = source_photographs(tmp_path_factory, tmp_path / "photos")
    assert export(run, tmp_path / "artifact") == 0
    moved = tmp_path / "elsewhere" / "model"
    shutil.move(tmp_path / "artifact", moved)

    def refuse(*args, **kwargs):
        raise AssertionError("the artifact read its run or dataset")

    monkeypatch.setattr("moekit.engine.experiment.build_dataset", refuse)
    monkeypatch.setattr("moekit.engine.checkpoint.checkpoint_dir", refuse)
    artifact = moekit.load_artifact(moved)
    assert list(artifact.tasks) == ["rg", "mer", "MA", "HE", "EX", "SE", "OD"]
    assert main(["predict", str(moved), *map(str, files), "--out", str(tmp_path / "out")]) == 0
    assert len(pd.read_csv(tmp_path / "out" / "predictions.csv")) == 3


@pytest.mark.slow
@pytest.mark.parametrize("family,task", [("flagship", "OD"), ("modsquad", "depth")])
def test_a_task_extracted_at_theta_zero_gives_the_full_models_outputs(
    tmp_path_factory, tmp_path, family, task
):
    """``--task T`` (θ = 0 by default): only T, fewer parameters, T's outputs as the full
    model's on new photographs."""
    run = RUNS[family](tmp_path_factory)
    files = source_photographs(tmp_path_factory, tmp_path / "photos")
    assert export(run, tmp_path / "task", "--task", task) == 0
    extracted = load_artifact(tmp_path / "task")
    full = load_artifact_of(run, tmp_path / "full")
    assert list(extracted.tasks) == [task]
    assert extracted.record["cost"]["params"] < full.record["cost"]["params"]
    assert extracted.record["extraction"]["rule"] == "theta0"
    assert extracted.record["extraction"]["max_abs_diff"] <= 1e-5
    for a, b in zip(
        probabilities(full.predictor(), files), probabilities(extracted.predictor(), files)
    ):
        torch.testing.assert_close(a[task], b[task], rtol=0, atol=1e-5)


def load_artifact_of(run, out):
    assert export(run, out) == 0
    return load_artifact(out)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_a_program_is_written_when_faithful_and_matches_the_model(tmp_path_factory, tmp_path):
    """The ODIR classifier (no MoE layer): torch.export and TorchScript programs that give the
    artifact's probabilities on new photographs, loaded with torch alone."""
    run = odir_run(tmp_path_factory)
    files = source_photographs(tmp_path_factory, tmp_path / "photos")
    out = tmp_path / "artifact"
    assert export(run, out, "--format", "export", "--format", "torchscript") == 0
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["programs"] == FORMATS
    predictor = load_artifact(out).predictor()
    scripted = torch.jit.load(str(out / FORMATS["torchscript"]))
    exported = torch.export.load(str(out / FORMATS["export"])).module()
    for path, expected in zip(files, probabilities(predictor, files)):
        inputs = predictor.load(predictor_item(predictor, path)).batch.inputs
        for program in (scripted, exported):
            (got,) = program(inputs)
            torch.testing.assert_close(got[0], expected["diagnosis"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_model_whose_routing_depends_on_the_input_gets_no_program(
    tmp_path_factory, tmp_path, capsys
):
    run = trained_run(tmp_path_factory)
    capsys.readouterr()  # the training's own lines, when this test trains the run
    assert export(run, tmp_path / "artifact", "--format", "torchscript") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "depends on the values of its input" in err[0]
    assert not (tmp_path / "artifact").exists()
    assert not any(p.name.startswith(".artifact") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_the_model_card_reports_data_metrics_cost_and_version(tmp_path_factory, tmp_path):
    """Before ``moekit eval`` the card takes the best epoch's validation values and says so;
    after it, the test values; always the parameters and FLOPs measured at export."""
    run = trained_run(tmp_path_factory)
    card = load_artifact_of(run, tmp_path / "before").path / CARD_FILE
    text = card.read_text()
    assert "No test evaluation recorded" in text and "| val/cls/accuracy |" in text
    assert f"moekit {moekit.__version__}" in text and "synthetic_tensors" in text
    record = json.loads((tmp_path / "before" / RECORD_FILE).read_text())
    assert f"parameters: {record['cost']['params']:,}" in text
    assert record["cost"]["flops"] > 0
    evaluation = {"metrics": {"test/cls/accuracy": 0.75, "test/cls/loss": 1.0}}
    metrics = recorded_metrics(_with_eval(run, tmp_path / "run", evaluation), "best", ["cls"])
    assert metrics["values"] == {"test/cls/accuracy": 0.75}
    assert "Test split" in metrics["source"]


def _with_eval(run, copy, evaluation):
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".moekit.lock"))
    (copy / "eval").mkdir(exist_ok=True)
    (copy / "eval" / "test-best.json").write_text(json.dumps(evaluation))
    return copy


def test_the_artifact_config_clears_pretrained_weights_and_the_schedule():
    cfg = {
        "model": {"backbone": {"name": "resnet50", "pretrained": "/weights/r50.pth"}},
        "routing_schedule": [{"until": 0.5, "router": "softmax"}, {"router": "top_p"}],
    }
    saved = artifact_config(cfg)
    assert saved["model"]["backbone"] == {"name": "resnet50", "pretrained": None}
    assert saved["routing_schedule"] == []
    assert cfg["model"]["backbone"]["pretrained"] == "/weights/r50.pth"


@pytest.mark.slow
def test_export_argument_errors_are_one_line(tmp_path_factory, tmp_path, capsys):
    run = trained_run(tmp_path_factory)
    cases = [
        (["--threshold", "0.1"], "give --task"),
        (["--task", "nope"], "no task named 'nope'"),
        (["--task", "cls", "--threshold", "2"], "threshold is a usage frequency"),
    ]
    for extra, message in cases:
        assert export(run, tmp_path / "a", *extra) == 2
        assert message in capsys.readouterr().err
    assert export(run, run) == 2
    assert "that is the source run" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert export(run, tmp_path / "taken") == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert export(run, tmp_path / "taken", "--overwrite") == 0
    assert (tmp_path / "taken" / RECORD_FILE).is_file()
