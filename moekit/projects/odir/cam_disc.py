"""Where a model looks for glaucoma on the ODIR replica: the share of the Grad-CAM mass inside
the optic disc.

The replica paints glaucoma as a large cup inside the optic disc and records every image's disc
(centre and radius in pixels of the saved photograph) in ``replica_meta.csv``. For the
glaucoma-positive images of a split, :func:`disc_mass_share` computes the Grad-CAM map of class
``G`` (:func:`moekit.analysis.gradcam.grad_cam`) and the share of its mass inside the disc,
``Σ_disc M / Σ M`` (:func:`moekit.analysis.gradcam.mass_inside`), beside the disc's share of the
image area — what the share would be for a map spread evenly. A model that found the sign has
a mass share well above the area share. The disc (an ellipse of the recorded radius, 10 %
taller than wide as painted) is brought to the model's input through the same preprocessing
as the photograph (its :class:`~moekit.data.preprocess.Geometry`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch

from moekit.analysis.gradcam import grad_cam, mass_inside
from moekit.data.image_io import read_rgb
from moekit.data.preprocess import forward
from moekit.data.replicas.odir import META_FILE
from moekit.errors import ConfigError, DataError

DISC_ELONGATION = 1.1
"""The painted disc's vertical semi-axis over its radius (:mod:`moekit.data.replicas.fundus`)."""


def disc_mask(meta: Mapping[str, Any], full_size: tuple[int, int]) -> np.ndarray:
    """``bool [H, W]`` the optic disc of one photograph from its ``replica_meta.csv`` row."""
    height, width = full_size
    mask = np.zeros((height, width), np.uint8)
    centre = (round(float(meta["disc_x"])), round(float(meta["disc_y"])))
    radius = float(meta["disc_radius"])
    axes = (max(1, round(radius)), max(1, round(DISC_ELONGATION * radius)))
    cv2.ellipse(mask, centre, axes, 0, 0, 360, 1, -1)
    return mask.astype(bool)


def input_disc_mask(dataset: Any, path: Path, meta: Mapping[str, Any]) -> np.ndarray:
    """The disc of the photograph at ``path`` on the model's input (``dataset``'s preprocessing
    step and image size)."""
    decoded, full_size = read_rgb(path, dataset.image_size)
    _, geometry = dataset.preprocess(decoded)
    full = disc_mask(meta, full_size)
    return forward(full, geometry.rescaled(*full_size), nearest=True)


def disc_mass_share(
    run_dir: str | Path,
    split: str = "test",
    checkpoint: str = "best",
    layer: str | None = None,
    task: str = "diagnosis",
    label: str = "G",
    batch_size: int = 16,
) -> dict[str, Any]:
    """Grad-CAM mass inside the disc for the ``label``-positive images of ``split``.

    Returns ``{images, empty_maps, mass_share, area_share, ratio, per_image: [{id, mass,
    area}]}``: the means over the images whose map is not all zero (``empty_maps`` counts the
    others, whose mass share is undefined), ``ratio`` = mass share / area share.
    """
    from moekit.engine.checkpoint import load_model
    from moekit.inference.inputs import pipeline_from_config

    model, cfg, tasks = load_model(run_dir, checkpoint)
    _, dataset = pipeline_from_config(cfg, split)
    table = Path(dataset.root) / META_FILE
    if not table.is_file():
        raise DataError(f"{table}: not found (the disc positions of a replica written by moekit)")
    meta = pd.read_csv(table, dtype={"id": str}).set_index(["split", "id"])
    names = list(tasks[task].options.get("class_names") or [])
    if label not in names:
        raise ConfigError(f"disc_mass_share: no class '{label}' in task '{task}' ({names})")
    column = names.index(label)
    picks = [
        i for i, r in enumerate(dataset.records) if r.labels is not None and r.labels[column] == 1
    ]
    rows = []
    for start in range(0, len(picks), batch_size):
        chosen = picks[start : start + batch_size]
        images = torch.stack([dataset[i]["inputs"] for i in chosen])
        maps = grad_cam(model, images, task, [column], layer).maps[:, 0]
        for k, i in enumerate(chosen):
            record = dataset.records[i]
            mask = input_disc_mask(dataset, record.path, meta.loc[(dataset.split, record.image_id)])
            inside = torch.from_numpy(mask)
            rows.append(
                {
                    "id": record.image_id,
                    "mass": float(mass_inside(maps[k], inside)),
                    "area": float(inside.float().mean()),
                }
            )
    defined = [r for r in rows if not math.isnan(r["mass"])]
    mass = float(np.mean([r["mass"] for r in defined])) if defined else math.nan
    area = float(np.mean([r["area"] for r in defined])) if defined else math.nan
    return {
        "images": len(rows),
        "empty_maps": len(rows) - len(defined),
        "mass_share": mass,
        "area_share": area,
        "ratio": mass / area if area and not math.isnan(mass) else math.nan,
        "per_image": rows,
    }
