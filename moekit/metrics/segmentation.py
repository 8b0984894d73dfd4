"""Foreground overlap metrics for segmentation: IoU and Dice per class.

Following the IDRiD paper, only foreground counts: with dense per-channel masks (one binary
mask per lesion class, ``sigmoid > threshold``; the engine passes ``eval.threshold``, default
0.5, to a metric not given its own) every channel is a foreground class; with
class-index maps (``argmax``) the ``background`` class is left out. Two aggregations:

- *dataset level* (the main value; the IDRiD paper's way): intersections and unions are summed over
  all images of the split, then ``IoU_c = ΣI / ΣU``, ``Dice_c = 2ΣI / (ΣP + ΣG)``;
- *per image* (suffix ``per_image``): the score of each image, averaged over the images where
  the class occurs in the prediction or the ground truth (images where it is absent from both
  are undefined and skipped).

Values are reported per class and as the mean over the classes where they are defined.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from moekit.losses.task_losses import is_class_index
from moekit.metrics.base import (
    DEFAULT_THRESHOLD,
    Metric,
    binarize,
    nanmean,
    per_sample_sum,
    safe_div,
)
from moekit.registry import METRICS


class OverlapMetric(Metric):
    """Shared statistics of IoU and Dice: per class ``I, P, G`` and per-image score sums."""

    higher_is_better = True

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        background: int | None = 0,
        ignore_index: int | None = None,
    ) -> None:
        self.threshold = float(threshold)
        self.background = background
        self.ignore_index = ignore_index
        super().__init__(num_classes, class_names)

    @property
    def num_stats(self) -> int:
        return 5 * self.num_classes

    def score(self, inter: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        """The overlap score from intersection and the two areas."""
        raise NotImplementedError

    def stats(self, preds: Tensor, targets: Tensor) -> Tensor:
        pred, target, valid = binarize(preds, targets, self.threshold, self.ignore_index)
        pred, target = pred & valid, target & valid
        inter = per_sample_sum(pred & target)
        area_p, area_g = per_sample_sum(pred), per_sample_sum(target)
        if is_class_index(preds, targets) and self.background is not None:
            for area in (inter, area_p, area_g):
                area[:, self.background] = 0
        image_score = self.score(inter, area_p, area_g)
        defined = ~torch.isnan(image_score)
        image_score = torch.where(defined, image_score, torch.zeros_like(image_score))
        return torch.cat([inter, area_p, area_g, image_score, defined.float()], dim=1)

    def reduce(self, total: Tensor) -> dict[str, float]:
        inter, area_p, area_g, image_sum, image_count = total.view(5, self.num_classes)
        dataset = self.score(inter, area_p, area_g)
        per_image = safe_div(image_sum, image_count)
        return {
            "": nanmean(dataset),
            **self.per_class(dataset),
            "per_image": nanmean(per_image),
            **self.per_class(per_image, prefix="per_image/"),
        }


@METRICS.register("iou")
class IoU(OverlapMetric):
    """Foreground intersection over union ``I / (P + G - I)`` per class (Jaccard index)."""

    def score(self, inter: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        return safe_div(inter, pred + target - inter)


@METRICS.register("dice")
class Dice(OverlapMetric):
    """Foreground Dice coefficient ``2 I / (P + G)`` per class (F1 on pixels)."""

    def score(self, inter: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        return safe_div(2 * inter, pred + target)
