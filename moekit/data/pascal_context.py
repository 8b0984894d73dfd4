"""PASCAL-Context for multi-task learning, in the ``PASCAL_MT`` layout of Maninis et al. (2019).

ASTMT released PASCAL-Context with five dense tasks as ``PASCAL_MT.tgz``; MTI-Net, M3ViT and
Mod-Squad load the same folder. This loader reads that layout (and PNG conversions of its two
MATLAB annotations, for machines without scipy). The files, per image id ``<id>`` of
``ImageSets/Context/<split>.txt``:

=============  ===============================================  ==================================
task           file (first existing wins)                       target
=============  ===============================================  ==================================
(input)        ``JPEGImages/<id>.jpg``                          ``float [3, H, W]``, ImageNet-norm.
semseg         ``semseg/VOC12/<id>.png``,                       ``long [H, W]``: 0 = background,
               ``semseg/pascal-context/<id>.png``               1..20 VOC classes, 255 = ignore
human_parts    ``human_parts/<id>.png`` (part ids 0..6),        ``long [H, W]``: 0 = background,
               ``human_parts/<id>.mat`` (PASCAL-Part ``anno``)  1 head, 2 torso, 3 upper arms,
                                                                4 lower arms/hands, 5 upper legs,
                                                                6 lower legs/feet
sal            ``sal_distill/<id>.png``                         ``float [1, H, W]``: ``v >= 128``
normals        ``normals_distill/<id>.png``                     ``float [3, H, W]``: ``2 v/255 - 1``
                                                                (x right, y, z); zeros = invalid
edge           ``edges/<id>.png`` (non-zero = edge),            ``float [1, H, W]`` 0/1
               ``pascal-context/trainval/<id>.mat``
               (``LabelMap``: edges = thinned Laplacian ≠ 0)
=============  ===============================================  ==================================

Rules taken from ASTMT's ``fblib/dataloaders/pascal_context.py`` (and MTI-Net's copy):

* ``semseg`` has 21 classes (``semseg_num_classes``), as in ASTMT/MTI-Net/M3ViT configs —
  not the 59-class PASCAL-Context benchmark; a map with other values fails with the file named.
* ``human_parts``: an image without a part annotation (no file, no person with parts, or an
  all-background map) is unlabelled for the task (``has_target`` False; ASTMT marks the whole
  map as ignored). The ``.mat`` is read with the 6-part grouping of ASTMT's ``HUMAN_PART[6]``.
* ``normals``: when ``pascal-context/trainval/<id>.mat`` exists, pixels whose 459-class
  ``LabelMap`` id is not one of ``NORMALS_VALID_CONTEXT_CLASSES`` (classes that also exist in
  NYUD, plus tvmonitor) are set to the zero vector, i.e. invalid (ASTMT does the same). Without
  that file (a PNG-only copy) the distilled normals are used everywhere.
* ``edge`` from the ``LabelMap``: ``thin(|Laplacian(LabelMap)| > 0)`` with the Guo–Hall
  thinning of ``skimage.morphology.thin``, re-implemented here (no scikit-image needed).

Processing: resize to ``image_size`` (image and normals by area/linear interpolation, then
normals renormalised; label maps by nearest neighbour), then an optional horizontal flip (the
default in ``train``) that also negates the normals' x component, then ImageNet normalisation.
The flip of sample ``i`` in epoch ``e`` is drawn from ``(seed, e, i)`` (call :meth:`set_epoch`).
ASTMT's rotation/scaling augmentation is not reproduced. Reading ``.mat`` files needs scipy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from moekit.data.image_io import read_mask, read_rgb, resize_image, resize_mask
from moekit.data.tasks import check_tasks
from moekit.data.transforms import eval_transform
from moekit.errors import ConfigError, DataError
from moekit.registry import DATASETS

TASK_NAMES: tuple[str, ...] = ("semseg", "human_parts", "sal", "normals", "edge")
TASK_KINDS: dict[str, str] = {
    "semseg": "segmentation",
    "human_parts": "segmentation",
    "sal": "segmentation",
    "normals": "regression",
    "edge": "segmentation",
}
SEMSEG_NUM_CLASSES = 21
HUMAN_PARTS_NUM_CLASSES = 7
IGNORE_INDEX = 255
PERSON_CLASS = 15  # PASCAL VOC / PASCAL-Part class index of "person"

# ASTMT's HUMAN_PART[6]: PASCAL-Part part names -> 6 groups.
HUMAN_PART_GROUPS: dict[str, int] = {
    **dict.fromkeys(
        ("hair", "head", "lear", "rear", "lebrow", "rebrow", "leye", "reye", "mouth", "nose"), 1
    ),
    **dict.fromkeys(("neck", "torso"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("llarm", "rlarm", "lhand", "rhand"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("llleg", "rlleg", "lfoot", "rfoot"), 6),
}

# 459-class PASCAL-Context ids whose name is also an NYUD class (except "unknown"), plus
# tvmonitor (427): ASTMT's ``normals_valid_classes``, derived from its nyu_classes.json and
# context_classes.json. Distilled normals are only trusted on these classes.
NORMALS_VALID_CONTEXT_CLASSES: frozenset[int] = frozenset((
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49,
    50, 51, 53, 55, 56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101,
    104, 105, 107, 111, 113, 115, 122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159,
    165, 172, 174, 181, 183, 184, 191, 193, 195, 197, 199, 202, 213, 215, 216, 219, 220, 223,
    225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250, 251, 252, 255, 260, 261, 263, 269,
    272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295, 304, 307, 309,
    310, 314, 315, 319, 323, 329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368,
    370, 371, 374, 379, 380, 383, 384, 397, 401, 403, 405, 407, 408, 411, 412, 413, 414, 417,
    419, 421, 423, 427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457,
))  # fmt: skip


def pascal_context_tasks(
    tasks: Sequence[str] = TASK_NAMES, semseg_num_classes: int = SEMSEG_NUM_CLASSES
) -> dict[str, dict[str, Any]]:
    """The ``tasks:`` config block matching the loader (kinds and class counts)."""
    classes = {
        "semseg": semseg_num_classes,
        "human_parts": HUMAN_PARTS_NUM_CLASSES,
        "sal": 1,
        "normals": 3,
        "edge": 1,
    }
    block: dict[str, dict[str, Any]] = {}
    for name in check_tasks("pascal_context", tasks, TASK_NAMES):
        block[name] = {"kind": TASK_KINDS[name], "num_classes": classes[name]}
        if name == "normals":
            block[name]["dense"] = True
    return block


# ---------------------------------------------------------------------------- thinning
def _thinning_tables() -> tuple[np.ndarray, np.ndarray]:
    """Guo & Hall (1989) deletion tables of the two sub-iterations of :func:`thin`.

    Indexed by the code of the 8 neighbours: bit 0 = east, then counter-clockwise NE, N, NW,
    W, SW, S, SE.
    """
    x = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(bool)
    g1 = sum((~x[:, i] & (x[:, i + 1] | x[:, (i + 2) % 8])).astype(int) for i in (0, 2, 4, 6)) == 1
    n1 = sum((x[:, k] | x[:, k - 1]).astype(int) for k in (1, 3, 5, 7))
    n2 = sum((x[:, k] | x[:, (k + 1) % 8]).astype(int) for k in (1, 3, 5, 7))
    g2 = np.isin(np.minimum(n1, n2), (2, 3))
    g3 = ~((x[:, 1] | x[:, 2] | ~x[:, 7]) & x[:, 0])
    g3p = ~((x[:, 5] | x[:, 6] | ~x[:, 3]) & x[:, 4])
    return g1 & g2 & g3, g1 & g2 & g3p


_THIN_TABLES = _thinning_tables()


def thin(mask: np.ndarray) -> np.ndarray:
    """Morphological thinning to 1-pixel-wide lines (``skimage.morphology.thin``'s algorithm)."""
    skel = np.asarray(mask, dtype=bool).copy()
    while True:
        before = int(skel.sum())
        for table in _THIN_TABLES:
            p = np.pad(skel, 1).astype(np.uint8)
            code = (
                p[1:-1, 2:]
                | p[:-2, 2:] << 1
                | p[:-2, 1:-1] << 2
                | p[:-2, :-2] << 3
                | p[1:-1, :-2] << 4
                | p[2:, :-2] << 5
                | p[2:, 1:-1] << 6
                | p[2:, 2:] << 7
            )
            skel &= ~table[code]
        if int(skel.sum()) == before:
            return skel


def edges_from_label_map(label_map: np.ndarray) -> np.ndarray:
    """ASTMT's edge target: ``thin(|Laplacian(LabelMap)| > 0)`` as ``uint8`` 0/1."""
    laplacian = cv2.Laplacian(np.asarray(label_map, dtype=np.float64), cv2.CV_64F)
    return thin(np.abs(laplacian) > 0).astype(np.uint8)


# ---------------------------------------------------------------------------- readers
def _read_png(path: Path, what: str, mode: str | None = None) -> np.ndarray:
    """A PNG as an array; ``mode`` converts first, else it must be single-channel (P or L)."""
    try:
        with Image.open(path) as img:
            if mode is not None:
                img = img.convert(mode)
            elif img.mode not in ("P", "L"):
                raise DataError(
                    f"{path}: {what} must be a single-channel (P or L) PNG, got {img.mode}"
                )
            return np.asarray(img).copy()
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: cannot read {what} ({type(exc).__name__}: {exc})") from None


def _load_mat(path: Path) -> dict[str, Any]:
    try:
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError
    except ImportError:
        raise DataError(
            f"{path}: reading .mat files needs scipy; install it or convert the file to PNG "
            "(see docs/datasets.md)"
        ) from None
    try:
        return loadmat(path)
    except (MatReadError, OSError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: cannot read .mat file ({type(exc).__name__}: {exc})") from None


def read_label_map(path: Path) -> np.ndarray:
    """The 459-class ``LabelMap`` of ``pascal-context/trainval/<id>.mat``."""
    mat = _load_mat(path)
    if "LabelMap" not in mat:
        raise DataError(f"{path}: no 'LabelMap' variable")
    return np.asarray(mat["LabelMap"])


def read_human_parts_mat(path: Path) -> np.ndarray:
    """Part ids ``uint8 [H, W]`` from a PASCAL-Part ``anno`` struct (persons only)."""
    try:
        objects = _load_mat(path)["anno"][0, 0]["objects"][0]
        target = None
        for obj in objects:
            if target is None:
                target = np.zeros(np.asarray(obj["mask"]).shape, dtype=np.uint8)
            if (
                int(np.asarray(obj["class_ind"]).squeeze()) != PERSON_CLASS
                or obj["parts"].size == 0
            ):
                continue
            for part in obj["parts"][0]:
                name = str(np.asarray(part["part_name"]).squeeze())
                target[np.asarray(part["mask"]).astype(bool)] = HUMAN_PART_GROUPS[name]
    except KeyError as exc:
        raise DataError(
            f"{path}: unexpected PASCAL-Part annotation (unknown key or part {exc})"
        ) from None
    except (IndexError, ValueError) as exc:
        raise DataError(f"{path}: malformed PASCAL-Part annotation ({exc})") from None
    return np.zeros((0, 0), dtype=np.uint8) if target is None else target


def _check_ids(labels: np.ndarray, num_classes: int, path: Path, what: str) -> np.ndarray:
    bad = (labels >= num_classes) & (labels != IGNORE_INDEX)
    if bad.any():
        raise DataError(
            f"{path}: {what} value {int(labels[bad][0])} is outside 0..{num_classes - 1} "
            f"(and {IGNORE_INDEX} = ignore)"
        )
    return labels


# ---------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class PascalFiles:
    """The files of one image (``None``: absent; only ``human_parts`` and ``label_map`` may be)."""

    image: Path
    semseg: Path | None
    human_parts: Path | None
    sal: Path | None
    normals: Path | None
    edge: Path | None
    label_map: Path | None


def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def resolve_files(root: Path, image_id: str) -> PascalFiles:
    """Where each annotation of ``image_id`` is (see the module docstring for the order)."""
    label_map = _first_existing(root / "pascal-context" / "trainval" / f"{image_id}.mat")
    return PascalFiles(
        image=root / "JPEGImages" / f"{image_id}.jpg",
        semseg=_first_existing(
            root / "semseg" / "VOC12" / f"{image_id}.png",
            root / "semseg" / "pascal-context" / f"{image_id}.png",
        ),
        human_parts=_first_existing(
            root / "human_parts" / f"{image_id}.png", root / "human_parts" / f"{image_id}.mat"
        ),
        sal=_first_existing(root / "sal_distill" / f"{image_id}.png"),
        normals=_first_existing(root / "normals_distill" / f"{image_id}.png"),
        edge=_first_existing(root / "edges" / f"{image_id}.png") or label_map,
        label_map=label_map,
    )


_EXPECTED = {
    "semseg": "semseg/pascal-context/{}.png",
    "sal": "sal_distill/{}.png",
    "normals": "normals_distill/{}.png",
    "edge": "pascal-context/trainval/{}.mat (or edges/{}.png)",
}


def _image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise ConfigError(
            f"pascal_context: image_size must be an int or [height, width], got {image_size!r}"
        )
    return int(size[0]), int(size[1])


def read_split(root: Path, split: str) -> list[str]:
    """Image ids of ``ImageSets/Context/<split>.txt`` (blank lines skipped)."""
    if not root.is_dir():
        raise DataError(f"{root}: PASCAL-Context root not found (expected the PASCAL_MT layout)")
    if not (root / "JPEGImages").is_dir():
        raise DataError(f"{root / 'JPEGImages'}: folder not found; is {root} a PASCAL_MT root?")
    split_dir = root / "ImageSets" / "Context"
    split_file = split_dir / f"{split}.txt"
    if not split_file.is_file():
        found = sorted(p.stem for p in split_dir.glob("*.txt")) if split_dir.is_dir() else []
        raise DataError(f"{split_file}: split file not found; splits found: {found or 'none'}")
    ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{split_file}: no image ids")
    return ids


# ---------------------------------------------------------------------------- dataset
@DATASETS.register("pascal_context")
class PascalContext(Dataset):
    """PASCAL-Context with five dense tasks (semseg, human parts, saliency, normals, edges).

    Args:
        root: the ``PASCAL_MT`` folder (see ``docs/datasets.md``).
        split: a name with a list at ``ImageSets/Context/<split>.txt`` (``train``, ``val``).
        tasks: the tasks to load; their files must exist for every image (``human_parts`` may
            be absent: the image is then unlabelled for it).
        image_size: output size, an int or ``[height, width]`` (512 in ASTMT/MTI-Net).
        flip: random horizontal flips; default on for ``train`` only.
        seed: seed of the flips.
        semseg_num_classes: 21 for the PASCAL_MT maps; set it for other semseg maps.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        tasks: Sequence[str] = TASK_NAMES,
        image_size: int | Sequence[int] = 512,
        flip: bool | None = None,
        seed: int = 0,
        semseg_num_classes: int = SEMSEG_NUM_CLASSES,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.tasks = check_tasks("pascal_context", tasks, TASK_NAMES)
        self.image_size = _image_size(image_size)
        self.flip = split == "train" if flip is None else bool(flip)
        self.seed = int(seed)
        self.epoch = 0
        self.semseg_num_classes = int(semseg_num_classes)
        self.ids = read_split(self.root, split)
        self.files = [resolve_files(self.root, image_id) for image_id in self.ids]
        self._check_files()
        self._normalize = eval_transform(self.image_size)

    def _check_files(self) -> None:
        missing = [str(f.image) for f in self.files if not f.image.is_file()]
        for task in self.tasks:
            if task in _EXPECTED:
                missing += [
                    str(self.root / _EXPECTED[task].format(image_id, image_id))
                    for image_id, f in zip(self.ids, self.files)
                    if getattr(f, task) is None
                ]
        if missing:
            raise DataError(
                f"PASCAL-Context {self.split}: {len(missing)} file(s) missing, first: {missing[0]}"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose flips :meth:`__getitem__` draws."""
        self.epoch = int(epoch)

    def is_flipped(self, index: int) -> bool:
        """Whether sample ``index`` is flipped in the current epoch."""
        if not self.flip:
            return False
        return bool(np.random.default_rng([self.seed, self.epoch, index]).random() < 0.5)

    def _load(
        self, task: str, files: PascalFiles, label_map: np.ndarray | None
    ) -> np.ndarray | None:
        """The full-resolution target of ``task``, or ``None`` when the image has no label."""
        if task == "semseg":
            return _check_ids(
                _read_png(files.semseg, "semseg map"),
                self.semseg_num_classes,
                files.semseg,
                "semseg",
            )
        if task == "human_parts":
            path = files.human_parts
            if path is None:
                return None
            if path.suffix == ".mat":
                parts = read_human_parts_mat(path)
            else:
                parts = _check_ids(
                    _read_png(path, "human-part map"), HUMAN_PARTS_NUM_CLASSES, path, "human-part"
                )
            labelled = (parts > 0) & (parts != IGNORE_INDEX)
            return parts if labelled.any() else None
        if task == "sal":
            return (_read_png(files.sal, "saliency map", mode="L") >= 128).astype(np.uint8)
        if task == "normals":
            normals = read_rgb(files.normals)[0].astype(np.float32) * (2.0 / 255.0) - 1.0
            if label_map is not None:
                if label_map.shape != normals.shape[:2]:
                    raise DataError(
                        f"{files.label_map}: LabelMap is {label_map.shape}, but "
                        f"{files.normals.name} is {normals.shape[:2]}"
                    )
                valid = np.isin(label_map, list(NORMALS_VALID_CONTEXT_CLASSES))
                normals[~valid] = 0.0
            return normals
        if files.edge.suffix == ".mat":
            return edges_from_label_map(label_map)
        return read_mask(files.edge)

    def _resize(self, task: str, array: np.ndarray) -> np.ndarray:
        if task != "normals":
            return resize_mask(array, self.image_size)
        normals = resize_image(array, self.image_size)
        norm = np.linalg.norm(normals, axis=-1, keepdims=True)
        return np.where(norm > 1e-6, normals / np.maximum(norm, 1e-6), 0.0).astype(np.float32)

    def __getitem__(self, index: int) -> dict[str, Any]:
        files = self.files[index]
        image, full_size = read_rgb(files.image, self.image_size)
        inputs, _ = self._normalize(resize_image(image, self.image_size))
        edge_from_map = "edge" in self.tasks and files.edge.suffix == ".mat"
        needs_map = files.label_map is not None and ("normals" in self.tasks or edge_from_map)
        label_map = read_label_map(files.label_map) if needs_map else None
        height, width = self.image_size
        targets, has_target = {}, {}
        for task in self.tasks:
            raw = self._load(task, files, label_map)
            has_target[task] = raw is not None
            if raw is None:
                targets[task] = torch.zeros((height, width), dtype=torch.long)
                continue
            array = self._resize(task, raw)
            if task in ("semseg", "human_parts"):
                targets[task] = torch.from_numpy(array.astype(np.int64))
            elif task == "normals":
                targets[task] = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
            else:
                targets[task] = torch.from_numpy(array.astype(np.float32))[None]
        flipped = self.is_flipped(index)
        if flipped:
            inputs = inputs.flip(-1)
            targets = {task: t.flip(-1) for task, t in targets.items()}
            if "normals" in targets:
                targets["normals"][0].neg_()
        return {
            "inputs": inputs,
            "targets": targets,
            "has_target": has_target,
            "meta": {"id": self.ids[index], "flipped": flipped, "size": full_size},
        }
