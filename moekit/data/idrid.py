"""IDRiD, the flagship dataset: disease grading and lesion segmentation on one folder tree.

The Indian Diabetic Retinopathy Image Dataset (Porwal et al., IEEE Dataport 2018) ships two
sets of *different* fundus photographs in one download:

* grading images (413 train, 103 test) with two labels from a CSV: ``rg`` (retinopathy grade,
  0–4) and ``mer`` (risk of macular edema, 0–2);
* segmentation images (54 train, 27 test) with one binary TIFF mask per lesion: ``MA``
  (microaneurysms), ``HE`` (haemorrhages), ``EX`` (hard exudates), ``SE`` (soft exudates) and
  ``OD`` (optic disc). A missing mask file means the lesion is absent (all negative, as in the
  IDRiD paper), so a segmentation image is labelled for all five lesions.

:class:`IdridDataset` (``DATASETS: idrid``) reads the layout of the real download (see
``docs/idrid.md`` and :data:`LAYOUT`) and serves both sets as one multi-task dataset whose
samples carry ``has_target`` per task. A validation split is carved from the training images by
a seeded, stratified fraction; the test split is never used for model selection.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from moekit.data.image_io import read_mask, read_rgb
from moekit.data.preprocess import Geometry, forward
from moekit.data.transforms import JointTransform, parse_size
from moekit.errors import ConfigError, DataError, did_you_mean
from moekit.registry import DATASETS, PREPROCESS, TRANSFORMS
from moekit.rng import derived_seed

GRADING_TASKS = ("rg", "mer")
LESIONS = ("MA", "HE", "EX", "SE", "OD")
TASKS = GRADING_TASKS + LESIONS
NUM_CLASSES = {"rg": 5, "mer": 3, **dict.fromkeys(LESIONS, 1)}
SOURCES = ("grading", "segmentation")
SPLITS = ("train", "val", "test")
IGNORE_INDEX = -1
"""Filler class label of a grading task on an image that has no grade."""

IMAGE_SUFFIXES = (".jpg", ".jpeg")
DEFAULT_PREPROCESS = {"type": "fundus_fov"}
"""IDRiD's preprocessing unless ``preprocess`` says otherwise: the field of view, cropped and
padded to the aspect ratio of ``image_size`` (:class:`moekit.data.preprocess.FundusFov`)."""


@dataclass(frozen=True)
class IdridLayout:
    """Folder and file names of the IDRiD download, relative to its root.

    ``split`` below is ``"train"`` or ``"test"`` (the folders on disk).
    """

    segmentation: str = "A. Segmentation"
    grading: str = "B. Disease Grading"
    images: str = "1. Original Images"
    masks: str = "2. All Segmentation Groundtruths"
    labels: str = "2. Groundtruths"
    split_dirs: tuple[tuple[str, str], ...] = (
        ("train", "a. Training Set"),
        ("test", "b. Testing Set"),
    )
    label_csvs: tuple[tuple[str, str], ...] = (
        ("train", "a. IDRiD_Disease Grading_Training Labels.csv"),
        ("test", "b. IDRiD_Disease Grading_Testing Labels.csv"),
    )
    lesion_dirs: tuple[tuple[str, str], ...] = (
        ("MA", "1. Microaneurysms"),
        ("HE", "2. Haemorrhages"),
        ("EX", "3. Hard Exudates"),
        ("SE", "4. Soft Exudates"),
        ("OD", "5. Optic Disc"),
    )
    csv_columns: tuple[tuple[str, str], ...] = (
        ("id", "Image name"),
        ("rg", "Retinopathy grade"),
        ("mer", "Risk of macular edema"),
    )

    def split_dir(self, split: str) -> str:
        return dict(self.split_dirs)[split]

    def grading_images(self, root: Path, split: str) -> Path:
        return root / self.grading / self.images / self.split_dir(split)

    def grading_csv(self, root: Path, split: str) -> Path:
        return root / self.grading / self.labels / dict(self.label_csvs)[split]

    def segmentation_images(self, root: Path, split: str) -> Path:
        return root / self.segmentation / self.images / self.split_dir(split)

    def mask_dir(self, root: Path, split: str, lesion: str) -> Path:
        masks = root / self.segmentation / self.masks / self.split_dir(split)
        return masks / dict(self.lesion_dirs)[lesion]

    def mask_path(self, root: Path, split: str, image_id: str, lesion: str) -> Path:
        return self.mask_dir(root, split, lesion) / f"{image_id}_{lesion}.tif"


LAYOUT = IdridLayout()


@dataclass(frozen=True)
class IdridRecord:
    """One image of the index: where it is and what it is labelled with.

    ``split`` is the folder it lives in (``train`` or ``test``); ``grades`` is ``(rg, mer)`` for
    a grading image; ``masks`` maps each loaded lesion to its mask file (``None``: file absent,
    the lesion is absent) for a segmentation image; ``has_se`` tells whether the image has a
    soft-exudate mask file (the stratum of the validation carve, whether or not SE is loaded).
    """

    split: str
    image_id: str
    source: str
    image: Path
    grades: tuple[int, int] | None = None
    masks: tuple[tuple[str, Path | None], ...] = ()
    has_se: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return self.split, self.image_id


def _check_dir(path: Path, root: Path) -> None:
    if not path.is_dir():
        raise DataError(
            f"{path}: folder not found; is data.root ({root}) the folder that holds "
            f"'{LAYOUT.segmentation}' and '{LAYOUT.grading}' of the IDRiD download?"
        )


def list_images(folder: Path) -> dict[str, Path]:
    """``{id: path}`` of the JPEG images in ``folder`` (sorted; other files ignored)."""
    return {
        p.stem: p
        for p in sorted(folder.iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    }


def read_grading_csv(path: Path) -> dict[str, tuple[int, int]]:
    """``{image id: (rg, mer)}`` from a grading CSV.

    Column names are matched after stripping whitespace (the real header is
    ``Risk of macular edema `` with a trailing space); extra and empty columns, blank rows and
    a byte-order mark are ignored. Ids may be given with or without ``.jpg``.
    """
    try:
        table = pd.read_csv(path, dtype=str, encoding="utf-8-sig", skip_blank_lines=True)
    except FileNotFoundError:
        raise DataError(f"{path}: grading label CSV not found") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: cannot read CSV ({type(exc).__name__}: {exc})") from None
    table.columns = [str(c).strip() for c in table.columns]
    columns = dict(LAYOUT.csv_columns)
    for name in columns.values():
        if name not in table.columns:
            found = [c for c in table.columns if not c.startswith("Unnamed")]
            raise DataError(
                f"{path}: missing column '{name}'{did_you_mean(name, found)}; found {found}"
            )
    table = table[list(columns.values())].dropna(how="all")
    labels: dict[str, tuple[int, int]] = {}
    for row_number, row in zip(table.index, table.itertuples(index=False)):
        image_id, rg, mer = (str(v).strip() if isinstance(v, str) else v for v in row)
        line = f"{path}: row {row_number + 2}"
        if not isinstance(image_id, str) or not image_id:
            raise DataError(f"{line}: empty '{columns['id']}'")
        image_id = image_id.removesuffix(".jpg")
        grades = []
        for task, value, high in (("rg", rg, 4), ("mer", mer, 2)):
            try:
                grade = int(value)
            except (TypeError, ValueError):
                grade = -1
            if not 0 <= grade <= high:
                raise DataError(
                    f"{line}: '{columns[task]}' must be an integer 0-{high}, got {value!r}"
                )
            grades.append(grade)
        if image_id in labels:
            raise DataError(f"{line}: image '{image_id}' is listed twice")
        labels[image_id] = (grades[0], grades[1])
    return labels


def scan_grading(root: Path, split: str) -> list[IdridRecord]:
    """The grading images of ``split`` (``train`` or ``test``) with their CSV labels."""
    folder = LAYOUT.grading_images(root, split)
    _check_dir(folder, root)
    csv = LAYOUT.grading_csv(root, split)
    labels = read_grading_csv(csv)
    images = list_images(folder)
    for image_id, path in images.items():
        if image_id not in labels:
            raise DataError(f"{path}: image has no row in {csv}")
    records = []
    for image_id, grades in sorted(labels.items()):
        if image_id not in images:
            raise DataError(f"{csv}: '{image_id}' has no image {folder / (image_id + '.jpg')}")
        records.append(IdridRecord(split, image_id, "grading", images[image_id], grades))
    return records


def scan_segmentation(
    root: Path, split: str, lesions: Sequence[str] = LESIONS
) -> list[IdridRecord]:
    """The segmentation images of ``split`` with the mask file of each of ``lesions`` (or
    ``None``: the file is absent, the lesion is absent). Only the folders of ``lesions`` must
    exist (a missing one is an error; the others are not looked at)."""
    folder = LAYOUT.segmentation_images(root, split)
    _check_dir(folder, root)
    for lesion in lesions:
        _check_dir(LAYOUT.mask_dir(root, split, lesion), root)
    records = []
    for image_id, path in list_images(folder).items():
        masks = []
        for lesion in lesions:
            mask = LAYOUT.mask_path(root, split, image_id, lesion)
            masks.append((lesion, mask if mask.is_file() else None))
        has_se = LAYOUT.mask_path(root, split, image_id, "SE").is_file()
        records.append(
            IdridRecord(split, image_id, "segmentation", path, None, tuple(masks), has_se)
        )
    return records


def stratified_split(strata: Sequence[Hashable], fraction: float, seed: int) -> list[bool]:
    """Choose ``round(fraction * n)`` items spread over the strata in proportion (``True``).

    Each stratum contributes ``floor(fraction * size)`` items plus, for the strata with the
    largest remainders, one more, so the total is exact. Which items are chosen is a random
    draw from ``seed`` over the items in their given order (sort them first for a result
    independent of the listing order).
    """
    rng = np.random.default_rng(seed)
    groups: dict[Hashable, list[int]] = {}
    for i, stratum in enumerate(strata):
        groups.setdefault(stratum, []).append(i)
    keys = sorted(groups, key=repr)
    exact = {k: fraction * len(groups[k]) for k in keys}
    quota = {k: int(np.floor(exact[k])) for k in keys}
    missing = round(fraction * len(strata)) - sum(quota.values())
    for k in sorted(keys, key=lambda k: exact[k] - quota[k], reverse=True)[:missing]:
        quota[k] += 1
    chosen = [False] * len(strata)
    for k in keys:
        for i in rng.permutation(groups[k])[: quota[k]]:
            chosen[int(i)] = True
    return chosen


def _stratum(record: IdridRecord) -> Hashable:
    """Grading images by retinopathy grade; segmentation images by whether they have an SE mask
    (also when SE is not loaded, so every lesion subset carves the same validation images)."""
    if record.grades is not None:
        return record.grades[0]
    return record.has_se


def carve_validation(
    records: Sequence[IdridRecord], fraction: float, seed: int
) -> tuple[list[IdridRecord], list[IdridRecord]]:
    """Split training records into ``(train, val)``, stratified, per source, from ``seed``.

    Each source is split on its own (grading by ``rg``, segmentation by SE presence) with a
    seed derived from ``(seed, source)``, so the grading validation images do not change when
    the segmentation images are added or left out.
    """
    train: list[IdridRecord] = []
    val: list[IdridRecord] = []
    for source_index, source in enumerate(SOURCES):
        group = sorted((r for r in records if r.source == source), key=lambda r: r.image_id)
        chosen = stratified_split(
            [_stratum(r) for r in group], fraction, derived_seed(seed, source_index)
        )
        for record, is_val in zip(group, chosen):
            (val if is_val else train).append(record)
    return train, val


def _choice(name: str, values: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        values = [values]
    for value in values:
        if value not in allowed:
            raise ConfigError(
                f"idrid: unknown {name} '{value}'; valid: {', '.join(allowed)}"
                f"{did_you_mean(str(value), allowed)}"
            )
    return tuple(v for v in allowed if v in values)


def idrid_tasks(tasks: Sequence[str] = TASKS) -> dict[str, dict[str, Any]]:
    """The ``tasks:`` config block matching the loader (kinds and class counts).

    Losses and metrics are left to the experiment config.
    """
    return {
        name: {
            "kind": "multiclass" if name in GRADING_TASKS else "segmentation",
            "num_classes": NUM_CLASSES[name],
        }
        for name in _choice("task", tasks, TASKS)
    }


@DATASETS.register("idrid")
class IdridDataset(Dataset):
    """IDRiD grading + lesion segmentation as one multi-task dataset (real download layout).

    Args:
        root: the folder holding ``A. Segmentation`` and ``B. Disease Grading``.
        split: ``train``, ``val`` (carved from the training images) or ``test``.
        image_size: ``[height, width]`` of the samples (IDRiD's photographs are 2848×4288).
        tasks: the tasks to emit, a subset of ``rg, mer, MA, HE, EX, SE, OD`` (default all).
        sources: ``grading`` and/or ``segmentation``; default: those that carry a label for
            one of ``tasks``.
        val_fraction: share of each source's training images held out as ``val`` (0: none;
            ``train`` then uses every training image, as the IDRiD paper did).
        val_seed: seeds the train/val carve (kept apart from ``seed`` so that varying the
            training seed does not move images between train and val).
        augment: ``true`` for the IDRiD paper's training augmentation (``TRANSFORMS: idrid_train``),
            ``false`` for resize + normalise (``eval``), or a ``TRANSFORMS`` config mapping
            (``type`` defaults to ``idrid_train``) such as ``{rotate: 10, blur_p: 0}``. Default:
            ``true`` for ``train``, ``false`` otherwise.
        seed: seeds the augmentation: sample ``i`` of epoch ``e`` is augmented from
            ``(seed, e, i)`` (see :meth:`set_epoch`).
        preprocess: the ``PREPROCESS`` step that brings each photograph and its masks to
            ``image_size`` before augmentation, the same for every split (a config mapping or
            a name; default :data:`DEFAULT_PREPROCESS`, ``fundus_fov``; ``resize`` for a plain
            resize of the whole photograph). :attr:`preprocess_config` is the step's config.

    A sample is ``{"inputs": float32 [3, H, W], "targets": {task: tensor}, "has_target":
    {task: bool}, "meta": {"split", "id", "source"}}``: ``rg``/``mer`` targets are ``int64``
    scalars (:data:`IGNORE_INDEX` on segmentation images), lesion targets ``float32 [1, H, W]``
    0/1 masks (zeros on grading images).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        image_size: Sequence[int] = (712, 1072),
        tasks: Sequence[str] = TASKS,
        sources: Sequence[str] | None = None,
        val_fraction: float = 0.2,
        val_seed: int = 0,
        augment: bool | Mapping[str, Any] | None = None,
        seed: int = 0,
        preprocess: Mapping[str, Any] | str | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        self.split = _choice("split", [split], SPLITS)[0]
        self.tasks = _choice("task", tasks, TASKS)
        self.grading_tasks = tuple(t for t in self.tasks if t in GRADING_TASKS)
        self.lesion_tasks = tuple(t for t in self.tasks if t in LESIONS)
        if sources is None:
            sources = [
                s
                for s, names in zip(SOURCES, (GRADING_TASKS, LESIONS))
                if any(t in names for t in self.tasks)
            ]
        self.source_names = _choice("source", sources, SOURCES)
        if not self.tasks or not self.source_names:
            raise ConfigError(f"idrid: tasks and sources must not be empty, got {tasks}, {sources}")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ConfigError(f"idrid: val_fraction must be in [0, 1), got {val_fraction}")
        if self.split == "val" and float(val_fraction) == 0.0:
            raise ConfigError("idrid: split 'val' needs val_fraction > 0")
        self.val_fraction = float(val_fraction)
        self.image_size = parse_size(image_size)
        if preprocess is None:
            preprocess = DEFAULT_PREPROCESS
        self.preprocess_config = (
            {"type": preprocess} if isinstance(preprocess, str) else dict(preprocess)
        )
        self.preprocess = PREPROCESS.build(self.preprocess_config, image_size=self.image_size)
        self.seed = int(seed)
        self.epoch = 0
        self.records = self._index(int(val_seed))
        self.transform = self._build_transform(
            self.split == "train" if augment is None else augment
        )

    def _index(self, val_seed: int) -> list[IdridRecord]:
        if not self.root.is_dir():
            raise DataError(f"{self.root}: IDRiD root folder not found (data.root)")
        disk_split = "test" if self.split == "test" else "train"
        records: list[IdridRecord] = []
        if "grading" in self.source_names:
            records += scan_grading(self.root, disk_split)
        if "segmentation" in self.source_names:
            records += scan_segmentation(self.root, disk_split, self.lesion_tasks)
        if disk_split == "train" and self.val_fraction > 0:
            train, val = carve_validation(records, self.val_fraction, val_seed)
            records = val if self.split == "val" else train
        if not records:
            raise DataError(
                f"{self.root}: the '{self.split}' split of IDRiD ({', '.join(self.source_names)}) "
                "has no images"
            )
        return records

    def _build_transform(self, augment: bool | Mapping[str, Any]) -> JointTransform:
        if isinstance(augment, Mapping):
            cfg = {"type": "idrid_train", **augment}
        else:
            cfg = {"type": "idrid_train" if augment else "eval"}
        return TRANSFORMS.build(cfg, image_size=self.image_size, seed=self.seed)

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}: {self.sources.count(s)}" for s in self.source_names)
        return f"IdridDataset({self.root}, split={self.split}, {counts}, tasks={list(self.tasks)})"

    @property
    def sources(self) -> list[str]:
        """The source of every sample (for :class:`moekit.data.samplers.BalancedSourceSampler`)."""
        return [r.source for r in self.records]

    def class_labels(self, task: str) -> list[int]:
        """The grades of ``task`` (``rg`` or ``mer``) of the split's grading images, in sample
        order, read from the index (no image is decoded): e.g. for a majority-class rate."""
        if task not in self.grading_tasks:
            raise ConfigError(f"idrid: '{task}' is not a loaded grading task {self.grading_tasks}")
        column = GRADING_TASKS.index(task)
        return [r.grades[column] for r in self.records if r.grades is not None]

    @property
    def keys(self) -> list[tuple[str, str]]:
        """``(folder split, image id)`` of every sample; unique (grading ids restart per split)."""
        return [r.key for r in self.records]

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentation of epoch ``epoch``: sample ``i`` of epoch ``e`` is augmented
        from ``derived_seed(seed, e, i)``, the same in any loader worker, process, batch size
        or order, so a run resumed anywhere (at an epoch's end, or in the middle of an epoch
        after a preemption) repeats the augmentation exactly."""
        self.epoch = int(epoch)

    def _read_masks(self, record: IdridRecord, geometry: Geometry) -> list[np.ndarray]:
        """The loaded lesions' masks, brought to ``image_size`` by the photograph's geometry
        (found on its reduced decode, applied to the full-size masks; nearest neighbour)."""
        files = dict(record.masks)
        masks = []
        for lesion in self.lesion_tasks:
            path = files[lesion]
            if path is None:
                masks.append(np.zeros(self.image_size, np.uint8))
                continue
            mask = read_mask(path)
            if mask.shape != geometry.source_size:
                raise DataError(
                    f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                    f"{record.image} is {geometry.source_size[1]}x{geometry.source_size[0]}"
                )
            masks.append(forward(mask, geometry, nearest=True))
        return masks

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        decoded, full_size = read_rgb(record.image, self.image_size)
        image, geometry = self.preprocess(decoded)
        is_seg = record.source == "segmentation"
        masks = self._read_masks(record, geometry.rescaled(*full_size)) if is_seg else []
        self.transform.set_seed(derived_seed(self.seed, self.epoch, index) % 2**32)
        inputs, mask_tensor = self.transform(image, masks)
        targets: dict[str, torch.Tensor] = {}
        has_target: dict[str, bool] = {}
        for task in self.grading_tasks:
            grade = record.grades[GRADING_TASKS.index(task)] if record.grades else IGNORE_INDEX
            targets[task] = torch.tensor(grade, dtype=torch.long)
            has_target[task] = record.grades is not None
        height, width = inputs.shape[1:]
        for i, task in enumerate(self.lesion_tasks):
            if is_seg:
                targets[task] = mask_tensor[i : i + 1].float()
            else:
                targets[task] = torch.zeros(1, height, width)
            has_target[task] = is_seg
        meta = {"split": self.split, "id": record.image_id, "source": record.source}
        return {"inputs": inputs, "targets": targets, "has_target": has_target, "meta": meta}
