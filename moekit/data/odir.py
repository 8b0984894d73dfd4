"""ODIR fundus photographs, multi-label: the ODIR study's layout and the public ODIR-5K table.

Two loaders (both real on-disk layouts, both one multi-label task, default name ``diagnosis``):

* ``DATASETS: odir`` — the layout of the ODIR study (a course variant of ODIR-5K with three
  labels, diabetic retinopathy ``D``, glaucoma ``G`` and age-related macular degeneration
  ``A``; :data:`STUDY_LAYOUT`)::

      train.csv  val.csv  offsite_test.csv        id,D,G,A   (id: the file name, 0/1 labels)
      onsite_test_submission.csv                  id         (no labels)
      images/train/  images/val/  images/offsite_test/  images/onsite_test/   913_right.jpg

  One sample per image; the on-site test images have no labels (``has_target`` False).

* ``DATASETS: odir5k`` — the public ODIR-5K release: one table row per **patient** (xlsx, or
  a CSV copy) with ``ID, Patient Age, Patient Sex, Left-Fundus, Right-Fundus, Left-Diagnostic
  Keywords, Right-Diagnostic Keywords, N, D, G, C, A, H, M, O`` and a folder of images. The
  eight labels belong to the patient (both eyes together). ``view: eye`` gives one sample per
  eye, labelled by the patient's labels or by labels derived from that eye's keywords
  (:func:`eye_labels`); ``view: patient`` gives one sample per patient with both eyes as two
  views ``{"left", "right"}`` (the multi-view path: ``present`` marks an eye whose file is
  missing). ``train``/``val`` are carved per patient (both eyes in the same split), stratified
  by the label pattern.

Both read only labels and file names to index a split, so :meth:`label_counts` (the positives
per class, e.g. for ``class_balanced_bce`` with ``counts: auto``) never decodes an image and
never sees augmentation. Images go through ``preprocess`` (default ``resize``, the study's plain
resize; ``fundus_fov`` crops the field of view first) and then the augmentation:
``TRANSFORMS: odir_train`` — the study's flips, rotation ±15° and ImageNet normalisation — for
training, resize + normalise otherwise.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import pandas as pd
import torch

from moekit.data.gamma import _read_table as read_table
from moekit.data.generated import read_generated
from moekit.data.idrid import stratified_split
from moekit.data.image_io import read_rgb
from moekit.data.modality_transforms import build_transform
from moekit.data.multimodal import MultiModalDataset, check_names
from moekit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, JointTransform, parse_size
from moekit.errors import ConfigError, DataError, did_you_mean
from moekit.registry import DATASETS, PREPROCESS, TRANSFORMS

STUDY_CLASSES = ("D", "G", "A")
"""The ODIR study's labels: diabetic retinopathy, glaucoma, age-related macular degeneration."""
ODIR5K_CLASSES = ("N", "D", "G", "C", "A", "H", "M", "O")
"""ODIR-5K's labels: normal, diabetes, glaucoma, cataract, AMD, hypertension, myopia, other."""
EYES = ("left", "right")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class StudyLayout:
    """File names of the ODIR study's layout, relative to its root."""

    tables: tuple[tuple[str, str], ...] = (
        ("train", "train.csv"),
        ("val", "val.csv"),
        ("offsite_test", "offsite_test.csv"),
        ("onsite_test", "onsite_test_submission.csv"),
    )
    images: str = "images"
    id_column: str = "id"
    unlabelled: tuple[str, ...] = ("onsite_test",)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(split for split, _ in self.tables)

    def table(self, root: Path, split: str) -> Path:
        return root / dict(self.tables)[split]

    def image_dir(self, root: Path, split: str) -> Path:
        return root / self.images / split


STUDY_LAYOUT = StudyLayout()


