"""Modality dropout: hide some of a sample's modalities at training, never all of them.

Training with whole modalities removed at random teaches a multi-modal model to work when one
is missing at test time (and not to lean on one modality alone). With ``modality_dropout: p``
a multi-modal dataset (``gamma``, ``multiview_csv``) removes each modality a sample *has* with
probability ``p``, independently, and draws again when that would remove all of them: the kept
set is distributed as independent Bernoulli(1 − p) keeps conditioned on at least one kept. For
a sample with ``n`` modalities each one is dropped with probability

    P(drop) = (p − pⁿ) / (1 − pⁿ)

(so a sample with one modality keeps it). A dropped modality is absent from the sample exactly
as a missing file is (``present`` False, a zero filler, not read from disk); targets defined
on its pixels (a segmentation mask of that image) lose ``has_target``. The draw for sample
``i`` in epoch ``e`` comes from ``(seed, e, i)``, independent of loader workers and batch
size, so a run is reproducible and a resumed run repeats it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moekit.errors import ConfigError


def check_dropout_p(p: float, dataset: str) -> float:
    """``p`` as a float in ``[0, 1)``, else a :class:`ConfigError` naming ``dataset``."""
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= float(p) < 1.0:
        raise ConfigError(f"{dataset}: modality_dropout must be a number in [0, 1), got {p!r}")
    return float(p)


def drop_probability(p: float, n: int) -> float:
    """The chance that one of ``n`` present modalities is dropped: ``(p − pⁿ) / (1 − pⁿ)``."""
    if n <= 1:
        return 0.0
    return (p - p**n) / (1.0 - p**n)


def modality_dropout(present: Sequence[str], p: float, rng: np.random.Generator) -> tuple[str, ...]:
    """The modalities of ``present`` that are kept, in their order; at least one is.

    Each is dropped with probability ``p`` (``0 <= p < 1``), independently, redrawn while the
    draw drops them all.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"modality_dropout: p must be in [0, 1), got {p}")
    if p == 0.0 or len(present) <= 1:
        return tuple(present)
    while True:
        keep = rng.random(len(present)) >= p
        if keep.any():
            return tuple(name for name, k in zip(present, keep) if k)
