"""Write a synthetic four-view mammography replica as a ``multiview_csv`` table and images.

``make_mammography_replica(root)`` writes ``cases.csv`` (one row per case) and grey PNG images
``images/<case>/<view>.png`` for the four standard views — left/right breast × cranio-caudal
(CC) and medio-lateral oblique (MLO) — plus mass masks ``masks/<case>/<view>.png`` (0/255) for
the CC views. Each view shows a breast outline against the dark background (chest wall on the
left for the right breast, mirrored for the left; the MLO views add the pectoral muscle in the
upper corner), fatty tissue with fibroglandular texture, and the case's findings:

============== ============================================================================
label           how it shows
============== ============================================================================
``density``     breast density A–D (BI-RADS style): share of bright fibroglandular tissue
                (about 10 / 30 / 55 / 80 %) in all four views
``mass``        0/1: a bright blob with an irregular margin in *one* breast, visible in both
                views of that side (its CC mask in ``<side>_CC_mask``)
``calcification`` 0/1: a cluster of tiny bright specks in one breast, both views of that side
``age``         years, regression; denser breasts are younger on average
============== ============================================================================

Each view is missing (empty cell, no file) with probability ``missing_view`` — never all four —
so a finding may be visible in one view of its side only; each label is missing with
probability ``missing_label`` (empty cell). A ``split`` column says ``train`` or ``test``.
Everything is a function of ``seed``: case ``i`` has its own random stream.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from moekit.errors import DataError

VIEWS = ("L_CC", "L_MLO", "R_CC", "R_MLO")
DENSITY = ("A", "B", "C", "D")
DENSITY_PRIOR = (0.1, 0.4, 0.4, 0.1)
DENSE_SHARE = (0.10, 0.30, 0.55, 0.80)
CSV_NAME = "cases.csv"
MASK_VIEWS = ("L_CC", "R_CC")


@dataclass(frozen=True)
class Finding:
    """A mass or calcification cluster: its breast, depth from the chest wall (0–1 of the
    breast) and position across it (−1 top … 1 bottom), and size (fraction of the height)."""

    side: str
    depth: float
    across: float
    size: float


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    coarse = rng.normal(0, 1, (max(2, cells * height // width), cells)).astype(np.float32)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def _finding_xy(finding: Finding, view: str, width: int, height: int) -> tuple[float, float]:
    """Pixel centre of a finding in ``view`` (before the left/right mirroring)."""
    shift = 0.12 if view.endswith("MLO") else 0.0  # the oblique view sees it a little lower
    return 0.08 * width + finding.depth * 0.75 * width, height * (
        0.5 + 0.36 * finding.across + shift
    )


def paint_view(
    rng: np.random.Generator,
    view: str,
    width: int,
    height: int,
    density: int,
    texture: np.ndarray,
    mass: Finding | None,
    calcification: Finding | None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 [H, W] image, uint8 [H, W] 0/1 mass mask)`` of one view."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    reach = width * rng.uniform(0.78, 0.92)
    half = height * (0.44 if view.endswith("CC") else 0.48)
    centre = height * (0.5 if view.endswith("CC") else 0.55)
    r = np.sqrt((xx / reach) ** 2 + ((yy - centre) / half) ** 2)
    breast = (r < 1.0).astype(np.float32)
    threshold = np.quantile(texture, 1.0 - DENSE_SHARE[density])
    fibro = cv2.GaussianBlur((texture > threshold).astype(np.float32), (0, 0), 1.5)
    tissue = 0.28 + 0.34 * fibro - 0.12 * np.clip((r - 0.8) / 0.2, 0, 1)
    if view.endswith("MLO"):
        pectoral = (xx / (0.35 * width) + yy / (0.45 * height)) < 1.0
        tissue = np.where(pectoral, 0.72, tissue)
    image = tissue * breast
    mask = np.zeros((height, width), np.uint8)
    side = view[0]
    if mass is not None and mass.side == side:
        cx, cy = _finding_xy(mass, view, width, height)
        angle = np.arctan2(yy - cy, xx - cx)
        wobble = 1.0 + 0.18 * np.sin(5 * angle + rng.uniform(0, 6.3)) + 0.1 * np.sin(9 * angle)
        radius = mass.size * height * wobble
        blob = (np.hypot(xx - cx, yy - cy) < radius) & (breast > 0)
        mask = blob.astype(np.uint8)
        soft = cv2.GaussianBlur(blob.astype(np.float32), (0, 0), 0.8)
        image = image * (1 - soft) + 0.82 * soft
    if calcification is not None and calcification.side == side:
        cx, cy = _finding_xy(calcification, view, width, height)
        spread = 0.05 * height
        for _ in range(rng.integers(6, 13)):
            x = round(cx + rng.normal(0, spread))
            y = round(cy + rng.normal(0, spread))
            if 0 <= x < width and 0 <= y < height and breast[y, x] > 0:
                image[y, x] = 0.98
    image = image + rng.normal(0, 0.02, image.shape).astype(np.float32) * breast
    if side == "L":
        image, mask = image[:, ::-1], mask[:, ::-1]
    grey = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(grey), np.ascontiguousarray(mask)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _finding(rng: np.random.Generator, size: tuple[float, float]) -> Finding:
    return Finding(
        side=str(rng.choice(["L", "R"])),
        depth=float(rng.uniform(0.3, 0.75)),
        across=float(rng.uniform(-0.6, 0.6)),
        size=float(rng.uniform(*size)),
    )


def make_mammography_replica(
    root: str | Path,
    n_cases: int = 120,
    size: tuple[int, int] = (96, 128),
    test_fraction: float = 0.2,
    missing_view: float = 0.1,
    missing_label: float = 0.08,
    seed: int = 0,
) -> Path:
    """Write ``root/cases.csv`` and its images (``root`` must not hold a replica already).

    Args:
        root: the folder to write.
        n_cases: rows of the table.
        size: ``(width, height)`` of every view.
        test_fraction: share of cases with ``split`` ``test``.
        missing_view: probability that a view is missing (at least one view is kept).
        missing_label: probability that a label cell is empty (per task).
        seed: everything drawn is a function of it.

    Returns:
        ``root``.
    """
    root = Path(root)
    if (root / CSV_NAME).exists():
        raise DataError(f"{root / CSV_NAME}: already exists; remove it or choose another folder")
    width, height = size
    if n_cases < 1 or min(width, height) < 32:
        raise DataError(f"{root}: need n_cases >= 1 and views of at least 32x32")
    rows = []
    for i in range(1, n_cases + 1):
        rng = np.random.default_rng([seed, i])
        case = f"c{i:04d}"
        density = int(rng.choice(len(DENSITY), p=DENSITY_PRIOR))
        age = float(np.clip(rng.normal(68 - 6 * density, 7), 40, 90))
        mass = _finding(rng, (0.06, 0.1)) if rng.random() < 0.3 else None
        calcification = _finding(rng, (0.05, 0.05)) if rng.random() < 0.25 else None
        kept = rng.random(len(VIEWS)) >= missing_view
        if not kept.any():
            kept[rng.integers(len(VIEWS))] = True
        row: dict[str, object] = {"case_id": case}
        for view, keep in zip(VIEWS, kept):
            texture = _smooth_noise(rng, height, width, 8) + 0.5 * _smooth_noise(
                rng, height, width, 24
            )
            image, mask = paint_view(
                rng, view, width, height, density, texture, mass, calcification
            )
            row[view] = f"images/{case}/{view}.png" if keep else ""
            if keep:
                (root / "images" / case).mkdir(parents=True, exist_ok=True)
                (root / row[view]).write_bytes(_png(image))
            if view in MASK_VIEWS:
                row[f"{view}_mask"] = f"masks/{case}/{view}.png" if keep else ""
                if keep:
                    (root / "masks" / case).mkdir(parents=True, exist_ok=True)
                    (root / row[f"{view}_mask"]).write_bytes(_png(mask * 255))
        labels = {
            "density": DENSITY[density],
            "mass": int(mass is not None),
            "calcification": int(calcification is not None),
            "age": round(age, 1),
        }
        if rng.random() < missing_label:
            labels["density"] = ""
        if rng.random() < missing_label:
            labels["mass"] = labels["calcification"] = ""
        if rng.random() < missing_label:
            labels["age"] = ""
        row.update(labels)
        row["split"] = "test" if rng.random() < test_fraction else "train"
        rows.append(row)
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / CSV_NAME, index=False)
    return root
