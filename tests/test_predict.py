"""``moekit predict``: inputs read as the datasets read them, predictions mapped back to the
photograph's own pixels, per-input errors, and end to end on a tiny run of every family."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from inference_runs import (
    flagship_run,
    gamma_replica,
    idrid_replica,
    m4oe_run,
    modsquad_run,
    odir_run,
    photographs,
)
from PIL import Image
from torch import nn

from moekit.cli import main
from moekit.data.idrid import LAYOUT as IDRID_LAYOUT
from moekit.errors import ConfigError, DataError
from moekit.inference.inputs import (
    InputItem,
    InputPipeline,
    InputSpec,
    collect_inputs,
    pipeline_from_config,
)
from moekit.inference.outputs import prediction_row
from moekit.inference.predict import predict_to_folder
from moekit.inference.predictor import (
    SHARED,
    Predictor,
    decision_thresholds,
    describe_selection,
    selected_experts,
)
from moekit.routing.types import Routing, RoutingRecord
from moekit.types import ModelOutput, parse_tasks

GREY = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


class Brightness(nn.Module):
    """A stub model whose answers are known from the image: ``seg`` is the pixels brighter
    than mid-grey, ``cls`` class 1 when the image is bright on average, ``labels`` the three
    channels' mean brightness as logits, ``size`` the mean itself."""

    def forward(self, inputs, task_mask=None):
        x = inputs if isinstance(inputs, torch.Tensor) else inputs["image"]
        mean = x.mean(dim=(2, 3))
        cls = torch.stack([torch.zeros_like(mean[:, 0]), mean.mean(dim=1)], dim=1) * 10
        preds = {
            "seg": 40 * x[:, :1],
            "cls": cls,
            "labels": 10 * mean,
            "size": mean[:, :1],
        }
        return ModelOutput(preds)


TASKS = parse_tasks(
    {
        "seg": {"kind": "segmentation", "num_classes": 1},
        "cls": {"kind": "multiclass", "num_classes": 2, "class_names": ["dark", "bright"]},
        "labels": {"kind": "multilabel", "num_classes": 3, "class_names": ["r", "g", "b"]},
        "size": {"kind": "regression", "num_classes": 1},
    }
)


def disc_photograph(height: int, width: int, centre: tuple[int, int], radius: int) -> np.ndarray:
    """A white disc on black: a field of view whose pixels are all brighter than mid-grey."""
    yy, xx = np.mgrid[0:height, 0:width]
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    image = np.zeros((height, width, 3), np.uint8)
    image[disc] = 200
    return image


def stub_predictor(preprocess: str, size=(32, 48)) -> Predictor:
    spec = InputSpec("image", "image", 3, size, {"type": preprocess}, **GREY)
    thresholds = {"seg": [0.5], "labels": [0.5, 0.9, 0.5]}
    return Predictor(Brightness(), TASKS, InputPipeline((spec,)), thresholds)


@pytest.mark.parametrize("preprocess", ["resize", "fundus_fov"])
@pytest.mark.parametrize(
    "height,width,centre,radius",
    [(128, 192, (64, 96), 60), (300, 300, (150, 150), 140), (200, 500, (100, 150), 90)],
)
def test_masks_come_back_on_the_photographs_pixels(
    tmp_path, preprocess, height, width, centre, radius
):
    """Whatever the size, aspect ratio and preprocessing, the mask of the bright pixels is the
    disc drawn in the photograph, at its resolution (the stub's answer is the ground truth)."""
    path = tmp_path / "photo.png"
    disc = disc_photograph(height, width, centre, radius)
    Image.fromarray(disc).save(path)
    result = stub_predictor(preprocess).predict_file(path).tasks["seg"]
    truth = disc[..., 0] > 0
    assert result.decision.shape == truth.shape == result.map.shape
    mask = result.decision.astype(bool)
    assert (mask & truth).sum() / (mask | truth).sum() > 0.9
    yy, xx = np.mgrid[0:height, 0:width]
    far = np.hypot(yy - centre[0], xx - centre[1]) > radius + 0.1 * min(height, width)
    assert not result.decision[far].any()


