"""Preprocessing steps: the fundus field of view on photographs of many shapes, and geometries
that map predictions back to the original pixels exactly."""

import io

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from moekit.data.preprocess import (
    FundusFov,
    Geometry,
    Resize,
    find_field,
    fit_aspect,
    forward,
    to_original,
)
from moekit.errors import ConfigError, RegistryError
from moekit.registry import PREPROCESS


def photograph(
    width: int,
    height: int,
    center: tuple[float, float],
    radius: float,
    level: float = 170.0,
    vignette: float = 0.6,
    notch: bool = False,
    label: bool = False,
    quality: int | None = 85,
    seed: int = 0,
) -> np.ndarray:
    """A circular field on a black surround: orange-red, darker towards the rim by
    ``vignette``, textured; optionally a square notch cut into the rim, a white text label in
    the surround's corner, and JPEG compression."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    d = np.hypot(xx - center[0], yy - center[1]) / radius
    texture = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), 3)
    shade = level * (1 - vignette * np.clip(d, 0, 1) ** 2) * (1 + 0.3 * texture)
    image = np.clip(shade[..., None] * np.array([1.0, 0.45, 0.15]), 0, 255)
    image[d >= 1] = rng.uniform(0, 4, (int((d >= 1).sum()), 3))
    image = image.astype(np.uint8)
    if notch:
        side = max(2, round(0.08 * radius))
        x, y = round(center[0] + 0.7071 * radius), round(center[1] - 0.7071 * radius)
        image[y - side : y + side, x - side : x + side] = 0
    if label:
        cv2.putText(image, "OD 2024-01-01", (2, height - 4), 0, 0.3, (255, 255, 255), 1)
    if quality is not None:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        image = np.array(Image.open(buffer).convert("RGB"))
    return image


def circle_box(width, height, center, radius):
    """The visible field's bounding box ``(top, left, bottom, right)``."""
    cx, cy = center
    return (
        max(0.0, cy - radius),
        max(0.0, cx - radius),
        min(float(height), cy + radius),
        min(float(width), cx + radius),
    )


