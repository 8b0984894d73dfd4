"""Procedural macular OCT volumes: B-scans with layered retina, foveal pit and speckle.

:func:`paint_oct_volume` draws a stack of ``n`` B-scans (the slow axis crosses the macula)
as ``uint8 [n, H, W]`` grey images. Each B-scan shows, from top to bottom: the dark vitreous,
the retinal layers with their usual OCT reflectivity — nerve-fibre layer (RNFL, bright),
ganglion cell layer (GCL), inner plexiform (IPL), inner nuclear (INL, dark), outer plexiform
(OPL), outer nuclear (ONL, dark), the photoreceptor line (IS/OS, bright) and the retinal
pigment epithelium (RPE, brightest) — then the choroid fading into darkness. The retina is
curved and tilted; the inner layers thin to a pit at the fovea (the ONL thickens there); the
RNFL is thicker on the nasal side (towards the optic disc) and absent at the fovea. Speckle is
multiplicative gamma noise, as in real OCT, plus a little additive noise.

The RNFL thickness is scaled by :attr:`RetinaAnatomy.rnfl` (1 = a healthy eye's mean): this is
what glaucoma thins and what a model must read. A *degraded* volume (low signal strength) has
its signal dimmed, full-strength speckle and strong additive noise.

Thicknesses are given in pixels of a B-scan 128 pixels high (the depth range is cropped to the
retina, unlike the real 992-pixel scans) and scale with the height.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REFERENCE_HEIGHT = 128
LAYERS: tuple[tuple[str, float, float], ...] = (
    # name, thickness (px at REFERENCE_HEIGHT, away from the fovea), reflectivity
    ("RNFL", 9.0, 0.80),
    ("GCL", 7.0, 0.42),
    ("IPL", 5.0, 0.62),
    ("INL", 5.0, 0.28),
    ("OPL", 3.0, 0.58),
    ("ONL", 10.0, 0.18),
    ("ISOS", 2.5, 0.85),
    ("RPE", 3.5, 1.00),
)
PIT_THINNING = {"RNFL": 0.97, "GCL": 0.9, "IPL": 0.85, "INL": 0.7, "OPL": 0.5, "ONL": -0.35}
"""Relative thinning of each layer at the foveal centre (negative: thickening)."""
VITREOUS = 0.04
CHOROID = (14.0, 0.55)
"""Choroid thickness (px at REFERENCE_HEIGHT) and reflectivity at its top (it fades with depth)."""


@dataclass(frozen=True)
class RetinaAnatomy:
    """One eye's macular OCT geometry.

    ``rnfl``: RNFL thickness relative to a healthy eye's mean; ``nasal``: +1 when the nasal side
    (towards the disc) is on the right of the B-scans, −1 on the left; ``fovea``: the pit's
    centre in ``[-1, 1]²`` (fast axis, slow axis); ``layer_scale``: per-layer thickness factors
    of this eye; ``curvature``, ``tilt``: shape of the RPE; ``depth``: RPE depth as a fraction
    of the height at the centre (the retina curves up towards the edges).
    """

    rnfl: float
    nasal: float
    fovea: tuple[float, float]
    layer_scale: tuple[float, ...]
    curvature: float
    tilt: float
    depth: float

    @classmethod
    def sample(cls, rng: np.random.Generator, rnfl: float, nasal: float) -> RetinaAnatomy:
        """An eye with the given RNFL factor and side, the rest jittered."""
        return cls(
            rnfl=float(rnfl),
            nasal=float(nasal),
            fovea=(float(rng.normal(0, 0.06)), float(rng.normal(0, 0.06))),
            layer_scale=tuple(float(s) for s in rng.normal(1.0, 0.05, len(LAYERS))),
            curvature=float(rng.uniform(0.02, 0.07)),
            tilt=float(rng.normal(0, 0.03)),
            depth=float(rng.uniform(0.68, 0.74)),
        )


def layer_thickness(
    anatomy: RetinaAnatomy, name: str, x: np.ndarray, pit: np.ndarray
) -> np.ndarray:
    """Thickness map (px at :data:`REFERENCE_HEIGHT`) of layer ``name`` over positions ``x``
    (fast axis, ``[-1, 1]``) with the foveal pit profile ``pit`` (1 at the centre)."""
    index = [layer[0] for layer in LAYERS].index(name)
    base = LAYERS[index][1] * anatomy.layer_scale[index]
    if name == "RNFL":
        base = base * anatomy.rnfl * (0.7 + 0.3 * anatomy.nasal * x)
    return base * (1.0 - PIT_THINNING.get(name, 0.0) * pit)


def paint_oct_volume(
    rng: np.random.Generator,
    anatomy: RetinaAnatomy,
    num_scans: int,
    width: int = 64,
    height: int = 128,
    degraded: bool = False,
) -> np.ndarray:
    """``uint8 [num_scans, height, width]`` B-scans of ``anatomy`` (slice ``k`` at slow-axis
    position ``-1 + 2k / (num_scans - 1)``); ``degraded`` gives a low-signal, noisy volume."""
    scale = height / REFERENCE_HEIGHT
    x = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    y = np.linspace(-1.0, 1.0, max(num_scans, 1), dtype=np.float32)[:num_scans, None]
    r2 = (x - anatomy.fovea[0]) ** 2 + (y - anatomy.fovea[1]) ** 2
    pit = np.exp(-r2 / (2 * 0.14**2))
    rpe_bottom = height * (anatomy.depth - anatomy.curvature * (x**2 + y**2) + anatomy.tilt * x)
    rows = np.arange(height, dtype=np.float32)[None, :, None]  # [1, H, 1]
    signal = np.full((num_scans, height, width), VITREOUS, np.float32)
    bottom = rpe_bottom[:, None, :]  # [n, 1, W]
    edge = bottom
    for name, _, reflectivity in reversed(LAYERS):
        top = edge - scale * layer_thickness(anatomy, name, x, pit)[:, None, :]
        cover = np.clip(np.minimum(rows + 1, edge) - np.maximum(rows, top), 0.0, 1.0)
        signal += cover * (reflectivity - VITREOUS)
        edge = top
    thickness, reflectivity = CHOROID
    below = rows + 0.5 - bottom
    choroid = reflectivity * np.exp(-np.clip(below, 0, None) / (0.5 * scale * thickness))
    signal += np.where(below > 0, choroid - VITREOUS, 0.0)
    shape = signal.shape
    if degraded:
        signal = 0.35 * signal * rng.gamma(1.0, 1.0, shape) + rng.normal(0, 0.12, shape)
    else:
        signal = signal * rng.gamma(2.5, 1 / 2.5, shape) + rng.normal(0, 0.02, shape)
    grey = np.clip(signal, 0.0, 1.0) ** 0.8
    return (grey * 255.0 + 0.5).astype(np.uint8)
