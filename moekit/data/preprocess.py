"""Named preprocessing steps (registry ``PREPROCESS``): a photograph as it comes -> the model's
input geometry, with a record that maps dense predictions back to the photograph's pixels.

A step is built from the config's ``preprocess:`` mapping and the dataset's ``image_size``
(``PREPROCESS.build(cfg, image_size=(height, width))``) and called on a ``uint8 [H, W, 3]``
RGB photograph of any size. It returns the image at ``image_size`` and a :class:`Geometry`:

* :func:`forward` applies a geometry to another array of the photograph's size (a lesion
  mask: nearest neighbour; an image: area or linear interpolation);
* :func:`to_original` maps an array at ``image_size`` (a mask, a probability map) back onto
  the photograph's pixels, black (0) outside the crop;
* :meth:`Geometry.rescaled` moves a geometry found on a reduced decode of a photograph to
  another resolution of it (IDRiD's masks are full size, its JPEGs are decoded reduced).

A geometry is a crop box, black padding on each side of the crop and a resize:
``output = resize(pad(photo[top:bottom, left:right]), image_size)``. Resizing uses pixel
centres (``x_src = (x_out + 0.5) * scale - 0.5``; OpenCV's area/linear and its exact nearest
neighbour), so a mask taken back to the photograph and forward again is the same mask
whenever the crop is at least as large as ``image_size``.

Steps:

* ``resize``: the whole photograph, resized (no crop, no padding): what non-fundus datasets do.
* ``fundus_fov``: the circular field of view of a fundus photograph is found by thresholding
  the dark surround (:func:`find_field`), cropped to, padded with black to the aspect ratio of
  ``image_size`` (centred) and resized; its exposure is evened out (``brightness``). Cameras
  differ in how much of the circle the frame shows (IDRiD's 4288×2848 photographs clip it at
  the top and bottom, Messidor's and many others' show it whole, off-centre or small); after
  this step every photograph shows its field the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from math import ceil, floor

import cv2
import numpy as np

from moekit.data.transforms import parse_size
from moekit.errors import ConfigError, did_you_mean
from moekit.registry import PREPROCESS

DETECT_SIDE = 512
"""Field detection runs on a copy whose longer side is at most this many pixels."""
EXTENTS = ("field", "circle")


@dataclass(frozen=True)
class Geometry:
    """How a photograph became the model's input: crop, pad with black, resize.

    Attributes:
        source_size: ``(height, width)`` of the photograph the geometry applies to.
        crop: ``(top, left, bottom, right)``: rows ``top:bottom`` and columns ``left:right``
            of the photograph (always inside it).
        padding: ``(top, bottom, left, right)`` black pixels added around the crop, in the
            photograph's pixels.
        output_size: ``(height, width)`` of the model's input.
    """

    source_size: tuple[int, int]
    crop: tuple[int, int, int, int]
    padding: tuple[int, int, int, int]
    output_size: tuple[int, int]

    @property
    def padded_size(self) -> tuple[int, int]:
        """``(height, width)`` of the crop with its padding, before the resize."""
        top, left, bottom, right = self.crop
        pad_top, pad_bottom, pad_left, pad_right = self.padding
        return bottom - top + pad_top + pad_bottom, right - left + pad_left + pad_right

    @property
    def scale(self) -> tuple[float, float]:
        """Output pixels per photograph pixel, ``(vertical, horizontal)``."""
        height, width = self.padded_size
        return self.output_size[0] / height, self.output_size[1] / width

    def rescaled(self, height: int, width: int) -> Geometry:
        """The same geometry on a ``height × width`` version of the photograph (e.g. the
        full-size masks of a photograph whose reduced decode gave this geometry)."""
        fy, fx = height / self.source_size[0], width / self.source_size[1]
        top, left, bottom, right = self.crop
        crop = (round(top * fy), round(left * fx), round(bottom * fy), round(right * fx))
        crop = (
            min(crop[0], height - 1),
            min(crop[1], width - 1),
            min(max(crop[2], crop[0] + 1), height),
            min(max(crop[3], crop[1] + 1), width),
        )
        factors = (fy, fy, fx, fx)
        padding = tuple(round(p * f) for p, f in zip(self.padding, factors))
        return Geometry((height, width), crop, padding, self.output_size)

    def as_dict(self) -> dict[str, list[int]]:
        """JSON-ready form (lists of ints); :meth:`from_dict` reads it back."""
        return {key: list(value) for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Sequence[int]]) -> Geometry:
        return cls(*(tuple(int(v) for v in data[key]) for key in cls.__dataclass_fields__))


def _resize(array: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """Resize ``[H, W]`` or ``[H, W, C]`` (any C) to ``size = (height, width)``, pixel centres
    aligned: exact nearest neighbour, else area averaging when shrinking, linear when not."""
    height, width = size
    if array.shape[:2] == (height, width):
        return array
    if nearest:
        interpolation = cv2.INTER_NEAREST_EXACT
    elif array.shape[0] > height or array.shape[1] > width:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_LINEAR
    if array.ndim == 3 and array.shape[2] > 4:
        parts = [array[..., i : i + 4] for i in range(0, array.shape[2], 4)]
        resized = [_resize(np.ascontiguousarray(p), size, nearest) for p in parts]
        return np.concatenate([r if r.ndim == 3 else r[..., None] for r in resized], axis=2)
    out = cv2.resize(array, (width, height), interpolation=interpolation)
    return out if out.ndim == array.ndim else out[..., None]


def _as_resizable(array: np.ndarray) -> tuple[np.ndarray, np.dtype]:
    if array.dtype == np.bool_:
        return array.astype(np.uint8), array.dtype
    if array.dtype == np.float64:
        return array.astype(np.float32), array.dtype
    return array, array.dtype


def forward(array: np.ndarray, geometry: Geometry, nearest: bool = False) -> np.ndarray:
    """Apply ``geometry`` to ``array`` ``[H, W]`` or ``[H, W, C]`` of the photograph's size.

    ``nearest``: exact nearest neighbour (masks, label maps); else area averaging when
    shrinking and linear interpolation when enlarging (images).
    """
    if tuple(array.shape[:2]) != geometry.source_size:
        raise ValueError(
            f"forward: array is {array.shape[:2]}, the geometry is for {geometry.source_size}"
        )
    data, dtype = _as_resizable(array)
    top, left, bottom, right = geometry.crop
    pad_top, pad_bottom, pad_left, pad_right = geometry.padding
    widths = [(pad_top, pad_bottom), (pad_left, pad_right)] + [(0, 0)] * (data.ndim - 2)
    padded = np.pad(data[top:bottom, left:right], widths)
    return _resize(padded, geometry.output_size, nearest).astype(dtype, copy=False)


def to_original(map_: np.ndarray, geometry: Geometry, nearest: bool = False) -> np.ndarray:
    """Map ``map_`` (``[h, w]`` or ``[h, w, C]`` at ``geometry.output_size``: a mask, a
    probability map) back onto the photograph: ``[H, W(, C)]`` at ``geometry.source_size``,
    0 outside the crop. ``nearest`` for masks and label maps, else linear interpolation."""
    if tuple(map_.shape[:2]) != geometry.output_size:
        raise ValueError(
            f"to_original: map is {map_.shape[:2]}, the geometry's output is {geometry.output_size}"
        )
    data, dtype = _as_resizable(map_)
    padded = _resize(data, geometry.padded_size, nearest)
    top, left, bottom, right = geometry.crop
    pad_top, _, pad_left, _ = geometry.padding
    inner = padded[pad_top : pad_top + bottom - top, pad_left : pad_left + right - left]
    out = np.zeros((*geometry.source_size, *data.shape[2:]), data.dtype)
    out[top:bottom, left:right] = inner
    return out.astype(dtype, copy=False)


def fit_aspect(
    box: tuple[int, int, int, int], source_size: tuple[int, int], output_size: tuple[int, int]
) -> Geometry:
    """The geometry that crops ``box = (top, left, bottom, right)`` (which may reach beyond
    the photograph: the outside is padded black) and pads it evenly with black to the aspect
    ratio of ``output_size``."""
    height, width = source_size
    top, left, bottom, right = box
    inside = (max(0, top), max(0, left), min(height, bottom), min(width, right))
    if inside[2] <= inside[0] or inside[3] <= inside[1]:
        raise ValueError(f"fit_aspect: box {box} is outside the {width}x{height} photograph")
    box_h, box_w = bottom - top, right - left
    aspect = output_size[1] / output_size[0]
    extra_h = max(0, round(box_w / aspect) - box_h)
    extra_w = max(0, round(box_h * aspect) - box_w)
    padding = (
        inside[0] - top + extra_h // 2,
        bottom - inside[2] + extra_h - extra_h // 2,
        inside[1] - left + extra_w // 2,
        right - inside[3] + extra_w - extra_w // 2,
    )
    return Geometry((height, width), inside, padding, output_size)


@dataclass(frozen=True)
class Field:
    """The field of view found in a photograph, in its pixels.

    ``box``: ``(top, left, bottom, right)`` of the visible field; ``circle``: ``(cx, cy, r)``
    of the circle fitted to its rim, or ``None`` when the field is not a circle (then
    ``box`` is all there is); ``level``: the median of the field's brightest channel (0–255),
    a measure of the photograph's exposure.
    """

    box: tuple[int, int, int, int]
    circle: tuple[float, float, float] | None
    level: float


def _auto_threshold(level: np.ndarray) -> float:
    """Between the dark surround and the field: ``s + max(4, 0.15 (f - s))`` with ``s`` the
    0.5th percentile (the surround) and ``f`` the median of the pixels 10 levels above it."""
    surround = float(np.percentile(level, 0.5))
    bright = level[level > surround + 10]
    field = float(np.median(bright)) if bright.size else surround
    return surround + max(4.0, 0.15 * (field - surround))


def _fit_circle(points: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    """Least-squares circle through ``points [n, 2]`` (Kåsa's algebraic fit): ``(cx, cy, r,
    each point's distance to the circle minus r)``."""
    x, y = points[:, 0], points[:, 1]
    design = np.stack([x, y, np.ones_like(x)], axis=1)
    (a, b, c), *_ = np.linalg.lstsq(design, x**2 + y**2, rcond=None)
    cx, cy = a / 2, b / 2
    r = float(np.sqrt(max(c + cx**2 + cy**2, 0.0)))
    return float(cx), float(cy), r, np.hypot(x - cx, y - cy) - r


def find_field(image: np.ndarray, threshold: float | None = None) -> Field:
    """Find the field of view of a fundus photograph ``uint8 [H, W, 3]``.

    On a copy reduced to at most :data:`DETECT_SIDE` px (area averaging and a 5×5 median
    blur remove JPEG noise and thin text), the brightest channel is thresholded (``threshold``
    on 0–255, or :func:`_auto_threshold`); the largest connected region is the field (text
    labels and specks in the surround are other regions). A circle is fitted to the vertices
    of the region's convex hull that do not lie on the photograph's border: the hull bridges
    notches and dark crescents of the rim, and the vertices on a clipped top or bottom are
    left out. Vertices more than 1% of the radius inside the circle (where vignetting or a
    shaded sector pulled the threshold inwards) are dropped, at most 15% of them at a time,
    and the circle refitted until none is; it is kept when at least half of the vertices
    remain, none lies more than 1% of the radius outside, and they span at least 30% of its
    circumference (an IDRiD field clipped at the top and bottom shows about 60%).
    """
    height, width = image.shape[:2]
    factor = min(1.0, DETECT_SIDE / max(height, width))
    small = image
    if factor < 1.0:
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    level = cv2.medianBlur(np.ascontiguousarray(small.max(axis=2)), 5)
    cut = _auto_threshold(level) if threshold is None else float(threshold)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        (level > cut).astype(np.uint8), connectivity=8
    )
    if count < 2:
        return Field((0, 0, height, width), None, float(np.median(level)))
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    left, top, w, h = stats[largest, :4]
    sy, sx = height / small.shape[0], width / small.shape[1]
    box = (
        int(np.floor(top * sy)),
        int(np.floor(left * sx)),
        int(np.ceil((top + h) * sy)),
        int(np.ceil((left + w) * sx)),
    )
    hull = cv2.convexHull(cv2.findNonZero((labels == largest).astype(np.uint8)))[:, 0, :]
    hull = hull.astype(np.float64) + 0.5
    on_border = (
        (hull[:, 0] < 1)
        | (hull[:, 1] < 1)
        | (hull[:, 0] > small.shape[1] - 1)
        | (hull[:, 1] > small.shape[0] - 1)
    )
    rim = hull[~on_border]
    enough = max(8, 0.5 * len(rim))
    circle = None
    while len(rim) >= enough:  # refit without the vertices inside the circle (a dark sector)
        cx, cy, r, residual = _fit_circle(rim)
        tolerance = max(0.01 * r, 1.5)
        if residual.min() < -tolerance:  # drop the worst (up to 15%) and refit
            rim = rim[residual >= min(-tolerance, float(np.quantile(residual, 0.15)))]
            continue
        angles = np.arctan2(rim[:, 1] - cy, rim[:, 0] - cx)
        covered = np.unique(np.floor((angles + np.pi) / (2 * np.pi) * 36)).size / 36
        if residual.max() < tolerance and covered >= 0.3:
            circle = (cx * sx, cy * sy, (r + 0.5) * (sx + sy) / 2)  # + 0.5: rim pixels' edge
        break
    return Field(box, circle, float(np.median(level[labels == largest])))


