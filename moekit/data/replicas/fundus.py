"""Procedural colour fundus photographs with pixel-exact lesion masks.

The replica stands in for real photographs, so it imitates what a model could learn the optic
disc from, and varies what it must not learn it from. A :class:`FundusPainter` works like a
camera: it paints the retina's *reflectance* — anatomy and lesions — and :meth:`finish` lights
and photographs it.

Anatomy (:class:`FundusGeometry`, sizes from retinal millimetres and the camera's angle of view,
0.29 mm per degree): an optic disc of 1.6–2.3 mm (a vertical oval, about 1/6–1/9 of a 45–50°
field), 4.2–5.2 mm (about 2.5 disc diameters) nasal of the fovea and a little above it, in a
left or a right eye; the photograph centred on the macula, on the disc or between them.

Reflectance (:meth:`FundusPainter.paint_anatomy`): a retina from orange-red (little pigment,
often with the choroid's vessels showing through: a tessellated fundus) to dark red-brown (much
pigment); fine choroidal texture; a darker macula; a disc whose rim is orange-pink and whose cup
is pale yellow-white, with a blurred margin and sometimes a pale crescent of peripapillary
atrophy; vessels leaving the disc in four trunks (the temporal arcades curving around the
macula, thinner nasal trunks), veins wider and darker than arteries, tapering and branching
(Murray's law), stopping short of the fovea.

Lesions on request (each ``add_*`` returns the centres it drew; masks are pixel-exact):

==================  ============================================  ==========
lesion              look                                          mask
==================  ============================================  ==========
microaneurysm (MA)  tiny dark-red dot                             ``MA``
haemorrhage (HE)    larger dark-red blot (union of ellipses)      ``HE``
hard exudate (EX)   cluster of bright yellow specks               ``EX``
soft exudate (SE)   pale, fuzzy cotton-wool patch                 ``SE``
drusen              small soft yellowish deposits at the macula   ``drusen``
neovascularisation  tangle of fine vessels near the disc          (none)
==================  ============================================  ==========

Photograph (:meth:`FundusPainter.finish`): uneven illumination (vignetting, a gradient across
the field, a bright spot, sometimes a dark crescent at the rim), reflections (the nerve-fibre
sheen along the arcades, a foveal reflex, a young retina's patchy sheen, lens flare at the rim)
— bright things that are not the disc —, sometimes lens haze, the camera's white balance and
tone curve, optical blur, sensor noise, the black surround, and a camera's notch or text label.
How a camera frames the field (a circle clipped at the top and bottom as in IDRiD's 4288×2848
photographs, or whole, small, off-centre, in 3:2, 4:3, 16:10 or square frames) is a
:class:`Camera` of :data:`CAMERAS`.

Sizes scale with the field radius, so the same picture comes out at any resolution; the
smallest lesions are about 2 px across at 384×256. Every random choice comes from the
``numpy.random.Generator`` given to the painter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

LESIONS = ("MA", "HE", "EX", "SE", "OD")
MASKS = (*LESIONS, "cup", "drusen")
"""The masks :meth:`FundusPainter.finish` returns: IDRiD's lesions, the optic cup, drusen."""
MM_PER_DEGREE = 0.29
"""Retinal millimetres per degree of the camera's angle of view (Gullstrand's eye)."""
DISC_MM = (1.6, 2.3)
"""Range of the optic disc's mean diameter in millimetres (vertical about 10% more)."""
FOVEA_DISC_MM = (4.2, 5.2)
"""Range of the distance from the disc's centre to the fovea in millimetres."""
_SHIFT = 4  # cv2 fixed-point bits: coordinates and radii are passed in 1/16 pixel
_ONE = 1 << _SHIFT


@dataclass(frozen=True)
class Camera:
    """How a fundus camera frames and renders the field (ranges are drawn per photograph).

    Attributes:
        name: the key in :data:`CAMERAS`.
        aspect: frame width / height (what :func:`moekit.data.replicas.idrid.paint` uses).
        diameter: range of the field's diameter as a fraction of the frame's width (a circle
            higher than the frame is clipped at the top and bottom).
        offset: largest shift of the field's centre from the frame's, fraction of the height.
        degrees: range of the angle of view (sets the disc's size in the field).
        fixation: probabilities of a photograph centred on the macula, between macula and
            disc, and on the disc.
        tint: the camera's white balance (gain of R, G, B).
        blur: range of the optical blur, in thousandths of the field radius.
        notch: probability of the camera's notch on the rim, at ``notch_angle`` degrees
            (counter-clockwise from the right).
        label: probability of a text label in the surround.
        jpeg_quality: range of the JPEG quality the camera saves with.
    """

    name: str
    aspect: float
    diameter: tuple[float, float]
    offset: float
    degrees: tuple[float, float]
    fixation: tuple[float, float, float]
    tint: tuple[float, float, float]
    blur: tuple[float, float]
    notch: float = 0.0
    notch_angle: float = 0.0
    label: float = 0.0
    jpeg_quality: tuple[int, int] = (85, 97)


