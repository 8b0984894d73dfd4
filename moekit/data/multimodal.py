"""What the multi-modal datasets (``gamma``, ``multiview_csv``) share: modality choice, the
per-sample random draws, modality dropout and the sample dict.

A dataset loads a chosen list of modalities. Its samples hold, in ``inputs``, the modalities a
sample *has* (missing on disk or dropped by :mod:`moekit.data.modality_dropout` means left
out), and declare all loaded modalities with their shapes in ``modalities``, so that
:func:`moekit.data.collate.collate_samples` gives every batch the same columns and its
``present`` mask. With a single loaded modality the sample's ``inputs`` is that modality's
tensor instead (``dict_inputs: null``, the default), so any single-image model takes it; set
``dict_inputs: true`` to keep the ``{modality: tensor}`` form.

Every random draw of sample ``i`` in epoch ``e`` (one augmentation draw per modality, one
dropout draw) is seeded by ``(seed, e, i, stream)`` through
:func:`moekit.data.modality_transforms.sample_seed`: the same in any loader worker, for any
batch size, and repeated by a run resumed at an epoch boundary after ``set_epoch(e)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from moekit.data.modality_dropout import check_dropout_p, modality_dropout
from moekit.data.modality_transforms import sample_seed
from moekit.errors import ConfigError, did_you_mean


def check_names(dataset: str, what: str, values: Sequence[str], valid: Sequence[str]) -> list[str]:
    """``values`` as a list after checking it is a non-empty list of ``valid`` names without
    repeats; errors start with ``dataset`` and name ``what`` (``modality``, ``source``...)."""
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ConfigError(f"{dataset}: {what} must be a list, got {values!r}")
    values = list(values)
    for value in values:
        if value not in valid:
            raise ConfigError(
                f"{dataset}: unknown {what} '{value}'; valid: {', '.join(valid)}"
                f"{did_you_mean(str(value), valid)}"
            )
    if not values or len(set(values)) != len(values):
        raise ConfigError(f"{dataset}: {what} must be a non-empty list without repeats")
    return values


def augment_per_modality(
    dataset: str,
    augment: bool | Mapping[str, Any] | None,
    modalities: Sequence[str],
    default: bool,
) -> dict[str, bool | Mapping[str, Any]]:
    """``{modality: true | false | TRANSFORMS mapping}`` from a dataset's ``augment`` value:
    ``null`` (``default`` for all), a bool for all, or a mapping by modality (the ones left
    out get ``default``)."""
    if augment is None or isinstance(augment, bool):
        return dict.fromkeys(modalities, default if augment is None else augment)
    if not isinstance(augment, Mapping):
        raise ConfigError(f"{dataset}: augment must be true, false or a mapping, got {augment!r}")
    check_names(dataset, "modality in augment", list(augment), modalities)
    return {m: augment.get(m, default) for m in modalities}


class MultiModalDataset(Dataset):
    """Base of the multi-modal datasets: call :meth:`_setup_modalities` in ``__init__``."""

    name = "multimodal"
    """The registry name, first word of every error message."""

    def _setup_modalities(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        seed: int,
        modality_dropout: float,
        dict_inputs: bool | None,
    ) -> None:
        """Declare the loaded modalities (in order, with the shape of one sample's tensor)."""
        self.modality_shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self.modalities = tuple(self.modality_shapes)
        self.seed = int(seed)
        self.epoch = 0
        self.modality_dropout = check_dropout_p(modality_dropout, self.name)
        if dict_inputs not in (None, True, False):
            raise ConfigError(f"{self.name}: dict_inputs must be null, true or false")
        self.dict_inputs = len(self.modalities) > 1 if dict_inputs is None else dict_inputs

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draws (augmentation, modality dropout) the samples use."""
        self.epoch = int(epoch)

    def draw_seed(self, index: int, stream: int) -> int:
        """The seed of draw ``stream`` of sample ``index`` in the current epoch."""
        return sample_seed(self.seed, self.epoch, index, stream)

    def kept_modalities(self, index: int, available: Sequence[str]) -> tuple[str, ...]:
        """The modalities of ``available`` that sample ``index`` keeps after modality dropout
        (stream ``len(modalities)``, after one stream per modality)."""
        if self.modality_dropout == 0.0:
            return tuple(available)
        rng = np.random.default_rng(self.draw_seed(index, len(self.modalities)))
        return modality_dropout(available, self.modality_dropout, rng)

    def make_sample(
        self,
        inputs: Mapping[str, Tensor],
        targets: dict[str, Tensor],
        has_target: dict[str, bool],
        meta: dict[str, Any],
    ) -> dict[str, Any]:
        """The sample dict; ``inputs`` holds the modalities the sample has."""
        if self.dict_inputs:
            return {
                "inputs": dict(inputs),
                "modalities": self.modality_shapes,
                "targets": targets,
                "has_target": has_target,
                "meta": meta,
            }
        (only,) = self.modalities
        return {"inputs": inputs[only], "targets": targets, "has_target": has_target, "meta": meta}