def test_image_level_decisions_and_their_row(tmp_path):
    """Multiclass: the arg-max with its name; multi-label: ``p_c > t_c`` per class with the
    run's per-class thresholds; regression: the value; one CSV row with every column."""
    path = tmp_path / "bright.png"
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(path)
    predictor = stub_predictor("resize")
    prediction = predictor.predict_file(path)
    expected = (200 / 255 - 0.5) / 0.25
    probs = torch.sigmoid(torch.tensor([10 * expected] * 3)).numpy()
    result = prediction.tasks
    assert result["cls"].decision == 1
    np.testing.assert_allclose(result["labels"].probs, probs, rtol=1e-5)
    assert result["labels"].decision.tolist() == [p > t for p, t in zip(probs, [0.5, 0.9, 0.5])]
    np.testing.assert_allclose(result["size"].probs, [expected], rtol=1e-5)
    row = prediction_row(prediction, TASKS, {"seg": "masks/bright_seg.png"}, False)
    assert row["id"] == "bright" and row["input"] == str(path)
    assert row["cls/name"] == "bright" and row["cls/class"] == 1
    assert row["cls/prob/bright"] == pytest.approx(float(result["cls"].probs[1]))
    assert row["labels/labels"] == " ".join(
        name for name, on in zip("rgb", result["labels"].decision) if on
    )
    assert row["labels/positive/g"] == int(probs[1] > 0.9)
    assert row["size/value"] == pytest.approx(expected, rel=1e-5)
    assert row["seg/mask"] == "masks/bright_seg.png" and row["seg/area"] == 1.0


class Ramp(nn.Module):
    """A stub whose map is not mirror-symmetric: bright pixels plus a left-to-right ramp."""

    def forward(self, inputs, task_mask=None):
        ramp = torch.linspace(-2, 2, inputs.shape[-1]).expand_as(inputs[:, :1])
        return ModelOutput({"seg": 4 * inputs[:, :1] + ramp})


def test_flip_tta_averages_with_the_mirror_images_prediction(tmp_path):
    """``--tta flip``: ``p = ½ (σ(f(x)) + flip σ(f(flip x)))``, computed here by hand."""
    path = tmp_path / "photo.png"
    Image.fromarray(disc_photograph(64, 96, (30, 30), 20)).save(path)
    spec = InputSpec("image", "image", 3, (32, 48), {"type": "resize"}, **GREY)
    tasks = {"seg": TASKS["seg"]}
    predictor = Predictor(Ramp(), tasks, InputPipeline((spec,)), {"seg": [0.5]}, "flip")
    loaded = predictor.load(InputItem("photo", {"image": path}, str(path)))
    probs, _ = predictor.probabilities(loaded)
    x = loaded.batch.inputs
    model = Ramp()
    expected = 0.5 * (
        model(x).preds["seg"].sigmoid() + model(x.flip(-1)).preds["seg"].sigmoid().flip(-1)
    )
    torch.testing.assert_close(probs["seg"], expected[0])
    assert not torch.allclose(probs["seg"], model(x).preds["seg"].sigmoid()[0])


def record(layer, index, task_ids=None, valid=None, experts=4):
    index = torch.tensor(index)
    probs = torch.full((index.shape[0], experts), 1 / experts)
    return RoutingRecord(
        layer,
        Routing(probs, probs.log(), index, (index >= 0).float()),
        task_ids=None if task_ids is None else torch.tensor(task_ids),
        valid=None if valid is None else torch.tensor(valid),
    )


