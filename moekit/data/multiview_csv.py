"""A dataset from a CSV table: one row per case, one image column per view or modality.

``DATASETS: multiview_csv`` reads a table such as::

    case_id,L_CC,L_MLO,R_CC,R_MLO,density,mass,calcification,age,L_CC_mask,split
    c0001,images/c0001/L_CC.png,images/c0001/L_MLO.png,,images/c0001/R_MLO.png,B,1,0,57.5,...,train

* each *view* column holds the path of one image (relative to ``root``, by default the CSV's
  folder); an empty cell means the view is missing for that case — the sample simply does not
  have it (``present`` False in the batch). A case with none of the loaded views is left out
  (``dataset.left_out``);
* each *task* maps label columns to a task: ``multiclass`` (one column; its values are the
  ``classes`` listed, or integers ``0 .. num_classes − 1``), ``multilabel`` (``columns`` of 0/1),
  ``regression`` (one or more numeric ``columns``) or ``segmentation`` (a column of mask paths,
  drawn on the pixels of one ``view``). An empty label cell (any of a task's cells) means the
  case is unlabelled for that task (``has_target`` False), never for the others;
* the split is an optional ``split_column`` (``train``, ``val``, ``test``); ``train`` and
  ``val`` are carved from the training rows by a seeded stratified fraction when the table has
  no ``val`` rows (or no split column at all), as for IDRiD.

This covers four-view mammography tables (L/R × CC/MLO, e.g. EMBED, RSNA or VinDr-Mammo after
one pivot to a row per case) and, with a single image column, any single-image dataset: with
one view a sample's ``inputs`` is that view's tensor, so every single-image model trains on
it. See ``docs/own_data.md``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from moekit.data.idrid import stratified_split
from moekit.data.image_io import read_grey, read_mask, read_rgb, resize_image, resize_mask
from moekit.data.modality_transforms import build_transform
from moekit.data.multimodal import MultiModalDataset, augment_per_modality, check_names
from moekit.data.transforms import parse_size
from moekit.errors import ConfigError, DataError, did_you_mean
from moekit.registry import DATASETS
from moekit.types import TASK_KINDS

SPLITS = ("train", "val", "test", "all")
IGNORE_INDEX = -1
"""Filler class of an unlabelled multiclass task."""
TASK_KEYS = ("kind", "column", "columns", "classes", "num_classes", "view")
VIEW_KEYS = ("column", "image_size", "channels")


@dataclass(frozen=True)
class View:
    """A loaded image column: its modality name, column, size and channels (1 grey, 3 RGB)."""

    name: str
    column: str
    image_size: tuple[int, int]
    channels: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.image_size)


@dataclass(frozen=True)
class ColumnTask:
    """A task read from table columns."""

    name: str
    kind: str
    columns: tuple[str, ...]
    classes: tuple[str, ...] = ()
    num_classes: int = 1
    view: str | None = None


@dataclass(frozen=True)
class CaseRecord:
    """One row: its CSV line, id, split, image per view (``None``: missing) and labels."""

    line: int
    case_id: str
    split: str
    images: tuple[Path | None, ...]
    labels: tuple[Any, ...]


def _parse_views(
    views: Sequence[str] | Mapping[str, Any], image_size: Sequence[int], channels: int
) -> list[View]:
    where = "multiview_csv.views"
    if isinstance(views, str) or not isinstance(views, Sequence | Mapping) or not views:
        raise ConfigError(f"{where}: expected a list of image columns or a mapping, got {views!r}")
    items = views.items() if isinstance(views, Mapping) else [(v, v) for v in views]
    parsed = []
    for name, spec in items:
        spec = {"column": spec} if isinstance(spec, str) else dict(spec or {})
        unknown = set(spec) - set(VIEW_KEYS)
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(
                f"{where}.{name}: unknown key '{key}'; valid: {', '.join(VIEW_KEYS)}"
                f"{did_you_mean(key, VIEW_KEYS)}"
            )
        view_channels = spec.get("channels", channels)
        if view_channels not in (1, 3):
            raise ConfigError(f"{where}.{name}.channels: expected 1 or 3, got {view_channels!r}")
        size = parse_size(spec.get("image_size", image_size))
        parsed.append(View(str(name), str(spec.get("column", name)), size, int(view_channels)))
    if len({v.name for v in parsed}) != len(parsed):
        raise ConfigError(f"{where}: view names repeat")
    return parsed


def _parse_task(name: str, spec: Any, views: Sequence[View]) -> ColumnTask:
    where = f"multiview_csv.tasks.{name}"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a mapping with kind and column(s), got {spec!r}")
    unknown = set(spec) - set(TASK_KEYS)
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(
            f"{where}: unknown key '{key}'; valid: {', '.join(TASK_KEYS)}"
            f"{did_you_mean(key, TASK_KEYS)}"
        )
    kind = spec.get("kind")
    if kind not in TASK_KINDS:
        raise ConfigError(
            f"{where}.kind: '{kind}' is not a task kind; valid: {', '.join(TASK_KINDS)}"
            f"{did_you_mean(str(kind), TASK_KINDS)}"
        )
    if ("column" in spec) == ("columns" in spec):
        raise ConfigError(f"{where}: give exactly one of 'column' and 'columns'")
    columns = (spec["column"],) if "column" in spec else tuple(spec["columns"] or ())
    columns = tuple(str(c) for c in columns)
    if not columns or (kind in ("multiclass", "segmentation") and len(columns) != 1):
        raise ConfigError(f"{where}: a {kind} task reads one 'column'")
    if kind == "multiclass":
        classes = tuple(str(c) for c in spec.get("classes") or ())
        num_classes = len(classes) if classes else spec.get("num_classes")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ConfigError(f"{where}: a multiclass task needs 'classes' or num_classes >= 2")
        if classes and len(set(classes)) != len(classes):
            raise ConfigError(f"{where}.classes: values repeat")
        return ColumnTask(name, kind, columns, classes, num_classes)
    if kind == "segmentation":
        names = [v.name for v in views]
        view = spec.get("view", names[0] if len(names) == 1 else None)
        if view not in names:
            raise ConfigError(
                f"{where}.view: name the view the masks are drawn on; one of {', '.join(names)}"
                f"{did_you_mean(str(view), names)}"
            )
        return ColumnTask(name, kind, columns, view=view)
    return ColumnTask(name, kind, columns, num_classes=len(columns))


def _parse_label(task: ColumnTask, cells: Sequence[str], where: str, root: Path) -> Any:
    """A task's label from its cells (``None``: unlabelled); a bad value is a DataError."""
    if any(c == "" for c in cells):
        return None
    if task.kind == "multiclass":
        (cell,) = cells
        if task.classes:
            if cell not in task.classes:
                raise DataError(
                    f"{where}: '{task.columns[0]}' is {cell!r}, not one of the classes "
                    f"{', '.join(task.classes)} of task '{task.name}'"
                )
            return task.classes.index(cell)
        try:
            value = float(cell)
        except ValueError:
            value = math.nan
        if not (value.is_integer() and 0 <= value < task.num_classes):
            raise DataError(
                f"{where}: '{task.columns[0]}' is {cell!r}, expected an integer "
                f"0-{task.num_classes - 1} for task '{task.name}'"
            )
        return int(value)
    if task.kind == "segmentation":
        path = root / cells[0]
        if not path.is_file():
            raise DataError(f"{where}: mask file {path} ('{task.columns[0]}') not found")
        return path
    values = []
    for column, cell in zip(task.columns, cells):
        try:
            value = float(cell)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or (task.kind == "multilabel" and value not in (0.0, 1.0)):
            expected = "0 or 1" if task.kind == "multilabel" else "a number"
            raise DataError(f"{where}: '{column}' is {cell!r}, expected {expected}")
        values.append(value)
    return tuple(values)


