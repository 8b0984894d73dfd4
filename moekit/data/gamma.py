"""GAMMA: glaucoma grading from a fundus photograph and an OCT volume, optic disc/cup segmentation.

The GAMMA challenge (Wu et al., Medical Image Analysis 2023), M4oE's retinal dataset, ships
per patient a colour fundus photograph and a macular OCT volume (256 B-scans) with a glaucoma
grade, and, in a separate folder, fundus photographs with optic disc and cup masks:

* ``Glaucoma_grading/training/glaucoma_grading_training_GT.xlsx``: columns ``data`` (the
  patient number, ``1`` → folder ``0001``) and the one-hot grade ``non``, ``early``,
  ``mid_advanced`` (a CSV with the same stem and columns is read when there is no xlsx);
* ``Glaucoma_grading/training/multi-modality_images/<id>/<id>.jpg``: the fundus photograph;
* ``Glaucoma_grading/training/multi-modality_images/<id>/<id>/<k>_image.jpg``: the B-scans,
  ordered by the integer ``k`` (``10_image.jpg`` comes after ``9_image.jpg``);
* ``Disc_Cup_Segmentation/training/fundus color images/<id>.jpg`` and
  ``Disc_Cup_Segmentation/training/Disc_Cup_Mask/<id>.bmp``: grey levels 0 = cup, 128 = disc
  rim, 255 = background, so disc = cup ∪ rim.

:class:`GammaDataset` (``DATASETS: gamma``) serves one sample per *patient id*: a patient of the
grading table has a grade, a fundus (if its JPEG exists) and an OCT volume (if its B-scans do);
a patient id of the segmentation folder has a fundus and, if its BMP exists, ``disc`` and
``cup`` masks. An id in both folders is one patient with all of these; its fundus is then the
segmentation folder's photograph, the one the masks are drawn on. Tasks: ``grade`` (3 classes,
the challenge's metric is quadratic-weighted kappa), ``disc`` and ``cup`` (binary masks).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from moekit.data.idrid import stratified_split
from moekit.data.image_io import read_grey, read_rgb, resize_image, resize_mask
from moekit.data.modality_transforms import build_transform
from moekit.data.multimodal import MultiModalDataset, augment_per_modality, check_names
from moekit.data.transforms import parse_size
from moekit.errors import ConfigError, DataError, did_you_mean
from moekit.registry import DATASETS
from moekit.rng import derived_seed

MODALITIES = ("fundus", "oct")
TASKS = ("grade", "disc", "cup")
MASK_TASKS = ("disc", "cup")
GRADES = ("non", "early", "mid_advanced")
NUM_CLASSES = {"grade": len(GRADES), "disc": 1, "cup": 1}
SOURCES = ("grading", "segmentation")
SPLITS = ("train", "val", "test")
IGNORE_INDEX = -1
"""Filler grade of a patient without one."""
CUP_BELOW = 64
DISC_BELOW = 192
"""Mask grey levels below 64 are cup, below 192 disc (cup or rim); the release uses 0/128/255."""
BSCAN_NAME = re.compile(r"^(\d+)_image\.jpe?g$", re.IGNORECASE)


@dataclass(frozen=True)
class GammaLayout:
    """Folder and file names of the GAMMA download, relative to its root.

    ``split`` below is ``train`` or ``test``, stored in the folders ``training`` and
    ``testing``; the test table follows the training table's name pattern.
    """

    grading: str = "Glaucoma_grading"
    segmentation: str = "Disc_Cup_Segmentation"
    images: str = "multi-modality_images"
    seg_images: str = "fundus color images"
    seg_masks: str = "Disc_Cup_Mask"
    split_dirs: tuple[tuple[str, str], ...] = (("train", "training"), ("test", "testing"))
    id_column: str = "data"

    def split_dir(self, split: str) -> str:
        return dict(self.split_dirs)[split]

    def grades_table(self, root: Path, split: str, suffix: str = ".xlsx") -> Path:
        folder = self.split_dir(split)
        return root / self.grading / folder / f"glaucoma_grading_{folder}_GT{suffix}"

    def patients_dir(self, root: Path, split: str) -> Path:
        return root / self.grading / self.split_dir(split) / self.images

    def fundus(self, root: Path, split: str, patient: str) -> Path:
        return self.patients_dir(root, split) / patient / f"{patient}.jpg"

    def oct_dir(self, root: Path, split: str, patient: str) -> Path:
        return self.patients_dir(root, split) / patient / patient

    def bscan(self, root: Path, split: str, patient: str, k: int) -> Path:
        return self.oct_dir(root, split, patient) / f"{k}_image.jpg"

    def seg_images_dir(self, root: Path, split: str) -> Path:
        return root / self.segmentation / self.split_dir(split) / self.seg_images

    def seg_masks_dir(self, root: Path, split: str) -> Path:
        return root / self.segmentation / self.split_dir(split) / self.seg_masks

    def seg_image(self, root: Path, split: str, patient: str) -> Path:
        return self.seg_images_dir(root, split) / f"{patient}.jpg"

    def mask(self, root: Path, split: str, patient: str) -> Path:
        return self.seg_masks_dir(root, split) / f"{patient}.bmp"


LAYOUT = GammaLayout()


@dataclass(frozen=True)
class GammaRecord:
    """One patient: its grade (or ``None``), its fundus photograph and kept B-scans (``None``:
    the modality is missing) and its disc/cup mask (``None``: no mask)."""

    split: str
    patient: str
    grade: int | None
    fundus: Path | None
    bscans: tuple[Path, ...] | None
    mask: Path | None

    @property
    def key(self) -> tuple[str, str]:
        return self.split, self.patient

    @property
    def source(self) -> str:
        """``grading`` for a patient with a grade, else ``segmentation``."""
        return "grading" if self.grade is not None else "segmentation"

    def has(self, modality: str) -> bool:
        return (self.fundus if modality == "fundus" else self.bscans) is not None


def patient_id(value: Any, where: str) -> str:
    """The folder name of a patient number: ``1``, ``1.0`` or ``"0001"`` → ``"0001"``."""
    text = str(value).strip()
    if re.fullmatch(r"\d+(\.0+)?", text):
        return f"{int(float(text)):04d}"
    raise DataError(f"{where}: '{LAYOUT.id_column}' must be a patient number, got {value!r}")


def _read_table(path: Path) -> pd.DataFrame:
    try:
        if path.suffix.lower() == ".xlsx":
            return pd.read_excel(path, dtype=object)
        return pd.read_csv(path, dtype=object, keep_default_na=False)
    except ImportError as exc:
        raise DataError(f"{path}: reading .xlsx needs openpyxl ({exc})") from None
    except Exception as exc:  # pandas and openpyxl raise many types for a malformed file
        raise DataError(f"{path}: cannot read the table ({type(exc).__name__}: {exc})") from None


def read_grades(path: str | os.PathLike[str]) -> dict[str, int]:
    """``{patient id: grade}`` from a grading table (xlsx or CSV, columns ``data, non, early,
    mid_advanced``); the grade is the column holding the one 1 (0 non, 1 early, 2
    mid_advanced)."""
    path = Path(path)
    table = _read_table(path)
    table.columns = [str(c).strip() for c in table.columns]
    expected = (LAYOUT.id_column, *GRADES)
    for column in expected:
        if column not in table.columns:
            raise DataError(
                f"{path}: no column '{column}'{did_you_mean(column, table.columns)}; "
                f"expected {', '.join(expected)}, found {', '.join(table.columns)}"
            )
    grades: dict[str, int] = {}
    for row, values in enumerate(table[list(expected)].itertuples(index=False), start=2):
        where = f"{path} row {row}"
        patient = patient_id(values[0], where)
        try:
            onehot = [float(v) for v in values[1:]]
        except (TypeError, ValueError):
            onehot = []
        if sorted(onehot) != [0.0] * (len(GRADES) - 1) + [1.0]:
            raise DataError(
                f"{where}: {', '.join(GRADES)} must be one-hot (one 1, the rest 0), "
                f"got {list(values[1:])}"
            )
        if patient in grades:
            raise DataError(f"{where}: patient '{patient}' is listed twice")
        grades[patient] = onehot.index(1.0)
    return grades


def grades_table(root: Path, split: str) -> Path:
    """The grading table of ``split``: the xlsx, else a CSV with the same stem."""
    xlsx = LAYOUT.grades_table(root, split)
    csv = LAYOUT.grades_table(root, split, ".csv")
    if xlsx.is_file() or not csv.is_file():
        if not xlsx.is_file():
            raise DataError(f"{xlsx}: grading table not found (nor {csv.name})")
        return xlsx
    return csv


def list_bscans(folder: Path) -> list[Path]:
    """The B-scans ``<k>_image.jpg`` of an OCT folder, ordered by the integer ``k``."""
    scans = []
    for path in folder.iterdir():
        match = BSCAN_NAME.match(path.name)
        if match and path.is_file():
            scans.append((int(match.group(1)), path))
    if not scans:
        raise DataError(f"{folder}: OCT folder holds no B-scan named <k>_image.jpg")
    return [path for _, path in sorted(scans)]


def evenly_spaced(count: int, keep: int) -> list[int]:
    """``keep`` indices of ``range(count)`` at the centres of ``keep`` equal parts:
    ``floor((i + ½) · count / keep)`` (one keeps the middle; ``keep == count`` keeps all)."""
    return [int((i + 0.5) * count / keep) for i in range(keep)]


def split_mask(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(disc, cup)`` ``uint8`` 0/1 masks from a GAMMA label map (0 cup, 128 rim, 255
    background): disc = grey < :data:`DISC_BELOW`, cup = grey < :data:`CUP_BELOW`."""
    return (grey < DISC_BELOW).astype(np.uint8), (grey < CUP_BELOW).astype(np.uint8)


