"""A tiny synthetic PASCAL-Context in the ``PASCAL_MT`` layout, with consistent annotations.

Each image is a two-part background (a top class — sky or wall — above a horizon, and a ground
class — grass or floor — below it) with one to three objects of PASCAL VOC classes drawn as
boxes and ellipses, nearer objects painted over farther ones. Every other image contains a
person, drawn as a box split into the six ASTMT part groups (head; torso; upper arms; lower
arms; upper legs; lower legs). From that one scene the writer derives every file the loader
reads (see :mod:`moekit.data.pascal_context`):

* ``LabelMap`` (459-class PASCAL-Context ids): background classes and each object's class
  mapped through ASTMT's VOC→Context table; ``semseg`` (21 VOC classes) from the objects;
* ``human_parts``: part ids on the visible pixels of the person (no file without a person);
* ``sal_distill``: 255 on objects; ``normals_distill``: one unit normal per background class
  and per object, RGB-encoded as ``(n + 1) / 2 * 255``; ``edges``: ASTMT's edges of the
  ``LabelMap``.

With ``matlab=True`` (needs scipy) the two MATLAB files of the real release are written
instead of their PNG conversions: ``pascal-context/trainval/<id>.mat`` (``LabelMap``) and
``human_parts/<id>.mat`` (a PASCAL-Part ``anno`` struct, for every image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from moekit.data.pascal_context import PERSON_CLASS, edges_from_label_map

# ASTMT's CONTEXT_CATEGORY_LABELS: VOC class index -> 459-class PASCAL-Context id.
VOC_TO_CONTEXT = (
    0, 2, 23, 25, 31, 34, 45, 59, 65, 72, 98, 397, 113, 207, 258, 284, 308, 347, 368, 416, 427,
)  # fmt: skip
TOP_CLASSES = (360, 440)  # sky (no valid normals), wall (valid)
GROUND_CLASSES = (187, 158)  # grass (no valid normals), floor (valid)
PART_NAMES = {1: "head", 2: "torso", 3: "luarm", 4: "llarm", 5: "luleg", 6: "llleg"}
_TOWARDS = np.array([0.0, 0.0, 1.0])  # normals face the camera, with random tilts


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _person_parts(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Part ids over the image for a person standing in ``box = (top, bottom, left, right)``."""
    top, bottom, left, right = box
    yy, xx = np.mgrid[0:height, 0:width]
    rel_y = (yy - top) / max(bottom - top, 1)
    rel_x = (xx - left) / max(right - left, 1)
    parts = np.select(
        [rel_y < 0.2, rel_y >= 0.8, rel_y >= 0.6, (rel_x < 0.2) | (rel_x >= 0.8)],
        [1, 6, 5, np.where(rel_y < 0.4, 3, 4)],
        default=2,
    ).astype(np.uint8)
    inside = (yy >= top) & (yy < bottom) & (xx >= left) & (xx < right)
    return np.where(inside, parts, 0).astype(np.uint8)


