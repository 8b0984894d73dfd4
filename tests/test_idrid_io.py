"""Image and mask reading: every mask mode, alpha never read, clear errors naming the file."""

import numpy as np
import pytest
from PIL import Image

from moekit.data.image_io import read_mask, read_rgb, resize_image, resize_mask
from moekit.errors import DataError

MASK = np.zeros((12, 20), np.uint8)
MASK[3:7, 5:11] = 1


def _save(path, img):
    img.save(path, compression="tiff_lzw")
    return path


def _palette(mask):
    img = Image.fromarray(mask)
    img.putpalette([0, 0, 0, 255, 255, 255])
    return img


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_palette, id="P"),
        pytest.param(lambda m: Image.fromarray(m.astype(bool)), id="1-bit"),
        pytest.param(lambda m: Image.fromarray(m * 255), id="L-0-255"),
        pytest.param(lambda m: Image.fromarray(m), id="L-0-1"),
        pytest.param(lambda m: Image.fromarray(m.astype(np.uint16) * 1000), id="I;16"),
        pytest.param(lambda m: Image.fromarray(np.dstack([m * 0, m * 0, m * 255])), id="RGB-blue"),
        pytest.param(
            lambda m: Image.fromarray(np.dstack([m * 255, m * 0, m * 0, np.full_like(m, 255)])),
            id="RGBA",
        ),
        pytest.param(
            lambda m: Image.fromarray(np.dstack([m * 255, np.full_like(m, 255)])), id="LA"
        ),
    ],
)
def test_read_mask_every_mode_gives_uint8_zero_one(tmp_path, make):
    path = _save(tmp_path / "m.tif", make(MASK))
    mask = read_mask(path)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, MASK)


def test_rgba_mask_alpha_is_never_read(tmp_path):
    # colour channels all zero, alpha 255 everywhere: no lesion at all (IDRiD_81_EX.tif trap)
    rgba = np.zeros((12, 20, 4), np.uint8)
    rgba[..., 3] = 255
    path = _save(tmp_path / "IDRiD_81_EX.tif", Image.fromarray(rgba))
    assert read_mask(path).sum() == 0


def test_read_rgb_reduced_decode_reports_full_size(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (240, 360, 3), dtype=np.uint8)
    path = tmp_path / "a.jpg"
    Image.fromarray(image).save(path, quality=95)
    full, size = read_rgb(path)
    assert full.shape == (240, 360, 3) and size == (240, 360)
    reduced, size = read_rgb(path, target_size=(60, 90))
    assert size == (240, 360)
    assert reduced.shape[0] >= 60 and reduced.shape[1] >= 90 and reduced.shape[0] < 240
    assert resize_image(reduced, (60, 90)).shape == (60, 90, 3)


def test_read_rgb_converts_grey_jpeg(tmp_path):
    path = tmp_path / "grey.jpg"
    Image.fromarray(np.full((16, 24), 128, np.uint8)).save(path)
    image, _ = read_rgb(path)
    assert image.shape == (16, 24, 3)


def test_corrupt_jpeg_is_a_data_error_naming_the_file(tmp_path):
    path = tmp_path / "IDRiD_007.jpg"
    path.write_bytes(b"this is not a jpeg at all" * 10)
    with pytest.raises(DataError, match=r"IDRiD_007.jpg") as info:
        read_rgb(path)
    assert "\n" not in str(info.value)


def test_truncated_jpeg_is_a_data_error(tmp_path):
    path = tmp_path / "cut.jpg"
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(image).save(path)
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(DataError, match=r"cut.jpg"):
        read_rgb(path)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_missing_and_corrupt_masks_are_data_errors(tmp_path):
    with pytest.raises(DataError, match=r"nope.tif: mask not found"):
        read_mask(tmp_path / "nope.tif")
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00garbage")
    with pytest.raises(DataError, match=r"bad.tif"):
        read_mask(bad)


def test_resize_mask_is_nearest_and_stays_uint8():
    mask = np.kron(np.array([[0, 1], [1, 0]], np.uint8), np.ones((8, 8), np.uint8))
    small = resize_mask(mask, (4, 4))
    assert small.dtype == np.uint8 and set(np.unique(small)) == {0, 1}
    np.testing.assert_array_equal(small, np.kron(np.array([[0, 1], [1, 0]]), np.ones((2, 2))))
