"""MultiTaskShapes: a procedural multi-task scene dataset for checking MoE claims on a CPU.

Each image shows 1–4 shapes (circle, square, triangle, cross) of random bright colour, size,
position and rotation on a darker textured background (stripes, smooth noise or checks in two
random dark colours), with five targets of different nature:

========  ===============  ====================================================================
task      kind             target
========  ===============  ====================================================================
shape     multiclass (4)   class of the object with the largest *visible* area, ``long []``
count     multiclass (4)   number of objects minus the minimum (1..4 -> 0..3), ``long []``
semseg    segmentation (5) 0 = background, ``1 + shape class`` per pixel, ``long [H, W]``
edge      segmentation (1) object boundaries (instance map changes), ``float [1, H, W]`` 0/1
depth     regression (1)   depth-like distance, ``float [1, H, W]`` (objects 0.25–0.6,
                           background a tilted plane in about 0.65–1.0)
========  ===============  ====================================================================

The scene is a small 2.5-D world: every object sits at a random depth, objects are painted far
to near (so a nearer object occludes a farther one, consistent with the depth map), an
object's apparent size scales with ``1 / depth`` and a dark haze grows with depth, so depth is
visible in the image. Objects are brighter than the background in every channel (one contrast
polarity, which a small ViT learns from scratch in CPU minutes; with free colours it does
not). Every object keeps at least half of its area visible as one 4-connected region, so
``count`` equals the number of connected objects one can see. The nearest object dominates:
every other object has at most 0.7 times its radius, and a scene is kept only if the nearest
object's visible area is at least 1.5 times any other's, so ``shape`` (the class of the
largest visible object) has one clear answer (in generator version 1, one scene in ten had a
runner-up within 10 % of the largest visible area).

Sample ``i`` of a split is a pure function of ``(seed, split, i)`` (its own
``numpy.random.Generator``), so generating on the fly is reproducible, DataLoader workers
agree, and train/val/test draw from disjoint random streams. ``cache_dir`` stores a split as
one compressed ``.npz`` named by a hash of the generation parameters.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from moekit.data.tasks import check_tasks
from moekit.data.transforms import eval_transform
from moekit.errors import ConfigError, DataError, did_you_mean
from moekit.fileio import atomic_write_bytes
from moekit.registry import DATASETS

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
TASK_NAMES: tuple[str, ...] = ("shape", "count", "semseg", "edge", "depth")
TASK_KINDS: dict[str, str] = {
    "shape": "multiclass",
    "count": "multiclass",
    "semseg": "segmentation",
    "edge": "segmentation",
    "depth": "regression",
}
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
DEFAULT_NUM_SHAPES: tuple[int, int] = (1, 4)

# Bump when the generator changes so that caches written by an older version are not reused.
GENERATOR_VERSION = 3
OBJECT_DEPTH = (0.25, 0.6)
_SIZE_AT_UNIT_DEPTH = (0.04, 0.06)  # apparent radius = size * U(range) / depth
# Objects are brighter than the background in every channel (a fixed contrast polarity): the
# channels of the two background colours are drawn in _BACKGROUND_LEVELS, an object's in
# _OBJECT_LEVELS, at a mean channel gap of at least _OBJECT_COLOR_GAP from the scene's other
# objects. With free colours (generator version 2) a small ViT trained from scratch does not
# learn the silhouettes in CPU minutes (docs/modsquad.md, "What runs on a CPU").
_BACKGROUND_LEVELS = (0.0, 0.4)
_OBJECT_LEVELS = (0.55, 1.0)
_OBJECT_COLOR_GAP = 0.15
_COLOR_TRIES = 30
# Depth darkens: a pixel at depth d is mixed with a dark haze level, weight _HAZE * d.
_HAZE = 0.6
_HAZE_LEVELS = (0.0, 0.25)
_MIN_VISIBLE_FRACTION = 0.5
_MIN_VISIBLE_PIXELS = 6
_PLACEMENT_TRIES = 40
# The nearest object dominates the scene: every other object's radius is at most 0.7 times its
# radius (half its area), and a placement is kept only if its visible area is at least 1.5
# times any other's (pixels round the areas), so `shape` has one clear answer.
_DOMINANT_RADIUS = 0.7
_DOMINANT_AREA = 1.5
# Farthest reach of each shape from its centre, in radii (see shape_mask).
_EXTENT = {"circle": 1.0, "square": 1.253, "triangle": 1.555, "cross": 1.237}


def task_num_classes(num_shapes: Sequence[int] = DEFAULT_NUM_SHAPES) -> dict[str, int]:
    """``num_classes`` of every task (``count`` depends on the range of objects per image)."""
    low, high = _shape_range(num_shapes)
    return {
        "shape": len(SHAPE_CLASSES),
        "count": high - low + 1,
        "semseg": 1 + len(SHAPE_CLASSES),
        "edge": 1,
        "depth": 1,
    }


def multitask_shapes_tasks(
    num_shapes: Sequence[int] = DEFAULT_NUM_SHAPES, tasks: Sequence[str] = TASK_NAMES
) -> dict[str, dict[str, Any]]:
    """The ``tasks:`` config block matching the dataset (kinds and class counts).

    Dense tasks that are not segmentation carry ``dense: true`` (see ``Task.is_dense``).
    Losses and metrics are left to the experiment config.
    """
    classes = task_num_classes(num_shapes)
    block: dict[str, dict[str, Any]] = {}
    for name in check_tasks("multitask_shapes", tasks, TASK_NAMES):
        block[name] = {"kind": TASK_KINDS[name], "num_classes": classes[name]}
        if name == "depth":
            block[name]["dense"] = True
    return block


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene; ``cx, cy, radius`` in pixels, ``angle`` in radians."""

    shape: int
    cx: float
    cy: float
    radius: float
    angle: float
    depth: float
    color: tuple[float, float, float]


