"""PASCAL-Context loader on the synthetic PASCAL_MT replica: every task, flips, errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from moekit.data.collate import collate_samples
from moekit.data.pascal_context import (
    NORMALS_VALID_CONTEXT_CLASSES,
    PERSON_CLASS,
    TASK_NAMES,
    PascalContext,
    pascal_context_tasks,
    thin,
)
from moekit.data.replicas.pascal_context import make_pascal_context_replica
from moekit.errors import ConfigError, DataError
from moekit.registry import DATASETS
from moekit.types import tasks_from_config

SIZE = (40, 56)


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    return make_pascal_context_replica(tmp_path_factory.mktemp("pascal"), 6, 4, SIZE, seed=1)


def _ids(root, split):
    return (root / "ImageSets" / "Context" / f"{split}.txt").read_text().split()


def _png(path):
    return np.asarray(Image.open(path))


def test_every_task_is_read_as_written(replica):
    ds = PascalContext(replica, "val", image_size=SIZE, flip=False)
    assert ds.ids == _ids(replica, "val") and len(ds) == 4
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for index, image_id in enumerate(ds.ids):
        sample = ds[index]
        targets, has = sample["targets"], sample["has_target"]
        assert set(targets) == set(TASK_NAMES) and sample["meta"]["id"] == image_id
        photo = _png(replica / "JPEGImages" / f"{image_id}.jpg") / 255.0
        np.testing.assert_allclose(
            sample["inputs"].numpy(), ((photo - mean) / std).transpose(2, 0, 1), atol=1e-5
        )
        semseg = _png(replica / "semseg" / "pascal-context" / f"{image_id}.png")
        assert torch.equal(targets["semseg"], torch.from_numpy(semseg.astype(np.int64)))
        sal = _png(replica / "sal_distill" / f"{image_id}.png") >= 128
        assert torch.equal(targets["sal"][0], torch.from_numpy(sal.astype(np.float32)))
        edge = _png(replica / "edges" / f"{image_id}.png") > 0
        assert torch.equal(targets["edge"][0], torch.from_numpy(edge.astype(np.float32)))
        normals = _png(replica / "normals_distill" / f"{image_id}.png") * (2 / 255) - 1
        normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
        np.testing.assert_allclose(
            targets["normals"].numpy(), normals.transpose(2, 0, 1), atol=1e-5
        )
        parts_file = replica / "human_parts" / f"{image_id}.png"
        assert has == {**dict.fromkeys(TASK_NAMES, True), "human_parts": parts_file.exists()}
        if parts_file.exists():
            parts = torch.from_numpy(_png(parts_file).astype(np.int64))
            assert torch.equal(targets["human_parts"], parts)
            # parts lie on the person and cover it
            assert torch.equal(targets["human_parts"] > 0, targets["semseg"] == PERSON_CLASS)
        else:
            assert not targets["human_parts"].any() and targets["human_parts"].shape == SIZE
        assert torch.equal(targets["sal"][0] > 0, targets["semseg"] > 0)


def test_batches_mix_images_with_and_without_human_parts(replica):
    ds = PascalContext(replica, "train", image_size=32, flip=False)
    batch = collate_samples([ds[i] for i in range(len(ds))])
    assert batch.inputs.shape == (6, 3, 32, 32)
    assert batch.targets["semseg"].shape == (6, 32, 32)
    assert batch.targets["normals"].shape == (6, 3, 32, 32)
    assert batch.targets["edge"].shape == batch.targets["sal"].shape == (6, 1, 32, 32)
    assert batch.has_target["human_parts"].tolist() == [True, False] * 3
    assert batch.has_target["semseg"].all()
    assert set(batch.targets["semseg"].unique().tolist()) <= set(range(21))
    assert set(batch.targets["human_parts"].unique().tolist()) == set(range(7))
    norms = batch.targets["normals"].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_horizontal_flip_mirrors_everything_and_negates_normal_x(replica):
    plain = PascalContext(replica, "train", image_size=SIZE, flip=False)
    flipping = PascalContext(replica, "train", image_size=SIZE, seed=0)
    assert flipping.flip and not PascalContext(replica, "val", image_size=SIZE).flip
    flips = {
        (epoch, i): flipping.set_epoch(epoch) or flipping.is_flipped(i)
        for epoch in range(3)
        for i in range(len(flipping))
    }
    assert any(flips.values()) and not all(flips.values())
    epoch, index = next(key for key, flipped in flips.items() if flipped)
    flipping.set_epoch(epoch)
    a, b = plain[index], flipping[index]
    assert b["meta"]["flipped"] and not a["meta"]["flipped"]
    assert torch.equal(b["inputs"], a["inputs"].flip(-1))
    for task in ("semseg", "human_parts", "sal", "edge"):
        assert torch.equal(b["targets"][task], a["targets"][task].flip(-1))
    normals_a, normals_b = a["targets"]["normals"], b["targets"]["normals"]
    assert torch.equal(normals_b[0], -normals_a[0].flip(-1))
    assert torch.equal(normals_b[1:], normals_a[1:].flip(-1))
    # the flips of an epoch are reproducible
    flipping.set_epoch(epoch)
    assert torch.equal(flipping[index]["inputs"], b["inputs"])


def test_resize_keeps_label_values(replica):
    ds = PascalContext(replica, "train", image_size=[24, 30], flip=False, tasks=["semseg", "edge"])
    sample = ds[0]
    assert set(sample["targets"]) == {"semseg", "edge"}
    assert sample["inputs"].shape == (3, 24, 30) and sample["targets"]["semseg"].shape == (24, 30)
    original = set(np.unique(_png(replica / "semseg" / "pascal-context" / f"{ds.ids[0]}.png")))
    assert set(sample["targets"]["semseg"].unique().tolist()) <= original
    assert sample["meta"]["size"] == SIZE


def test_matlab_layout_matches_png_layout(tmp_path):
    pytest.importorskip("scipy.io")
    png = make_pascal_context_replica(tmp_path / "png", 4, 2, SIZE, seed=5)
    mat = make_pascal_context_replica(tmp_path / "mat", 4, 2, SIZE, seed=5, matlab=True)
    assert (
        not (mat / "edges").exists()
        and (mat / "human_parts" / f"{_ids(mat, 'train')[1]}.mat").exists()
    )
    from scipy.io import loadmat

    a_ds, b_ds = (PascalContext(root, "train", image_size=SIZE, flip=False) for root in (png, mat))
    invalid_pixels = 0
    for index in range(4):
        a, b = a_ds[index], b_ds[index]
        assert a["has_target"] == b["has_target"]
        for task in ("semseg", "human_parts", "sal", "edge"):
            assert torch.equal(a["targets"][task], b["targets"][task])
        label_map = loadmat(mat / "pascal-context" / "trainval" / f"{b_ds.ids[index]}.mat")[
            "LabelMap"
        ]
        valid = torch.from_numpy(np.isin(label_map, list(NORMALS_VALID_CONTEXT_CLASSES)))
        invalid_pixels += int((~valid).sum())
        assert torch.equal(b["targets"]["normals"][:, valid], a["targets"]["normals"][:, valid])
        assert not b["targets"]["normals"][:, ~valid].any()
    assert invalid_pixels > 0


def test_thin_matches_skimage_example():
    square = np.zeros((7, 7), dtype=bool)
    square[1:-1, 2:-2] = True
    square[0, 1] = True
    expected = np.zeros((7, 7), dtype=bool)
    expected[0, 1] = expected[1, 2] = True
    expected[2:5, 3] = True
    np.testing.assert_array_equal(thin(square), expected)


def test_registry_and_tasks_block(replica):
    ds = DATASETS.build(
        {"type": "pascal_context", "root": str(replica), "split": "val", "image_size": 32}
    )
    assert isinstance(ds, PascalContext) and len(ds) == 4
    tasks = tasks_from_config({"tasks": pascal_context_tasks()})
    assert [t.num_classes for t in tasks.values()] == [21, 7, 1, 3, 1]
    assert tasks["normals"].kind == "regression" and tasks["normals"].is_dense


def _one_line(exc_info):
    assert "\n" not in str(exc_info.value)
    return str(exc_info.value)


def test_clear_errors_for_a_wrong_root_or_split(tmp_path, replica):
    with pytest.raises(DataError) as exc:
        PascalContext(tmp_path / "nowhere")
    assert "nowhere" in _one_line(exc)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as exc:
        PascalContext(tmp_path / "empty")
    assert "JPEGImages" in _one_line(exc)
    with pytest.raises(DataError) as exc:
        PascalContext(replica, "test")
    message = _one_line(exc)
    assert "ImageSets/Context/test.txt" in message and "['train', 'val']" in message
    with pytest.raises(ConfigError, match="did you mean 'normals'"):
        PascalContext(replica, tasks=["normal"])
    with pytest.raises(ConfigError, match="pascal_context: tasks must be a non-empty list"):
        PascalContext(replica, tasks=["sal", "sal"])
    with pytest.raises(ConfigError, match="pascal_context: unknown task 'shape'"):
        pascal_context_tasks(tasks=["shape"])


def test_clear_errors_for_missing_or_bad_files(tmp_path):
    root = make_pascal_context_replica(tmp_path / "pascal", 4, 2, SIZE, seed=2)
    ids = _ids(root, "train")
    (root / "sal_distill" / f"{ids[2]}.png").unlink()
    with pytest.raises(DataError) as exc:
        PascalContext(root, "train")
    assert f"sal_distill/{ids[2]}.png" in _one_line(exc)
    assert len(PascalContext(root, "train", tasks=["semseg", "edge"])) == 4

    (root / "JPEGImages" / f"{ids[1]}.jpg").write_bytes(b"not a jpeg")
    ds = PascalContext(root, "train", tasks=["semseg"], flip=False)
    with pytest.raises(DataError) as exc:
        ds[1]
    assert f"{ids[1]}.jpg" in _one_line(exc)

    semseg = root / "semseg" / "pascal-context" / f"{ids[0]}.png"
    Image.fromarray(np.full(SIZE, 40, dtype=np.uint8)).save(semseg)
    with pytest.raises(DataError) as exc:
        ds[0]
    assert semseg.name in _one_line(exc) and "value 40" in str(exc.value)
    assert (
        PascalContext(root, "train", tasks=["semseg"], semseg_num_classes=60)[0]["targets"][
            "semseg"
        ].max()
        == 40
    )


def test_cli_writes_a_replica(tmp_path, capsys):
    from moekit.cli import main

    argv = ["data", "make-pascal", str(tmp_path / "p"), "--n-train", "2", "--n-val", "1"]
    assert main([*argv, "--size", "40x32", "--seed", "3"]) == 0
    assert "2 train / 1 val, 40x32 px" in capsys.readouterr().out
    sample = PascalContext(tmp_path / "p", "val", image_size=16)[0]
    assert sample["inputs"].shape == (3, 16, 16) and sample["meta"]["size"] == (32, 40)
