"""MultiTaskShapes: sample format, determinism, label consistency, caching, label fractions."""

import cv2
import numpy as np
import pytest
import torch

from moekit.data.collate import collate_samples
from moekit.data.multitask_shapes import (
    SHAPE_CLASSES,
    TASK_NAMES,
    MultiTaskShapes,
    boundary_map,
    multitask_shapes_tasks,
    shape_mask,
    trivial_baselines,
)
from moekit.errors import ConfigError
from moekit.registry import DATASETS
from moekit.types import tasks_from_config


@pytest.fixture(scope="module")
def dataset():
    return MultiTaskShapes(split="train", num_samples=96, image_size=48, seed=3)


def test_sample_format_and_collate(dataset):
    sample = dataset[0]
    assert sample["inputs"].shape == (3, 48, 48) and sample["inputs"].dtype == torch.float32
    targets = sample["targets"]
    assert set(targets) == set(TASK_NAMES)
    assert targets["shape"].shape == () and targets["shape"].dtype == torch.long
    assert targets["count"].shape == () and targets["count"].dtype == torch.long
    assert targets["semseg"].shape == (48, 48) and targets["semseg"].dtype == torch.long
    assert targets["edge"].shape == (1, 48, 48) and targets["edge"].dtype == torch.float32
    assert targets["depth"].shape == (1, 48, 48) and targets["depth"].dtype == torch.float32
    assert set(targets["edge"].unique().tolist()) <= {0.0, 1.0}
    assert sample["has_target"] == dict.fromkeys(TASK_NAMES, True)
    assert sample["meta"]["id"] == "train/000000"

    batch = collate_samples([dataset[i] for i in range(4)])
    assert batch.inputs.shape == (4, 3, 48, 48)
    assert batch.targets["semseg"].shape == (4, 48, 48)
    assert batch.has_target["depth"].dtype == torch.bool and batch.has_target["depth"].all()


