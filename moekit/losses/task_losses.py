"""Task losses (registry ``TASK_LOSSES``), each returning one loss value per sample.

Every loss is called as ``loss(preds, targets) -> Tensor[N]`` on the *labelled* rows of a task
only (the trainer selects them with ``Batch.has_target``) and returns the loss of each sample,
averaged over that sample's classes, pixels or outputs. The trainer averages over the labelled
samples of the global batch, so a task without a labelled sample contributes nothing (never
NaN) and the loss of a batch split across processes equals the loss of the whole batch.

``preds`` are raw model outputs (logits) ``[N, C, *spatial]``. Targets come in two forms:

- *class indices*: an integer tensor ``[N, *spatial]`` (multiclass classification, multiclass
  segmentation maps);
- *dense*: a float tensor shaped like ``preds`` (multi-label and binary targets, per-channel
  masks, regression values). ``[N, *spatial]`` targets of a one-channel output are also dense.

Losses that work on probabilities choose a softmax form for class indices and a sigmoid form
for dense targets unless ``form`` says otherwise; ``form: sigmoid`` on class indices one-hot
encodes them (the IDRiD paper's torchvision-style focal loss on grading labels).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.errors import ConfigError
from moekit.registry import TASK_LOSSES

Form = Literal["auto", "softmax", "sigmoid"]


def is_class_index(preds: Tensor, targets: Tensor) -> bool:
    """Whether ``targets`` are class indices (``[N, *s]`` integers) for ``preds [N, C, *s]``."""
    return (
        targets.dim() == preds.dim() - 1 and not targets.is_floating_point() and preds.shape[1] > 1
    )


def dense_targets(preds: Tensor, targets: Tensor) -> Tensor:
    """Targets as a float tensor shaped like ``preds``.

    Class indices are one-hot encoded along dim 1; ``[N, *s]`` targets of a one-channel
    output gain the channel dimension.
    """
    if targets.shape == preds.shape:
        return targets.float()
    if targets.dim() == preds.dim() - 1:
        if preds.shape[1] == 1:
            return targets.unsqueeze(1).float()
        if not targets.is_floating_point():
            one_hot = F.one_hot(targets.long(), preds.shape[1])
            return one_hot.movedim(-1, 1).float()
    raise ValueError(
        f"targets of shape {tuple(targets.shape)} ({targets.dtype}) do not fit predictions of "
        f"shape {tuple(preds.shape)}: expected the same shape or class indices"
    )


def per_sample_mean(values: Tensor, valid: Tensor | None = None) -> Tensor:
    """``[N, ...] -> [N]``: the mean over all but the first dimension (over ``valid`` entries)."""
    flat = values.flatten(1)
    if valid is None:
        return flat.mean(dim=1)
    weight = valid.flatten(1).to(flat.dtype)
    return (flat * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)


def _resolve_form(form: Form, preds: Tensor, targets: Tensor) -> str:
    if form == "auto":
        return "softmax" if is_class_index(preds, targets) else "sigmoid"
    if form == "softmax" and not is_class_index(preds, targets):
        raise ValueError("form 'softmax' needs class-index targets")
    return form


def _class_tensor(values: float | Sequence[float] | None, name: str) -> Tensor | None:
    if values is None:
        return None
    tensor = torch.as_tensor(values, dtype=torch.float32)
    if tensor.dim() > 1:
        raise ConfigError(f"{name}: expected a number or a list of numbers, got {values!r}")
    return tensor


def _per_channel(weights: Tensor, preds: Tensor) -> Tensor:
    """Shape per-class weights ``[C]`` to broadcast over ``[N, C, *spatial]``."""
    if weights.numel() not in (1, preds.shape[1]):
        raise ValueError(f"{weights.numel()} class weights for {preds.shape[1]} classes")
    return weights.to(preds.device).view(1, -1, *([1] * (preds.dim() - 2)))


@TASK_LOSSES.register("cross_entropy")
class CrossEntropyLoss(nn.Module):
    """Softmax cross-entropy ``-log softmax(x)_y`` per sample (mean over pixels).

    Args:
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.
        class_weights: optional weight per class; each term is scaled by the weight of its
            target class and the mean over positions is *not* renormalised by the weights
            (unlike torch's ``reduction="mean"``), so the loss stays a per-sample quantity.
        ignore_index: target value of positions that do not count (segmentation maps).
    """

    def __init__(
        self,
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | None = None,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)
        self.class_weights = _class_tensor(class_weights, "cross_entropy.class_weights")
        self.ignore_index = int(ignore_index)

    def forward(self, preds: Tensor, targets: Tensor) -> Tensor:
        preds = preds.float()
        weight = None if self.class_weights is None else self.class_weights.to(preds.device)
        if not is_class_index(preds, targets):
            loss = F.cross_entropy(
                preds,
                targets.float(),
                weight=weight,
                reduction="none",
                label_smoothing=self.label_smoothing,
            )
            return per_sample_mean(loss.unsqueeze(1))
        targets = targets.long()
        loss = F.cross_entropy(
            preds,
            targets,
            weight=weight,
            reduction="none",
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
        )
        return per_sample_mean(loss.unsqueeze(1), (targets != self.ignore_index).unsqueeze(1))


@TASK_LOSSES.register("bce")
class BCELoss(nn.Module):
    """Binary cross-entropy with logits per element, averaged per sample.

    ``-[w_c y log σ(x) + (1 - y) log(1 - σ(x))]`` with an optional positive weight ``w_c`` per
    class (``pos_weight``, a number or a list with one entry per channel).
    """

    def __init__(self, pos_weight: float | Sequence[float] | None = None) -> None:
        super().__init__()
        self.pos_weight = _class_tensor(pos_weight, "bce.pos_weight")

    def forward(self, preds: Tensor, targets: Tensor) -> Tensor:
        preds = preds.float()
        pos_weight = None if self.pos_weight is None else _per_channel(self.pos_weight, preds)
        loss = F.binary_cross_entropy_with_logits(
            preds, dense_targets(preds, targets), pos_weight=pos_weight, reduction="none"
        )
        return per_sample_mean(loss)


AUTO_COUNTS = "auto"
"""``counts: auto`` of a class-balanced loss: the engine substitutes the positives per class of
the training dataset's real labels (see :func:`resolve_auto_counts`)."""


@TASK_LOSSES.register("class_balanced_bce")
class ClassBalancedBCELoss(BCELoss):
    """BCE with class-balanced positive weights (Cui et al., CVPR 2019).

    The weight of class ``c`` with ``n_c`` positive training samples is the inverse effective
    number of samples ``(1 - β) / (1 - β^{n_c})``, normalised so the weights sum to the number of
    classes, and is applied to the positive term of the class (``pos_weight``).

    Args:
        counts: number of positive training samples per class, or ``auto``: the positives of
            the training dataset's labels as listed in its index, before any augmentation or
            oversampling (the ODIR study counted them after its VAE balancing, which made every
            weight equal and CB-BCE plain BCE). ``auto`` is resolved by the experiment builder
            (:func:`resolve_auto_counts`); the loss itself needs numbers.
        beta: ``β`` in ``[0, 1)``; 0 gives equal weights, values near 1 approach inverse frequency.
    """

    def __init__(self, counts: Sequence[float] | str, beta: float = 0.999) -> None:
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"class_balanced_bce.beta: expected 0 <= beta < 1, got {beta}")
        if counts == AUTO_COUNTS:
            raise ConfigError(
                "class_balanced_bce.counts: 'auto' is resolved from the training dataset when an "
                "experiment is built; building the loss alone needs the counts per class"
            )
        if isinstance(counts, str) or not counts or min(counts) < 0:
            raise ConfigError(
                f"class_balanced_bce.counts: expected counts >= 0 per class or 'auto', got "
                f"{counts!r}"
            )
        self.counts = [float(c) for c in counts]
        weights = class_balanced_weights(counts, beta)
        super().__init__(pos_weight=weights.tolist())