class PreprocessStep:
    """A named preprocessing step: ``step(photo) -> (image at image_size, geometry)``.

    Subclasses say where the photograph goes (:meth:`geometry`); the step applies it.
    """

    def __init__(self, image_size: Sequence[int]) -> None:
        self.image_size = parse_size(image_size)

    def geometry(self, image: np.ndarray) -> Geometry:
        raise NotImplementedError

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, Geometry]:
        """``(image at image_size, its geometry)`` for a ``uint8 [H, W, 3]`` photograph."""
        geometry = self.geometry(image)
        return forward(image, geometry), geometry


@PREPROCESS.register("resize")
class Resize(PreprocessStep):
    """Resize the whole photograph to ``image_size`` (no crop, no padding)."""

    def geometry(self, image: np.ndarray) -> Geometry:
        height, width = image.shape[:2]
        return Geometry((height, width), (0, 0, height, width), (0, 0, 0, 0), self.image_size)


@PREPROCESS.register("fundus_fov")
class FundusFov(PreprocessStep):
    """Crop a fundus photograph to its field of view, pad with black to the aspect ratio of
    ``image_size`` (centred), resize and, optionally, even out the exposure.

    Args:
        image_size: ``(height, width)`` of the output.
        threshold: the level (0–255, brightest channel) above which a pixel belongs to the
            field; ``null`` chooses one per photograph between the surround and the field.
        extent: ``field`` crops to the field as the frame shows it (the fitted circle's
            bounding box inside the photograph: a circle clipped by the frame stays clipped;
            a dark crescent or a notch on the rim does not move it); ``circle`` crops to the
            circle's whole bounding square, padding what the frame cut off with black, so
            every field becomes a whole circle as high as the output. Where no circle is found
            (:func:`find_field`), both crop to the bounding box of the bright region.
        brightness: a level (0–255): the image is multiplied so that the median of the
            field's brightest channel becomes that level (by a factor of 1/3 to 3), so an
            under- or over-exposed photograph looks like the others (the black surround
            stays black; the geometry does not change); ``null`` keeps the exposure. With
            150 (about the replica's median) a model trained on the replica found the disc
            on darkened photographs as well as on the others (docs/datasets.md).
    """

    def __init__(
        self,
        image_size: Sequence[int],
        threshold: float | None = None,
        extent: str = "field",
        brightness: float | None = 150.0,
    ) -> None:
        super().__init__(image_size)
        for key, value in (("threshold", threshold), ("brightness", brightness)):
            if value is not None and not 0 < float(value) < 255:
                raise ConfigError(f"preprocess.{key}: expected 0-255 or null, got {value!r}")
        if extent not in EXTENTS:
            raise ConfigError(
                f"preprocess.extent: expected one of {', '.join(EXTENTS)}, got {extent!r}"
                f"{did_you_mean(str(extent), EXTENTS)}"
            )
        self.threshold = None if threshold is None else float(threshold)
        self.extent = extent
        self.brightness = None if brightness is None else float(brightness)

    def geometry(self, image: np.ndarray) -> Geometry:
        return self._place(find_field(image, self.threshold), image.shape[:2])

    def _place(self, field: Field, source_size: tuple[int, int]) -> Geometry:
        if field.circle is None:
            return fit_aspect(field.box, source_size, self.image_size)
        cx, cy, r = field.circle
        box = (floor(cy - r), floor(cx - r), ceil(cy + r), ceil(cx + r))
        if self.extent == "field":  # the circle as far as the frame shows it
            height, width = source_size
            box = (max(0, box[0]), max(0, box[1]), min(height, box[2]), min(width, box[3]))
        return fit_aspect(box, source_size, self.image_size)

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, Geometry]:
        field = find_field(image, self.threshold)
        geometry = self._place(field, image.shape[:2])
        out = forward(image, geometry)
        if self.brightness is not None:
            gain = min(3.0, max(1 / 3, self.brightness / max(field.level, 1.0)))
            out = np.clip(out.astype(np.float32) * gain + 0.5, 0, 255).astype(np.uint8)
        return out, geometry
