"""Per-modality augmentation: 2-D images with their masks, and volumes (OCT B-scan stacks).

A multi-modal sample gets one transform per modality, each with its own random draw:

* a 2-D image (a fundus photograph, a mammogram view) goes through a
  :class:`moekit.data.transforms.JointTransform` from ``TRANSFORMS`` with the masks defined on
  its pixels, so image and masks get the *same* geometric transform;
* a volume ``[D, H, W]`` goes through a :class:`VolumeTransform`: one albumentations draw
  applied to every slice alike (albumentations' ``images`` target), so the B-scans of an OCT
  volume stay aligned — a flip or shift moves the whole volume, never one slice.

``TRANSFORMS`` entries added here: ``volume_train`` (flip, small rotation and shift, brightness
and contrast; no scaling by default, because the thickness of a retinal layer in pixels is the
evidence a model reads) and ``volume_eval`` (resize and scale only).

:func:`build_transform` turns a dataset's ``augment`` value (``true``, ``false`` or a
``TRANSFORMS`` mapping) into the transform of one modality; :func:`sample_seed` is the seed of
one sample's draw, ``(seed, epoch, sample, stream)``, so augmentation does not depend on the
loader's workers or batch size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
import torch
from torch import Tensor

from moekit.data.transforms import JointTransform, parse_size
from moekit.errors import ConfigError
from moekit.registry import TRANSFORMS
from moekit.rng import derived_seed

GREY_MEAN = (0.5,)
GREY_STD = (0.25,)
"""Normalisation of one-channel images: ``(v / 255 − 0.5) / 0.25``."""
VOLUME_MEAN = 0.5
VOLUME_STD = 0.5
"""Normalisation of volumes: ``(v / 255 − 0.5) / 0.5``, i.e. grey levels scaled to [−1, 1]."""


class VolumeTransform:
    """One albumentations ``Compose`` applied with the same draw to every slice of a volume."""

    def __init__(self, compose: A.Compose) -> None:
        self.compose = compose

    def __repr__(self) -> str:
        names = ", ".join(type(t).__name__ for t in self.compose.transforms)
        return f"VolumeTransform({names})"

    def set_seed(self, seed: int) -> None:
        """Restart the random stream from ``seed``."""
        self.compose.set_random_seed(seed)

    def __call__(
        self, volume: np.ndarray, masks: Sequence[np.ndarray] = ()
    ) -> tuple[Tensor, Tensor]:
        """Transform ``volume [D, H, W] uint8``; returns ``float32 [D, h, w]`` and an empty
        ``uint8 [0, h, w]`` mask stack (volumes carry no masks here)."""
        if masks:
            raise ValueError("VolumeTransform: masks on volumes are not supported")
        if volume.ndim != 3:
            raise ValueError(f"VolumeTransform: expected [D, H, W], got shape {volume.shape}")
        out = self.compose(images=volume[..., None])["images"][..., 0]
        slices = torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
        return slices, torch.zeros((0, *slices.shape[1:]), dtype=torch.uint8)


def _volume_compose(transforms: list[A.BasicTransform], seed: int) -> VolumeTransform:
    return VolumeTransform(A.Compose(transforms, strict=True, seed=seed))


@TRANSFORMS.register("volume_train")
def volume_train(
    image_size: Sequence[int],
    seed: int = 0,
    hflip: float = 0.5,
    rotate: float = 5.0,
    translate: float = 0.05,
    scale: Sequence[float] = (1.0, 1.0),
    brightness: float = 0.1,
    contrast: float = 0.1,
    contrast_p: float = 0.5,
    mean: float = VOLUME_MEAN,
    std: float = VOLUME_STD,
) -> VolumeTransform:
    """Training augmentation of a volume, the same draw for all its slices.

    Args:
        image_size: output ``(height, width)`` of each slice.
        seed: seed of the random stream.
        hflip: probability of a horizontal flip (of every slice).
        rotate: maximum in-plane rotation in degrees.
        translate: maximum shift as a fraction of the size, per axis.
        scale: range of the isotropic scale factor (default none: layer thickness is evidence).
        brightness, contrast: maximum relative changes, applied with probability ``contrast_p``.
        mean, std: normalisation ``(v / 255 − mean) / std``.
    """
    height, width = parse_size(image_size)
    return _volume_compose(
        [
            A.Resize(height, width),
            A.HorizontalFlip(p=hflip),
            A.Affine(
                rotate=(-rotate, rotate),
                scale=tuple(scale),
                translate_percent=(-translate, translate),
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                p=1.0,
            ),
            A.RandomBrightnessContrast(
                brightness_limit=brightness, contrast_limit=contrast, p=contrast_p
            ),
            A.Normalize(mean=mean, std=std),
        ],
        seed,
    )


@TRANSFORMS.register("volume_eval")
def volume_eval(
    image_size: Sequence[int], seed: int = 0, mean: float = VOLUME_MEAN, std: float = VOLUME_STD
) -> VolumeTransform:
    """Resize every slice to ``image_size`` and normalise; no randomness."""
    height, width = parse_size(image_size)
    return _volume_compose([A.Resize(height, width), A.Normalize(mean=mean, std=std)], seed)


Kind = Literal["image", "volume"]
_DEFAULTS: dict[str, tuple[str, str]] = {
    "image": ("idrid_train", "eval"),
    "volume": ("volume_train", "volume_eval"),
}


def build_transform(
    kind: Kind,
    augment: bool | Mapping[str, Any],
    image_size: Sequence[int],
    seed: int = 0,
    channels: int = 3,
    where: str = "augment",
) -> JointTransform | VolumeTransform:
    """The transform of one modality from a dataset's ``augment`` value.

    ``true`` gives the default training augmentation of ``kind`` (images: ``idrid_train``, the
    IDRiD paper's flip, rotation, scale, translation, contrast and blur; volumes:
    ``volume_train``), ``false`` resize and normalise only (``eval``, ``volume_eval``), and a
    mapping is a ``TRANSFORMS`` config whose ``type`` defaults to the training entry. Images
    with one channel are normalised with :data:`GREY_MEAN` / :data:`GREY_STD` unless the
    mapping says otherwise.
    """
    train_type, eval_type = _DEFAULTS[kind]
    if isinstance(augment, Mapping):
        cfg = {"type": train_type, **augment}
    elif isinstance(augment, bool):
        cfg = {"type": train_type if augment else eval_type}
    else:
        raise ConfigError(f"{where}: expected true, false or a mapping, got {augment!r}")
    if kind == "image" and channels == 1:
        cfg = {"mean": GREY_MEAN, "std": GREY_STD, **cfg}
    try:
        return TRANSFORMS.build(cfg, image_size=image_size, seed=seed)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def sample_seed(seed: int, epoch: int, index: int, stream: int) -> int:
    """The 32-bit seed of one random draw of sample ``index`` in ``epoch`` (``stream`` tells
    the draws of one sample apart: one per modality, one for the modality dropout)."""
    return derived_seed(seed, epoch, index, stream) % 2**32