def test_selected_experts_per_task_layer_owner_and_shared():
    """A per-task layer is split by task id; a layer whose path names a task is that task's; any
    other layer is shared; invalid rows (absent modality) do not count; the shares are the
    fraction of the input's tokens that chose each expert (counted here with a plain loop)."""
    tasks = ["a", "b"]
    records = [
        record("blocks.0.mlp", [[0, 1], [0, 2], [3, -1], [3, 1]], task_ids=[0, 0, 1, 1]),
        record("heads.b", [[2, -1]]),
        record("encoder.mlp", [[1, 0], [1, 3], [2, 3]], valid=[True, True, False]),
    ]
    text = selected_experts(records, tasks)
    assert text["a"] == "blocks.0.mlp:0=1.00 1=0.50 2=0.50"
    assert text["b"] == "blocks.0.mlp:3=1.00 1=0.50; heads.b:2"
    assert text[SHARED] == "encoder.mlp:1=1.00 0=0.50 3=0.50"
    rows = [[1, 0], [1, 3]]
    counts = {}
    for row in rows:
        for e in row:
            counts[e] = counts.get(e, 0) + 1
    selected = torch.zeros(2, 4, dtype=torch.bool)
    for i, row in enumerate(rows):
        selected[i, row] = True
    assert describe_selection(selected) == " ".join(
        f"{e}={c / 2:.2f}" for e, c in sorted(counts.items(), key=lambda kv: -kv[1])
    )


def test_decision_thresholds_follow_eval_threshold():
    cfg = {"tasks": {}, "eval": {"threshold": 0.3}}
    assert decision_thresholds(cfg, TASKS) == {"seg": [0.3], "labels": [0.3, 0.3, 0.3]}