def _scene(rng: np.random.Generator, height: int, width: int, with_person: bool) -> dict:
    """One image's ``LabelMap``, instance map, object classes, semseg and part maps."""
    horizon = int(rng.integers(height // 4, 3 * height // 4))
    label_map = np.empty((height, width), dtype=np.uint16)
    label_map[:horizon] = TOP_CLASSES[rng.integers(2)]
    label_map[horizon:] = GROUND_CLASSES[rng.integers(2)]
    others = [c for c in range(1, 21) if c != PERSON_CLASS]
    count = int(rng.integers(1, 4))
    classes = [int(rng.choice(others)) for _ in range(count)]
    if with_person:
        classes[0] = PERSON_CLASS
    yy, xx = np.mgrid[0:height, 0:width]
    instances = np.zeros((height, width), dtype=np.uint8)
    parts = np.zeros((height, width), dtype=np.uint8)
    for k, voc in enumerate(classes):
        h = int(height * rng.uniform(0.4, 0.7))
        w = (
            int(width * rng.uniform(0.15, 0.3))
            if voc == PERSON_CLASS
            else int(width * rng.uniform(0.2, 0.4))
        )
        top, left = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        if voc == PERSON_CLASS or rng.random() < 0.5:
            mask = (yy >= top) & (yy < top + h) & (xx >= left) & (xx < left + w)
        else:
            cy, cx = top + h / 2, left + w / 2
            mask = ((yy + 0.5 - cy) / (h / 2)) ** 2 + ((xx + 0.5 - cx) / (w / 2)) ** 2 <= 1
        instances[mask] = k + 1
        parts[mask] = 0
        if voc == PERSON_CLASS:
            parts = np.maximum(parts, _person_parts(height, width, (top, top + h, left, left + w)))
    semseg = np.array([0, *classes], dtype=np.uint8)[instances]
    parts[semseg != PERSON_CLASS] = 0
    context = np.array([0, *(VOC_TO_CONTEXT[c] for c in classes)], dtype=np.uint16)[instances]
    label_map = np.where(instances > 0, context, label_map).astype(np.uint16)
    return {
        "label_map": label_map,
        "instances": instances,
        "semseg": semseg,
        "parts": parts,
        "classes": classes,
    }


def _render(rng: np.random.Generator, scene: dict) -> tuple[np.ndarray, np.ndarray]:
    """The RGB photograph and the RGB-encoded normals of a scene."""
    label_map = scene["label_map"]
    ids = np.unique(label_map)
    colors = {int(i): rng.uniform(0.1, 0.9, 3) for i in ids}
    normals = {int(i): _unit(rng.normal(0, 0.4, 3) + _TOWARDS) for i in ids}
    keys = scene["instances"].astype(np.int64) * 1000 + label_map
    image = np.zeros((*label_map.shape, 3))
    encoded = np.zeros((*label_map.shape, 3))
    for key in np.unique(keys):
        region = keys == key
        class_id = int(key % 1000)
        image[region] = colors[class_id] * rng.uniform(0.8, 1.2)
        facing = normals[class_id] if key < 1000 else _unit(rng.normal(0, 0.5, 3) + _TOWARDS)
        encoded[region] = facing
    image += rng.normal(0, 0.03, image.shape)
    photo = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    return photo, np.clip(np.rint((encoded + 1) / 2 * 255), 0, 255).astype(np.uint8)


def _save_png(array: np.ndarray, path: Path, palette: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if palette is not None:
        img.putpalette(palette)
    img.save(path)


def _write_mat(scene: dict, image_id: str, root: Path) -> None:
    from scipy.io import savemat

    label_dir = root / "pascal-context" / "trainval"
    label_dir.mkdir(parents=True, exist_ok=True)
    savemat(label_dir / f"{image_id}.mat", {"LabelMap": scene["label_map"]})
    objects = np.empty(
        (1, len(scene["classes"])),
        dtype=[(n, object) for n in ("class", "class_ind", "mask", "parts")],
    )
    for k, voc in enumerate(scene["classes"]):
        mask = (scene["instances"] == k + 1).astype(np.uint8)
        parts = np.zeros((0, 0))
        if voc == PERSON_CLASS:
            groups = [g for g in PART_NAMES if (scene["parts"][mask > 0] == g).any()]
            parts = np.empty((1, len(groups)), dtype=[("part_name", object), ("mask", object)])
            for j, g in enumerate(groups):
                parts[0, j] = (PART_NAMES[g], ((scene["parts"] == g) & (mask > 0)).astype(np.uint8))
        objects[0, k] = (f"class{voc}", np.array([[voc]], dtype=np.uint8), mask, parts)
    parts_dir = root / "human_parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    savemat(parts_dir / f"{image_id}.mat", {"anno": {"imname": image_id, "objects": objects}})


def make_pascal_context_replica(
    root: str | Path,
    n_train: int = 8,
    n_val: int = 4,
    size: tuple[int, int] = (96, 128),
    seed: int = 0,
    *,
    matlab: bool = False,
) -> Path:
    """Write a synthetic ``PASCAL_MT`` folder at ``root`` and return its path.

    Args:
        root: the folder to create (existing files are overwritten).
        n_train, n_val: images listed in ``ImageSets/Context/train.txt`` / ``val.txt``.
        size: ``(height, width)`` of every image.
        seed: everything written is a function of ``seed``.
        matlab: write ``LabelMap`` and human parts as ``.mat`` (the original release) instead
            of ``edges/<id>.png`` and ``human_parts/<id>.png``; needs scipy.
    """
    root = Path(root)
    height, width = size
    palette = [int(v) for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)]
    ids = [f"{2008 + k % 3}_{k:06d}" for k in range(n_train + n_val)]
    for k, image_id in enumerate(ids):
        rng = np.random.default_rng([seed, k])
        scene = _scene(rng, height, width, with_person=k % 2 == 0)
        photo, normals = _render(rng, scene)
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        _save_png(scene["semseg"], root / "semseg" / "pascal-context" / f"{image_id}.png", palette)
        _save_png(
            (scene["semseg"] > 0).astype(np.uint8) * 255, root / "sal_distill" / f"{image_id}.png"
        )
        _save_png(normals, root / "normals_distill" / f"{image_id}.png")
        if matlab:
            _write_mat(scene, image_id, root)
            continue
        edges = edges_from_label_map(scene["label_map"]) * 255
        _save_png(edges, root / "edges" / f"{image_id}.png")
        if scene["parts"].any():
            _save_png(scene["parts"], root / "human_parts" / f"{image_id}.png")
    split_dir = root / "ImageSets" / "Context"
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / "train.txt").write_text("".join(f"{i}\n" for i in ids[:n_train]))
    (split_dir / "val.txt").write_text("".join(f"{i}\n" for i in ids[n_train:]))
    return root
