"""Procedural colour fundus photographs with pixel-exact lesion masks.

A :class:`FundusPainter` draws, in this order: the dark circular field (clipped at the top and
bottom like IDRiD's 4288×2848 photographs), an orange-red retina with vignetting and choroidal
texture, a darker macula, a bright optic disc with its cup, a branching vessel tree leaving the
disc (arcades curving around the macula), and then lesions on request:

==================  ============================================  ==========
lesion              look                                          mask
==================  ============================================  ==========
microaneurysm (MA)  tiny dark-red dot                             ``MA``
haemorrhage (HE)    larger dark-red blot (union of ellipses)      ``HE``
hard exudate (EX)   cluster of bright yellow specks               ``EX``
soft exudate (SE)   pale, fuzzy cotton-wool patch                 ``SE``
neovascularisation  tangle of fine vessels near the disc          (none)
==================  ============================================  ==========

Sizes scale with the field radius, so the same picture comes out at any resolution; the
smallest lesions are about 2 px across at 384×256. Every random choice comes from the
``numpy.random.Generator`` given to the painter.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

LESIONS = ("MA", "HE", "EX", "SE", "OD")
_SHIFT = 4  # cv2 fixed-point bits: coordinates and radii are passed in 1/16 pixel
_ONE = 1 << _SHIFT


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

    @property
    def disc_diameter(self) -> float:
        return 2.0 * self.disc_radius

    @classmethod
    def sample(
        cls, rng: np.random.Generator, width: int, height: int, cup_ratio: float = 0.44
    ) -> FundusGeometry:
        """A macula-centred view of a left or right eye with a little jitter."""
        radius = 0.41 * width * rng.uniform(0.97, 1.03)
        cx = width / 2 + rng.normal(0, 0.01 * width)
        cy = height / 2 + rng.normal(0, 0.01 * height)
        side = 1.0 if rng.random() < 0.5 else -1.0  # disc on the right (right eye) or left
        disc = (cx + side * radius * rng.uniform(0.48, 0.56), cy + rng.normal(0, 0.04 * radius))
        macula = (cx - side * radius * rng.uniform(0.0, 0.06), cy + rng.normal(0, 0.03 * radius))
        disc_radius = radius * rng.uniform(0.11, 0.13)
        return cls(width, height, (cx, cy), radius, disc, disc_radius, macula, cup_ratio)


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


class FundusPainter:
    """Paint one fundus photograph and its lesion masks.

    Call :meth:`paint_anatomy` first, then any ``add_*`` methods, then :meth:`finish`.
    Each ``add_*`` returns what it drew (centres of the lesions, in pixels).
    """

    def __init__(self, geometry: FundusGeometry, rng: np.random.Generator) -> None:
        self.geometry = geometry
        self.rng = rng
        h, w = geometry.height, geometry.width
        self.image = np.zeros((h, w, 3), np.float32)
        self.masks = {name: np.zeros((h, w), np.uint8) for name in (*LESIONS, "cup")}
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        self._yy, self._xx = yy, xx
        self._r = np.hypot(xx - geometry.center[0], yy - geometry.center[1]) / geometry.radius

    # ------------------------------------------------------------------ anatomy
    def paint_anatomy(self) -> None:
        """Retina, macula, optic disc and vessel tree."""
        self._paint_retina()
        self._paint_macula()
        self._paint_disc()
        self._paint_vessels()

    def _smooth_noise(self, cells: int, amplitude: float) -> np.ndarray:
        h, w = self.geometry.height, self.geometry.width
        coarse = self.rng.normal(0, 1, (max(2, h * cells // w), cells)).astype(np.float32)
        return amplitude * cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)

    def _paint_retina(self) -> None:
        base = np.array([0.80, 0.34, 0.12], np.float32) * self.rng.uniform(0.85, 1.1, 3)
        shade = 1.0 - 0.42 * np.clip(self._r, 0, 1.2) ** 2.2
        shade = shade + self._smooth_noise(24, 0.03) + self._smooth_noise(6, 0.035)
        self.image[:] = base * shade[..., None]

    def _gaussian(self, center: tuple[float, float], sigma: float) -> np.ndarray:
        d2 = (self._xx - center[0]) ** 2 + (self._yy - center[1]) ** 2
        return np.exp(-d2 / (2 * sigma**2))

    def _paint_macula(self) -> None:
        dark = 0.3 * self._gaussian(self.geometry.macula_center, 0.13 * self.geometry.radius)
        self.image *= (1.0 - dark)[..., None]

    def _ellipse_layer(
        self, center: tuple[float, float], axes: tuple[float, float], angle: float
    ) -> np.ndarray:
        layer = np.zeros((self.geometry.height, self.geometry.width), np.uint8)
        cv2.ellipse(
            layer, _fixed(center), _fixed(axes), angle, 0, 360, 255, -1, cv2.LINE_AA, _SHIFT
        )
        return layer

    def _paint_disc(self) -> None:
        rd = self.geometry.disc_radius
        tilt = self.rng.uniform(-15, 15)
        disc = self._ellipse_layer(self.geometry.disc_center, (rd, rd * 1.1), tilt)
        self.masks["OD"] = (disc >= 128).astype(np.uint8)
        alpha = cv2.GaussianBlur(disc.astype(np.float32) / 255.0, (0, 0), 0.12 * rd)
        _blend(self.image, 0.95 * alpha, np.array([0.97, 0.78, 0.47], np.float32))
        ratio = self.geometry.cup_ratio
        cup_axes = (0.955 * ratio * rd, 1.1 * ratio * rd)  # the disc's vertical axis is 1.1·rd
        room = 0.5 * (rd - cup_axes[0])  # the cup stays inside the disc at any ratio
        shift = float(np.clip(self.rng.normal(0, 0.1 * rd), -room, room))
        cup_center = (self.geometry.disc_center[0] + shift, self.geometry.disc_center[1])
        cup = self._ellipse_layer(cup_center, cup_axes, tilt)
        self.masks["cup"] = (cup >= 128).astype(np.uint8) & self.masks["OD"]
        cup_alpha = cv2.GaussianBlur(cup.astype(np.float32) / 255.0, (0, 0), 0.15 * rd)
        _blend(self.image, 0.8 * cup_alpha, np.array([1.0, 0.93, 0.76], np.float32))

    def _walk(
        self,
        layer: np.ndarray,
        start: tuple[float, float],
        angle: float,
        thickness: float,
        bend: float,
        depth: int,
    ) -> None:
        """One vessel: a curving random walk that thins and spawns branches."""
        step = 0.025 * self.geometry.radius
        x, y = start
        min_thickness = max(0.6, 0.004 * self.geometry.radius)
        fovea = 0.12 * self.geometry.radius
        while thickness > min_thickness:
            angle += bend + self.rng.normal(0, 0.08)
            nx, ny = x + step * np.cos(angle), y + step * np.sin(angle)
            outside = (
                np.hypot(nx - self.geometry.center[0], ny - self.geometry.center[1])
                > 1.02 * self.geometry.radius
            )
            foveal = (
                np.hypot(nx - self.geometry.macula_center[0], ny - self.geometry.macula_center[1])
                < fovea
            )
            if outside or foveal:
                return
            width = max(1, round(thickness))
            cv2.line(layer, _fixed((x, y)), _fixed((nx, ny)), 255, width, cv2.LINE_AA, _SHIFT)
            x, y = nx, ny
            thickness *= 0.975
            bend *= 0.98
            if depth < 3 and self.rng.random() < 0.07:
                turn = self.rng.choice([-1.0, 1.0]) * self.rng.uniform(0.4, 0.9)
                child_bend = bend * 0.5 + self.rng.normal(0, 0.02)
                self._walk(layer, (x, y), angle + turn, thickness * 0.65, child_bend, depth + 1)

    def _paint_vessels(self) -> None:
        layer = np.zeros((self.geometry.height, self.geometry.width), np.uint8)
        temporal = np.sign(self.geometry.macula_center[0] - self.geometry.disc_center[0]) or 1.0
        main = 0.022 * self.geometry.radius
        # arcades: leave the disc upwards/downwards and bend towards (and around) the macula
        for vertical in (-1.0, 1.0):
            for toward, thickness, bend in ((1.0, main, 0.045), (-1.0, 0.7 * main, 0.02)):
                heading = np.arctan2(vertical, toward * temporal * 0.35)
                turn = -vertical * toward * temporal * bend
                self._walk(layer, self.geometry.disc_center, heading, thickness, turn, 0)
        alpha = cv2.GaussianBlur(layer.astype(np.float32) / 255.0, (0, 0), 0.5)
        _blend(self.image, 0.8 * alpha, np.array([0.50, 0.09, 0.06], np.float32))

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

    def _stamp(
        self,
        name: str,
        layer: np.ndarray,
        color: tuple[float, float, float],
        opacity: float,
        soften: float = 0.0,
    ) -> None:
        self.masks[name] |= (layer >= 128).astype(np.uint8)
        alpha = layer.astype(np.float32) / 255.0
        if soften > 0:
            alpha = cv2.GaussianBlur(alpha, (0, 0), soften)
        _blend(self.image, opacity * alpha, np.array(color, np.float32))

    def add_microaneurysms(self, count: int) -> list[tuple[float, float]]:
        """Tiny dark-red dots (radius about 1.2% of the field radius, at least 1 px)."""
        layer = np.zeros((self.geometry.height, self.geometry.width), np.uint8)
        centres = [self._pole_point(0.75) for _ in range(count)]
        for c in centres:
            r = max(1.0, self.geometry.radius * self.rng.uniform(0.010, 0.015))
            cv2.circle(layer, _fixed(c), round(r * _ONE), 255, -1, cv2.LINE_AA, _SHIFT)
        self._stamp("MA", layer, (0.36, 0.04, 0.03), 0.95)
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
        self._stamp("HE", layer, (0.42, 0.05, 0.04), 0.9, soften=0.6)
        return centres

    def add_exudate_cluster(self, center: tuple[float, float]) -> list[tuple[float, float]]:
        """Bright yellow specks scattered around ``center``; returns the speck centres."""
        layer = np.zeros((self.geometry.height, self.geometry.width), np.uint8)
        spread = 0.08 * self.geometry.radius
        specks = [self.point_around(center, 0.0, spread) for _ in range(self.rng.integers(4, 12))]
        for c in specks:
            r = max(1.0, self.geometry.radius * self.rng.uniform(0.008, 0.02))
            cv2.circle(layer, _fixed(c), round(r * _ONE), 255, -1, cv2.LINE_AA, _SHIFT)
        self._stamp("EX", layer, (1.0, 0.9, 0.35), 0.95)
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
        _blend(
            self.image,
            0.7 * layer.astype(np.float32) / 255.0,
            np.array([0.6, 0.1, 0.08], np.float32),
        )

    # ------------------------------------------------------------------ output
    def finish(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The ``uint8 [H, W, 3]`` photograph and the ``uint8`` 0/1 masks (the lesions and
        ``cup``, the optic cup inside ``OD``), cut to the field."""
        image = cv2.GaussianBlur(self.image, (0, 0), 0.5)
        image += self.rng.normal(0, 0.012, image.shape).astype(np.float32)
        edge = 1.5 / self.geometry.radius
        field = np.clip((1.0 - self._r) / edge + 0.5, 0.0, 1.0)
        image = image * field[..., None] + 0.012 * (1.0 - field[..., None])
        photo = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        inside = (field > 0.5).astype(np.uint8)
        return photo, {name: mask & inside for name, mask in self.masks.items()}
