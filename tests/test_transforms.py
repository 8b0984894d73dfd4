"""Joint image + mask transforms: same geometry for both, seeded, strict configs."""

import numpy as np
import pytest
import torch

from moekit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, idrid_train
from moekit.errors import ConfigError, RegistryError
from moekit.registry import TRANSFORMS

H, W = 48, 64
NO_PHOTOMETRIC = {"contrast_p": 0.0, "blur_p": 0.0, "colour_p": 0.0, "jpeg_p": 0.0}
NO_GEOMETRY = {"hflip": 0.0, "rotate": 0.0, "scale": (1.0, 1.0), "translate": 0.0}


def _pattern():
    """An image whose red channel is 255 exactly where the (asymmetric) mask is 1."""
    mask = np.zeros((H, W), np.uint8)
    mask[8:20, 10:40] = 1  # a bar in the upper left
    mask[20:36, 10:18] = 1  # and a leg going down: an "L", no symmetry
    image = np.zeros((H, W, 3), np.uint8)
    image[..., 0] = mask * 255
    return image, mask


def _red_mask(image: torch.Tensor) -> np.ndarray:
    red = image[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    return (red > 0.5).numpy().astype(np.uint8)


def test_output_shapes_dtypes_and_normalisation():
    image = np.full((30, 40, 3), 255, np.uint8)
    out, masks = eval_transform((H, W))(image, [np.ones((30, 40), np.uint8)] * 5)
    assert out.shape == (3, H, W) and out.dtype == torch.float32
    assert masks.shape == (5, H, W) and masks.dtype == torch.uint8
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(out[:, 0, 0], torch.tensor(expected), rtol=1e-5, atol=1e-5)
    out, masks = eval_transform((H, W))(image)
    assert masks.shape == (0, H, W)


def test_flip_moves_image_and_masks_identically():
    image, mask = _pattern()
    t = idrid_train(
        (H, W), hflip=1.0, rotate=0.0, scale=(1.0, 1.0), translate=0.0, **NO_PHOTOMETRIC
    )
    out, masks = t(image, [mask, 1 - mask])
    np.testing.assert_array_equal(masks[0].numpy(), mask[:, ::-1])
    np.testing.assert_array_equal(masks[1].numpy(), 1 - mask[:, ::-1])
    np.testing.assert_array_equal(_red_mask(out), mask[:, ::-1])


@pytest.mark.parametrize("seed", range(6))
def test_random_geometry_is_shared_by_image_and_masks(seed):
    image, mask = _pattern()
    t = idrid_train((H, W), seed=seed, **NO_PHOTOMETRIC)
    out, masks = t(image, [mask] * 5)
    warped = masks[0].numpy()
    assert set(np.unique(warped)) <= {0, 1}
    assert all(torch.equal(masks[0], m) for m in masks)
    from_image = _red_mask(out)
    iou = (warped & from_image).sum() / max(1, (warped | from_image).sum())
    assert iou > 0.85, iou


def test_augmentation_really_changes_geometry():
    image, mask = _pattern()
    t = idrid_train((H, W), seed=0, hflip=0.0, **NO_PHOTOMETRIC)
    warped = [t(image, [mask])[1][0].numpy() for _ in range(4)]
    assert not all(np.array_equal(w, mask) for w in warped)


def test_seed_and_set_seed_reproduce_the_stream():
    image = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    a = idrid_train((H, W), seed=7)
    b = idrid_train((H, W), seed=7)
    first = [a(image)[0] for _ in range(3)]
    assert all(torch.equal(x, b(image)[0]) for x in first)
    a.set_seed(7)
    assert torch.equal(a(image)[0], first[0])
    a.set_seed(8)
    assert not torch.equal(a(image)[0], first[0])


def test_registry_builds_with_image_size_and_seed_and_is_strict():
    for name in ("idrid_train", "eval"):
        t = TRANSFORMS.build({"type": name}, image_size=[H, W], seed=0)
        assert t(np.zeros((10, 12, 3), np.uint8))[0].shape == (3, H, W)
    with pytest.raises(RegistryError, match="did you mean 'rotate'"):
        TRANSFORMS.build({"type": "idrid_train", "rotat": 10}, image_size=[H, W], seed=0)
    with pytest.raises(ConfigError, match="image_size"):
        eval_transform((0, W))


def _fundus_like():
    """An orange disc on a black surround."""
    yy, xx = np.mgrid[0:H, 0:W]
    field = np.hypot(xx - W / 2, yy - H / 2) < 0.45 * H
    image = np.zeros((H, W, 3), np.uint8)
    image[field] = (200, 90, 30)
    return image, field


def _denormalise(out: torch.Tensor) -> np.ndarray:
    mean, std = (
        torch.tensor(IMAGENET_MEAN)[:, None, None],
        torch.tensor(IMAGENET_STD)[:, None, None],
    )
    return (out * std + mean).permute(1, 2, 0).numpy()


def test_colour_jitter_varies_the_field_and_keeps_the_surround_black():
    image, field = _fundus_like()
    t = idrid_train((H, W), seed=3, colour_p=1.0, jpeg_p=0.0, blur_p=0.0, **NO_GEOMETRY)
    colours, darkest = [], 0.0
    for _ in range(12):
        out, _ = t(image, [field.astype(np.uint8)])
        rgb = _denormalise(out)
        colours.append(rgb[field].mean(axis=0))
        darkest = max(darkest, float(np.abs(rgb[~field]).max()))
    colours = np.array(colours)
    assert colours.std(axis=0).min() > 0.02  # every channel's mean moves between draws
    assert np.ptp(colours[:, 1] / colours[:, 0]) > 0.05  # the hue/white balance changes too
    assert darkest < 0.02  # multiplicative changes and gamma keep black black


def test_seed_recipe_has_no_colour_change():
    image, field = _fundus_like()
    t = idrid_train((H, W), seed=0, **NO_PHOTOMETRIC, **NO_GEOMETRY)
    out, _ = t(image, [field.astype(np.uint8)])
    np.testing.assert_allclose(
        _denormalise(out)[field].mean(axis=0), (200 / 255, 90 / 255, 30 / 255), atol=1e-3
    )