@dataclass(frozen=True)
class Scene:
    """A rendered scene. Objects are listed far to near (the painting order).

    ``instances`` holds ``1 + position in objects`` (0 = background).
    """

    image: np.ndarray  # uint8 [H, W, 3]
    semseg: np.ndarray  # uint8 [H, W]
    instances: np.ndarray  # uint8 [H, W]
    edge: np.ndarray  # uint8 [H, W], 0/1
    depth: np.ndarray  # float32 [H, W]
    shape: int
    count: int
    objects: tuple[ShapeObject, ...]


@functools.lru_cache(maxsize=8)
def _pixel_centers(size: int) -> np.ndarray:
    """``[2, size, size]`` pixel-centre coordinates (y, x), read-only."""
    grid = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    grid.flags.writeable = False
    return grid


def shape_mask(obj: ShapeObject, size: int) -> np.ndarray:
    """Boolean ``[size, size]`` mask of the full (unoccluded) object.

    All shapes of one ``radius`` have the area of the circle ``pi * radius**2`` (so none is
    favoured by the "largest object" rule); ``_EXTENT`` gives their reach from the centre.
    """
    yy, xx = _pixel_centers(size)
    dx, dy = xx - obj.cx, yy - obj.cy
    cos, sin = np.cos(obj.angle), np.sin(obj.angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    r = obj.radius
    name = SHAPE_CLASSES[obj.shape]
    if name == "circle":
        return u * u + v * v <= r * r
    if name == "square":  # half side a: 4 a^2 = pi r^2
        return np.maximum(np.abs(u), np.abs(v)) <= 0.886 * r
    if name == "triangle":  # equilateral, apothem 0.778 r (circumradius 1.555 r)
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            phi = 2 * np.pi * k / 3
            inside &= np.cos(phi) * u + np.sin(phi) * v <= 0.778 * r
        return inside
    # cross: arms of half length L = 1.166 r and half width 0.35 L: 2.31 L^2 = pi r^2
    length = 1.166 * r
    arm = 0.35 * length
    au, av = np.abs(u), np.abs(v)
    return ((au <= arm) & (av <= length)) | ((av <= arm) & (au <= length))


def boundary_map(labels: np.ndarray) -> np.ndarray:
    """``uint8`` 0/1 map of pixels with a 4-neighbour of a different label (both sides)."""
    edge = np.zeros(labels.shape, dtype=bool)
    horizontal = labels[:, 1:] != labels[:, :-1]
    vertical = labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    return edge.astype(np.uint8)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of sample ``index`` of ``split``."""
    return np.random.default_rng([int(seed), SPLITS[split], int(index)])


def render_scene(
    rng: np.random.Generator, size: int, num_shapes: Sequence[int] = DEFAULT_NUM_SHAPES
) -> Scene:
    """Draw one scene from ``rng`` (see the module docstring for the rules)."""
    low, high = _shape_range(num_shapes)
    grid = _pixel_centers(size) / size
    background = _texture(rng, grid, size, rng.uniform(*_BACKGROUND_LEVELS, (2, 3)))
    depth = _background_depth(rng, grid)
    objects, instances = _place_objects(rng, size, int(rng.integers(low, high + 1)), low)

    image = background
    for k, obj in enumerate(objects):
        visible = instances == k + 1
        image[visible] = obj.color
        depth[visible] = obj.depth
    haze = rng.uniform(*_HAZE_LEVELS)
    image = image * (1 - _HAZE * depth[..., None]) + haze * _HAZE * depth[..., None]
    image += rng.normal(0.0, 0.03, image.shape)
    image = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)

    shape_ids = np.array([0] + [obj.shape + 1 for obj in objects], dtype=np.uint8)
    areas = np.bincount(instances.ravel(), minlength=len(objects) + 1)[1:]
    return Scene(
        image=image,
        semseg=shape_ids[instances],
        instances=instances,
        edge=boundary_map(instances),
        depth=depth.astype(np.float32),
        shape=objects[int(np.argmax(areas))].shape,
        count=len(objects) - low,
        objects=tuple(objects),
    )


def _texture(
    rng: np.random.Generator, grid: np.ndarray, size: int, colors: np.ndarray
) -> np.ndarray:
    yy, xx = grid
    kind = int(rng.integers(3))
    if kind == 0:  # stripes
        theta, period, phase = rng.uniform(0, np.pi), rng.uniform(0.08, 0.3), rng.uniform(0, 6.3)
        mix = 0.5 + 0.5 * np.sin(
            2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase
        )
    elif kind == 1:  # smooth noise
        cells = int(rng.integers(3, 9))
        coarse = rng.uniform(0, 1, (cells, cells)).astype(np.float32)
        mix = np.clip(cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC), 0, 1)
    else:  # checks
        period = rng.uniform(0.1, 0.3)
        mix = ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(np.float32)
    mix = mix[..., None]
    return (1 - mix) * colors[0] + mix * colors[1]


def _background_depth(rng: np.random.Generator, grid: np.ndarray) -> np.ndarray:
    yy, xx = grid
    base, tilt_x, tilt_y = (
        rng.uniform(0.78, 0.87),
        rng.uniform(-0.12, 0.12),
        rng.uniform(-0.12, 0.12),
    )
    return (base + tilt_x * (xx - 0.5) + tilt_y * (yy - 0.5)).astype(np.float64)


def _object_colors(rng: np.random.Generator, count: int) -> list[tuple[float, float, float]]:
    """``count`` colours with channels in ``_OBJECT_LEVELS``, each unlike the ones before it
    (a draw closer than ``_OBJECT_COLOR_GAP``, as a mean channel gap, is redrawn up to
    ``_COLOR_TRIES`` times)."""
    colors: list[np.ndarray] = []
    for _ in range(count):
        for _ in range(_COLOR_TRIES):
            color = rng.uniform(*_OBJECT_LEVELS, 3)
            if all(np.abs(color - other).mean() >= _OBJECT_COLOR_GAP for other in colors):
                break
        colors.append(color)
    return [(float(c[0]), float(c[1]), float(c[2])) for c in colors]


def _place_objects(
    rng: np.random.Generator, size: int, count: int, minimum: int
) -> tuple[list[ShapeObject], np.ndarray]:
    """Sample objects (far to near) and positions where each stays visible and connected.

    Positions are redrawn until every object keeps at least half of its area (and
    ``_MIN_VISIBLE_PIXELS``) visible as one 4-connected region. After ``_PLACEMENT_TRIES``
    failures the nearest object is dropped, or, at ``minimum`` objects, all are shrunk.
    """
    depths = np.sort(rng.uniform(*OBJECT_DEPTH, count))[::-1]
    shapes = rng.integers(0, len(SHAPE_CLASSES), count)
    sampled = size * rng.uniform(*_SIZE_AT_UNIT_DEPTH, count) / depths
    reach = np.array([_EXTENT[SHAPE_CLASSES[s]] for s in shapes])
    angles = rng.uniform(0, 2 * np.pi, count)
    colors = _object_colors(rng, count)
    scale = 1.0
    while True:
        radii = scale * _dominant_radii(sampled[:count])
        margin = np.minimum(reach[:count] * radii, size / 2 - 1)[:, None]
        for _ in range(_PLACEMENT_TRIES):
            centers = rng.uniform(margin, size - margin, (count, 2))
            objects = [
                ShapeObject(
                    int(shapes[k]),
                    float(centers[k, 0]),
                    float(centers[k, 1]),
                    float(radii[k]),
                    float(angles[k]),
                    float(depths[k]),
                    colors[k],
                )
                for k in range(count)
            ]
            masks = [shape_mask(obj, size) for obj in objects]
            instances = np.zeros((size, size), dtype=np.uint8)
            for k, mask in enumerate(masks):
                instances[mask] = k + 1
            if all(
                _is_visible(instances == k + 1, mask) for k, mask in enumerate(masks)
            ) and _is_dominant(instances, count):
                return objects, instances
        if count > minimum:
            count -= 1
        elif radii.max() > 2:
            scale *= 0.85
        else:
            raise DataError(f"multitask_shapes: cannot place {count} objects in {size}x{size} px")


def _dominant_radii(radii: np.ndarray) -> np.ndarray:
    """``radii`` (far to near) with every object but the nearest at most ``_DOMINANT_RADIUS``
    times the nearest one's radius, so the nearest has about twice the area of any other."""
    out = radii.astype(np.float64).copy()
    out[:-1] = np.minimum(out[:-1], _DOMINANT_RADIUS * out[-1])
    return out


def _is_dominant(instances: np.ndarray, count: int) -> bool:
    """The nearest object's visible area is at least ``_DOMINANT_AREA`` times any other's."""
    areas = np.bincount(instances.ravel(), minlength=count + 1)[1:]
    return count == 1 or bool(areas[-1] >= _DOMINANT_AREA * areas[:-1].max())


def _is_visible(visible: np.ndarray, full: np.ndarray) -> bool:
    area = int(visible.sum())
    if area < max(_MIN_VISIBLE_PIXELS, _MIN_VISIBLE_FRACTION * int(full.sum())):
        return False
    components, _ = cv2.connectedComponents(visible.astype(np.uint8), connectivity=4)
    return components == 2  # background + one region


def _shape_range(num_shapes: Sequence[int]) -> tuple[int, int]:
    if len(num_shapes) != 2 or not 1 <= int(num_shapes[0]) <= int(num_shapes[1]):
        raise ConfigError(
            f"num_shapes: expected [min, max] with 1 <= min <= max, got {num_shapes!r}"
        )
    return int(num_shapes[0]), int(num_shapes[1])


_ARRAY_KEYS = ("image", "semseg", "instances", "edge", "depth", "shape", "count")


@DATASETS.register("multitask_shapes")
class MultiTaskShapes(Dataset):
    """Procedural multi-task shapes (classification, counting, segmentation, edges, depth).

    Args:
        split: ``train``, ``val`` or ``test`` (disjoint random streams).
        num_samples: images in the split.
        image_size: side of the square images.
        num_shapes: ``[min, max]`` objects per image.
        seed: base seed; sample ``i`` depends only on ``(seed, split, i)``.
        cache_dir: folder for a compressed ``.npz`` of the split (written once, then read);
            ``None`` renders every sample on the fly.
        tasks: the tasks to return, a subset of ``shape, count, semseg, edge, depth``.
        label_fraction: ``{task: fraction}`` of samples labelled for the task (default 1.0);
            the labelled subset is a fixed function of ``(seed, split, task)``.
    """

    def __init__(
        self,
        split: str = "train",
        num_samples: int = 512,
        image_size: int = 64,
        num_shapes: Sequence[int] = DEFAULT_NUM_SHAPES,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        tasks: Sequence[str] = TASK_NAMES,
        label_fraction: Mapping[str, float] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ConfigError(
                f"multitask_shapes: unknown split '{split}'; valid: {', '.join(SPLITS)}"
                f"{did_you_mean(str(split), SPLITS)}"
            )
        if int(num_samples) < 1 or int(image_size) < 16:
            raise ConfigError(
                f"multitask_shapes: need num_samples >= 1 and image_size >= 16, "
                f"got {num_samples} and {image_size}"
            )
        self.split, self.num_samples, self.image_size = split, int(num_samples), int(image_size)
        self.num_shapes = _shape_range(num_shapes)
        self.seed = int(seed)
        self.tasks = check_tasks("multitask_shapes", tasks, TASK_NAMES)
        self.labelled = self._label_masks(label_fraction or {})
        self._normalize = eval_transform((self.image_size, self.image_size))
        self._arrays = None if cache_dir is None else self._load_or_build_cache(Path(cache_dir))

    def __len__(self) -> int:
        return self.num_samples

    def render(self, index: int) -> Scene:
        """Render sample ``index`` (with its objects, for inspection and tests)."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return render_scene(
            scene_rng(self.seed, self.split, index), self.image_size, self.num_shapes
        )

    def arrays(self, index: int) -> dict[str, np.ndarray]:
        """The raw arrays of sample ``index`` (from the cache when there is one)."""
        if self._arrays is not None:
            return {key: self._arrays[key][index] for key in _ARRAY_KEYS}
        scene = self.render(index)
        return {key: np.asarray(getattr(scene, key)) for key in _ARRAY_KEYS}

    def __getitem__(self, index: int) -> dict[str, Any]:
        raw = self.arrays(index)
        inputs, _ = self._normalize(raw["image"])
        targets = {
            "shape": torch.tensor(int(raw["shape"]), dtype=torch.long),
            "count": torch.tensor(int(raw["count"]), dtype=torch.long),
            "semseg": torch.from_numpy(raw["semseg"].astype(np.int64)),
            "edge": torch.from_numpy(raw["edge"].astype(np.float32))[None],
            "depth": torch.from_numpy(raw["depth"].astype(np.float32))[None],
        }
        has_target = {task: bool(self.labelled[task][index]) for task in self.tasks}
        return {
            "inputs": inputs,
            "targets": {
                task: targets[task] if has_target[task] else torch.zeros_like(targets[task])
                for task in self.tasks
            },
            "has_target": has_target,
            "meta": {"id": f"{self.split}/{index:06d}", "index": index},
        }

    def _label_masks(self, label_fraction: Mapping[str, float]) -> dict[str, np.ndarray]:
        """``bool[num_samples]`` per task: exactly ``round(fraction * N)`` labelled samples."""
        unknown = [t for t in label_fraction if t not in self.tasks]
        if unknown:
            raise ConfigError(
                f"multitask_shapes: label_fraction names '{unknown[0]}', which is not one of the "
                f"tasks {self.tasks}{did_you_mean(str(unknown[0]), self.tasks)}"
            )
        masks = {}
        for task in self.tasks:
            fraction = float(label_fraction.get(task, 1.0))
            if not 0.0 <= fraction <= 1.0:
                raise ConfigError(
                    f"multitask_shapes: label_fraction.{task} must be in [0, 1], got {fraction}"
                )
            rng = np.random.default_rng(
                [self.seed, SPLITS[self.split], 1000 + TASK_NAMES.index(task)]
            )
            chosen = rng.permutation(self.num_samples)[: round(fraction * self.num_samples)]
            mask = np.zeros(self.num_samples, dtype=bool)
            mask[chosen] = True
            masks[task] = mask
        return masks

    def cache_key(self) -> str:
        """Hash of everything the generated arrays depend on."""
        params = {
            "version": GENERATOR_VERSION,
            "split": self.split,
            "num_samples": self.num_samples,
            "image_size": self.image_size,
            "num_shapes": list(self.num_shapes),
            "seed": self.seed,
        }
        return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]

    def _load_or_build_cache(self, cache_dir: Path) -> dict[str, np.ndarray]:
        path = cache_dir / f"multitask_shapes_{self.split}_{self.cache_key()}.npz"
        if path.exists():
            try:
                with np.load(path) as data:
                    arrays = {key: data[key] for key in _ARRAY_KEYS}
            except (OSError, ValueError, KeyError) as exc:
                raise DataError(
                    f"{path}: unreadable multitask_shapes cache ({exc}); delete it"
                ) from None
            if len(arrays["shape"]) != self.num_samples:
                found = len(arrays["shape"])
                raise DataError(f"{path}: cache holds {found} samples, expected {self.num_samples}")
            return arrays
        scenes = [self.render(i) for i in range(self.num_samples)]
        arrays = {
            key: np.stack([np.asarray(getattr(s, key)) for s in scenes]) for key in _ARRAY_KEYS
        }
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())
        return arrays


def trivial_baselines(dataset: MultiTaskShapes) -> dict[str, dict[str, float]]:
    """Scores of the best constant predictions on ``dataset``'s labelled samples, per task.

    * ``shape``, ``count``: ``accuracy`` of always predicting the most frequent class.
    * ``semseg``: predicting background everywhere: ``miou`` (IoU summed over the split,
      averaged over the classes present in the ground truth, background included),
      ``pixel_accuracy``, and ``iou`` 0.0 (foreground only, as the ``iou`` metric counts).
    * ``edge``: ``f1`` of the better constant map. An all-zero map scores 0 (``f1_all_zero``);
      the all-one map scores ``2p / (1 + p)`` for an edge-pixel share ``p`` (``f1_all_one``).
    * ``depth``: ``rmse`` of the mean depth and ``mae`` of the median depth.

    Each is the best score of any constant prediction, fitted on the very samples it is
    scored on: a model must beat it to have learnt anything from the image.
    """
    per_task: dict[str, list[np.ndarray]] = {task: [] for task in dataset.tasks}
    for index in range(len(dataset)):
        raw = dataset.arrays(index)
        for task in dataset.tasks:
            if dataset.labelled[task][index]:
                per_task[task].append(np.asarray(raw[task]))
    out: dict[str, dict[str, float]] = {}
    for task, values in per_task.items():
        if not values:
            continue
        stacked = np.stack(values)
        if task in ("shape", "count"):
            out[task] = {"accuracy": float(np.bincount(stacked).max() / stacked.size)}
        elif task == "semseg":
            background = float((stacked == 0).mean())
            present = len(np.unique(stacked))
            out[task] = {"miou": background / present, "pixel_accuracy": background, "iou": 0.0}
        elif task == "edge":
            share = float(stacked.mean())
            all_one = 2 * share / (1 + share)
            out[task] = {"f1": all_one, "f1_all_zero": 0.0, "f1_all_one": all_one}
        else:
            depth = stacked.astype(np.float64)
            out[task] = {
                "rmse": float(np.sqrt(((depth - depth.mean()) ** 2).mean())),
                "mae": float(np.abs(depth - np.median(depth)).mean()),
            }
    return out