CAMERAS = {
    camera.name: camera
    for camera in (
        # IDRiD (Kowa VX-10α, 50°, 4288×2848): the circle clipped at the top and bottom
        Camera("idrid", 1.5, (0.80, 0.84), 0.01, (48, 52), (0.8, 0.2, 0.0), (1.0, 1.0, 1.0),
               (3, 6), jpeg_quality=(88, 97)),
        # a whole circle in a 3:2 frame (Messidor-style, 45°)
        Camera("circle_3_2", 1.5, (0.60, 0.66), 0.02, (43, 47), (0.6, 0.3, 0.1),
               (0.96, 1.04, 1.12), (3, 7), label=0.15, jpeg_quality=(80, 96)),
        # a whole circle in a 4:3 frame with a notch at the top right and labels
        Camera("circle_4_3", 4 / 3, (0.64, 0.73), 0.03, (43, 47), (0.6, 0.3, 0.1),
               (1.02, 1.06, 0.95), (3, 8), notch=0.7, notch_angle=45.0, label=0.35,
               jpeg_quality=(70, 95)),
        # a square frame the circle almost fills
        Camera("square", 1.0, (0.90, 0.99), 0.02, (40, 46), (0.5, 0.35, 0.15),
               (1.05, 0.94, 0.88), (3, 7), label=0.1, jpeg_quality=(75, 95)),
        # a small, off-centre field of a portable camera: narrow angle, soft, compressed
        Camera("portable", 4 / 3, (0.46, 0.60), 0.09, (32, 40), (0.3, 0.4, 0.3),
               (0.92, 1.1, 1.2), (6, 14), notch=0.3, notch_angle=270.0, label=0.2,
               jpeg_quality=(55, 85)),
        # a wide 16:10 frame, the circle slightly clipped
        Camera("wide_clipped", 1.6, (0.68, 0.74), 0.02, (48, 55), (0.7, 0.25, 0.05),
               (1.0, 0.98, 1.05), (3, 7), label=0.2, jpeg_quality=(80, 96)),
    )
}  # fmt: skip
"""The cameras of the replica, by name."""


