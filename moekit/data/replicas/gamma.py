"""Write a synthetic GAMMA replica in the layout of the real download, where fusion matters.

``make_gamma_replica(root)`` writes, in the layout :mod:`moekit.data.gamma` reads, the grading
table (xlsx through pandas/openpyxl, or CSV), one painted fundus JPEG per patient
(:mod:`moekit.data.replicas.fundus`), one OCT volume of JPEG B-scans ``<k>_image.jpg``
(:mod:`moekit.data.replicas.oct`), and, for a share of the patients, the segmentation folder's
copy of the photograph with its BMP disc/cup label map (0 cup, 128 rim, 255 background).

The photographs frame the optic disc region by default (``field="disc"``: a 15° field centred
on the disc, :func:`disc_field_geometry`), the crop GAMMA models grade from; there the disc is
large and in the same place in every photograph, so a small model trained from scratch can read
the cup-to-disc ratio at 64×64. ``field="full"`` paints the release's wide field (macula, disc or
between in the centre), where a disc of 1/8 of the field must be found first.

The two modalities carry *different* evidence of the grade (:class:`GammaEvidence`):

* the fundus shows the vertical cup-to-disc ratio (CDR), ``cdr | g ~ N(μ_f[g], σ_f)``; it
  separates mid-advanced glaucoma well and early glaucoma poorly;
* the OCT shows the nerve-fibre layer thickness (relative to a healthy eye),
  ``rnfl | g ~ N(μ_o[g], σ_o)``; it separates early glaucoma well (the RNFL thins before the
  cup grows, as in the clinic);
* for a share of the patients one modality is *uninformative*: a blurred, hazy fundus, or a
  dim, noisy OCT (disjoint shares, so every patient has one informative modality). Its
  evidence (CDR or RNFL) is then drawn from the population, independently of the grade, so
  that image carries no information on the grade at all; the degradation is visible, so a
  model can learn to discount it.

A model that reads each modality and weighs them per patient therefore beats either modality
alone and beats any fusion with weights fixed for all patients. :func:`oracle_ceilings`
computes what ideal observers reach (Bayes decisions on the exact CDR / RNFL values).

Everything is a function of ``seed``: patient ``i`` of a split has its own random stream.
Next to the layout the replica writes ``replica_truth.csv`` (the drawn CDR, RNFL and which
modalities are informative); the loader never reads it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image

from moekit.data.gamma import GRADES, LAYOUT
from moekit.data.replicas.fundus import (
    DISC_MM,
    FOVEA_DISC_MM,
    MM_PER_DEGREE,
    FundusGeometry,
    FundusPainter,
)
from moekit.data.replicas.oct import RetinaAnatomy, paint_oct_volume
from moekit.errors import DataError
from moekit.metrics.kappa import CohenKappa

JPEG_QUALITY = 92
_SPLIT_CODES = {"train": 0, "test": 1}
TRUTH_FILE = "replica_truth.csv"
FIELDS = ("disc", "full")
"""What a photograph frames: ``disc``, a 15° field centred on the optic disc (the disc region
GAMMA models crop); ``full``, the release's wide field (macula, disc or between)."""
DISC_FIELD_DEGREES = 15.0
DEFAULT_FUNDUS_SIZE = {"disc": (256, 256), "full": (384, 256)}