def test_inputs_are_imagenet_normalised(dataset):
    raw = dataset.arrays(1)["image"].astype(np.float32) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = ((raw - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(dataset[1]["inputs"].numpy(), expected, atol=1e-5)


def _assert_same(a, b):
    assert torch.equal(a["inputs"], b["inputs"])
    for task in a["targets"]:
        assert torch.equal(a["targets"][task], b["targets"][task])


def test_deterministic_per_index_and_splits_differ(dataset):
    again = MultiTaskShapes(split="train", num_samples=96, image_size=48, seed=3)
    for index in (0, 17, 95):
        _assert_same(dataset[index], again[index])
    # a sample does not depend on what was generated before it (DataLoader workers agree)
    fresh = MultiTaskShapes(split="train", num_samples=96, image_size=48, seed=3)
    _assert_same(fresh[42], dataset[42])
    # a longer split starts with the same samples
    _assert_same(
        MultiTaskShapes(split="train", num_samples=200, image_size=48, seed=3)[5], dataset[5]
    )

    images = {
        split: np.stack(
            [
                MultiTaskShapes(split=split, num_samples=8, image_size=48, seed=3).arrays(i)[
                    "image"
                ]
                for i in range(8)
            ]
        )
        for split in ("train", "val", "test")
    }
    other_seed = MultiTaskShapes(split="train", num_samples=8, image_size=48, seed=4).arrays(0)
    assert not np.array_equal(other_seed["image"], images["train"][0])
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        for i in range(8):
            for j in range(8):
                assert not np.array_equal(images[a][i], images[b][j])


def _painted(scene, size):
    """Instance map re-derived from the objects: the nearest object covering each pixel."""
    depth = np.full((size, size), np.inf)
    expected = np.zeros((size, size), dtype=np.uint8)
    for k, obj in enumerate(scene.objects):
        nearer = shape_mask(obj, size) & (obj.depth < depth)
        expected[nearer] = k + 1
        depth[nearer] = obj.depth
    return expected


def test_labels_are_consistent_with_the_scene(dataset):
    size = dataset.image_size
    low = dataset.num_shapes[0]
    overlaps = dominated = 0
    for index in range(len(dataset)):
        scene = dataset.render(index)
        objects = scene.objects
        # occlusion follows depth: re-painting nearest-wins gives the same instance map
        np.testing.assert_array_equal(scene.instances, _painted(scene, size))
        masks = [shape_mask(obj, size) for obj in objects]
        overlaps += sum(
            bool((masks[i] & masks[j]).any())
            for i in range(len(masks))
            for j in range(i + 1, len(masks))
        )
        # semseg: 1 + shape class of the visible object, 0 on the background
        for k, obj in enumerate(objects):
            visible = scene.instances == k + 1
            assert (scene.semseg[visible] == obj.shape + 1).all()
            assert (scene.depth[visible] == np.float32(obj.depth)).all()
        background = scene.instances == 0
        assert (scene.semseg[background] == 0).all()
        assert scene.depth[background].min() > max(obj.depth for obj in objects)
        # count: the number of objects, each one visible 4-connected region
        assert scene.count + low == len(objects)
        assert len(np.unique(scene.instances)) == len(objects) + 1
        for k in range(len(objects)):
            components, _ = cv2.connectedComponents(
                (scene.instances == k + 1).astype(np.uint8), connectivity=4
            )
            assert components == 2
        # shape: the class of the object with the largest visible area, which is the nearest
        # object, at least 1.5 times the visible area of any other (one clear answer)
        areas = [(scene.instances == k + 1).sum() for k in range(len(objects))]
        assert scene.shape == objects[int(np.argmax(areas))].shape == objects[-1].shape
        if len(objects) > 1:
            assert areas[-1] >= 1.5 * max(areas[:-1])
            dominated += 1
        # edges: boundaries of the objects, which include every semseg boundary
        np.testing.assert_array_equal(scene.edge, boundary_map(scene.instances))
        assert (scene.edge >= boundary_map(scene.semseg)).all()
    assert overlaps > 0, "no occlusion was exercised"
    assert dominated > len(dataset) // 2, "too few scenes with several objects"


def test_objects_are_brighter_than_the_background_in_every_channel(dataset):
    pairs = distinct = 0
    for index in range(len(dataset)):
        scene = dataset.render(index)
        image = scene.image.astype(np.float64) / 255
        background = image[scene.instances == 0].mean(axis=0)
        for k, obj in enumerate(scene.objects):
            assert 0.55 <= min(obj.color) <= max(obj.color) <= 1.0
            visible = image[scene.instances == k + 1].mean(axis=0)
            assert (visible > background + 0.05).all(), (index, k, visible, background)
            for other in scene.objects[:k]:
                pairs += 1
                distinct += np.abs(np.subtract(obj.color, other.color)).mean() >= 0.15
    assert pairs > 0 and distinct >= 0.95 * pairs


def test_class_balance_and_ranges(dataset):
    shapes = [int(dataset.arrays(i)["shape"]) for i in range(len(dataset))]
    counts = [int(dataset.arrays(i)["count"]) for i in range(len(dataset))]
    assert set(shapes) == set(range(len(SHAPE_CLASSES)))
    assert set(counts) == {0, 1, 2, 3}
    assert max(np.bincount(shapes)) < 0.5 * len(dataset)


def test_cache_round_trip(tmp_path):
    on_the_fly = MultiTaskShapes(split="val", num_samples=12, image_size=32, seed=1)
    written = MultiTaskShapes(
        split="val", num_samples=12, image_size=32, seed=1, cache_dir=tmp_path
    )
    files = list(tmp_path.glob("multitask_shapes_val_*.npz"))
    assert len(files) == 1
    read = MultiTaskShapes(split="val", num_samples=12, image_size=32, seed=1, cache_dir=tmp_path)
    for index in range(12):
        _assert_same(on_the_fly[index], written[index])
        _assert_same(on_the_fly[index], read[index])
    MultiTaskShapes(split="val", num_samples=12, image_size=32, seed=2, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("multitask_shapes_val_*.npz"))) == 2


def test_label_fraction_masks_targets():
    fractions = {"semseg": 0.25, "count": 0.25, "depth": 0.0}
    ds = MultiTaskShapes(num_samples=40, image_size=32, label_fraction=fractions)
    samples = [ds[i] for i in range(40)]
    labelled = {t: [s["has_target"][t] for s in samples] for t in TASK_NAMES}
    assert sum(labelled["semseg"]) == sum(labelled["count"]) == 10
    assert labelled["semseg"] != labelled["count"]  # each task has its own subset
    assert sum(labelled["depth"]) == 0
    assert all(labelled["shape"]) and all(labelled["edge"])
    for s in samples:
        if not s["has_target"]["semseg"]:
            assert s["targets"]["semseg"].shape == (32, 32) and not s["targets"]["semseg"].any()
    again = MultiTaskShapes(num_samples=40, image_size=32, label_fraction=fractions)
    assert [again[i]["has_target"]["semseg"] for i in range(40)] == labelled["semseg"]
    batch = collate_samples(samples[:8])
    assert batch.has_target["semseg"].tolist() == labelled["semseg"][:8]


def test_task_subset_and_tasks_block():
    ds = MultiTaskShapes(num_samples=4, image_size=32, tasks=["semseg", "count"], num_shapes=[2, 3])
    sample = ds[0]
    assert set(sample["targets"]) == {"semseg", "count"}
    assert 0 <= int(sample["targets"]["count"]) <= 1
    block = multitask_shapes_tasks(num_shapes=[2, 3])
    tasks = tasks_from_config({"tasks": block})
    assert tasks["count"].num_classes == 2 and tasks["semseg"].num_classes == 5
    assert tasks["depth"].kind == "regression" and tasks["depth"].is_dense
    assert tasks["edge"].is_dense and not tasks["shape"].is_dense


def test_built_from_the_registry():
    ds = DATASETS.build(
        {
            "type": "multitask_shapes",
            "split": "test",
            "num_samples": 3,
            "image_size": 32,
            "num_shapes": [1, 2],
        }
    )
    assert isinstance(ds, MultiTaskShapes) and len(ds) == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "training"}, "unknown split 'training'"),
        ({"tasks": ["shapes"]}, "did you mean 'shape'"),
        ({"tasks": ["shape", "shape"]}, "multitask_shapes: tasks must be a non-empty list"),
        ({"tasks": []}, "non-empty list without repeats"),
        ({"tasks": "shape"}, "must be a list of task names, got 'shape'"),
        ({"num_shapes": [3, 1]}, "num_shapes"),
        ({"label_fraction": {"semseg": 1.5}}, "label_fraction.semseg"),
        ({"label_fraction": {"normals": 0.5}}, "label_fraction names 'normals'"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MultiTaskShapes(num_samples=4, image_size=32, **kwargs)


def test_trivial_baselines(dataset):
    base = trivial_baselines(dataset)
    assert set(base) == set(TASK_NAMES)
    shapes = np.array([int(dataset.arrays(i)["shape"]) for i in range(len(dataset))])
    assert base["shape"]["accuracy"] == pytest.approx(np.bincount(shapes).max() / len(shapes))
    assert 0.25 <= base["count"]["accuracy"] < 0.5
    semseg = np.stack([dataset.arrays(i)["semseg"] for i in range(len(dataset))])
    assert base["semseg"]["pixel_accuracy"] == pytest.approx((semseg == 0).mean())
    assert base["semseg"]["miou"] == pytest.approx((semseg == 0).mean() / 5)
    assert base["edge"]["f1_all_zero"] == 0.0 and 0 < base["edge"]["f1"] < 0.5
    depth = np.stack([dataset.arrays(i)["depth"] for i in range(len(dataset))])
    assert base["depth"]["rmse"] == pytest.approx(depth.std(), rel=1e-4)
    partial = MultiTaskShapes(num_samples=20, image_size=32, label_fraction={"depth": 0.0})
    assert "depth" not in trivial_baselines(partial)
