"""Synthetic ODIR replicas: the ODIR study's layout and the public ODIR-5K layout.

Painted fundus photographs (:mod:`moekit.data.replicas.fundus`) whose labels follow from
what was painted, so the labels are learnable and a class-activation map can be checked:

==============================  ==========================================================
label                           what the photograph shows
==============================  ==========================================================
``D`` diabetic retinopathy      2–10 microaneurysms, 2–8 haemorrhages, 0–2 exudate clusters
``G`` glaucoma                  a large cup: vertical cup-to-disc ratio 0.6–0.85 (else 0.3–0.5)
``A`` AMD                       8–24 drusen within 1.5 disc diameters of the fovea
==============================  ==========================================================

:func:`make_odir_replica` writes the ODIR study's layout (``train.csv``, ``val.csv``,
``offsite_test.csv`` with ``id,D,G,A``; ``onsite_test_submission.csv`` with ids only; images
under ``images/<split>/`` named ``<patient>_<eye>.jpg``, the eye being the painted one: a right
eye has its disc right of the macula). Every split has the study's label distribution: at 800
training images exactly its counts (:data:`STUDY_PATTERNS`: D 517, G 163, A 142, 22 rows with
two labels, none without a label), other sizes in the same proportions.

:func:`make_odir5k_replica` writes the ODIR-5K layout (one table row per patient with both
eyes' files and keywords, the eight labels ``N D G C A H M O`` of the patient; only ``N``, ``D``,
``G`` and ``A`` occur); one listed file is left unwritten, as in copies of the release that lost
images, and some eyes carry the photograph keyword ``lens dust``.

Both write ``replica_meta.csv`` beside the data (the loaders never read it): for every image its
split and id, the painted labels (also of the unlabelled on-site test split), the frame size,
the optic disc's centre and radius and the macula's centre in pixels of the saved image, and the
cup-to-disc ratio — what a check of where a model looks needs (the share of a class-activation
map inside the disc of glaucomatous eyes).

Everything is a function of ``seed``: image ``i`` of a split has its own random stream, so a
larger replica starts with the same images as a smaller one.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from moekit.data.odir import EYES, ODIR5K_CLASSES, ODIR5K_COLUMNS, STUDY_CLASSES, STUDY_LAYOUT
from moekit.data.replicas.fundus import CAMERAS, FundusGeometry, FundusPainter
from moekit.errors import DataError

STUDY_PATTERNS: dict[tuple[int, int, int], int] = {
    (1, 0, 0): 498,
    (0, 1, 0): 151,
    (0, 0, 1): 129,
    (1, 1, 0): 9,
    (1, 0, 1): 10,
    (0, 1, 1): 3,
}
"""``(D, G, A)`` label patterns among the ODIR study's 800 training images: D 517, G 163, A 142
positives, 22 images with two labels, none without a label. The study gives the totals; how the
22 double labels split into pairs is the replica's choice."""
STUDY_SPLIT_SIZES = {"train": 800, "val": 200, "offsite_test": 200, "onsite_test": 250}
CAMERA_MIX = {
    "circle_3_2": 0.3,
    "circle_4_3": 0.25,
    "square": 0.2,
    "wide_clipped": 0.1,
    "idrid": 0.1,
    "portable": 0.05,
}
"""Share of each camera framing: ODIR's photographs come from several hospitals' cameras."""
META_COLUMNS = (
    "split",
    "id",
    "D",
    "G",
    "A",
    "width",
    "height",
    "disc_x",
    "disc_y",
    "disc_radius",
    "cup_ratio",
    "macula_x",
    "macula_y",
    "camera",
)
META_FILE = "replica_meta.csv"
ODIR5K_TABLE = "ODIR-5K_Training_Annotations(Updated)_V2.xlsx"
ODIR5K_IMAGES = "ODIR-5K_Training_Dataset"
KEYWORDS = {
    "D": "moderate non proliferative retinopathy",
    "G": "glaucoma",
    "A": "dry age-related macular degeneration",
}
"""The diagnostic keyword an ODIR-5K replica eye gets for each painted label."""
_SPLIT_CODES = {split: i for i, split in enumerate(STUDY_LAYOUT.splits)}


def pattern_counts(n: int) -> dict[tuple[int, int, int], int]:
    """How many of ``n`` images get each :data:`STUDY_PATTERNS` pattern: the study's proportions,
    rounded by largest remainders so the counts sum to ``n`` (exact at ``n = 800``)."""
    total = sum(STUDY_PATTERNS.values())
    exact = {p: n * c / total for p, c in STUDY_PATTERNS.items()}
    counts = {p: int(np.floor(v)) for p, v in exact.items()}
    by_remainder = sorted(exact, key=lambda p: exact[p] - counts[p], reverse=True)
    for p in by_remainder[: n - sum(counts.values())]:
        counts[p] += 1
    return counts


@dataclass(frozen=True)
class PaintedEye:
    """A painted photograph, its ``(D, G, A)`` labels, its eye and where its disc is."""

    image: np.ndarray
    labels: tuple[int, int, int]
    eye: str
    geometry: FundusGeometry
    jpeg_quality: int