@dataclass(frozen=True)
class GammaEvidence:
    """The replica's generative model of the grade and its evidence in each modality.

    ``prior``: grade shares (GAMMA's training set: 50 non, 26 early, 24 mid-advanced of 100);
    ``cdr_mean``/``cdr_sd``: vertical cup-to-disc ratio per grade; ``rnfl_mean``/``rnfl_sd``:
    RNFL thickness relative to a healthy eye, per grade; ``uninformative_fundus`` and
    ``uninformative_oct``: disjoint shares of patients whose fundus (or OCT) is degraded and
    shows a CDR (RNFL) drawn from the population, independent of the grade.
    """

    prior: tuple[float, float, float] = (0.50, 0.26, 0.24)
    cdr_mean: tuple[float, float, float] = (0.42, 0.52, 0.70)
    cdr_sd: float = 0.06
    rnfl_mean: tuple[float, float, float] = (1.00, 0.78, 0.62)
    rnfl_sd: float = 0.07
    uninformative_fundus: float = 0.25
    uninformative_oct: float = 0.25

    def __post_init__(self) -> None:
        shares = (self.uninformative_fundus, self.uninformative_oct)
        if min(shares) < 0 or sum(shares) > 1:
            raise ValueError(f"uninformative shares must be >= 0 with a sum <= 1, got {shares}")

    def sample(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """``n`` patients: ``grade``, ``fundus_informative``, ``oct_informative``, ``cdr``,
        ``rnfl`` (arrays of length ``n``)."""
        prior = np.asarray(self.prior) / np.sum(self.prior)
        grade = rng.choice(len(prior), n, p=prior)
        quality = rng.random(n)
        fundus_bad = quality < self.uninformative_fundus
        oct_bad = (quality >= self.uninformative_fundus) & (
            quality < self.uninformative_fundus + self.uninformative_oct
        )
        fundus_grade = np.where(fundus_bad, rng.choice(len(prior), n, p=prior), grade)
        oct_grade = np.where(oct_bad, rng.choice(len(prior), n, p=prior), grade)
        cdr = rng.normal(np.asarray(self.cdr_mean)[fundus_grade], self.cdr_sd)
        rnfl = rng.normal(np.asarray(self.rnfl_mean)[oct_grade], self.rnfl_sd)
        return {
            "grade": grade,
            "fundus_informative": ~fundus_bad,
            "oct_informative": ~oct_bad,
            "cdr": np.clip(cdr, 0.2, 0.9),
            "rnfl": np.clip(rnfl, 0.3, 1.3),
        }

    def log_likelihoods(self, latents: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``log p(cdr | g)`` and ``log p(rnfl | g)`` up to a constant, ``[n, 3]`` each (for an
        informative modality)."""
        cdr = -((latents["cdr"][:, None] - np.asarray(self.cdr_mean)) ** 2) / (2 * self.cdr_sd**2)
        rnfl = -((latents["rnfl"][:, None] - np.asarray(self.rnfl_mean)) ** 2) / (
            2 * self.rnfl_sd**2
        )
        return cdr, rnfl


def quadratic_kappa(target: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """Quadratic-weighted Cohen's kappa of class indices (moekit's ``kappa`` metric)."""
    confusion = np.zeros((num_classes, num_classes))
    np.add.at(confusion, (target, pred), 1.0)
    metric = CohenKappa(num_classes)
    return metric.reduce(torch.tensor(confusion.ravel(), dtype=torch.float64))[""]


def oracle_ceilings(
    evidence: GammaEvidence | None = None, num_patients: int = 200_000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Accuracy and quadratic kappa of ideal observers of the replica (Monte Carlo).

    Each observer reads the CDR and/or RNFL exactly and decides ``argmax_g`` of
    ``log P(g) + Σ log p(evidence | g)`` over the evidence it uses:

    * ``fundus``: the CDR when the fundus is informative, nothing (the prior) when it is not —
      it sees the degradation;
    * ``oct``: the same with the RNFL;
    * ``per_patient_fusion``: both, each only when informative — the replica's ceiling;
    * ``fixed_fusion``: both, always, with the same weight for every patient (a fusion that
      cannot discount a degraded modality).
    """
    evidence = evidence or GammaEvidence()
    latents = evidence.sample(np.random.default_rng(seed), num_patients)
    cdr, rnfl = evidence.log_likelihoods(latents)
    log_prior = np.log(np.asarray(evidence.prior) / np.sum(evidence.prior))
    fundus = np.where(latents["fundus_informative"][:, None], cdr, 0.0)
    oct_ = np.where(latents["oct_informative"][:, None], rnfl, 0.0)
    scores = {
        "fundus": log_prior + fundus,
        "oct": log_prior + oct_,
        "per_patient_fusion": log_prior + fundus + oct_,
        "fixed_fusion": log_prior + cdr + rnfl,
    }
    grade = latents["grade"]
    out = {}
    for name, score in scores.items():
        pred = score.argmax(1)
        out[name] = {
            "accuracy": float((pred == grade).mean()),
            "kappa": quadratic_kappa(grade, pred, len(log_prior)),
        }
    return out


def disc_field_geometry(
    rng: np.random.Generator,
    width: int,
    height: int,
    cup_ratio: float,
    degrees: float = DISC_FIELD_DEGREES,
) -> FundusGeometry:
    """A photograph of the optic disc region: a ``degrees``-wide circular field centred on the
    disc (shifted by up to about 6 % of the field radius), filling a ``width × height`` frame.

    Sizes follow retinal millimetres as in :meth:`FundusGeometry.sample`: a disc of
    :data:`DISC_MM` (about 0.4–0.6 of the field's radius at 15°), the fovea
    :data:`FOVEA_DISC_MM` temporal of the disc and a little below it, outside the field. At
    64×64 the disc's radius is about 14 px and a cup-to-disc ratio larger by 0.1 lengthens the
    cup's vertical radius by 1.5 px — as much as in a full field at 256×384, where a small
    model must first find a disc of 1/8 of the field.
    """
    radius = 0.5 * min(width, height) * rng.uniform(0.92, 0.99)
    center = (width / 2 + rng.normal(0, 0.02 * radius), height / 2 + rng.normal(0, 0.02 * radius))
    mm_per_radius = 0.5 * degrees * MM_PER_DEGREE
    disc_radius = radius * 0.5 * rng.uniform(*DISC_MM) / mm_per_radius
    disc = (center[0] + rng.normal(0, 0.06 * radius), center[1] + rng.normal(0, 0.06 * radius))
    nasal = 1.0 if rng.random() < 0.5 else -1.0
    distance = radius * rng.uniform(*FOVEA_DISC_MM) / mm_per_radius
    elevation = np.radians(rng.uniform(4.0, 10.0))
    macula = (
        disc[0] - nasal * distance * np.cos(elevation),
        disc[1] + distance * np.sin(elevation),
    )
    return FundusGeometry(
        width, height, center, radius, disc, disc_radius, macula, cup_ratio, camera="square"
    )


def degrade_fundus(photo: np.ndarray, disc_radius: float) -> np.ndarray:
    """A blurred, hazy photograph (media opacity): the cup cannot be told from the rim."""
    blurred = cv2.GaussianBlur(photo.astype(np.float32), (0, 0), 0.6 * disc_radius)
    field = cv2.GaussianBlur((photo.max(axis=2) > 12).astype(np.float32), (0, 0), 2.0)
    haze = np.array([200.0, 170.0, 130.0], np.float32)
    hazy = 0.55 * blurred + 0.45 * haze * field[..., None]
    return np.clip(hazy + 0.5, 0, 255).astype(np.uint8)


def mask_bmp(disc: np.ndarray, cup: np.ndarray) -> bytes:
    """A GAMMA label map: 0 on the cup, 128 on the rim, 255 elsewhere, as an 8-bit BMP."""
    grey = np.full(disc.shape, 255, np.uint8)
    grey[disc.astype(bool)] = 128
    grey[cup.astype(bool)] = 0
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="BMP")
    return buffer.getvalue()


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@dataclass(frozen=True)
class PatientPlan:
    """What the replica writes for one patient."""

    number: int
    graded: bool
    fundus: bool
    oct: bool
    mask: bool