@TRANSFORMS.register("odir_train")
def odir_train(
    image_size: Sequence[int],
    seed: int = 0,
    hflip: float = 0.5,
    vflip: float = 0.5,
    rotate: float = 15.0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> JointTransform:
    """The ODIR study's training augmentation: resize, horizontal and vertical flips, a rotation
    uniform in ``[-rotate, rotate]`` degrees (black corners), ImageNet normalisation.

    Args:
        image_size: output ``(height, width)`` (the study: 256×256).
        seed: seed of the random stream.
        hflip, vflip: probabilities of the flips.
        rotate: maximum rotation in degrees (always applied).
        mean, std: normalisation.
    """
    height, width = parse_size(image_size)
    compose = A.Compose(
        [
            A.Resize(height, width),
            A.HorizontalFlip(p=hflip),
            A.VerticalFlip(p=vflip),
            A.Rotate(limit=(-rotate, rotate), border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0),
            A.Normalize(mean=tuple(mean), std=tuple(std)),
        ],
        strict=True,
        seed=seed,
    )
    return JointTransform(compose)


def _binary(value: Any, where: str) -> int:
    text = str(value).strip()
    if text in ("0", "1", "0.0", "1.0"):
        return int(float(text))
    raise DataError(f"{where}: labels must be 0 or 1, got {value!r}")


def _columns(table: pd.DataFrame, path: Path, needed: Sequence[str]) -> None:
    table.columns = [str(c).strip() for c in table.columns]
    for column in needed:
        if column not in table.columns:
            found = [c for c in table.columns if not c.startswith("Unnamed")]
            raise DataError(
                f"{path}: no column '{column}'{did_you_mean(column, found)}; found {found}"
            )


@dataclass(frozen=True)
class ImageRecord:
    """One sample of the ODIR study's layout: its file and its labels (``None``: unlabelled)."""

    split: str
    image_id: str
    path: Path
    labels: tuple[int, ...] | None


def read_study_split(root: Path, split: str) -> list[ImageRecord]:
    """The images of one split of the ODIR study's layout with their labels, in table order.

    The table's ``id`` is the image's file name in ``images/<split>/``; a labelled split needs
    the columns ``D, G, A`` (0/1), the on-site test table only ``id``.
    """
    path = STUDY_LAYOUT.table(root, split)
    folder = STUDY_LAYOUT.image_dir(root, split)
    labelled = split not in STUDY_LAYOUT.unlabelled
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: table of the '{split}' split not found") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: cannot read CSV ({type(exc).__name__}: {exc})") from None
    needed = [STUDY_LAYOUT.id_column, *(STUDY_CLASSES if labelled else ())]
    _columns(table, path, needed)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder of the '{split}' split not found")
    records: list[ImageRecord] = []
    seen: set[str] = set()
    for row, values in enumerate(table[needed].itertuples(index=False), start=2):
        image_id = str(values[0]).strip()
        where = f"{path} row {row}"
        if not image_id:
            raise DataError(f"{where}: empty '{STUDY_LAYOUT.id_column}'")
        if image_id in seen:
            raise DataError(f"{where}: image '{image_id}' is listed twice")
        seen.add(image_id)
        image = folder / image_id
        if not image.is_file():
            raise DataError(f"{where}: '{image_id}' has no image {image}")
        labels = tuple(_binary(v, where) for v in values[1:]) if labelled else None
        records.append(ImageRecord(split, image_id, image, labels))
    if not records:
        raise DataError(f"{path}: the '{split}' split lists no image")
    return records


# ----------------------------------------------------------------------------- ODIR-5K
KEYWORD_LABELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("N", ("normal fundus",)),
    ("D", ("proliferative retinopathy", "diabetic retinopathy")),
    ("G", ("glaucoma",)),
    ("C", ("cataract",)),
    ("A", ("age-related macular degeneration",)),
    ("H", ("hypertensive",)),
    ("M", ("myopi",)),
)
"""Keyword fragments of each label (a keyword carrying a fragment gives the label). The
retinopathy grades ``mild/moderate/severe nonproliferative retinopathy`` and ``proliferative
diabetic retinopathy`` all contain a ``D`` fragment; ``hypertensive retinopathy`` does not."""
QUALITY_KEYWORDS = (
    "lens dust",
    "low image quality",
    "image offset",
    "optic disk photographically invisible",
    "anterior segment image",
    "no fundus image",
)
"""Keywords about the photograph, not the eye: they give no label."""