def _uniform(rng: np.random.Generator, bounds: Sequence[float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _wrap(angle: float) -> float:
    """``angle`` in ``[-π, π)``."""
    return (angle + math.pi) % (2 * math.pi) - math.pi


def _steer(heading: float, target: float, rate: float) -> float:
    """Turn ``heading`` by ``rate`` of the (shortest) angle to ``target`` (radians)."""
    return heading + rate * _wrap(target - heading)


def _rotate(vector: tuple[float, float], angle: float) -> tuple[float, float]:
    c, s = np.cos(angle), np.sin(angle)
    return vector[0] * c - vector[1] * s, vector[0] * s + vector[1] * c


@dataclass(frozen=True)
class FundusGeometry:
    """Where things are, in pixels: field centre and radius, disc, macula (``x, y`` order)."""

    width: int
    height: int
    center: tuple[float, float]
    radius: float
    disc_center: tuple[float, float]
    disc_radius: float
    macula_center: tuple[float, float]
    cup_ratio: float = 0.44
    """Vertical cup-to-disc ratio (healthy eyes about 0.3-0.5; glaucoma larger)."""
    camera: str = "idrid"
    """The :data:`CAMERAS` entry that framed the photograph and renders it."""

    @property
    def disc_diameter(self) -> float:
        return 2.0 * self.disc_radius

    @property
    def nasal(self) -> float:
        """+1 when the disc is right of the macula in the picture (a right eye), else -1."""
        return 1.0 if self.disc_center[0] >= self.macula_center[0] else -1.0

    @classmethod
    def sample(
        cls,
        rng: np.random.Generator,
        width: int,
        height: int,
        cup_ratio: float = 0.44,
        camera: str = "idrid",
    ) -> FundusGeometry:
        """A left or right eye framed by ``camera`` in a ``width × height`` frame.

        The field's radius follows the camera's ``diameter``; the disc's radius and its
        distance to the fovea follow :data:`DISC_MM` and :data:`FOVEA_DISC_MM` at the drawn
        angle of view; the disc lies 4–10° above the fovea's horizontal (rotated by up to
        ±5° more with the head); the camera centres the macula, the disc or a point between,
        and the disc is moved inwards until it lies inside the field and the frame.
        """
        cam = CAMERAS[camera]
        radius = 0.5 * width * _uniform(rng, cam.diameter)
        center = (
            width / 2 + rng.uniform(-1, 1) * cam.offset * height,
            height / 2 + rng.uniform(-1, 1) * cam.offset * height,
        )
        mm_per_radius = 0.5 * _uniform(rng, cam.degrees) * MM_PER_DEGREE
        disc_radius = radius * 0.5 * _uniform(rng, DISC_MM) / mm_per_radius
        distance = radius * _uniform(rng, FOVEA_DISC_MM) / mm_per_radius
        nasal = 1.0 if rng.random() < 0.5 else -1.0
        elevation = np.radians(rng.uniform(4.0, 10.0))
        to_disc = _rotate(
            (nasal * distance * np.cos(elevation), -distance * np.sin(elevation)),
            np.radians(rng.uniform(-5.0, 5.0)),
        )
        kind = rng.choice(3, p=cam.fixation)
        t = rng.uniform(*((-0.08, 0.15), (0.35, 0.6), (0.85, 1.05))[kind])
        origin = (
            center[0] + rng.normal(0, 0.04 * radius),
            center[1] + rng.normal(0, 0.05 * radius),
        )
        reach = 0.86 * radius - 1.15 * disc_radius
        for _ in range(40):  # move the framing towards the disc until the disc is visible
            disc = (origin[0] + (1 - t) * to_disc[0], origin[1] + (1 - t) * to_disc[1])
            inside = np.hypot(disc[0] - center[0], disc[1] - center[1]) <= reach
            margin = 1.2 * disc_radius
            inside = inside and margin <= disc[1] <= height - margin
            if inside:
                break
            t = min(1.0, t + 0.05)
            origin = (0.9 * origin[0] + 0.1 * center[0], 0.9 * origin[1] + 0.1 * center[1])
        macula = (origin[0] - t * to_disc[0], origin[1] - t * to_disc[1])
        return cls(width, height, center, radius, disc, disc_radius, macula, cup_ratio, cam.name)


def _fixed(point: tuple[float, float]) -> tuple[int, int]:
    return round(point[0] * _ONE), round(point[1] * _ONE)


def _blend(image: np.ndarray, alpha: np.ndarray, color: np.ndarray) -> None:
    """``image = (1 - alpha) image + alpha color`` in place, inside alpha's bounding box only."""
    x, y, w, h = cv2.boundingRect((alpha > 1e-3).astype(np.uint8))
    if w == 0 or h == 0:
        return
    a = alpha[y : y + h, x : x + w, None]
    roi = image[y : y + h, x : x + w]
    roi *= 1.0 - a
    roi += a * color


def _absorb(image: np.ndarray, alpha: np.ndarray, transmission: np.ndarray) -> None:
    """``image *= 1 - alpha (1 - transmission)`` in place: something that absorbs (blood)
    darkens what is under it in proportion, whatever the retina's colour."""
    x, y, w, h = cv2.boundingRect((alpha > 1e-3).astype(np.uint8))
    if w == 0 or h == 0:
        return
    roi = image[y : y + h, x : x + w]
    roi *= 1.0 - alpha[y : y + h, x : x + w, None] * (1.0 - transmission)


LIGHT_RETINA = np.array([1.0, 0.50, 0.25], np.float32)
"""Reflectance of a lightly pigmented retina (orange-red)."""
DARK_RETINA = np.array([0.66, 0.24, 0.10], np.float32)
"""Reflectance of a heavily pigmented retina (dark red-brown)."""
VEIN = np.array([0.58, 0.28, 0.38], np.float32)
"""Light a vein lets through, per channel (blood absorbs green and blue most)."""
ARTERY = np.array([0.78, 0.46, 0.52], np.float32)
BLOOD = np.array([0.42, 0.14, 0.22], np.float32)
"""Light a haemorrhage or microaneurysm lets through."""


class FundusPainter:
    """Paint one fundus photograph and its lesion masks.

    Call :meth:`paint_anatomy` first, then any ``add_*`` methods, then :meth:`finish`.
    Each ``add_*`` returns what it drew (centres of the lesions, in pixels). :attr:`image` is
    the retina's reflectance until :meth:`finish` photographs it.
    """

    def __init__(self, geometry: FundusGeometry, rng: np.random.Generator) -> None:
        self.geometry = geometry
        self.camera = CAMERAS[geometry.camera]
        self.rng = rng
        h, w = geometry.height, geometry.width
        self.image = np.zeros((h, w, 3), np.float32)
        self.masks = {name: np.zeros((h, w), np.uint8) for name in MASKS}
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        self._yy, self._xx = yy, xx
        self._r = np.hypot(xx - geometry.center[0], yy - geometry.center[1]) / geometry.radius
        self.pigment = float(rng.beta(1.5, 1.5))
        """0: a lightly pigmented (orange, often tessellated) retina; 1: a dark one."""

    # ------------------------------------------------------------------ anatomy
    def paint_anatomy(self) -> None:
        """Retina, macula, optic disc and vessel tree (reflectance)."""
        self._paint_retina()
        self._paint_macula()
        self._paint_disc()
        self._paint_vessels()

    def _smooth_noise(self, cells: float, amplitude: float) -> np.ndarray:
        """Noise with about ``cells`` blobs across the field's diameter, standard deviation
        about ``amplitude``."""
        h, w = self.geometry.height, self.geometry.width
        across = max(2, round(cells * w / (2 * self.geometry.radius)))
        coarse = self.rng.normal(0, 1, (max(2, round(across * h / w)), across)).astype(np.float32)
        return amplitude * cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)

    def _paint_retina(self) -> None:
        p = self.pigment
        base = (1 - p) * LIGHT_RETINA + p * DARK_RETINA
        base = base * self.rng.uniform(0.93, 1.07, 3).astype(np.float32)
        shade = 1.0 + self._smooth_noise(5, 0.04) + self._smooth_noise(40, 0.025)
        self.image[:] = base * shade[..., None]
        tessellation = (1 - p) * self.rng.uniform(0.0, 0.45) if self.rng.random() < 0.6 else 0.0
        if tessellation > 0.02:  # choroidal vessels seen between darker pigmented spaces
            ridges = np.exp(-((self._smooth_noise(10, 1.0) / 0.7) ** 2))
            spaces = tessellation * (1.0 - ridges) * np.clip(self._r * 1.3, 0.35, 1.0)
            self.image *= 1.0 - spaces[..., None] * np.array([0.45, 0.8, 0.7], np.float32)

    def _gaussian(self, center: tuple[float, float], sigma: float) -> np.ndarray:
        """``exp(-|p - center|² / 2σ²)`` over the frame (as an outer product: fast)."""
        g = self.geometry
        across = np.exp(-((np.arange(g.width, dtype=np.float32) - center[0]) ** 2) / (2 * sigma**2))
        down = np.exp(-((np.arange(g.height, dtype=np.float32) - center[1]) ** 2) / (2 * sigma**2))
        return np.outer(down, across)

    def _paint_macula(self) -> None:
        dd = self.geometry.disc_diameter
        depth = self.rng.uniform(0.15, 0.3) + 0.2 * self.pigment
        dark = depth * self._gaussian(self.geometry.macula_center, self.rng.uniform(0.5, 0.8) * dd)
        dark += 0.3 * depth * self._gaussian(self.geometry.macula_center, 1.6 * dd)
        self.image *= 1.0 - dark[..., None] * np.array([0.9, 1.0, 1.0], np.float32)

    def _ellipse_layer(
        self, center: tuple[float, float], axes: tuple[float, float], angle: float
    ) -> np.ndarray:
        layer = np.zeros((self.geometry.height, self.geometry.width), np.uint8)
        cv2.ellipse(
            layer, _fixed(center), _fixed(axes), angle, 0, 360, 255, -1, cv2.LINE_AA, _SHIFT
        )
        return layer

    def _paint_disc(self) -> None:
        g = self.geometry
        rd = g.disc_radius
        tilt = self.rng.uniform(-15, 15)
        if self.rng.random() < 0.35:  # peripapillary atrophy: a pale crescent, temporal side
            crescent = self._ellipse_layer(
                (g.disc_center[0] - g.nasal * 0.25 * rd, g.disc_center[1]),
                (1.2 * rd, 1.25 * rd),
                tilt,
            ).astype(np.float32)
            strength = self.rng.uniform(0.3, 0.7)
            _blend(self.image, strength * crescent / 255.0, np.array([0.9, 0.62, 0.42], np.float32))
        disc = self._ellipse_layer(g.disc_center, (rd, rd * 1.1), tilt)
        self.masks["OD"] = (disc >= 128).astype(np.uint8)
        alpha = cv2.GaussianBlur(
            disc.astype(np.float32) / 255.0, (0, 0), self.rng.uniform(0.03, 0.1) * rd
        )
        jitter = self.rng.uniform(0.92, 1.05, 3).astype(np.float32)
        rim = np.array([1.0, 0.66, 0.4], np.float32) * jitter  # orange-pink to yellow
        _blend(self.image, self.rng.uniform(0.65, 0.92) * alpha, rim)
        ratio = g.cup_ratio
        cup_axes = (0.955 * ratio * rd, 1.1 * ratio * rd)  # the disc's vertical axis is 1.1·rd
        room = 0.5 * (rd - cup_axes[0])  # the cup stays inside the disc at any ratio
        shift = float(np.clip(-g.nasal * abs(self.rng.normal(0, 0.12 * rd)), -room, room))
        cup_center = (g.disc_center[0] + shift, g.disc_center[1])  # cups sit temporally
        cup = self._ellipse_layer(cup_center, cup_axes, tilt)
        self.masks["cup"] = (cup >= 128).astype(np.uint8) & self.masks["OD"]
        cup_alpha = cv2.GaussianBlur(cup.astype(np.float32) / 255.0, (0, 0), 0.15 * rd)
        pale = np.array([1.0, 0.9, 0.72], np.float32)
        _blend(self.image, self.rng.uniform(0.45, 0.8) * cup_alpha, pale)

    def _flow(self, point: tuple[float, float], heading: float, orbit: float, spin: float) -> float:
        """The heading an arcade vessel steers to at ``point``: around the fovea (``spin``
        +1/-1: the sense of turning) at distance ``orbit``, drawn back to the orbit."""
        fx, fy = self.geometry.macula_center
        dx, dy = point[0] - fx, point[1] - fy
        rho = max(math.hypot(dx, dy), 1e-6)
        tangent = math.atan2(dy, dx) + spin * math.pi / 2
        correction = min(0.5, max(-0.5, (rho - orbit) / orbit)) * spin * 1.4
        return _steer(heading, tangent + correction, 0.25)

    def _vessel_tree(
        self,
        layer: np.ndarray,
        reflex: np.ndarray | None,
        start: tuple[float, float],
        heading: float,
        thickness: float,
        orbit: float = 0.0,
        spin: float = 0.0,
    ) -> None:
        """One trunk and its branches: a curving random walk that tapers and forks.

        A trunk with an ``orbit`` (a temporal arcade) follows :meth:`_flow` around the
        macula for 110–150° of arc, then runs on towards the temporal periphery; branches
        keep their heading, drawn slowly away from the disc, with some wander. At a fork the
        two daughters share the parent's cross-section (Murray's law, ``r³ = r₁³ + r₂³``)
        and leave 35–75° apart. Vessels stop at the field's rim and short of the fovea.
        """
        g = self.geometry
        step = 0.02 * g.radius
        min_thickness = max(0.5, 0.004 * g.radius)
        fovea_free = 0.3 * g.disc_diameter
        temporal = 0.0 if g.nasal < 0 else math.pi
        fx, fy = g.macula_center
        cx, cy = g.center
        rim = 1.02 * g.radius
        sweep = math.radians(self.rng.uniform(110, 150))
        wander = iter(())
        stack = [(start, heading, thickness, orbit > 0, 0)]
        while stack:
            (x, y), angle, width, arcade, depth = stack.pop()
            travelled, swept = 0.0, 0.0
            next_fork = self.rng.uniform(0.8, 1.8) * g.disc_diameter
            while width > min_thickness:
                if arcade and swept < sweep:
                    angle = self._flow((x, y), angle, orbit, spin)
                    orbit *= 1.003  # the arcades open out as they go
                elif arcade:
                    angle = _steer(angle, temporal, 0.04)
                else:
                    outward = math.atan2(y - g.disc_center[1], x - g.disc_center[0])
                    angle = _steer(angle, outward, 0.03)
                noise = next(wander, None)
                if noise is None:
                    wander = iter(self.rng.normal(0, 0.07, 64).tolist())
                    noise = next(wander)
                angle += noise
                nx, ny = x + step * math.cos(angle), y + step * math.sin(angle)
                if math.hypot(nx - cx, ny - cy) > rim or math.hypot(nx - fx, ny - fy) < fovea_free:
                    break
                value = 255 if width >= 1 else round(255 * width)
                a, b = _fixed((x, y)), _fixed((nx, ny))
                cv2.line(layer, a, b, value, max(1, round(width)), cv2.LINE_AA, _SHIFT)
                if reflex is not None and width >= 3:
                    cv2.line(reflex, a, b, 255, 1, cv2.LINE_AA, _SHIFT)
                if arcade:
                    swept += abs(_wrap(math.atan2(ny - fy, nx - fx) - math.atan2(y - fy, x - fx)))
                x, y = nx, ny
                travelled += step
                width *= 0.993 if arcade else 0.985
                if travelled >= next_fork and depth < 3:
                    travelled, next_fork = 0.0, self.rng.uniform(0.8, 1.8) * g.disc_diameter
                    share = self.rng.uniform(0.2, 0.45)  # the daughter's share of r³
                    child = width * share ** (1 / 3)
                    width *= (1 - share) ** (1 / 3)
                    turn = self.rng.choice([-1.0, 1.0]) * self.rng.uniform(0.6, 1.3)
                    stack.append(((x, y), angle + turn, child, False, depth + 1))
                    angle -= 0.3 * turn

    def _paint_vessels(self) -> None:
        g = self.geometry
        h, w = g.height, g.width
        dd = g.disc_diameter
        veins = np.zeros((h, w), np.uint8)
        arteries = np.zeros((h, w), np.uint8)
        reflex = np.zeros((h, w), np.uint8)
        fovea_distance = np.hypot(
            g.disc_center[0] - g.macula_center[0], g.disc_center[1] - g.macula_center[1]
        )
        vein_width = 0.085 * dd * self.rng.uniform(0.85, 1.15)
        temporal = -g.nasal
        for vertical in (-1.0, 1.0):  # superior (up) and inferior (down) trunks
            spin = vertical * g.nasal  # the arcades turn around the macula (+1: clockwise)
            for layer, width, shift in (
                (veins, vein_width, 0.0),
                (arteries, 0.7 * vein_width, 0.1),
            ):
                orbit = fovea_distance * self.rng.uniform(0.8, 0.95) * (1 + shift)
                heading = np.arctan2(vertical, temporal * self.rng.uniform(0.05, 0.35))
                start = (
                    g.disc_center[0] + self.rng.normal(0, 0.06 * dd),
                    g.disc_center[1] + vertical * 0.05 * dd,
                )
                target = reflex if layer is arteries else None
                self._vessel_tree(layer, target, start, heading, width, orbit, spin)
                nasal_heading = np.arctan2(vertical * self.rng.uniform(0.6, 1.6), g.nasal)
                self._vessel_tree(layer, target, start, nasal_heading, 0.6 * width, 0.0, 0.0)
        if self.rng.random() < 0.7:  # a small trunk towards the macula
            heading = np.arctan2(self.rng.normal(0, 0.2), temporal)
            self._vessel_tree(arteries, None, g.disc_center, heading, 0.3 * vein_width, 0.0, 0.0)
        for layer, transmission in ((veins, VEIN), (arteries, ARTERY)):
            alpha = cv2.GaussianBlur(layer.astype(np.float32) / 255.0, (0, 0), 0.5)
            _absorb(self.image, alpha, transmission * self.rng.uniform(0.9, 1.1))
        _blend(
            self.image,
            0.25 * reflex.astype(np.float32) / 255.0,
            np.array([0.95, 0.75, 0.6], np.float32),
        )

    # ------------------------------------------------------------------ lesions
    def point_around(
        self,
        center: tuple[float, float],
        min_dist: float,
        max_dist: float,
        avoid_disc: bool = True,
    ) -> tuple[float, float]:
        """A random point at ``min_dist``–``max_dist`` px from ``center``, inside the field.

        Uniform over the annulus; points on the optic disc are rejected when ``avoid_disc``.
        After 100 rejected draws the centre itself is returned.
        """
        g = self.geometry
        for _ in range(100):
            rho = np.sqrt(self.rng.uniform(min_dist**2, max_dist**2))
            theta = self.rng.uniform(0, 2 * np.pi)
            p = (center[0] + rho * np.cos(theta), center[1] + rho * np.sin(theta))
            inside = np.hypot(p[0] - g.center[0], p[1] - g.center[1]) < 0.9 * g.radius
            inside = inside and 2 <= p[0] < g.width - 2 and 2 <= p[1] < g.height - 2
            on_disc = (
                np.hypot(p[0] - g.disc_center[0], p[1] - g.disc_center[1]) < 1.6 * g.disc_radius
            )
            if inside and not (avoid_disc and on_disc):
                return p
        return center

    def _pole_point(self, extent: float) -> tuple[float, float]:
        """A point of the posterior pole: within ``extent`` field radii of the macula."""
        return self.point_around(self.geometry.macula_center, 0.0, extent * self.geometry.radius)

    def _mark(self, name: str, layer: np.ndarray, soften: float = 0.0) -> np.ndarray:
        """Add ``layer >= 128`` to the mask ``name``; return the layer as an alpha map."""
        self.masks[name] |= (layer >= 128).astype(np.uint8)
        alpha = layer.astype(np.float32) / 255.0
        return cv2.GaussianBlur(alpha, (0, 0), soften) if soften > 0 else alpha

    def _stamp(
        self,
        name: str,
        layer: np.ndarray,
        color: tuple[float, float, float],
        opacity: float,
        soften: float = 0.0,
    ) -> None:
        """A deposit: mask ``layer >= 128``, painted over the retina in ``color``."""
        alpha = self._mark(name, layer, soften)
        _blend(self.image, opacity * alpha, np.array(color, np.float32))

    def add_microaneurysms(self, count: int) -> list[tuple[float, float]]:
        """Tiny dark-red dots (radius about 1.2% of the field radius, at least 1 px)."""
        layer = np.zeros((self.geometry.height, self.geometry.width), np.uint8)
        centres = [self._pole_point(0.75) for _ in range(count)]
        for c in centres:
            r = max(1.0, self.geometry.radius * self.rng.uniform(0.010, 0.015))
            cv2.circle(layer, _fixed(c), round(r * _ONE), 255, -1, cv2.LINE_AA, _SHIFT)
        _absorb(self.image, 0.95 * self._mark("MA", layer), BLOOD)
        return centres

    def add_haemorrhages(self, count: int) -> list[tuple[float, float]]:
        """Dark-red blots: each the union of two to four overlapping ellipses."""
        layer = np.zeros((self.geometry.height, self.geometry.width), np.uint8)
        centres = [self._pole_point(0.8) for _ in range(count)]
        for c in centres:
            size = self.geometry.radius * self.rng.uniform(0.025, 0.05)
            for _ in range(self.rng.integers(2, 5)):
                offset = self.rng.normal(0, 0.35 * size, 2)
                axes = (size * self.rng.uniform(0.5, 1.0), size * self.rng.uniform(0.4, 0.9))
                cv2.ellipse(
                    layer,
                    _fixed((c[0] + offset[0], c[1] + offset[1])),
                    _fixed(axes),
                    self.rng.uniform(0, 180),
                    0,
                    360,
                    255,
                    -1,
                    cv2.LINE_AA,
                    _SHIFT,
                )
        _absorb(self.image, 0.9 * self._mark("HE", layer, soften=0.6), BLOOD)
        return centres

    def add_exudate_cluster(self, center: tuple[float, float]) -> list[tuple[float, float]]:
        """Bright yellow specks scattered around ``center``; returns the speck centres."""
        layer = np.zeros((self.geometry.height, self.geometry.width), np.uint8)
        spread = 0.08 * self.geometry.radius
        specks = [self.point_around(center, 0.0, spread) for _ in range(self.rng.integers(4, 12))]
        for c in specks:
            r = max(1.0, self.geometry.radius * self.rng.uniform(0.008, 0.02))
            cv2.circle(layer, _fixed(c), round(r * _ONE), 255, -1, cv2.LINE_AA, _SHIFT)
        self._stamp("EX", layer, (1.0, 0.9, 0.4), 0.95)
        return specks

    def add_soft_exudates(self, count: int) -> list[tuple[float, float]]:
        """Pale, fuzzy cotton-wool patches (mask: the patch before softening)."""
        layer = np.zeros((self.geometry.height, self.geometry.width), np.uint8)
        centres = [self._pole_point(0.7) for _ in range(count)]
        size = 0.0
        for c in centres:
            size = self.geometry.radius * self.rng.uniform(0.045, 0.08)
            axes = (size, size * self.rng.uniform(0.6, 0.9))
            cv2.ellipse(
                layer,
                _fixed(c),
                _fixed(axes),
                self.rng.uniform(0, 180),
                0,
                360,
                255,
                -1,
                cv2.LINE_AA,
                _SHIFT,
            )
        self._stamp("SE", layer, (0.95, 0.88, 0.74), 0.8, soften=max(0.5, 0.25 * size))
        return centres

    def add_drusen(self, count: int) -> list[tuple[float, float]]:
        """Small yellowish deposits within about 1.5 disc diameters of the fovea (age-related
        macular degeneration): hard drusen 0.4–0.9% of the field radius, soft ones up to 2%,
        with soft edges (mask: the deposits before softening)."""
        layer = np.zeros((self.geometry.height, self.geometry.width), np.uint8)
        reach = 1.5 * self.geometry.disc_diameter
        centres = [self.point_around(self.geometry.macula_center, 0.0, reach) for _ in range(count)]
        for c in centres:
            soft = self.rng.random() < 0.4
            r = self.geometry.radius * self.rng.uniform(*((0.004, 0.009), (0.01, 0.02))[soft])
            cv2.circle(layer, _fixed(c), round(max(1.0, r) * _ONE), 255, -1, cv2.LINE_AA, _SHIFT)
        soften = max(0.5, 0.004 * self.geometry.radius)
        self._stamp("drusen", layer, (0.97, 0.82, 0.5), 0.75, soften=soften)
        return centres

    def add_neovascularisation(self) -> None:
        """A tangle of fine, tortuous vessels on and around the disc (no mask)."""
        layer = np.zeros((self.geometry.height, self.geometry.width), np.uint8)
        for _ in range(self.rng.integers(3, 6)):
            x, y = self.point_around(
                self.geometry.disc_center, 0.0, self.geometry.disc_radius, avoid_disc=False
            )
            angle = self.rng.uniform(0, 2 * np.pi)
            for _ in range(12):
                angle += self.rng.normal(0, 0.9)
                nx = x + 0.02 * self.geometry.radius * np.cos(angle)
                ny = y + 0.02 * self.geometry.radius * np.sin(angle)
                cv2.line(layer, _fixed((x, y)), _fixed((nx, ny)), 255, 1, cv2.LINE_AA, _SHIFT)
                x, y = nx, ny
        _absorb(self.image, 0.7 * layer.astype(np.float32) / 255.0, ARTERY)

    # ------------------------------------------------------------------ photograph
    def _illumination(self) -> np.ndarray:
        """Light reaching each pixel: vignetting towards the rim, a gradient across the field,
        a broad bright spot and, sometimes, a dark crescent where the pupil shades the rim."""
        g, rng = self.geometry, self.rng
        r = np.clip(self._r, 0.0, 1.2)
        light = 1.0 - rng.uniform(0.25, 0.65) * r ** rng.uniform(2.0, 3.5)
        direction = rng.uniform(0, 2 * np.pi)
        along = (
            (self._xx - g.center[0]) * np.cos(direction)
            + (self._yy - g.center[1]) * np.sin(direction)
        ) / g.radius
        light *= 1.0 + rng.uniform(0.0, 0.3) * along
        spot = self.point_around(g.center, 0.0, 0.5 * g.radius, avoid_disc=False)
        light *= 1.0 + rng.uniform(0.0, 0.3) * self._gaussian(
            spot, rng.uniform(0.3, 0.6) * g.radius
        )
        if rng.random() < 0.15:  # the pupil shades one side: light from an offset circle
            angle = rng.uniform(0, 2 * np.pi)
            shift = rng.uniform(0.15, 0.35) * g.radius
            lit = (g.center[0] + shift * np.cos(angle), g.center[1] + shift * np.sin(angle))
            outside = np.hypot(self._xx - lit[0], self._yy - lit[1]) / g.radius - 0.95
            light *= 1.0 - 0.85 * np.clip(outside / 0.2, 0.0, 1.0)
        return light

    def _reflections(self) -> np.ndarray:
        """Specular light, white-bluish: the nerve-fibre sheen along the arcades, a foveal
        reflex, a young retina's patchy sheen and lens flare at the rim (none is the disc)."""
        g, rng = self.geometry, self.rng
        dd = g.disc_diameter
        sheen = np.zeros((g.height, g.width), np.float32)
        dx, dy = self._xx - g.disc_center[0], self._yy - g.disc_center[1]
        around = np.arctan2(dy, dx)
        vertical = np.abs(np.sin(around))
        if rng.random() < 0.6:  # radial striations above and below the disc
            rho = np.hypot(dx, dy) / dd
            phase = around * rng.uniform(40, 70) + self._smooth_noise(8, 2.0)
            band = np.exp(-(((rho - 1.4) / 0.7) ** 2)) * vertical**2
            sheen += rng.uniform(0.015, 0.06) * (0.5 + 0.5 * np.sin(phase)) ** 3 * band
        if rng.random() < 0.5:
            sheen += rng.uniform(0.1, 0.4) * self._gaussian(g.macula_center, 0.04 * dd)
        if rng.random() < 0.3:  # a young retina's glistening, in patches near the arcades
            near = np.exp(-(((np.hypot(dx, dy) / dd - 2.0) / 1.2) ** 2)) * vertical**2
            patches = np.clip(self._smooth_noise(16, 1.0) - 0.4, 0.0, None)
            sheen += rng.uniform(0.04, 0.12) * patches * near
        if rng.random() < 0.2:
            angle = rng.uniform(0, 2 * np.pi)
            at = (
                g.center[0] + 0.92 * g.radius * np.cos(angle),
                g.center[1] + 0.92 * g.radius * np.sin(angle),
            )
            sheen += rng.uniform(0.2, 0.6) * self._gaussian(at, rng.uniform(0.1, 0.25) * g.radius)
        return sheen

    def finish(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Photograph the retina: the ``uint8 [H, W, 3]`` photograph and the ``uint8`` 0/1
        masks (:data:`MASKS`: the lesions, ``cup`` inside ``OD``, ``drusen``), cut to the
        field (and its notch, if the camera has one)."""
        g, rng, cam = self.geometry, self.rng, self.camera
        exposure = float(np.exp(rng.uniform(np.log(0.45), np.log(1.3))))  # under-exposed too
        light = self._illumination()
        image = self.image * (exposure * light)[..., None]
        image += (self._reflections() * light)[..., None] * np.array([0.9, 0.95, 1.0], np.float32)
        if rng.random() < 0.25:  # lens haze: a veil of scattered light, lower contrast
            veil = rng.uniform(0.1, 0.35)
            haze = np.array([0.8, 0.62, 0.45], np.float32) * exposure * float(np.median(light))
            image = (
                image * (1 - veil)
                + veil * haze * cv2.GaussianBlur(light, (0, 0), 0.3 * g.radius)[..., None]
            )
        white_balance = np.array(cam.tint, np.float32) * rng.uniform(0.92, 1.08, 3).astype(
            np.float32
        )
        image = np.clip(image * white_balance, 0.0, None) ** (1.0 / rng.uniform(0.85, 1.2))
        blur = _uniform(rng, cam.blur) * 1e-3 * g.radius * (2.0 if rng.random() < 0.15 else 1.0)
        image = cv2.GaussianBlur(image, (0, 0), max(0.3, blur))
        image += rng.normal(0, rng.uniform(0.004, 0.015), image.shape).astype(np.float32)
        edge = 1.5 / g.radius
        field = np.clip((1.0 - self._r) / edge + 0.5, 0.0, 1.0)
        if rng.random() < cam.notch:
            field = self._cut_notch(field)
        surround = rng.uniform(0.0, 0.025)
        image = image * field[..., None] + surround * (1.0 - field[..., None])
        photo = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        if rng.random() < cam.label:
            self._write_label(photo, field)
        inside = (field > 0.5).astype(np.uint8)
        return photo, {name: mask & inside for name, mask in self.masks.items()}

    def _cut_notch(self, field: np.ndarray) -> np.ndarray:
        """A small square tab of the surround cut into the rim at the camera's angle."""
        g = self.geometry
        angle = np.radians(self.camera.notch_angle)
        x = g.center[0] + g.radius * np.cos(angle)
        y = g.center[1] - g.radius * np.sin(angle)
        half = 0.05 * g.radius
        notch = (np.abs(self._xx - x) < half) & (np.abs(self._yy - y) < half)
        return np.where(notch, 0.0, field)

    def _write_label(self, photo: np.ndarray, field: np.ndarray) -> None:
        """A short text (eye, date) in a corner of the surround, if one is free."""
        h, w = photo.shape[:2]
        scale = 0.0016 * h
        text = (
            "OD " if self.geometry.nasal > 0 else "OS "
        ) + f"20{self.rng.integers(10, 25)}-0{self.rng.integers(1, 10)}"
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        for x, y in ((2, th + 2), (w - tw - 2, h - 3), (2, h - 3), (w - tw - 2, th + 2)):
            if x >= 0 and field[max(0, y - th) : y + 1, x : x + tw].max() < 0.01:
                grey = int(self.rng.integers(150, 256))
                cv2.putText(
                    photo,
                    text,
                    (x, y),
                    cv2.FONT_HERSHEY_SIMPLEX,
                    scale,
                    (grey,) * 3,
                    1,
                    cv2.LINE_AA,
                )
                return