def draw_camera(rng: np.random.Generator) -> str:
    """A camera of :data:`CAMERA_MIX`, drawn by its share."""
    names = list(CAMERA_MIX)
    weights = np.array([CAMERA_MIX[n] for n in names])
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def mirrored(geometry: FundusGeometry) -> FundusGeometry:
    """The geometry of the horizontally flipped photograph (the other eye)."""
    last = geometry.width - 1

    def flip(point: tuple[float, float]) -> tuple[float, float]:
        return last - point[0], point[1]

    return replace(
        geometry,
        center=flip(geometry.center),
        disc_center=flip(geometry.disc_center),
        macula_center=flip(geometry.macula_center),
    )


def paint_eye(
    rng: np.random.Generator, size: int, labels: Sequence[int], eye: str | None = None
) -> PaintedEye:
    """Paint one photograph ``size`` pixels high (width by the camera's aspect) with the signs of
    its ``(D, G, A)`` labels (see the module docstring); ``eye`` (``left``/``right``) mirrors
    the photograph if the painter drew the other eye."""
    has_d, has_g, has_a = (bool(v) for v in labels)
    camera = draw_camera(rng)
    width = max(32, round(size * CAMERAS[camera].aspect))
    cup_ratio = rng.uniform(0.6, 0.85) if has_g else rng.uniform(0.3, 0.5)
    geometry = FundusGeometry.sample(rng, width, size, cup_ratio=cup_ratio, camera=camera)
    painter = FundusPainter(geometry, rng)
    painter.paint_anatomy()
    if has_d:
        painter.add_haemorrhages(int(rng.integers(2, 9)))
        painter.add_microaneurysms(int(rng.integers(2, 11)))
        for _ in range(int(rng.integers(0, 3))):
            reach = (0.3 * geometry.disc_diameter, 0.5 * geometry.radius)
            painter.add_exudate_cluster(painter.point_around(geometry.macula_center, *reach))
    if has_a:
        painter.add_drusen(int(rng.integers(8, 25)))
    image, _ = painter.finish()
    low, high = CAMERAS[camera].jpeg_quality
    painted = "right" if geometry.nasal > 0 else "left"
    if eye is not None and eye != painted:
        image, geometry, painted = np.ascontiguousarray(image[:, ::-1]), mirrored(geometry), eye
    quality = int(rng.integers(low, high + 1))
    return PaintedEye(image, (int(has_d), int(has_g), int(has_a)), painted, geometry, quality)


def _jpeg(painted: PaintedEye) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(painted.image).save(buffer, format="JPEG", quality=painted.jpeg_quality)
    return buffer.getvalue()


def _meta_row(split: str, image_id: str, painted: PaintedEye) -> list[object]:
    g = painted.geometry
    return [
        split,
        image_id,
        *painted.labels,
        g.width,
        g.height,
        round(g.disc_center[0], 2),
        round(g.disc_center[1], 2),
        round(g.disc_radius, 2),
        round(g.cup_ratio, 4),
        round(g.macula_center[0], 2),
        round(g.macula_center[1], 2),
        g.camera,
    ]


def _write_csv(path: Path, rows: Sequence[Sequence[object]]) -> None:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    path.write_text(text.getvalue())


def _patient_numbers(seed: int, count: int) -> list[int]:
    """``count`` distinct patient numbers in a range like ODIR-5K's (0–4999 for the study)."""
    rng = np.random.default_rng([seed, 99])
    return sorted(int(v) for v in rng.choice(max(5000, 2 * count), count, replace=False))


def _check_root(root: Path, parts: Sequence[str], size: int) -> None:
    if size < 32:
        raise DataError(f"{root}: replica images must be at least 32 pixels high, got {size}")
    for part in parts:
        if (root / part).exists():
            raise DataError(f"{root / part}: already exists; remove it or choose another folder")