def split_keywords(text: Any) -> list[str]:
    """The keywords of one eye: ODIR-5K separates them with a full-width comma ``，`` (some
    copies use ``,``); lower-cased and stripped, empty cells give none."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return []
    return [k.strip().lower() for k in re.split("[，,]", str(text)) if k.strip()]


def eye_labels(keywords: Sequence[str]) -> tuple[int, ...]:
    """Per-eye ``N D G C A H M O`` labels derived from one eye's diagnostic keywords.

    Each keyword gives the labels whose fragments (:data:`KEYWORD_LABELS`) it contains, no
    label if it is about the photograph (:data:`QUALITY_KEYWORDS`), and ``O`` otherwise (an
    other disease: drusen, epiretinal membrane...). ``N`` holds only when nothing else does.
    This rule is moekit's: ODIR-5K labels patients, not eyes, and its annotators' per-eye
    decisions are not published.
    """
    found: set[str] = set()
    for keyword in keywords:
        if keyword in QUALITY_KEYWORDS:
            continue
        labels = {name for name, parts in KEYWORD_LABELS if any(p in keyword for p in parts)}
        found |= labels or {"O"}
    if len(found) > 1:
        found.discard("N")
    return tuple(int(name in found) for name in ODIR5K_CLASSES)


@dataclass(frozen=True)
class PatientRecord:
    """One ODIR-5K patient: each eye's file name in the table and its image (``None``: no such
    file), the patient's labels, each eye's keyword labels, age and sex."""

    patient_id: str
    files: tuple[str, str]
    images: tuple[Path | None, Path | None]
    labels: tuple[int, ...]
    eye_labels: tuple[tuple[int, ...], tuple[int, ...]]
    age: float
    sex: str


ODIR5K_COLUMNS = {
    "id": "ID",
    "age": "Patient Age",
    "sex": "Patient Sex",
    "left": "Left-Fundus",
    "right": "Right-Fundus",
    "left_keywords": "Left-Diagnostic Keywords",
    "right_keywords": "Right-Diagnostic Keywords",
}


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _patient_id(value: Any, where: str) -> str:
    text = _text(value)
    if re.fullmatch(r"\d+\.0+", text):
        text = text.split(".")[0]
    if not text:
        raise DataError(f"{where}: empty '{ODIR5K_COLUMNS['id']}'")
    return text


def read_odir5k_table(table_path: Path, images: Path) -> list[PatientRecord]:
    """Every patient of an ODIR-5K table (xlsx or CSV), with the image files that exist."""
    table = read_table(table_path)
    needed = [*(ODIR5K_COLUMNS[k] for k in ("id", "left", "right")), *ODIR5K_CLASSES]
    needed += [ODIR5K_COLUMNS["left_keywords"], ODIR5K_COLUMNS["right_keywords"]]
    _columns(table, table_path, needed)
    records: list[PatientRecord] = []
    seen: set[str] = set()
    for row, values in enumerate(table.to_dict("records"), start=2):
        where = f"{table_path} row {row}"
        patient = _patient_id(values[ODIR5K_COLUMNS["id"]], where)
        if patient in seen:
            raise DataError(f"{where}: patient '{patient}' is listed twice")
        seen.add(patient)
        files = tuple(_text(values[ODIR5K_COLUMNS[eye]]) for eye in EYES)
        found = tuple(images / f if f and (images / f).is_file() else None for f in files)
        labels = tuple(_binary(values[c], f"{where} column {c}") for c in ODIR5K_CLASSES)
        keywords = tuple(
            eye_labels(split_keywords(values[ODIR5K_COLUMNS[f"{eye}_keywords"]])) for eye in EYES
        )
        age = pd.to_numeric(values.get(ODIR5K_COLUMNS["age"], ""), errors="coerce")
        records.append(
            PatientRecord(
                patient,
                (files[0], files[1]),
                (found[0], found[1]),
                labels,
                (keywords[0], keywords[1]),
                float(age) if pd.notna(age) else math.nan,
                _text(values.get(ODIR5K_COLUMNS["sex"], "")),
            )
        )
    if not records:
        raise DataError(f"{table_path}: the table lists no patient")
    return records


def carve_patients(
    records: Sequence[PatientRecord], fraction: float, seed: int
) -> tuple[list[PatientRecord], list[PatientRecord]]:
    """``(train, val)`` patients: a seeded share ``fraction`` stratified by the label pattern
    (patients sorted by id first, so the carve does not depend on the table's order)."""
    ordered = sorted(records, key=lambda r: (len(r.patient_id), r.patient_id))
    chosen = stratified_split([r.labels for r in ordered], fraction, seed)
    train = [r for r, is_val in zip(ordered, chosen) if not is_val]
    val = [r for r, is_val in zip(ordered, chosen) if is_val]
    return train, val


# ----------------------------------------------------------------------------- datasets
class _OdirBase(MultiModalDataset):
    """What both loaders share: the task, preprocessing, augmentation, label statistics."""

    classes: tuple[str, ...] = ()

    def _setup(
        self,
        task: str,
        image_size: Sequence[int],
        preprocess: Mapping[str, Any] | str | None,
        augment: bool | Mapping[str, Any] | None,
        train: bool,
        modalities: Sequence[str],
        seed: int,
        modality_dropout: float,
    ) -> None:
        if not isinstance(task, str) or not task:
            raise ConfigError(f"{self.name}: task must be a non-empty name, got {task!r}")
        self.task = task
        self.image_size = parse_size(image_size)
        spec = "resize" if preprocess is None else preprocess
        self.preprocess_config = {"type": spec} if isinstance(spec, str) else dict(spec)
        self.preprocess = PREPROCESS.build(self.preprocess_config, image_size=self.image_size)
        augment = train if augment is None else augment
        if augment is True or isinstance(augment, Mapping):
            augment = {"type": "odir_train", **(augment if isinstance(augment, Mapping) else {})}
        self.transform = build_transform(
            "image", augment, self.image_size, seed, where=f"{self.name}.augment"
        )
        shape = (3, *self.image_size)
        self._setup_modalities(dict.fromkeys(modalities, shape), seed, modality_dropout, None)

    def label_matrix(self, task: str | None = None) -> torch.Tensor:
        """``float32 [N, C]`` 0/1 labels of the split's samples, in sample order, from the
        index (no image decoded, no augmentation)."""
        raise NotImplementedError

    def label_counts(self, task: str) -> list[int]:
        """Positive samples per class of ``task`` in this split, before any augmentation or
        oversampling (what ``class_balanced_bce`` with ``counts: auto`` uses)."""
        return [int(v) for v in self.label_matrix(task).sum(dim=0).tolist()]

    def _check_task(self, task: str | None) -> None:
        if task is not None and task != self.task:
            raise ConfigError(f"{self.name}: no task '{task}'; this dataset emits '{self.task}'")

    def _image(self, path: Path, index: int, stream: int) -> torch.Tensor:
        decoded, _ = read_rgb(path, self.image_size)
        image, _ = self.preprocess(decoded)
        self.transform.set_seed(self.draw_seed(index, stream))
        tensor, _ = self.transform(image)
        return tensor


@DATASETS.register("odir")
class OdirDataset(_OdirBase):
    """The ODIR study's layout (see the module docstring): one multi-label sample per image.

    Args:
        root: the folder holding ``train.csv``, ..., and ``images/``.
        split: ``train``, ``val``, ``offsite_test`` or ``onsite_test`` (unlabelled).
        image_size: ``[height, width]`` of the samples (the study: ``[256, 256]``).
        task: the name of the task the labels go to (``D, G, A``: 3 classes).
        augment: ``true`` (``odir_train``), ``false`` (resize + normalise) or an
            ``odir_train`` options mapping; default ``true`` for ``train`` only.
        preprocess: the ``PREPROCESS`` step before augmentation (default ``resize``).
        seed: seeds the augmentation; sample ``i`` of epoch ``e`` draws from
            ``(seed, e, i)`` after :meth:`set_epoch`, in any worker.

    A sample is ``{"inputs": float32 [3, H, W], "targets": {task: float32 [3]},
    "has_target": {task: bool}, "meta": {"split", "id"}}``.
    """

    name = "odir"
    classes = STUDY_CLASSES

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        image_size: Sequence[int] = (256, 256),
        task: str = "diagnosis",
        augment: bool | Mapping[str, Any] | None = None,
        preprocess: Mapping[str, Any] | str | None = None,
        seed: int = 0,
    ) -> None:
        self.root = Path(root).expanduser()
        self.split = check_names(self.name, "split", [split], STUDY_LAYOUT.splits)[0]
        if not self.root.is_dir():
            raise DataError(f"{self.root}: ODIR root folder not found (data.root)")
        self.records = read_study_split(self.root, self.split)
        self.generated = read_generated(self.root, self.split)
        self.labelled = self.split not in STUDY_LAYOUT.unlabelled
        self._setup(
            task, image_size, preprocess, augment, self.split == "train", ["fundus"], seed, 0.0
        )

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"OdirDataset({self.root}, split={self.split}, {len(self)} images)"

    @property
    def ids(self) -> list[str]:
        """The image ids (file names) in sample order: the rows of a submission."""
        return [r.image_id for r in self.records]

    def label_matrix(self, task: str | None = None) -> torch.Tensor:
        self._check_task(task)
        if not self.labelled:
            raise ConfigError(f"odir: the '{self.split}' split has no labels")
        return torch.tensor([r.labels for r in self.records], dtype=torch.float32)

    def label_counts(self, task: str) -> list[int]:
        """Positives per class of the real images: images a generator added (listed in
        ``generated.csv``, ``moekit data vae-augment``) are left out, so class-balanced losses
        weigh the real labels."""
        real = torch.tensor([r.image_id not in self.generated for r in self.records])
        return [int(v) for v in self.label_matrix(task)[real].sum(dim=0).tolist()]

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        labels = record.labels or (0,) * len(self.classes)
        return self.make_sample(
            {"fundus": self._image(record.path, index, 0)},
            {self.task: torch.tensor(labels, dtype=torch.float32)},
            {self.task: record.labels is not None},
            {"split": self.split, "id": record.image_id},
        )