def _check_dir(path: Path, root: Path) -> None:
    if not path.is_dir():
        raise DataError(
            f"{path}: folder not found; is data.root ({root}) the folder that holds "
            f"'{LAYOUT.grading}' and '{LAYOUT.segmentation}' of the GAMMA download?"
        )


def scan_grading(
    root: Path, split: str, num_bscans: int | None
) -> dict[str, tuple[int, Path | None, tuple[Path, ...] | None]]:
    """``{patient: (grade, fundus or None, kept B-scans or None)}`` of the grading folder."""
    folder = LAYOUT.patients_dir(root, split)
    _check_dir(folder, root)
    table = grades_table(root, split)
    grades = read_grades(table)
    on_disk = sorted(p.name for p in folder.iterdir() if p.is_dir())
    for name in on_disk:
        if name not in grades:
            raise DataError(f"{folder / name}: patient folder has no row in {table}")
    patients = {}
    for patient, grade in sorted(grades.items()):
        if patient not in on_disk:
            raise DataError(f"{table}: patient '{patient}' has no folder {folder / patient}")
        fundus = LAYOUT.fundus(root, split, patient)
        oct_dir = LAYOUT.oct_dir(root, split, patient)
        bscans = None
        if oct_dir.is_dir():
            scans = list_bscans(oct_dir)
            keep = len(scans) if num_bscans is None else num_bscans
            if len(scans) < keep:
                raise DataError(f"{oct_dir}: {len(scans)} B-scans, fewer than num_bscans ({keep})")
            bscans = tuple(scans[i] for i in evenly_spaced(len(scans), keep))
        patients[patient] = (grade, fundus if fundus.is_file() else None, bscans)
    return patients