def make_odir_replica(
    root: str | Path,
    counts: Mapping[str, int] | None = None,
    size: int = 256,
    seed: int = 0,
) -> Path:
    """Write a synthetic replica of the ODIR study's layout under ``root``.

    Args:
        root: the folder to write (``train.csv``..., ``images/``, ``replica_meta.csv``).
        counts: images per split (``train``, ``val``, ``offsite_test``, ``onsite_test``);
            default :data:`STUDY_SPLIT_SIZES`, the study's 800 / 200 / 200 / 250.
        size: photograph height in pixels (the width follows the camera's aspect ratio).
        seed: everything drawn is a function of it.

    Returns:
        ``root``.
    """
    root = Path(root)
    counts = {**STUDY_SPLIT_SIZES, **(counts or {})}
    unknown = set(counts) - set(STUDY_SPLIT_SIZES)
    if unknown or min(counts.values()) < 0 or counts["train"] < 1:
        raise DataError(
            f"{root}: replica counts are per split {list(STUDY_SPLIT_SIZES)}, >= 0, with "
            f"training images; got {dict(counts)}"
        )
    parts = [name for _, name in STUDY_LAYOUT.tables] + [STUDY_LAYOUT.images, META_FILE]
    _check_root(root, parts, size)
    patients = iter(_patient_numbers(seed, sum(counts.values())))
    meta: list[list[object]] = [list(META_COLUMNS)]
    for split in STUDY_LAYOUT.splits:
        folder = STUDY_LAYOUT.image_dir(root, split)
        folder.mkdir(parents=True, exist_ok=True)
        order = np.random.default_rng([seed, _SPLIT_CODES[split], 1])
        labels = [p for p, c in pattern_counts(counts[split]).items() for _ in range(c)]
        labels = [labels[i] for i in order.permutation(len(labels))]
        rows: list[list[object]] = []
        for index, pattern in enumerate(labels):
            rng = np.random.default_rng([seed, _SPLIT_CODES[split], 0, index])
            painted = paint_eye(rng, size, pattern)
            image_id = f"{next(patients)}_{painted.eye}.jpg"
            (folder / image_id).write_bytes(_jpeg(painted))
            labelled = split not in STUDY_LAYOUT.unlabelled
            rows.append([image_id, *painted.labels] if labelled else [image_id])
            meta.append(_meta_row(split, image_id, painted))
        header = [STUDY_LAYOUT.id_column]
        if split not in STUDY_LAYOUT.unlabelled:
            header += list(STUDY_CLASSES)
        _write_csv(STUDY_LAYOUT.table(root, split), [header, *rows])
    _write_csv(root / META_FILE, meta)
    return root


def _eye_keywords(rng: np.random.Generator, labels: Sequence[int]) -> str:
    words = [KEYWORDS[c] for c, v in zip(STUDY_CLASSES, labels) if v] or ["normal fundus"]
    if rng.random() < 0.1:
        words.append("lens dust")
    return "，".join(words)


def make_odir5k_replica(
    root: str | Path,
    n_patients: int = 40,
    size: int = 256,
    seed: int = 0,
    table: str = ODIR5K_TABLE,
) -> Path:
    """Write a synthetic replica of the ODIR-5K layout under ``root``.

    Each patient has two painted eyes; an eye is normal with probability 0.4, else gets a
    pattern of :data:`STUDY_PATTERNS` (in the study's proportions). The patient's labels are
    the eyes' labels combined (``N`` when both eyes are normal). The last patient's left-eye
    file is listed in the table but not written.

    Args:
        root: the folder to write (the table, ``ODIR-5K_Training_Dataset/``, the meta file).
        n_patients: table rows.
        size: photograph height in pixels.
        seed: everything drawn is a function of it.
        table: the table's file name (``.xlsx`` as the release, or ``.csv`` as copies).

    Returns:
        ``root``.
    """
    root = Path(root)
    if n_patients < 1:
        raise DataError(f"{root}: an ODIR-5K replica needs at least one patient")
    _check_root(root, [table, ODIR5K_IMAGES, META_FILE], size)
    images = root / ODIR5K_IMAGES
    images.mkdir(parents=True)
    patterns = list(STUDY_PATTERNS)
    weights = np.array([STUDY_PATTERNS[p] for p in patterns], np.float64)
    weights /= weights.sum()
    numbers = _patient_numbers(seed, n_patients)
    rows = []
    meta: list[list[object]] = [list(META_COLUMNS)]
    for index, number in enumerate(numbers):
        rng = np.random.default_rng([seed, 7, index])
        row: dict[str, object] = {
            ODIR5K_COLUMNS["id"]: number,
            ODIR5K_COLUMNS["age"]: int(rng.integers(30, 85)),
            ODIR5K_COLUMNS["sex"]: "Female" if rng.random() < 0.5 else "Male",
        }
        patient = np.zeros(len(STUDY_CLASSES), int)
        for eye in EYES:
            normal = rng.random() < 0.4
            pattern = (0, 0, 0) if normal else patterns[int(rng.choice(len(patterns), p=weights))]
            painted = paint_eye(rng, size, pattern, eye)
            name = f"{number}_{eye}.jpg"
            row[ODIR5K_COLUMNS[eye]] = name
            row[ODIR5K_COLUMNS[f"{eye}_keywords"]] = _eye_keywords(rng, pattern)
            patient |= np.array(pattern)
            if not (index == n_patients - 1 and eye == "left"):
                (images / name).write_bytes(_jpeg(painted))
            meta.append(_meta_row("all", name, painted))
        labels = {"N": int(not patient.any()), **dict(zip(STUDY_CLASSES, patient.tolist()))}
        row.update({label: labels.get(label, 0) for label in ODIR5K_CLASSES})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=[*ODIR5K_COLUMNS.values(), *ODIR5K_CLASSES])
    if table.lower().endswith(".xlsx"):
        frame.to_excel(root / table, index=False)
    else:
        frame.to_csv(root / table, index=False)
    _write_csv(root / META_FILE, meta)
    return root
