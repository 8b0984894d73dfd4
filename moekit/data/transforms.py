"""Joint image + mask transforms on albumentations 2.0 (registry ``TRANSFORMS``).

A transform is a :class:`JointTransform`: called as ``transform(image, masks)`` with a
``uint8 [H, W, 3]`` RGB image and a list of ``uint8 [H, W]`` masks (0/1), it returns the
normalised image ``float32 [3, h, w]`` and the masks ``uint8 [N, h, w]`` after the *same*
geometric transform (albumentations' ``masks=`` target; masks are warped with nearest
neighbour and filled with 0 outside the image).

Every builder takes ``image_size = (height, width)`` and ``seed`` (so the registry's
``build(cfg, image_size=..., seed=...)`` works for any entry) and builds a
``Compose(..., strict=True, seed=seed)``: an unknown argument is an error, and the random
stream is reproducible. :meth:`JointTransform.set_seed` restarts the stream; datasets call it
per sample, with a seed derived from (dataset seed, epoch, sample index).

Entries:

* ``idrid_train``: the IDRiD paper's training augmentation — resize, horizontal flip, affine
  (rotation ±18°, scale 0.8–1.1, translation ±10%, always applied), contrast ±10% (p 0.5),
  Gaussian blur σ 0.1–2 with a 7×7 kernel (p 0.3), ImageNet normalisation — and moekit's
  photometric additions, so that a model does not learn one camera's colours: with
  probability 0.5 one of brightness ×0.75–1.25 with saturation ±20% and hue ±7°, gamma
  0.8–1.25, or a white-balance gain ±10% per channel; JPEG compression at quality 40–95
  (p 0.2). ``colour_p: 0, jpeg_p: 0`` is the paper's recipe. Every colour change is
  multiplicative or a gamma, so the black surround of a fundus photograph stays black. (With
  the three changes at probability 0.8 each, the demo's model did not learn ``rg`` in its 16
  epochs.)
* ``eval``: resize and ImageNet normalisation only.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from torch import Tensor

from moekit.errors import ConfigError
from moekit.registry import TRANSFORMS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class JointTransform:
    """Apply one albumentations ``Compose`` to an image and its masks; return tensors."""

    def __init__(self, compose: A.Compose) -> None:
        self.compose = compose

    def __repr__(self) -> str:
        names = ", ".join(type(t).__name__ for t in self.compose.transforms)
        return f"JointTransform({names})"

    def set_seed(self, seed: int) -> None:
        """Restart the random stream from ``seed`` (same seed, same sequence of draws)."""
        self.compose.set_random_seed(seed)

    def __call__(
        self, image: np.ndarray, masks: Sequence[np.ndarray] = ()
    ) -> tuple[Tensor, Tensor]:
        """Transform ``image [H, W, 3] uint8`` and ``masks`` (each ``[H, W] uint8``).

        Returns ``image [3, h, w] float32`` and ``masks [N, h, w] uint8`` (``N = len(masks)``).
        """
        out = self.compose(image=image, masks=list(masks))
        transformed = np.ascontiguousarray(out["image"].transpose(2, 0, 1), dtype=np.float32)
        height, width = transformed.shape[1:]
        if masks:
            stacked = np.ascontiguousarray(np.stack(out["masks"]), dtype=np.uint8)
        else:
            stacked = np.zeros((0, height, width), dtype=np.uint8)
        return torch.from_numpy(transformed), torch.from_numpy(stacked)


def parse_size(image_size: Sequence[int]) -> tuple[int, int]:
    """Check and return ``image_size`` as ``(height, width)`` positive ints."""
    ok = isinstance(image_size, Sequence) and not isinstance(image_size, str)
    ok = (
        ok
        and len(image_size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in image_size)
    )
    if not ok:
        raise ConfigError(f"image_size: expected [height, width] positive ints, got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def _compose(transforms: list[A.BasicTransform], seed: int) -> JointTransform:
    return JointTransform(A.Compose(transforms, strict=True, seed=seed))


@TRANSFORMS.register("idrid_train")
def idrid_train(
    image_size: Sequence[int],
    seed: int = 0,
    hflip: float = 0.5,
    rotate: float = 18.0,
    scale: Sequence[float] = (0.8, 1.1),
    translate: float = 0.1,
    contrast: float = 0.1,
    contrast_p: float = 0.5,
    blur_sigma: Sequence[float] = (0.1, 2.0),
    blur_kernel: int = 7,
    blur_p: float = 0.3,
    brightness: Sequence[float] = (0.75, 1.25),
    saturation: float = 0.2,
    hue: float = 0.02,
    gamma: Sequence[float] = (0.8, 1.25),
    channel_gain: float = 0.1,
    colour_p: float = 0.5,
    jpeg_quality: Sequence[int] = (40, 95),
    jpeg_p: float = 0.2,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> JointTransform:
    """The IDRiD paper's training augmentation (flip, rotate ±18°, scale, translate, contrast,
    blur) with moekit's colour, gamma, white-balance and JPEG jitter.

    Args:
        image_size: output ``(height, width)``.
        seed: seed of the random stream.
        hflip: probability of a horizontal flip.
        rotate: maximum rotation in degrees (uniform in ``[-rotate, rotate]``).
        scale: range of the isotropic scale factor.
        translate: maximum translation as a fraction of the size, per axis.
        contrast: maximum relative contrast change (0.1: factor 0.9–1.1).
        contrast_p: probability of the contrast change.
        blur_sigma: range of the Gaussian blur's sigma (pixels).
        blur_kernel: the blur's kernel size (odd).
        blur_p: probability of the blur.
        brightness: range of the brightness factor.
        saturation: maximum relative saturation change (a factor ``1 ± saturation``).
        hue: maximum hue shift, as a fraction of the colour circle (0.02: ±7°).
        gamma: range of the gamma exponent (``out = in ** gamma`` on 0–1 values).
        channel_gain: maximum white-balance change: each channel times ``1 ± channel_gain``.
        colour_p: probability of one colour change, chosen at random among brightness,
            saturation and hue; gamma; white balance. 0 turns them off.
        jpeg_quality: range of the JPEG quality of the compression artefacts.
        jpeg_p: probability of JPEG compression.
        mean, std: normalisation (ImageNet by default).
    """
    height, width = parse_size(image_size)
    return _compose(
        [
            A.Resize(height, width),
            A.HorizontalFlip(p=hflip),
            A.Affine(
                rotate=(-rotate, rotate),
                scale=tuple(scale),
                translate_percent=(-translate, translate),
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=1.0,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=contrast, p=contrast_p),
            A.OneOf(
                [
                    A.ColorJitter(
                        brightness=tuple(brightness),
                        contrast=(1.0, 1.0),
                        saturation=(1 - saturation, 1 + saturation),
                        hue=(-hue, hue),
                    ),
                    A.RandomGamma(gamma_limit=(100 * gamma[0], 100 * gamma[1])),
                    A.MultiplicativeNoise(
                        multiplier=(1 - channel_gain, 1 + channel_gain),
                        per_channel=True,
                        elementwise=False,
                    ),
                ],
                p=colour_p,
            ),
            A.GaussianBlur(
                blur_limit=(blur_kernel, blur_kernel), sigma_limit=tuple(blur_sigma), p=blur_p
            ),
            A.ImageCompression(quality_range=tuple(int(q) for q in jpeg_quality), p=jpeg_p),
            A.Normalize(mean=tuple(mean), std=tuple(std)),
        ],
        seed,
    )


@TRANSFORMS.register("eval")
def eval_transform(
    image_size: Sequence[int],
    seed: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> JointTransform:
    """Resize to ``image_size`` and normalise (ImageNet statistics by default); no randomness.

    ``seed`` is accepted so that every ``TRANSFORMS`` entry builds with the same arguments.
    """
    height, width = parse_size(image_size)
    return _compose([A.Resize(height, width), A.Normalize(mean=tuple(mean), std=tuple(std))], seed)