def multiview_csv_tasks(tasks: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The ``tasks:`` config block (kinds and class counts) matching a dataset's ``tasks``."""
    views = [View("image", "image", (1, 1), 3)]
    block = {}
    for name, spec in tasks.items():
        spec = {**spec, "view": "image"} if spec.get("kind") == "segmentation" else spec
        task = _parse_task(name, spec, views)
        block[name] = {"kind": task.kind, "num_classes": task.num_classes}
        if task.classes:
            block[name]["class_names"] = list(task.classes)
    return block


@DATASETS.register("multiview_csv")
class MultiViewCsvDataset(MultiModalDataset):
    """Cases from a CSV table: one image column per view/modality, label columns per task.

    Args:
        csv: the table (one row per case).
        views: the image columns to load, in order: a list of column names (the modality
            names), or ``{modality: column}`` / ``{modality: {column, image_size, channels}}``.
        tasks: ``{task: {kind, column | columns, classes | num_classes, view}}`` (see the
            module docstring); the experiment's ``tasks:`` block must name the same tasks with
            the same kinds and class counts (:func:`multiview_csv_tasks` writes it).
        root: folder the paths are relative to (default: the CSV's folder).
        split: ``train``, ``val``, ``test`` or ``all`` (every row).
        split_column: column with ``train``/``val``/``test`` per row (default: none, every row
            is a training row).
        id_column: column with a unique case id (default: the CSV line number).
        image_size: ``[height, width]`` of every view (a view's own ``image_size`` wins).
        channels: 1 (grey, read as luminance; 16-bit images scaled by their maximum) or 3 (RGB).
        val_fraction: share of the training rows carved out as ``val`` when the table has no
            ``val`` rows; ``val_seed`` seeds the carve, stratified by the labels of the task
            ``stratify`` (default: the first multiclass task, unlabelled rows as a stratum).
        augment: ``true`` (``idrid_train`` per view), ``false`` (resize + normalise), or
            ``{view: true | false | TRANSFORMS mapping}``; default ``true`` for ``train``. Each
            view gets its own draw, shared with the masks drawn on it.
        modality_dropout: ``p``, drop each view a case has with probability ``p``, never all.
        dict_inputs: ``null``: a dict of views with several views, the tensor with one.
        seed: seeds augmentation and dropout per ``(seed, epoch, sample)``.

    A sample's ``inputs`` are ``float32 [channels, H, W]`` per view (ImageNet-normalised for
    RGB, ``(v/255 − 0.5)/0.25`` for grey). Targets: multiclass ``int64`` (:data:`IGNORE_INDEX`
    unlabelled), multilabel and regression ``float32 [C]``, segmentation ``float32 [1, H, W]``
    0/1 (non-zero pixels of the mask file; unlabelled also when its view is missing or
    dropped). ``meta``: ``split``, ``id``, ``line``.
    """

    name = "multiview_csv"

    def __init__(
        self,
        csv: str | os.PathLike[str],
        views: Sequence[str] | Mapping[str, Any],
        tasks: Mapping[str, Mapping[str, Any]],
        root: str | os.PathLike[str] | None = None,
        split: str = "train",
        split_column: str | None = None,
        id_column: str | None = None,
        image_size: Sequence[int] = (256, 256),
        channels: int = 3,
        val_fraction: float = 0.2,
        val_seed: int = 0,
        stratify: str | None = None,
        augment: bool | Mapping[str, Any] | None = None,
        modality_dropout: float = 0.0,
        dict_inputs: bool | None = None,
        seed: int = 0,
    ) -> None:
        self.csv = Path(csv).expanduser()
        self.root = self.csv.parent if root is None else Path(root).expanduser()
        self.split = check_names(self.name, "split", [split], SPLITS)[0]
        self.views = _parse_views(views, image_size, channels)
        if not isinstance(tasks, Mapping) or not tasks:
            raise ConfigError(f"{self.name}.tasks: expected a mapping of task name -> columns")
        self.task_specs = [_parse_task(str(n), s, self.views) for n, s in tasks.items()]
        self.tasks = tuple(t.name for t in self.task_specs)
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ConfigError(f"{self.name}: val_fraction must be in [0, 1), got {val_fraction}")
        self.val_fraction = float(val_fraction)
        self.split_column, self.id_column = split_column, id_column
        self.stratify = self._stratify_task(stratify)
        self.left_out: list[str] = []
        self.records = self._index(int(val_seed))
        self._setup_modalities(
            {v.name: v.shape for v in self.views}, seed, modality_dropout, dict_inputs
        )
        names = [v.name for v in self.views]
        choice = augment_per_modality(self.name, augment, names, self.split == "train")
        self.transforms = {
            v.name: build_transform(
                "image",
                choice[v.name],
                v.image_size,
                self.seed,
                channels=v.channels,
                where=f"{self.name}.augment.{v.name}",
            )
            for v in self.views
        }

    def _stratify_task(self, stratify: str | None) -> int | None:
        names = list(self.tasks)
        if stratify is None:
            return next((i for i, t in enumerate(self.task_specs) if t.kind == "multiclass"), None)
        check_names(self.name, "stratify task", [stratify], names)
        return names.index(stratify)

    def _read_table(self) -> pd.DataFrame:
        if not self.csv.is_file():
            raise DataError(f"{self.csv}: CSV table not found")
        try:
            table = pd.read_csv(self.csv, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
            raise DataError(f"{self.csv}: cannot read the table ({exc})") from None
        table.columns = [str(c).strip() for c in table.columns]
        needed = [v.column for v in self.views]
        needed += [c for t in self.task_specs for c in t.columns]
        needed += [c for c in (self.split_column, self.id_column) if c is not None]
        for column in needed:
            if column not in table.columns:
                raise DataError(
                    f"{self.csv}: no column '{column}'{did_you_mean(column, table.columns)}; "
                    f"columns: {', '.join(table.columns)}"
                )
        return table.map(str.strip)

    def _index(self, val_seed: int) -> list[CaseRecord]:
        table = self._read_table()
        records = []
        seen: dict[str, int] = {}
        for row, values in enumerate(table.to_dict("records")):
            line = row + 2
            where = f"{self.csv} line {line}"
            case_id = values[self.id_column] if self.id_column else str(line)
            if case_id in seen:
                raise DataError(f"{where}: id '{case_id}' repeats line {seen[case_id]}")
            seen[case_id] = line
            split = values[self.split_column] if self.split_column else "train"
            if split not in SPLITS[:3]:
                raise DataError(
                    f"{where}: '{self.split_column}' is {split!r}, expected train, val or test "
                    "(rename the values in the table)"
                )
            images = []
            for view in self.views:
                cell = values[view.column]
                path = self.root / cell if cell else None
                if path is not None and not path.is_file():
                    raise DataError(f"{where}: image {path} ('{view.column}') not found")
                images.append(path)
            labels = tuple(
                _parse_label(t, [values[c] for c in t.columns], where, self.root)
                for t in self.task_specs
            )
            if all(p is None for p in images):
                self.left_out.append(case_id)
                continue
            records.append(CaseRecord(line, case_id, split, tuple(images), labels))
        records = self._select_split(records, val_seed)
        if not records:
            raise DataError(f"{self.csv}: split '{self.split}' has no case with an image")
        return records

    def _select_split(self, records: list[CaseRecord], val_seed: int) -> list[CaseRecord]:
        if self.split == "all":
            return records
        if self.split == "test":
            return [r for r in records if r.split == "test"]
        if any(r.split == "val" for r in records):
            return [r for r in records if r.split == self.split]
        train = [r for r in records if r.split == "train"]
        if self.split == "val" and self.val_fraction == 0.0:
            raise ConfigError(
                f"{self.name}: split 'val' needs val rows in the split column or val_fraction > 0"
            )
        if self.val_fraction == 0.0:
            return train
        strata = [None if self.stratify is None else r.labels[self.stratify] for r in train]
        chosen = stratified_split(strata, self.val_fraction, val_seed)
        return [r for r, is_val in zip(train, chosen) if is_val == (self.split == "val")]

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return (
            f"MultiViewCsvDataset({self.csv}, split={self.split}, {len(self)} cases, "
            f"views={[v.name for v in self.views]}, tasks={list(self.tasks)})"
        )

    @property
    def keys(self) -> list[str]:
        """The case id of every sample."""
        return [r.case_id for r in self.records]

    def class_labels(self, task: str) -> list[int]:
        """The labels of multiclass ``task`` of the labelled cases, in sample order."""
        index = self.tasks.index(task) if task in self.tasks else -1
        if index < 0 or self.task_specs[index].kind != "multiclass":
            raise ConfigError(f"{self.name}: '{task}' is not a multiclass task of the dataset")
        return [r.labels[index] for r in self.records if r.labels[index] is not None]

    def _read_view(self, view: View, path: Path) -> tuple[np.ndarray, tuple[int, int]]:
        if view.channels == 3:
            image, full_size = read_rgb(path, view.image_size)
        else:
            grey, full_size = read_grey(path, view.image_size)
            image = grey[..., None]
        resized = resize_image(image, view.image_size)
        return (resized if resized.ndim == 3 else resized[..., None]), full_size

    def _read_masks(
        self, record: CaseRecord, view: View, full_size: tuple[int, int]
    ) -> dict[str, np.ndarray]:
        masks = {}
        for task, label in zip(self.task_specs, record.labels):
            if task.kind != "segmentation" or task.view != view.name or label is None:
                continue
            mask = read_mask(label)
            if mask.shape != full_size:
                raise DataError(
                    f"{label}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                    f"{record.images[self.views.index(view)]} is {full_size[1]}x{full_size[0]}"
                )
            masks[task.name] = resize_mask(mask, view.image_size)
        return masks

    def _target(self, task: ColumnTask, label: Any) -> torch.Tensor:
        if task.kind == "multiclass":
            return torch.tensor(IGNORE_INDEX if label is None else label, dtype=torch.long)
        if task.kind == "segmentation":
            view = self.views[[v.name for v in self.views].index(task.view)]
            return torch.zeros(1, *view.image_size)
        if label is None:
            return torch.zeros(task.num_classes)
        return torch.tensor(label, dtype=torch.float32)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        available = [v.name for v, p in zip(self.views, record.images) if p is not None]
        kept = self.kept_modalities(index, available)
        inputs: dict[str, torch.Tensor] = {}
        masks: dict[str, torch.Tensor] = {}
        for stream, (view, path) in enumerate(zip(self.views, record.images)):
            if view.name not in kept:
                continue
            image, full_size = self._read_view(view, path)
            raw = self._read_masks(record, view, full_size)
            transform = self.transforms[view.name]
            transform.set_seed(self.draw_seed(index, stream))
            inputs[view.name], moved = transform(image, list(raw.values()))
            masks.update({name: moved[i : i + 1].float() for i, name in enumerate(raw)})
        targets: dict[str, torch.Tensor] = {}
        has_target: dict[str, bool] = {}
        for task, label in zip(self.task_specs, record.labels):
            if task.kind == "segmentation":
                targets[task.name] = masks.get(task.name, self._target(task, None))
                has_target[task.name] = task.name in masks
            else:
                targets[task.name] = self._target(task, label)
                has_target[task.name] = label is not None
        meta = {"split": self.split, "id": record.case_id, "line": record.line}
        return self.make_sample(inputs, targets, has_target, meta)