@DATASETS.register("odir5k")
class Odir5kDataset(_OdirBase):
    """The public ODIR-5K release (see the module docstring): eyes or patients, 8 labels.

    Args:
        root: the folder of the release.
        table: the annotation table (xlsx or CSV), relative to ``root`` or absolute.
        images: the folder of the fundus images, relative to ``root`` or absolute.
        split: ``train``/``val`` (patients carved by ``val_fraction``) or ``all``.
        view: ``eye`` (one sample per eye with an image) or ``patient`` (both eyes as the
            views ``left`` and ``right``).
        eye_labels: for ``view: eye``, ``keywords`` (derived from the eye's own keywords,
            :func:`eye_labels`) or ``patient`` (the patient's labels for both eyes).
        image_size, task, augment, preprocess, seed: as for ``odir`` (8 classes).
        val_fraction: share of the patients held out as ``val`` (0: ``train`` is all).
        val_seed: seeds the carve.
        modality_dropout: ``view: patient``: chance of hiding one eye in training.

    Samples without an image file are left out (an eye, or a patient with neither eye):
    :attr:`missing` lists the files named in the table but not found.
    """

    name = "odir5k"
    classes = ODIR5K_CLASSES

    def __init__(
        self,
        root: str | os.PathLike[str],
        table: str = "ODIR-5K_Training_Annotations(Updated)_V2.xlsx",
        images: str = "ODIR-5K_Training_Dataset",
        split: str = "train",
        view: str = "eye",
        eye_labels: str = "keywords",
        image_size: Sequence[int] = (256, 256),
        task: str = "diagnosis",
        val_fraction: float = 0.2,
        val_seed: int = 0,
        augment: bool | Mapping[str, Any] | None = None,
        preprocess: Mapping[str, Any] | str | None = None,
        seed: int = 0,
        modality_dropout: float = 0.0,
    ) -> None:
        self.root = Path(root).expanduser()
        self.split = check_names(self.name, "split", [split], ("train", "val", "all"))[0]
        self.view = check_names(self.name, "view", [view], ("eye", "patient"))[0]
        self.label_source = check_names(
            self.name, "eye_labels", [eye_labels], ("keywords", "patient")
        )[0]
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ConfigError(f"odir5k: val_fraction must be in [0, 1), got {val_fraction}")
        if self.split == "val" and float(val_fraction) == 0.0:
            raise ConfigError("odir5k: split 'val' needs val_fraction > 0")
        self.table_path = self._under_root(table)
        self.image_dir = self._under_root(images)
        if not self.image_dir.is_dir():
            raise DataError(f"{self.image_dir}: ODIR-5K image folder not found (images)")
        patients = read_odir5k_table(self.table_path, self.image_dir)
        self.missing = [
            self.image_dir / name
            for record in patients
            for name, path in zip(record.files, record.images)
            if name and path is None
        ]
        if self.split != "all" and float(val_fraction) > 0:
            train, val = carve_patients(patients, float(val_fraction), int(val_seed))
            patients = val if self.split == "val" else train
        self.patients = [p for p in patients if any(p.images)]
        self.samples = (
            [(p, e) for p in self.patients for e in range(2) if p.images[e] is not None]
            if self.view == "eye"
            else [(p, None) for p in self.patients]
        )
        if not self.samples:
            raise DataError(
                f"{self.table_path}: no image of the '{self.split}' split exists in "
                f"{self.image_dir}"
            )
        modalities = ["fundus"] if self.view == "eye" else list(EYES)
        dropout = modality_dropout if self.split == "train" else 0.0
        self._setup(
            task, image_size, preprocess, augment, self.split == "train", modalities, seed, dropout
        )

    def _under_root(self, path: str) -> Path:
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else self.root / candidate

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (
            f"Odir5kDataset({self.table_path}, split={self.split}, view={self.view}, "
            f"{len(self)} samples, {len(self.missing)} missing files)"
        )

    def _labels(self, patient: PatientRecord, eye: int | None) -> tuple[int, ...]:
        if eye is None or self.label_source == "patient":
            return patient.labels
        return patient.eye_labels[eye]

    def label_matrix(self, task: str | None = None) -> torch.Tensor:
        self._check_task(task)
        rows = [self._labels(patient, eye) for patient, eye in self.samples]
        return torch.tensor(rows, dtype=torch.float32)

    def __getitem__(self, index: int) -> dict[str, Any]:
        patient, eye = self.samples[index]
        if eye is not None:
            inputs = {"fundus": self._image(patient.images[eye], index, 0)}
            sample_id = patient.images[eye].name
        else:
            available = [name for name, path in zip(EYES, patient.images) if path is not None]
            kept = self.kept_modalities(index, available)
            inputs = {
                name: self._image(path, index, m)
                for m, (name, path) in enumerate(zip(EYES, patient.images))
                if name in kept
            }
            sample_id = patient.patient_id
        labels = torch.tensor(self._labels(patient, eye), dtype=torch.float32)
        meta = {"split": self.split, "id": sample_id, "patient": patient.patient_id}
        return self.make_sample(inputs, {self.task: labels}, {self.task: True}, meta)