def plan_patients(
    rng: np.random.Generator,
    first: int,
    n_graded: int,
    n_seg_only: int,
    seg_fraction: float,
    missing_fraction: float,
) -> list[PatientPlan]:
    """Graded patients ``first ..`` (a ``seg_fraction`` share with a mask; a
    ``missing_fraction`` share missing the fundus or the OCT, alternately, and then no mask)
    followed by ``n_seg_only`` patients with only a photograph and its mask."""
    with_mask = set(rng.permutation(n_graded)[: round(seg_fraction * n_graded)].tolist())
    missing = rng.permutation(n_graded)[: round(missing_fraction * n_graded)].tolist()
    no_fundus, no_oct = set(missing[0::2]), set(missing[1::2])
    plans = [
        PatientPlan(
            number=first + i,
            graded=True,
            fundus=i not in no_fundus,
            oct=i not in no_oct,
            mask=i in with_mask and i not in no_fundus,
        )
        for i in range(n_graded)
    ]
    plans += [
        PatientPlan(first + n_graded + i, graded=False, fundus=True, oct=False, mask=True)
        for i in range(n_seg_only)
    ]
    return plans


def _write_split(
    root: Path,
    split: str,
    plans: Sequence[PatientPlan],
    evidence: GammaEvidence,
    num_bscans: int,
    fundus_size: tuple[int, int],
    field: str,
    oct_size: tuple[int, int],
    table_format: str,
    seed: int,
) -> list[dict[str, object]]:
    rows, truth = [], []
    for plan in plans:
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], plan.number])
        latents = {k: v[0] for k, v in evidence.sample(rng, 1).items()}
        patient = f"{plan.number:04d}"
        cdr = float(latents["cdr"])
        geometry = (
            disc_field_geometry(rng, *fundus_size, cup_ratio=cdr)
            if field == "disc"
            else FundusGeometry.sample(rng, *fundus_size, cup_ratio=cdr)
        )
        painter = FundusPainter(geometry, rng)
        painter.paint_anatomy()
        photo, masks = painter.finish()
        if not latents["fundus_informative"]:
            photo = degrade_fundus(photo, geometry.disc_radius)
        nasal = 1.0 if geometry.disc_center[0] > geometry.center[0] else -1.0
        anatomy = RetinaAnatomy.sample(rng, float(latents["rnfl"]), nasal)
        if plan.graded:
            if plan.fundus:
                _write(LAYOUT.fundus(root, split, patient), _jpeg(photo))
            if plan.oct:
                volume = paint_oct_volume(
                    rng, anatomy, num_bscans, *oct_size, degraded=not latents["oct_informative"]
                )
                for k, scan in enumerate(volume):
                    _write(LAYOUT.bscan(root, split, patient, k), _jpeg(scan))
            LAYOUT.patients_dir(root, split).joinpath(patient).mkdir(parents=True, exist_ok=True)
            onehot = [int(latents["grade"] == g) for g in range(len(GRADES))]
            rows.append([plan.number, *onehot])
        if plan.mask:
            _write(LAYOUT.seg_image(root, split, patient), _jpeg(photo))
            _write(LAYOUT.mask(root, split, patient), mask_bmp(masks["OD"], masks["cup"]))
        truth.append(
            {
                "split": split,
                "id": patient,
                "grade": int(latents["grade"]) if plan.graded else "",
                "cdr": round(float(latents["cdr"]), 4),
                "rnfl": round(float(latents["rnfl"]), 4),
                "fundus_informative": bool(latents["fundus_informative"]),
                "oct_informative": bool(latents["oct_informative"]),
                "has_fundus": plan.fundus,
                "has_oct": plan.graded and plan.oct,
                "has_mask": plan.mask,
            }
        )
    LAYOUT.seg_images_dir(root, split).mkdir(parents=True, exist_ok=True)
    LAYOUT.seg_masks_dir(root, split).mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows, columns=[LAYOUT.id_column, *GRADES])
    path = LAYOUT.grades_table(root, split, f".{table_format}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if table_format == "xlsx":
        table.to_excel(path, index=False)
    else:
        table.to_csv(path, index=False)
    return truth


def make_gamma_replica(
    root: str | Path,
    n_train: int = 100,
    n_test: int = 0,
    num_bscans: int = 256,
    fundus_size: tuple[int, int] | None = None,
    field: str = "disc",
    oct_size: tuple[int, int] = (64, 128),
    seg_fraction: float = 0.8,
    seg_only_fraction: float = 0.1,
    missing_fraction: float = 0.0,
    evidence: GammaEvidence | None = None,
    table_format: str = "xlsx",
    seed: int = 0,
) -> Path:
    """Write a synthetic GAMMA download under ``root`` (which must not hold one already).

    Args:
        root: the folder to create; it will hold ``Glaucoma_grading`` and
            ``Disc_Cup_Segmentation``.
        n_train, n_test: graded patients per split (the release: 100 training).
        num_bscans: B-scans per OCT volume (the release: 256).
        fundus_size: ``(width, height)`` of the photographs (default 256×256 for the disc
            field, 384×256 for the full field; the release: 2992×2000).
        field: ``disc`` (default), a 15° photograph centred on the optic disc
            (:func:`disc_field_geometry`: the disc region GAMMA models crop, where a small
            model can read the cup-to-disc ratio), or ``full``, the release's wide field.
        oct_size: ``(width, height)`` of the B-scans (the release: 512×992).
        seg_fraction: share of graded patients with a disc/cup mask.
        seg_only_fraction: patients with only a photograph and a mask, as a share of the
            graded ones (``round``), numbered after them.
        missing_fraction: share of graded patients missing their fundus or (alternately) their
            OCT volume.
        evidence: the generative model of the evidence (default :class:`GammaEvidence`).
        table_format: ``xlsx`` (as the release) or ``csv``.
        seed: everything drawn is a function of it.

    Returns:
        ``root``.
    """
    root = Path(root)
    evidence = evidence or GammaEvidence()
    if field not in FIELDS:
        raise DataError(f"{root}: field must be one of {', '.join(FIELDS)}, got {field!r}")
    fundus_size = tuple(fundus_size or DEFAULT_FUNDUS_SIZE[field])
    if table_format not in ("xlsx", "csv"):
        raise DataError(f"{root}: table_format must be xlsx or csv, got {table_format!r}")
    for part in (LAYOUT.grading, LAYOUT.segmentation):
        if (root / part).exists():
            raise DataError(f"{root / part}: already exists; remove it or choose another folder")
    if n_train < 1 or n_test < 0 or num_bscans < 1:
        raise DataError(f"{root}: need n_train >= 1, n_test >= 0 and num_bscans >= 1")
    if min(*fundus_size, *oct_size) < 32:
        raise DataError(f"{root}: replica images must be at least 32x32")
    for name, share in (("seg_fraction", seg_fraction), ("missing_fraction", missing_fraction)):
        if not 0.0 <= share <= 1.0:
            raise DataError(f"{root}: {name} must be in [0, 1], got {share}")
    truth: list[dict[str, object]] = []
    first = 1
    for split, count in (("train", n_train), ("test", n_test)):
        if split == "test" and count == 0:
            continue
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], 7])
        n_seg_only = round(seg_only_fraction * count)
        plans = plan_patients(rng, first, count, n_seg_only, seg_fraction, missing_fraction)
        truth += _write_split(
            root,
            split,
            plans,
            evidence,
            num_bscans,
            fundus_size,
            field,
            oct_size,
            table_format,
            seed,
        )
        first += count + n_seg_only
    pd.DataFrame(truth).to_csv(root / TRUTH_FILE, index=False)
    return root