def test_collect_inputs_files_folders_and_tables(tmp_path):
    """Files and folders in order (a folder's images by natural name order, other files
    ignored), a table's ``id`` and relative paths, repeated ids made unique, and a missing
    file kept (it fails alone when read)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("img10.png", "img2.png", "notes.txt"):
        (folder / name).write_bytes(b"x")
    table = tmp_path / "inputs.csv"
    table.write_text("id,path,label\ncase 1,photos/img2.png,3\n,photos/img10.png,1\n")
    spec = InputSpec("image", "image", 3, (8, 8))
    items = collect_inputs([folder, table, tmp_path / "missing.jpg"], InputPipeline((spec,)))
    assert [i.id for i in items] == ["img2", "img10", "case_1", "img10-2", "missing"]
    assert items[2].paths == {"image": folder / "img2.png"}
    assert items[2].where == f"{table} row 2"
    assert items[4].paths["image"] == tmp_path / "missing.jpg"


def test_multimodal_inputs_come_from_a_table_with_missing_cells(tmp_path):
    specs = (InputSpec("fundus", "image", 3, (8, 8)), InputSpec("oct", "volume", 4, (8, 8)))
    pipeline = InputPipeline(specs, dict_inputs=True)
    table = tmp_path / "cases.csv"
    table.write_text("id,fundus,oct\np1,a.jpg,\np2,,scans/p2\n")
    items = collect_inputs([table], pipeline)
    assert items[0].paths == {"fundus": tmp_path / "a.jpg", "oct": None}
    assert items[1].paths == {"fundus": None, "oct": tmp_path / "scans" / "p2"}
    with pytest.raises(ConfigError, match="give a CSV with one column per modality"):
        collect_inputs([tmp_path / "a.jpg"], pipeline)
    (tmp_path / "other.csv").write_text("name,file\nx,y.png\n")
    with pytest.raises(ConfigError, match="no input column; expected one of fundus, oct"):
        collect_inputs([tmp_path / "other.csv"], pipeline)


def test_an_unreadable_file_is_one_line_and_the_others_are_predicted(tmp_path):
    good = []
    for i, (h, w) in enumerate([(40, 60), (90, 30)]):
        good.append(tmp_path / f"good{i}.png")
        Image.fromarray(disc_photograph(h, w, (h // 2, w // 2), min(h, w) // 3)).save(good[-1])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    predictor = stub_predictor("resize")
    items = collect_inputs([good[0], bad, good[1]], predictor.pipeline)
    lines = []
    result = predict_to_folder(predictor, items, tmp_path / "out", report=lines.append)
    assert [r["id"] for r in result.rows] == ["good0", "good1"]
    assert [item.id for item, _ in result.failures] == ["bad"]
    assert len(lines) == 1 and lines[0].startswith(f"moekit: error: {bad}: cannot read image")
    table = pd.read_csv(result.csv)
    assert list(table["id"]) == ["good0", "good1"]
    for path, mask in zip(good, table["seg/mask"]):
        assert Image.open(tmp_path / "out" / mask).size == Image.open(path).size
    assert (tmp_path / "out" / "overlays" / "good1.png").stat().st_size > 1000


def test_the_pipeline_reads_a_file_as_the_idrid_dataset_does(tmp_path_factory):
    """For every test photograph of the IDRiD replica (several cameras and sizes), the tensor
    predict makes from the file is the dataset's evaluation input (fundus field of view,
    ImageNet normalisation), bit for bit."""
    root = idrid_replica(tmp_path_factory)
    data = {"type": "idrid", "root": str(root), "image_size": [32, 48]}
    cfg = {"tasks": {}, "data": {"test": {**data, "split": "test"}}}
    pipeline, dataset = pipeline_from_config(cfg)
    assert pipeline.specs[0].preprocess == {"type": "fundus_fov"}
    for index, record in enumerate(dataset.records):
        loaded = pipeline.load(InputItem(record.image_id, {"image": record.image}, "x"))
        assert torch.equal(loaded.batch.inputs[0], dataset[index]["inputs"])
    assert IDRID_LAYOUT.segmentation in str(dataset.records[-1].image)


def test_the_pipeline_reads_fundus_and_oct_as_the_gamma_dataset_does(tmp_path_factory):
    root = gamma_replica(tmp_path_factory)
    data = {"type": "gamma", "root": str(root), "num_bscans": 4, "fundus_size": [64, 96]}
    data.update(oct_size=[32, 32], sources=["grading"], tasks=["grade"])
    cfg = {"tasks": {}, "data": {"test": {**data, "split": "test"}}}
    pipeline, dataset = pipeline_from_config(cfg)
    assert pipeline.dict_inputs and pipeline.names == ["fundus", "oct"]
    assert [s.kind for s in pipeline.specs] == ["image", "volume"]
    for index, record in enumerate(dataset.records):
        oct_folder = record.bscans[0].parent if record.bscans else None
        item = InputItem(record.patient, {"fundus": record.fundus, "oct": oct_folder}, "x")
        loaded = pipeline.load(item)
        sample = dataset[index]
        for m, name in enumerate(pipeline.names):
            assert bool(loaded.batch.present[0, m]) == (name in sample["inputs"])
            if name in sample["inputs"]:
                assert torch.equal(loaded.batch.inputs[name][0], sample["inputs"][name])


def test_a_volume_with_too_few_slices_is_a_data_error(tmp_path):
    folder = tmp_path / "scan"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "1.png")
    spec = InputSpec("oct", "volume", 4, (8, 8))
    pipeline = InputPipeline((spec,))
    with pytest.raises(DataError, match="1 slice images, the model takes 4"):
        pipeline.load(InputItem("scan", {"oct": folder}, str(folder)))


# ------------------------------------------------------------------------ end to end
def predict(run, files, out, *extra):
    return main(["predict", str(run), *map(str, files), "--out", str(out), *extra])


def source_photograph(tmp_path_factory):
    root = idrid_replica(tmp_path_factory)
    folder = root / "A. Segmentation" / "1. Original Images" / "b. Testing Set"
    return sorted(folder.glob("*.jpg"))[0]


RUNS = {"flagship": flagship_run, "modsquad": modsquad_run, "odir": odir_run}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(RUNS))
def test_predict_on_photographs_of_three_sizes(tmp_path_factory, tmp_path, family, capsys):
    """Three files of different sizes and aspect ratios: a row each, every mask at its
    input's size, an overlay each."""
    run = RUNS[family](tmp_path_factory)
    files = photographs(tmp_path / "photos", source_photograph(tmp_path_factory))
    assert predict(run, files, tmp_path / "out") == 0
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert list(table["id"]) == ["as_is", "enlarged", "square"]
    masks = [c for c in table.columns if c.endswith("/mask")]
    for path, (_, row) in zip(files, table.iterrows()):
        for column in masks:
            assert Image.open(tmp_path / "out" / row[column]).size == Image.open(path).size
        assert (tmp_path / "out" / "overlays" / f"{row['id']}.png").is_file()
    assert "predicted 3 of 3 inputs" in capsys.readouterr().out


