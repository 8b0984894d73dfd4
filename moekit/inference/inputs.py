"""A run's input pipeline: how a file of any size becomes the tensor its model was trained on.

An :class:`InputPipeline` lists the model's modalities as :class:`InputSpec` s (a single-input
model has one, named after the dataset's modality or ``image``). An **image** modality is read
as RGB (3 channels) or grey levels (1), decoded reduced where the file allows it (as the
datasets do, :func:`moekit.data.image_io.read_rgb`), brought to the run's input geometry by its
``PREPROCESS`` step (:mod:`moekit.data.preprocess`: ``resize``, or ``fundus_fov`` which finds
the field of view, crops, pads to the training aspect ratio and resizes) and normalised,
``(v / max − mean) / std``. The step's :class:`~moekit.data.preprocess.Geometry` maps dense
predictions back onto the photograph's own pixels. A **volume** modality (a stack of slices,
e.g. OCT B-scans) is a folder of 2-D images ordered by name (numbers compared as numbers),
of which ``channels`` evenly spaced slices are kept (the rule of the volume datasets,
:func:`moekit.data.gamma.evenly_spaced`), each read as grey levels, resized and
normalised.

:func:`pipeline_from_dataset` reads the pipeline off the run's built dataset, so that
``predict`` repeats exactly what evaluation did:

- modalities and tensor shapes: ``dataset.modality_shapes`` (the multi-modal datasets), else
  the first sample's ``inputs``; ``dataset.dict_inputs`` tells whether the model takes
  ``{modality: tensor}``;
- the preprocessing: ``dataset.preprocess_config``, which is the config's top-level
  ``preprocess`` if set, else the one the dataset config names, else the dataset's default
  (:func:`moekit.engine.experiment.build_dataset` passes them down in that order); a dataset
  without one resizes (``{type: resize}``);
- kind and normalisation: the dataset's evaluation transform (an image transform or a volume
  transform, :mod:`moekit.data.modality_transforms`) and its ``Normalize`` step; a dataset
  that holds no transform (generated tensors) gets pixel values scaled to ``[0, 1]``.

:func:`collect_inputs` turns command-line arguments (files, folders, CSV tables) into
:class:`InputItem` s; :meth:`InputPipeline.load` reads one into a :class:`LoadedInput`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pandas as pd
import torch
from torch import Tensor

from moekit.data.collate import collate_samples
from moekit.data.gamma import evenly_spaced
from moekit.data.image_io import read_grey, read_rgb, resize_image
from moekit.data.modality_transforms import VolumeTransform
from moekit.data.preprocess import Geometry, PreprocessStep
from moekit.data.transforms import JointTransform
from moekit.errors import ConfigError, DataError
from moekit.registry import PREPROCESS
from moekit.types import Batch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
"""Files a folder given to ``predict`` contributes (other files are ignored)."""
SINGLE_NAME = "image"
"""The modality name of a model that takes one image tensor and whose dataset names none."""
PATH_COLUMNS = ("path", "image")
"""CSV columns that hold the file of a single-input model (besides its modality's name)."""
ID_COLUMN = "id"
EVAL_SPLITS = ("test", "val", "train")
KINDS = ("image", "volume")
DEFAULT_PREPROCESS = {"type": "resize"}
PASSIVE_STEPS = (A.Resize, A.Normalize)
"""Steps of an evaluation transform that the pipeline reproduces (the resize is a no-op after
the preprocessing step)."""


@dataclass(frozen=True)
class InputSpec:
    """How one modality is read.

    Attributes:
        name: the modality (``image`` for a single-input model whose dataset names none).
        kind: ``image`` or ``volume``.
        channels: 3 (RGB) or 1 (grey) for an image; the number of slices for a volume.
        size: ``(height, width)`` of the model's input (of each slice for a volume).
        preprocess: the ``PREPROCESS`` config of an image (``{type: resize}`` for a volume's
            slices).
        mean, std: the normalisation ``(v / max_value − mean) / std``, per channel (one value
            for grey images and volumes); ``None``: ``v / max_value`` only.
        max_value: the pixel value that maps to 1 (255 for 8-bit files).
    """

    name: str
    kind: str
    channels: int
    size: tuple[int, int]
    preprocess: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_PREPROCESS))
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    max_value: float = 255.0

    @property
    def shape(self) -> tuple[int, int, int]:
        """The tensor shape of one input ``(channels, height, width)``."""
        return (self.channels, *self.size)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form; :meth:`from_dict` reads it back."""
        data = asdict(self)
        data["size"] = list(self.size)
        for key in ("mean", "std"):
            data[key] = None if data[key] is None else list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputSpec:
        def floats(value: Any) -> tuple[float, ...] | None:
            return None if value is None else tuple(float(v) for v in value)

        return cls(
            name=str(data["name"]),
            kind=str(data["kind"]),
            channels=int(data["channels"]),
            size=(int(data["size"][0]), int(data["size"][1])),
            preprocess=dict(data.get("preprocess") or DEFAULT_PREPROCESS),
            mean=floats(data.get("mean")),
            std=floats(data.get("std")),
            max_value=float(data.get("max_value", 255.0)),
        )

    def normalise(self, array: np.ndarray) -> np.ndarray:
        """``float32 [H, W, C]`` from ``uint8 [H, W, C]`` (albumentations' ``Normalize``, as
        the datasets' transforms apply it)."""
        if self.mean is None or self.std is None:
            return array.astype(np.float32) / np.float32(self.max_value)
        step = A.Normalize(mean=self.mean, std=self.std, max_pixel_value=self.max_value, p=1.0)
        return step(image=array)["image"].astype(np.float32, copy=False)


@dataclass(frozen=True)
class InputItem:
    """One input to predict on: an id and the file (or folder) of each modality.

    ``paths[m]`` is ``None`` where modality ``m`` is missing for this input; ``where`` names
    the input in messages (its file, or ``table.csv row 3``).
    """

    id: str
    paths: dict[str, Path | None]
    where: str


@dataclass
class ModalityInput:
    """One modality of one input, read and preprocessed.

    ``tensor`` is the model's input ``[C, H, W]``. For an image, ``decoded`` is the photograph
    as decoded (possibly reduced, ``uint8 [h, w, 3]``; a grey image is repeated to 3
    channels), ``geometry`` maps ``decoded`` to the model's input and ``full_size`` is the
    file's ``(height, width)``; :attr:`full_geometry` maps the file's own pixels.
    """

    tensor: Tensor
    decoded: np.ndarray | None = None
    geometry: Geometry | None = None
    full_size: tuple[int, int] | None = None

    @property
    def full_geometry(self) -> Geometry | None:
        """The geometry on the file's own pixels (its original resolution)."""
        if self.geometry is None or self.full_size is None:
            return None
        return self.geometry.rescaled(*self.full_size)


@dataclass
class LoadedInput:
    """An input ready for the model: its modalities (``None`` where missing) and the batch."""

    item: InputItem
    modalities: dict[str, ModalityInput | None]
    batch: Batch


def natural_key(name: str) -> list[Any]:
    """Sort key that compares the numbers in a name as numbers (``2_x`` before ``10_x``)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_images(folder: Path) -> list[Path]:
    """The image files of ``folder`` (:data:`IMAGE_SUFFIXES`, not hidden), in natural order."""
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    ]
    return sorted(files, key=lambda p: natural_key(p.name))


@dataclass(frozen=True)
class InputPipeline:
    """The modalities of a model's input, in the order of its ``{modality: tensor}`` dict.

    ``dict_inputs``: the model takes ``{modality: tensor}`` with a ``present`` mask (else the
    one modality's tensor).
    """

    specs: tuple[InputSpec, ...]
    dict_inputs: bool = False

    def __post_init__(self) -> None:
        if not self.specs:
            raise ValueError("InputPipeline: no modality")
        if not self.dict_inputs and len(self.specs) != 1:
            raise ValueError("InputPipeline: several modalities need dict_inputs")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def spec(self, name: str) -> InputSpec:
        return next(s for s in self.specs if s.name == name)

    def as_dict(self) -> dict[str, Any]:
        return {"dict_inputs": self.dict_inputs, "modalities": [s.as_dict() for s in self.specs]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputPipeline:
        specs = tuple(InputSpec.from_dict(s) for s in data["modalities"])
        return cls(specs, bool(data.get("dict_inputs", False)))

    def steps(self) -> dict[str, PreprocessStep]:
        """The preprocessing step of every image modality."""
        return {
            s.name: PREPROCESS.build(s.preprocess, image_size=s.size)
            for s in self.specs
            if s.kind == "image"
        }

    def load(
        self, item: InputItem, steps: Mapping[str, PreprocessStep] | None = None
    ) -> LoadedInput:
        """Read ``item`` (a :class:`~moekit.errors.DataError` naming the file if one cannot
        be read) into the batch of one input."""
        steps = self.steps() if steps is None else steps
        modalities: dict[str, ModalityInput | None] = {}
        for spec in self.specs:
            path = item.paths.get(spec.name)
            if path is None:
                modalities[spec.name] = None
            elif spec.kind == "volume":
                modalities[spec.name] = read_volume(spec, path)
            else:
                modalities[spec.name] = read_image(spec, path, steps[spec.name])
        given = {name: m.tensor for name, m in modalities.items() if m is not None}
        if not given:
            raise DataError(f"{item.where}: no input given (columns {', '.join(self.names)})")
        if not self.dict_inputs:
            batch = collate_samples([{"inputs": given[self.specs[0].name], "targets": {}}])
        else:
            shapes = {s.name: s.shape for s in self.specs}
            sample = {"inputs": given, "modalities": shapes, "targets": {}, "has_target": {}}
            batch = collate_samples([sample])
        return LoadedInput(item, modalities, batch)


def read_image(spec: InputSpec, path: Path, step: PreprocessStep) -> ModalityInput:
    """One image file through the modality's preprocessing and normalisation."""
    if spec.channels == 3:
        decoded, full_size = read_rgb(path, spec.size)
        image, geometry = step(decoded)
    else:
        grey, full_size = read_grey(path, spec.size)
        image, geometry = step(grey[..., None])
        decoded = np.repeat(grey[..., None], 3, axis=2)
        image = image if image.ndim == 3 else image[..., None]
    tensor = torch.from_numpy(np.ascontiguousarray(spec.normalise(image).transpose(2, 0, 1)))
    return ModalityInput(tensor, decoded, geometry, full_size)


def read_volume(spec: InputSpec, folder: Path) -> ModalityInput:
    """A folder of slices: ``spec.channels`` evenly spaced ones, grey, resized, normalised."""
    if not folder.exists():
        raise DataError(f"{folder}: volume folder not found ('{spec.name}')")
    if not folder.is_dir():
        raise DataError(f"{folder}: a volume ('{spec.name}') is a folder of slice images")
    slices = list_images(folder)
    if len(slices) < spec.channels:
        raise DataError(
            f"{folder}: {len(slices)} slice images, the model takes {spec.channels} ('{spec.name}')"
        )
    stack = []
    for index in evenly_spaced(len(slices), spec.channels):
        grey, _ = read_grey(slices[index], spec.size)
        stack.append(spec.normalise(resize_image(grey, spec.size)[..., None])[..., 0])
    return ModalityInput(torch.from_numpy(np.ascontiguousarray(np.stack(stack))))


# ----------------------------------------------------------------------- reading a dataset
def _transforms(dataset: Any) -> dict[str | None, Any]:
    """The image and volume transforms a dataset holds: ``{None: t}`` for one, ``{modality:
    t}`` for a mapping of them."""
    kinds = (JointTransform, VolumeTransform)
    found: dict[str | None, Any] = {}
    for value in vars(dataset).values():
        if isinstance(value, kinds):
            found.setdefault(None, value)
        elif (
            isinstance(value, Mapping)
            and value
            and all(isinstance(v, kinds) for v in value.values())
        ):
            found.update(value)
    return found


def _normalisation(transform: Any, where: str) -> tuple[Any, Any, float]:
    """``(mean, std, max_value)`` of a transform's ``Normalize`` step (``None``s without
    one); a step the pipeline does not reproduce is an error naming it."""
    mean = std = None
    max_value = 255.0
    for step in transform.compose.transforms:
        if isinstance(step, A.Normalize):
            if step.normalization != "standard":
                raise ConfigError(
                    f"{where}: predict reproduces 'standard' normalisation, the evaluation "
                    f"transform uses '{step.normalization}'"
                )
            values = (step.mean, step.std)
            mean, std = (tuple(float(v) for v in np.atleast_1d(x)) for x in values)
            max_value = float(step.max_pixel_value)
        elif not isinstance(step, PASSIVE_STEPS):
            raise ConfigError(
                f"{where}: the evaluation transform has a {type(step).__name__} step, which "
                "predict does not reproduce (it resizes and normalises)"
            )
    return mean, std, max_value


def pipeline_from_dataset(dataset: Any, where: str = "dataset") -> InputPipeline:
    """The input pipeline of a built (evaluation) dataset; see the module docstring."""
    shapes = getattr(dataset, "modality_shapes", None)
    dict_inputs = bool(getattr(dataset, "dict_inputs", False))
    if shapes:
        shapes = {str(k): tuple(int(n) for n in v) for k, v in shapes.items()}
    else:
        if len(dataset) == 0:
            raise DataError(f"{where}: the dataset has no sample to read the input shape from")
        inputs = dataset[0]["inputs"]
        if not isinstance(inputs, Tensor):
            raise ConfigError(f"{where}: dict inputs without modality_shapes")
        shapes = {SINGLE_NAME: tuple(inputs.shape)}
        dict_inputs = False
    transforms = _transforms(dataset)
    preprocess = getattr(dataset, "preprocess_config", None) or DEFAULT_PREPROCESS
    specs = []
    for name, shape in shapes.items():
        transform = transforms.get(name, transforms.get(None))
        if len(shape) != 3:
            raise ConfigError(f"{where}: modality '{name}' has shape {list(shape)}, not [C, H, W]")
        kind = "volume" if isinstance(transform, VolumeTransform) else "image"
        if kind == "image" and shape[0] not in (1, 3):
            raise ConfigError(
                f"{where}: modality '{name}' has {shape[0]} channels; predict reads RGB (3) "
                "or grey (1) images"
            )
        mean, std, max_value = (
            _normalisation(transform, where) if transform is not None else (None, None, 255.0)
        )
        specs.append(
            InputSpec(
                name=name,
                kind=kind,
                channels=int(shape[0]),
                size=(int(shape[1]), int(shape[2])),
                preprocess=dict(preprocess if kind == "image" else DEFAULT_PREPROCESS),
                mean=mean,
                std=std,
                max_value=max_value,
            )
        )
    return InputPipeline(tuple(specs), dict_inputs)


def pipeline_from_config(
    cfg: Mapping[str, Any], split: str | None = None
) -> tuple[InputPipeline, Any]:
    """``(pipeline, dataset)`` of a run's config: its ``split`` dataset (default: the first of
    ``test``, ``val``, ``train`` it defines) built without augmentation, and the pipeline read
    off it. The data must be where the config says."""
    from moekit.engine.experiment import build_dataset
    from moekit.registry import DATASETS, accepted_kwargs
    from moekit.sections import settings

    data = settings(cfg, "data")
    if split is None:
        split = next((s for s in EVAL_SPLITS if data[s] is not None), EVAL_SPLITS[0])
    spec = data.get(split)
    if spec is None:
        raise ConfigError(
            f"config key 'data.{split}': no dataset to read the run's input pipeline from"
        )
    if isinstance(spec, Mapping) and isinstance(spec.get("type"), str):
        spec = dict(spec)
        if "augment" in accepted_kwargs(DATASETS.get(spec["type"]))[0]:
            spec["augment"] = False
    dataset = build_dataset({**cfg, "data": {**dict(cfg.get("data") or {}), split: spec}}, split)
    return pipeline_from_dataset(dataset, f"data.{split}"), dataset


# ------------------------------------------------------------------- command-line inputs
def _unique(ids: list[str]) -> list[str]:
    """Ids made unique: a repeated id gets ``-2``, ``-3``, ... in order."""
    seen: dict[str, int] = {}
    out = []
    for value in ids:
        count = seen.get(value, 0) + 1
        seen[value] = count
        out.append(value if count == 1 else f"{value}-{count}")
    return out


def _resolve(value: str, base: Path) -> Path | None:
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def read_table(path: Path, pipeline: InputPipeline) -> list[tuple[str | None, dict, str]]:
    """The rows of a CSV of inputs: ``(id or None, {modality: path or None}, where)``.

    Columns: one per modality, named after it (a single-input model also takes ``path`` or
    ``image``); an optional ``id``; others are ignored. An empty cell is a missing modality;
    relative paths are relative to the CSV's folder.
    """
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot read the CSV of inputs ({exc})") from None
    table.columns = [str(c).strip() for c in table.columns]
    columns: dict[str, str] = {}
    for spec in pipeline.specs:
        candidates = [spec.name] + (list(PATH_COLUMNS) if not pipeline.dict_inputs else [])
        found = next((c for c in candidates if c in table.columns), None)
        if found is not None:
            columns[spec.name] = found
    if not columns:
        expected = pipeline.names + ([] if pipeline.dict_inputs else list(PATH_COLUMNS))
        raise ConfigError(
            f"{path}: no input column; expected one of {', '.join(expected)} (found "
            f"{', '.join(table.columns) or 'none'})"
        )
    rows = []
    for number, row in enumerate(table.itertuples(index=False), start=2):
        values = dict(zip(table.columns, (str(v).strip() for v in row)))
        paths = {name: _resolve(values[column], path.parent) for name, column in columns.items()}
        rows.append((values.get(ID_COLUMN) or None, paths, f"{path} row {number}"))
    return rows


def collect_inputs(arguments: Sequence[str | Path], pipeline: InputPipeline) -> list[InputItem]:
    """The inputs named on the command line, in order: image files, folders (their image
    files; for a single volume modality the folder is one volume) and CSV tables
    (:func:`read_table`; the only form for a multi-modal model). A path that does not exist
    is kept: reading it fails for that input alone."""
    entries: list[tuple[str | None, dict[str, Path | None], str]] = []
    single = pipeline.specs[0]
    for argument in arguments:
        path = Path(argument).expanduser()
        if path.suffix.lower() == ".csv" and path.is_file():
            entries += read_table(path, pipeline)
        elif pipeline.dict_inputs:
            raise ConfigError(
                f"{path}: this model takes several modalities ({', '.join(pipeline.names)}); "
                "give a CSV with one column per modality (an empty cell: missing)"
            )
        elif path.is_dir() and single.kind == "image":
            files = list_images(path)
            if not files:
                raise ConfigError(f"{path}: folder holds no image ({', '.join(IMAGE_SUFFIXES)})")
            entries += [(None, {single.name: f}, str(f)) for f in files]
        else:
            entries.append((None, {single.name: path}, str(path)))
    names = []
    for given_id, paths, _ in entries:
        first = next((p for p in paths.values() if p is not None), None)
        names.append(safe_id(given_id or (first.stem if first is not None else "input")))
    return [
        InputItem(name, paths, where) for name, (_, paths, where) in zip(_unique(names), entries)
    ]


def safe_id(value: str) -> str:
    """``value`` usable as a file name: characters other than letters, digits, ``.-_``
    become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", value) or "input"