SHAPES = {
    # name: (width, height, centre, radius, options)
    "idrid_clipped_top_bottom": (428, 284, (214, 142), 176, {}),
    "full_circle_4_3": (400, 300, (200, 150), 138, {}),
    "square_touching": (300, 300, (150, 150), 149, {}),
    "off_centre_small": (360, 240, (150, 130), 90, {}),
    "dark_fundus": (420, 280, (210, 140), 134, {"level": 60.0}),
    "strong_vignetting": (420, 280, (210, 140), 134, {"vignette": 0.85}),
    "notch_and_label": (400, 300, (200, 150), 130, {"notch": True, "label": True}),
    "low_jpeg_quality": (420, 280, (212, 138), 134, {"quality": 40}),
    "large_photograph": (1500, 1000, (750, 500), 600, {}),
    "clipped_left_right": (300, 400, (150, 200), 170, {}),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_find_field_box_and_circle_on_many_shapes(name):
    width, height, center, radius, options = SHAPES[name]
    image = photograph(width, height, center, radius, **options)
    field = find_field(image)
    expected = circle_box(width, height, center, radius)
    tolerance = 0.02 * radius + 2
    assert np.allclose(field.box, expected, atol=tolerance), (field.box, expected)
    assert field.circle is not None
    cx, cy, r = field.circle
    assert abs(cx - center[0]) < tolerance and abs(cy - center[1]) < tolerance
    assert abs(r - radius) < tolerance


def test_a_dark_crescent_on_the_rim_does_not_move_the_circle():
    width, height, center, radius = 400, 300, (200, 150), 130
    image = photograph(width, height, center, radius)
    yy, xx = np.mgrid[0:height, 0:width]
    crescent = (np.hypot(xx - center[0], yy - center[1]) > 0.8 * radius) & (xx < 110)
    image[crescent] = 2  # an under-exposed sector (a small pupil shades the rim)
    field = find_field(image)
    assert field.box[1] > 90  # the visible field starts later on the left ...
    cx, cy, r = field.circle
    assert abs(cx - 200) < 4 and abs(cy - 150) < 4 and abs(r - 130) < 4  # ... its circle not
    intact = FundusFov((96, 144)).geometry(photograph(width, height, center, radius))
    shaded = FundusFov((96, 144)).geometry(image)
    np.testing.assert_allclose(shaded.crop, intact.crop, atol=3)


def test_a_field_that_is_no_circle_gives_its_box():
    image = np.zeros((120, 160, 3), np.uint8)
    image[20:100, 30:140] = (180, 80, 30)
    field = find_field(image)
    assert field.box == (20, 30, 100, 140) and field.circle is None


def test_fixed_threshold_and_a_photograph_without_surround():
    image = photograph(200, 150, (100, 75), 60, quality=None)
    assert find_field(image, threshold=20).box == find_field(image).box
    full = np.full((50, 80, 3), 120, np.uint8)
    assert find_field(full).box == (0, 0, 50, 80)


def _output_circle(geometry: Geometry, center, radius):
    """Where a circle of the photograph lands in the output (independent arithmetic)."""
    top, left, _, _ = geometry.crop
    pad_top, _, pad_left, _ = geometry.padding
    sy, sx = geometry.scale
    return (
        (center[0] - left + pad_left) * sx,
        (center[1] - top + pad_top) * sy,
        radius * sx,
        radius * sy,
    )


@pytest.mark.parametrize(
    "name", ["idrid_clipped_top_bottom", "full_circle_4_3", "off_centre_small"]
)
def test_fundus_fov_centres_the_field_at_the_output_aspect(name):
    width, height, center, radius, options = SHAPES[name]
    image = photograph(width, height, center, radius, **options)
    out, geometry = FundusFov((96, 144))(image)
    assert out.shape == (96, 144, 3) and out.dtype == np.uint8
    padded_h, padded_w = geometry.padded_size
    assert abs(padded_w / padded_h - 1.5) < 2 / padded_h
    cx, cy, rx, ry = _output_circle(geometry, center, radius)
    assert abs(cx - 72) < 2 and abs(cy - 48) < 2
    assert abs(min(2 * rx, 144) - 144) < 3 or abs(min(2 * ry, 96) - 96) < 3  # fills a side
    assert out[:3, :3].max() < 10 and out[48, 72].max() > 60  # black corner, bright centre


def test_extent_circle_makes_every_field_a_whole_circle_of_the_output_height():
    for name in ("idrid_clipped_top_bottom", "full_circle_4_3", "clipped_left_right"):
        width, height, center, radius, options = SHAPES[name]
        image = photograph(width, height, center, radius, **options)
        _, geometry = FundusFov((96, 144), extent="circle")(image)
        cx, cy, rx, ry = _output_circle(geometry, center, radius)
        assert abs(cx - 72) < 2 and abs(cy - 48) < 2, name
        assert abs(2 * ry - 96) < 3 and abs(2 * rx - 96) < 3, name


def test_resize_step_is_the_whole_photograph():
    image = photograph(120, 80, (60, 40), 35)
    out, geometry = Resize((40, 60))(image)
    assert geometry == Geometry((80, 120), (0, 0, 80, 120), (0, 0, 0, 0), (40, 60))
    np.testing.assert_array_equal(out, cv2.resize(image, (60, 40), interpolation=cv2.INTER_AREA))


@settings(max_examples=60, deadline=None)
@given(
    source=st.tuples(st.integers(60, 400), st.integers(60, 400)),
    box=st.tuples(*[st.floats(0, 1)] * 4),
    output=st.tuples(st.integers(8, 60), st.integers(8, 60)),
    seed=st.integers(0, 1000),
)
def test_to_original_then_forward_gives_back_the_model_map(source, box, output, seed):
    """A mask at the model's size (0 on the padding), taken to the photograph and brought
    forward again with the same geometry, is the same mask (nearest neighbour on pixel
    centres) whenever the crop is at least as large as the output."""
    height, width = source
    top, bottom = sorted((round(box[0] * height), round(box[1] * height)))
    left, right = sorted((round(box[2] * width), round(box[3] * width)))
    bottom, right = max(bottom, top + output[0]), max(right, left + output[1])
    if bottom > height or right > width:
        return
    geometry = fit_aspect((top, left, bottom, right), (height, width), output)
    rng = np.random.default_rng(seed)
    in_crop = forward(np.ones(source, np.uint8), geometry, nearest=True)  # not the padding
    model_map = rng.integers(0, 2, output, dtype=np.uint8) * in_crop
    original = to_original(model_map, geometry, nearest=True)
    assert original.shape == (height, width)
    assert not original[:top].any() and not original[:, right:].any()  # 0 outside the crop
    np.testing.assert_array_equal(forward(original, geometry, nearest=True), model_map)


def test_forward_moves_a_point_where_the_geometry_says():
    geometry = Geometry((300, 400), (20, 50, 280, 350), (5, 7, 40, 30), (90, 120))
    mask = np.zeros((300, 400), np.uint8)
    mask[100:110, 200:210] = 1  # centre (205, 105) in the photograph (pixel-centre coords)
    out = forward(mask, geometry, nearest=True)
    ys, xs = np.nonzero(out)
    sy, sx = geometry.scale
    expected_x = (205 - 50 + 40) * sx - 0.5
    expected_y = (105 - 20 + 5) * sy - 0.5
    assert abs(xs.mean() - expected_x) < 0.6 and abs(ys.mean() - expected_y) < 0.6
    assert geometry.padded_size == (272, 370)


def test_probability_maps_with_many_channels_go_back_linearly():
    geometry = fit_aspect((10, 20, 90, 140), (100, 160), (24, 32))
    probs = np.random.default_rng(0).random((24, 32, 7)).astype(np.float32)
    back = to_original(probs, geometry)
    assert back.shape == (100, 160, 7) and back.dtype == np.float32
    assert back[:10].max() == 0 and 0 < back[50, 80].min() <= back.max() <= 1
    constant = to_original(np.full((24, 32), 0.25, np.float32), geometry)
    top, left, bottom, right = geometry.crop
    np.testing.assert_allclose(constant[top:bottom, left:right], 0.25, atol=1e-6)
    assert to_original(np.ones((24, 32), bool), geometry, nearest=True).dtype == np.bool_


def test_rescaled_geometry_aligns_full_size_masks_with_a_reduced_image():
    width, height, center, radius, _ = SHAPES["large_photograph"]
    full = photograph(width, height, center, radius, quality=None)
    reduced = cv2.resize(full, (width // 4, height // 4), interpolation=cv2.INTER_AREA)
    step = FundusFov((96, 144))
    _, small_geometry = step(reduced)
    geometry = small_geometry.rescaled(height, width)
    assert geometry.source_size == (height, width)
    np.testing.assert_allclose(geometry.crop, step.geometry(full).crop, atol=6)
    yy, xx = np.mgrid[0:height, 0:width]
    field = (np.hypot(xx - center[0], yy - center[1]) < radius).astype(np.uint8)
    mask_out = forward(field, geometry, nearest=True)
    image_out = forward(reduced, small_geometry)
    bright = image_out.max(axis=2) > 20
    assert (mask_out.astype(bool) == bright).mean() > 0.99


def test_geometry_round_trips_through_a_dict():
    geometry = fit_aspect((3, 4, 50, 60), (64, 64), (32, 48))
    assert Geometry.from_dict(geometry.as_dict()) == geometry


def test_registry_builds_steps_and_rejects_bad_settings():
    step = PREPROCESS.build({"type": "fundus_fov", "threshold": 12}, image_size=[32, 48])
    assert isinstance(step, FundusFov) and step.threshold == 12.0
    assert isinstance(PREPROCESS.build("resize", image_size=[32, 48]), Resize)
    with pytest.raises(RegistryError, match="did you mean 'threshold'"):
        PREPROCESS.build({"type": "fundus_fov", "treshold": 5}, image_size=[32, 48])
    with pytest.raises(ConfigError, match="did you mean 'circle'"):
        FundusFov((32, 48), extent="circel")
    with pytest.raises(ConfigError, match="threshold"):
        FundusFov((32, 48), threshold=300)
    with pytest.raises(ConfigError, match="brightness"):
        FundusFov((32, 48), brightness=-1)
    with pytest.raises(ValueError, match="geometry is for"):
        forward(np.zeros((5, 5), np.uint8), Resize((4, 4)).geometry(np.zeros((6, 6, 3))))


def test_brightness_evens_out_exposure_and_keeps_the_surround_black():
    width, height, center, radius, _ = SHAPES["full_circle_4_3"]
    bright = photograph(width, height, center, radius, level=200.0, quality=None)
    dark = photograph(width, height, center, radius, level=70.0, quality=None)
    step = FundusFov((96, 144), brightness=150)
    outs = [step(image)[0] for image in (bright, dark)]
    field = forward(bright, step.geometry(bright)).max(axis=2) > 20
    medians = [float(np.median(out.max(axis=2)[field])) for out in outs]
    assert abs(medians[0] - 150) < 8 and abs(medians[1] - 150) < 8
    assert all(out[:3, :3].max() < 10 for out in outs)
    kept, geometry = FundusFov((96, 144), brightness=None)(dark)
    np.testing.assert_array_equal(kept, forward(dark, geometry))
    assert step(dark)[1] == geometry