@pytest.mark.slow
def test_flagship_predictions_name_grades_and_experts(tmp_path_factory, tmp_path):
    """The flagship's row: grade names, per-class probabilities that sum to 1, lesion masks,
    and each head's experts (its own MoE layer ``heads.<task>``)."""
    run = flagship_run(tmp_path_factory)
    files = photographs(tmp_path / "photos", source_photograph(tmp_path_factory))
    assert predict(run, files[:1], tmp_path / "out", "--tta", "flip") == 0
    row = pd.read_csv(tmp_path / "out" / "predictions.csv").iloc[0]
    grades = ["none", "mild", "moderate", "severe", "proliferative"]
    probs = [row[f"rg/prob/{g}"] for g in grades]
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert row["rg/name"] == grades[int(np.argmax(probs))]
    for task in ("rg", "mer", "MA", "HE", "EX", "SE", "OD"):
        assert row[f"{task}/experts"].startswith(f"heads.{task}:")
    mask = np.asarray(Image.open(tmp_path / "out" / row["OD/mask"]))
    assert set(np.unique(mask)) <= {0, 255}
    assert row["OD/area"] == pytest.approx((mask > 0).mean())


@pytest.mark.slow
def test_an_unreadable_file_among_good_ones_exits_2_with_one_line(
    tmp_path_factory, tmp_path, capsys
):
    run = flagship_run(tmp_path_factory)
    files = photographs(tmp_path / "photos", source_photograph(tmp_path_factory))
    bad = tmp_path / "photos" / "truncated.jpg"
    bad.write_bytes(files[0].read_bytes()[:200])
    capsys.readouterr()  # the training's own lines, when this test trains the run
    assert predict(run, [files[0], bad, *files[1:]], tmp_path / "out") == 2
    err = capsys.readouterr().err.splitlines()
    assert len([line for line in err if line.startswith("moekit: error:")]) == 1
    assert str(bad) in err[0]
    assert err[-2:] == ["moekit: 1 of 4 inputs failed:", f"  {bad}"]
    assert len(pd.read_csv(tmp_path / "out" / "predictions.csv")) == 3


@pytest.mark.slow
def test_multimodal_predictions_from_a_table_with_a_missing_modality(tmp_path_factory, tmp_path):
    """M4oE on the GAMMA replica: fundus and OCT, fundus alone, OCT alone (no mask: the masks
    are drawn on the fundus); masks at the fundus photograph's own size."""
    run = m4oe_run(tmp_path_factory)
    patients = gamma_replica(tmp_path_factory) / "Glaucoma_grading" / "testing"
    patients = patients / "multi-modality_images"
    with_both = [p for p in sorted(patients.iterdir()) if (p / f"{p.name}.jpg").is_file()][:2]
    fundus = [p / f"{p.name}.jpg" for p in with_both]
    big = tmp_path / "big.png"
    Image.open(fundus[1]).resize((250, 170)).save(big)
    table = tmp_path / "cases.csv"
    table.write_text(
        "id,fundus,oct\n"
        f"both,{fundus[0]},{with_both[0] / with_both[0].name}\n"
        f"fundus_only,{big},\n"
        f"oct_only,,{with_both[1] / with_both[1].name}\n"
    )
    assert predict(run, [table], tmp_path / "out") == 0
    rows = pd.read_csv(tmp_path / "out" / "predictions.csv", keep_default_na=False)
    rows = rows.set_index("id")
    assert (
        Image.open(tmp_path / "out" / rows.loc["both", "disc/mask"]).size
        == Image.open(fundus[0]).size
    )
    assert Image.open(tmp_path / "out" / rows.loc["fundus_only", "cup/mask"]).size == (250, 170)
    assert rows.loc["oct_only", "disc/mask"] == "" and rows.loc["oct_only", "input/fundus"] == ""
    for patient in rows.index:
        probs = [rows.loc[patient, f"grade/prob/{g}"] for g in ("non", "early", "mid_advanced")]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert "msoe.oct" not in rows.loc["fundus_only", "experts"]


def test_predict_refuses_an_output_folder_that_is_not_empty(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["predict", str(tmp_path), "x.png", "--out", str(out)]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