def scan_segmentation(root: Path, split: str) -> dict[str, tuple[Path, Path | None]]:
    """``{patient: (photograph, mask or None)}`` of the segmentation folder."""
    images, masks = LAYOUT.seg_images_dir(root, split), LAYOUT.seg_masks_dir(root, split)
    _check_dir(images, root)
    _check_dir(masks, root)
    photos = {p.stem: p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")}
    for mask in sorted(masks.glob("*.bmp")):
        if mask.stem not in photos:
            raise DataError(f"{mask}: mask has no photograph in {images}")
    return {
        patient: (photo, LAYOUT.mask(root, split, patient))
        if LAYOUT.mask(root, split, patient).is_file()
        else (photo, None)
        for patient, photo in sorted(photos.items())
    }


def carve_validation(
    records: Sequence[GammaRecord], fraction: float, seed: int
) -> tuple[list[GammaRecord], list[GammaRecord]]:
    """Split training patients into ``(train, val)`` from ``seed``: graded patients stratified
    by grade (seed derived from ``(seed, 0)``), ungraded ones on their own (``(seed, 1)``), so
    the graded validation patients do not change when ungraded ones are added."""
    train: list[GammaRecord] = []
    val: list[GammaRecord] = []
    for group_index, graded in enumerate((True, False)):
        group = sorted(
            (r for r in records if (r.grade is not None) == graded), key=lambda r: r.patient
        )
        chosen = stratified_split(
            [r.grade for r in group], fraction, derived_seed(seed, group_index)
        )
        for record, is_val in zip(group, chosen):
            (val if is_val else train).append(record)
    return train, val


def gamma_tasks(tasks: Sequence[str] = TASKS) -> dict[str, dict[str, Any]]:
    """The ``tasks:`` config block matching the loader (kinds and class counts)."""
    return {
        name: {
            "kind": "multiclass" if name == "grade" else "segmentation",
            "num_classes": NUM_CLASSES[name],
            **({"class_names": list(GRADES)} if name == "grade" else {}),
        }
        for name in check_names("gamma", "task", tasks, TASKS)
    }


@DATASETS.register("gamma")
class GammaDataset(MultiModalDataset):
    """GAMMA glaucoma grading (fundus + OCT) and disc/cup segmentation (real download layout).

    Args:
        root: the folder holding ``Glaucoma_grading`` and ``Disc_Cup_Segmentation``.
        split: ``train``, ``val`` (carved from the training patients) or ``test``.
        tasks: a subset of ``grade, disc, cup`` (default all).
        modalities: ``fundus`` and/or ``oct``; default both, or ``fundus`` when only the
            segmentation folder is read (it has no OCT).
        sources: ``grading`` and/or ``segmentation`` (the folders read); default: those that
            label one of ``tasks`` (``grade``: grading; ``disc``, ``cup``: segmentation).
        num_bscans: B-scans kept per volume, evenly spaced (``null``: all 256).
        fundus_size: ``[height, width]`` of the fundus and masks (the release: 2000×2992 and
            1934×1956).
        oct_size: ``[height, width]`` of each B-scan (the release: 992×512).
        val_fraction: share of the training patients held out as ``val``.
        val_seed: seeds the train/val carve.
        augment: ``true``, ``false`` or ``{fundus: ..., oct: ...}`` (each ``true``, ``false``
            or a ``TRANSFORMS`` mapping); default: ``true`` for ``train``. The fundus and its
            masks share one geometric transform (``idrid_train``); the B-scans of a volume
            share one (``volume_train``).
        modality_dropout: ``p``, drop each modality a patient has with probability ``p``,
            never all (:mod:`moekit.data.modality_dropout`); 0 by default.
        dict_inputs: ``null`` (default): ``{modality: tensor}`` inputs with two modalities, the
            tensor itself with one; ``true``/``false`` to choose.
        seed: seeds augmentation and modality dropout: draw ``s`` of sample ``i`` in epoch
            ``e`` from ``(seed, e, i, s)`` (call :meth:`set_epoch`).

    A sample's ``inputs`` has ``fundus``: ``float32 [3, H, W]`` (ImageNet-normalised) and
    ``oct``: ``float32 [num_bscans, h, w]`` (grey levels scaled to [−1, 1]) when the patient
    has them; ``targets``: ``grade`` ``int64`` (:data:`IGNORE_INDEX` without a grade),
    ``disc``/``cup`` ``float32 [1, H, W]`` 0/1 (zeros, ``has_target`` False, without a mask
    or without the fundus); ``meta``: ``split``, ``id``, ``source``.
    """

    name = "gamma"

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        tasks: Sequence[str] = TASKS,
        modalities: Sequence[str] | None = None,
        sources: Sequence[str] | None = None,
        num_bscans: int | None = 16,
        fundus_size: Sequence[int] = (256, 384),
        oct_size: Sequence[int] = (128, 64),
        val_fraction: float = 0.2,
        val_seed: int = 0,
        augment: bool | Mapping[str, Any] | None = None,
        modality_dropout: float = 0.0,
        dict_inputs: bool | None = None,
        seed: int = 0,
    ) -> None:
        self.root = Path(root).expanduser()
        self.split = check_names("gamma", "split", [split], SPLITS)[0]
        self.tasks = tuple(t for t in TASKS if t in check_names("gamma", "task", tasks, TASKS))
        self.mask_tasks = tuple(t for t in self.tasks if t in MASK_TASKS)
        if sources is None:
            sources = ["grading"] if "grade" in self.tasks else []
            sources += ["segmentation"] if self.mask_tasks else []
        self.source_names = tuple(
            s for s in SOURCES if s in check_names("gamma", "source", sources, SOURCES)
        )
        if modalities is None:
            modalities = MODALITIES if "grading" in self.source_names else ["fundus"]
        loaded = check_names("gamma", "modality", modalities, MODALITIES)
        self.loaded = tuple(m for m in MODALITIES if m in loaded)
        if "oct" in self.loaded and "grading" not in self.source_names:
            raise ConfigError("gamma: modality 'oct' needs source 'grading' (the OCT volumes)")
        if num_bscans is not None and (
            isinstance(num_bscans, bool) or not isinstance(num_bscans, int) or num_bscans < 1
        ):
            raise ConfigError(
                f"gamma: num_bscans must be a positive int or null, got {num_bscans!r}"
            )
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ConfigError(f"gamma: val_fraction must be in [0, 1), got {val_fraction}")
        if self.split == "val" and float(val_fraction) == 0.0:
            raise ConfigError("gamma: split 'val' needs val_fraction > 0")
        self.num_bscans = num_bscans
        self.val_fraction = float(val_fraction)
        self.fundus_size = parse_size(fundus_size)
        self.oct_size = parse_size(oct_size)
        self.left_out: list[str] = []
        self.records = self._index(int(val_seed))
        shapes = {"fundus": (3, *self.fundus_size), "oct": (self._depth(), *self.oct_size)}
        self._setup_modalities(
            {m: shapes[m] for m in self.loaded}, seed, modality_dropout, dict_inputs
        )
        choice = augment_per_modality("gamma", augment, self.loaded, self.split == "train")
        self.transforms = {
            m: build_transform(
                "image" if m == "fundus" else "volume",
                choice[m],
                self.fundus_size if m == "fundus" else self.oct_size,
                self.seed,
                where=f"gamma.augment.{m}",
            )
            for m in self.loaded
        }

    def _index(self, val_seed: int) -> list[GammaRecord]:
        if not self.root.is_dir():
            raise DataError(f"{self.root}: GAMMA root folder not found (data.root)")
        disk_split = "test" if self.split == "test" else "train"
        grading = (
            scan_grading(self.root, disk_split, self.num_bscans)
            if "grading" in self.source_names
            else {}
        )
        segmentation = (
            scan_segmentation(self.root, disk_split) if "segmentation" in self.source_names else {}
        )
        records = []
        for patient in sorted(set(grading) | set(segmentation)):
            grade, fundus, bscans = grading.get(patient, (None, None, None))
            photo, mask = segmentation.get(patient, (None, None))
            record = GammaRecord(disk_split, patient, grade, photo or fundus, bscans, mask)
            if any(record.has(m) for m in self.loaded):
                records.append(record)
            else:
                self.left_out.append(patient)
        if disk_split == "train" and self.val_fraction > 0:
            train, val = carve_validation(records, self.val_fraction, val_seed)
            records = val if self.split == "val" else train
        if not records:
            raise DataError(
                f"{self.root}: the '{self.split}' split of GAMMA "
                f"({', '.join(self.source_names)}; {', '.join(self.loaded)}) has no patients"
            )
        return records

    def _depth(self) -> int:
        """B-scans per volume: ``num_bscans``, or the one count of every volume (``null``)."""
        if self.num_bscans is not None:
            return self.num_bscans
        volumes = [r for r in self.records if r.bscans is not None]
        for record in volumes:
            if len(record.bscans) != len(volumes[0].bscans):
                raise DataError(
                    f"{record.bscans[0].parent}: {len(record.bscans)} B-scans but "
                    f"{volumes[0].bscans[0].parent} has {len(volumes[0].bscans)}; "
                    "set num_bscans to keep the same number from every volume"
                )
        return len(volumes[0].bscans) if volumes else 0

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return (
            f"GammaDataset({self.root}, split={self.split}, {len(self)} patients, "
            f"modalities={list(self.loaded)}, tasks={list(self.tasks)})"
        )

    @property
    def keys(self) -> list[tuple[str, str]]:
        """``(folder split, patient id)`` of every sample."""
        return [r.key for r in self.records]

    @property
    def sources(self) -> list[str]:
        """``grading`` or ``segmentation`` per sample (for the ``balanced_source`` sampler)."""
        return [r.source for r in self.records]

    def class_labels(self, task: str = "grade") -> list[int]:
        """The grades of the graded patients, in sample order, from the index."""
        if task != "grade" or "grade" not in self.tasks:
            raise ConfigError(f"gamma: '{task}' is not a loaded grading task")
        return [r.grade for r in self.records if r.grade is not None]

    def _read_fundus(
        self, record: GammaRecord, with_mask: bool
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        image, full_size = read_rgb(record.fundus, self.fundus_size)
        image = resize_image(image, self.fundus_size)
        if not with_mask:
            return image, []
        grey, mask_size = read_grey(record.mask)
        if mask_size != full_size:
            raise DataError(
                f"{record.mask}: mask is {mask_size[1]}x{mask_size[0]} but its photograph "
                f"{record.fundus} is {full_size[1]}x{full_size[0]}"
            )
        disc, cup = split_mask(grey)
        masks = {"disc": disc, "cup": cup}
        return image, [resize_mask(masks[t], self.fundus_size) for t in self.mask_tasks]

    def _read_oct(self, record: GammaRecord) -> np.ndarray:
        slices = []
        first_size = None
        for path in record.bscans:
            grey, full_size = read_grey(path, self.oct_size)
            if first_size is None:
                first_size = full_size
            elif full_size != first_size:
                raise DataError(
                    f"{path}: B-scan is {full_size[1]}x{full_size[0]}, the volume's first "
                    f"{record.bscans[0]} is {first_size[1]}x{first_size[0]}"
                )
            slices.append(resize_image(grey, self.oct_size))
        return np.stack(slices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        available = [m for m in self.loaded if record.has(m)]
        kept = self.kept_modalities(index, available)
        inputs: dict[str, torch.Tensor] = {}
        masks = None
        for stream, modality in enumerate(self.loaded):
            if modality not in kept:
                continue
            transform = self.transforms[modality]
            transform.set_seed(self.draw_seed(index, stream))
            if modality == "fundus":
                with_mask = record.mask is not None and bool(self.mask_tasks)
                image, raw_masks = self._read_fundus(record, with_mask)
                inputs["fundus"], out_masks = transform(image, raw_masks)
                masks = out_masks if with_mask else None
            else:
                inputs["oct"], _ = transform(self._read_oct(record))
        targets: dict[str, torch.Tensor] = {}
        has_target: dict[str, bool] = {}
        if "grade" in self.tasks:
            grade = IGNORE_INDEX if record.grade is None else record.grade
            targets["grade"] = torch.tensor(grade, dtype=torch.long)
            has_target["grade"] = record.grade is not None
        for i, task in enumerate(self.mask_tasks):
            if masks is None:
                targets[task] = torch.zeros(1, *self.fundus_size)
            else:
                targets[task] = masks[i : i + 1].float()
            has_target[task] = masks is not None
        meta = {"split": self.split, "id": record.patient, "source": record.source}
        return self.make_sample(inputs, targets, has_target, meta)