def class_balanced_weights(counts: Sequence[float], beta: float) -> Tensor:
    """``w_c ∝ (1 - β) / (1 - β^{n_c})``, normalised to ``Σ_c w_c = C`` (Cui et al. 2019)."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    effective = (1.0 - torch.pow(beta, n)) / (1.0 - beta) if beta > 0 else torch.ones_like(n)
    weights = 1.0 / effective.clamp(min=1e-12)
    return (weights / weights.sum() * len(counts)).float()


def resolve_auto_counts(
    spec: Mapping[str, Any], task: str, train: Callable[[], Any] | None
) -> dict[str, Any]:
    """A loss config with ``counts: auto`` replaced by the training labels' positives per class.

    ``train`` returns the training dataset (called only when a term asks for ``auto``), which
    must offer ``label_counts(task) -> [C]`` counted from its index (no image decoded, no
    augmentation or oversampling applied). Other configs are returned unchanged.
    """
    if spec.get("counts") != AUTO_COUNTS:
        return dict(spec)
    where = f"tasks.{task}.loss ({spec.get('type')}).counts"
    dataset = None if train is None else train()
    if dataset is None:
        raise ConfigError(f"config key '{where}': 'auto' needs a training dataset (data.train)")
    if not callable(getattr(dataset, "label_counts", None)):
        dataset = getattr(dataset, "dataset", dataset)  # a loader over the dataset
    if not callable(getattr(dataset, "label_counts", None)):
        raise ConfigError(
            f"config key '{where}': 'auto' needs a dataset with label_counts(task); "
            f"{type(dataset).__name__} has none, give the counts per class"
        )
    return {**spec, "counts": [float(c) for c in dataset.label_counts(task)]}


@TASK_LOSSES.register("focal")
class FocalLoss(nn.Module):
    """Focal loss ``FL = -α_t (1 - p_t)^γ log p_t`` (Lin et al., ICCV 2017), mean per sample.

    Two forms:

    - ``sigmoid`` (multi-label, binary masks, or one-hot class indices): per element
      ``p_t = p y + (1 - p)(1 - y)``, ``α_t = α y + (1 - α)(1 - y)``, exactly torchvision's
      ``sigmoid_focal_loss``. The IDRiD paper uses it on one-hot grading labels with
      ``α = 0.75, γ = 4``: ``{type: focal, form: sigmoid, alpha: 0.75, gamma: 4}``.
    - ``softmax`` (class indices): ``p_t`` is the softmax probability of the target class and
      ``α_t`` is ``alpha`` (a number) or ``alpha[y]`` (a list with one weight per class).

    ``form: auto`` picks softmax for class indices and sigmoid otherwise. ``alpha: null``
    disables the α factor.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        form: Form = "auto",
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        if form not in ("auto", "softmax", "sigmoid"):
            raise ConfigError(f"focal.form: '{form}' is not one of auto, softmax, sigmoid")
        self.gamma = float(gamma)
        self.alpha = _class_tensor(alpha, "focal.alpha")
        self.form = form
        self.ignore_index = int(ignore_index)

    def forward(self, preds: Tensor, targets: Tensor) -> Tensor:
        preds = preds.float()
        if _resolve_form(self.form, preds, targets) == "softmax":
            return self._softmax(preds, targets.long())
        y = dense_targets(preds, targets)
        p = torch.sigmoid(preds)
        ce = F.binary_cross_entropy_with_logits(preds, y, reduction="none")
        p_t = p * y + (1 - p) * (1 - y)
        loss = ce * (1 - p_t) ** self.gamma
        if self.alpha is not None:
            alpha = _per_channel(self.alpha, preds)
            loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
        return per_sample_mean(loss)

    def _softmax(self, preds: Tensor, targets: Tensor) -> Tensor:
        valid = targets != self.ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        log_p = F.log_softmax(preds, dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
        loss = -((1 - log_p.exp()) ** self.gamma) * log_p
        if self.alpha is not None:
            alpha = self.alpha.to(preds.device)
            loss = loss * (alpha[safe] if alpha.numel() > 1 else alpha)
        return per_sample_mean(loss.unsqueeze(1), valid.unsqueeze(1))


@TASK_LOSSES.register("dice")
class DiceLoss(nn.Module):
    """Soft Dice loss per sample: ``1 - (2 Σ p g + s) / (Σ p + Σ g + s)`` per channel, averaged.

    ``p`` are sigmoid probabilities against dense masks (binary / multi-label, one channel per
    class), or softmax probabilities against one-hot class-index maps (multiclass). Sums run over
    the pixels of one sample, so the loss of a batch is the mean of per-image losses.

    Args:
        smooth: ``s``, keeps empty masks finite (an empty prediction of an empty mask costs 0).
        form: ``auto`` (softmax for class indices, sigmoid otherwise), ``softmax`` or ``sigmoid``.
        include_background: in the softmax form, whether channel 0 counts.
    """

    def __init__(
        self, smooth: float = 1.0, form: Form = "auto", include_background: bool = True
    ) -> None:
        super().__init__()
        if form not in ("auto", "softmax", "sigmoid"):
            raise ConfigError(f"dice.form: '{form}' is not one of auto, softmax, sigmoid")
        self.smooth = float(smooth)
        self.form = form
        self.include_background = bool(include_background)

    def forward(self, preds: Tensor, targets: Tensor) -> Tensor:
        preds = preds.float()
        softmax = _resolve_form(self.form, preds, targets) == "softmax"
        p = preds.softmax(dim=1) if softmax else torch.sigmoid(preds)
        g = dense_targets(preds, targets)
        if softmax and not self.include_background:
            p, g = p[:, 1:], g[:, 1:]
        p, g = p.flatten(2), g.flatten(2)
        dice = (2 * (p * g).sum(-1) + self.smooth) / (p.sum(-1) + g.sum(-1) + self.smooth)
        return (1 - dice).mean(dim=1)


@TASK_LOSSES.register("l1")
class L1Loss(nn.Module):
    """Mean absolute error ``|x - y|`` per sample (regression)."""

    def forward(self, preds: Tensor, targets: Tensor) -> Tensor:
        preds = preds.float()
        return per_sample_mean((preds - dense_targets(preds, targets)).abs())


@TASK_LOSSES.register("mse")
class MSELoss(nn.Module):
    """Mean squared error ``(x - y)²`` per sample (regression)."""

    def forward(self, preds: Tensor, targets: Tensor) -> Tensor:
        preds = preds.float()
        return per_sample_mean((preds - dense_targets(preds, targets)) ** 2)
