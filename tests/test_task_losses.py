"""Task losses: reference formulas, per-sample reduction, target forms."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

import moekit.losses.task_losses  # noqa: F401  (registers TASK_LOSSES)
from moekit.errors import ConfigError, RegistryError
from moekit.losses.task_losses import class_balanced_weights, dense_targets, is_class_index
from moekit.registry import TASK_LOSSES


def build(name, **kwargs):
    return TASK_LOSSES.build({"type": name, **kwargs})


def test_target_forms():
    logits = torch.randn(4, 3, 5, 5)
    index = torch.randint(0, 3, (4, 5, 5))
    assert is_class_index(logits, index)
    assert dense_targets(logits, index).shape == logits.shape
    assert torch.equal(dense_targets(logits, index).argmax(1), index)
    binary = torch.randn(4, 1, 5, 5)
    assert dense_targets(binary, torch.ones(4, 5, 5)).shape == binary.shape
    assert not is_class_index(binary, torch.ones(4, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="do not fit"):
        dense_targets(logits, torch.zeros(4, 2))


def test_cross_entropy_matches_torch_per_sample():
    logits, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    out = build("cross_entropy")(logits, y)
    assert out.shape == (6,)
    torch.testing.assert_close(out, F.cross_entropy(logits, y, reduction="none"))
    seg_logits, seg_y = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    seg_y[0, 0, :] = 255
    seg = build("cross_entropy", ignore_index=255)(seg_logits, seg_y)
    ref = F.cross_entropy(seg_logits[:1], seg_y[:1], ignore_index=255)
    torch.testing.assert_close(seg[0], ref)


def test_bce_and_class_balanced():
    logits, y = torch.randn(5, 3), torch.randint(0, 2, (5, 3)).float()
    torch.testing.assert_close(
        build("bce")(logits, y),
        F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1),
    )
    weights = class_balanced_weights([10, 100, 1000], beta=0.999)
    assert weights.sum().item() == pytest.approx(3.0)
    assert weights[0] > weights[1] > weights[2]
    effective = [(1 - 0.999**n) / (1 - 0.999) for n in (10, 100, 1000)]
    inverse = [1 / e for e in effective]
    expected = [3 * w / sum(inverse) for w in inverse]
    assert weights.tolist() == pytest.approx(expected, rel=1e-5)
    out = build("class_balanced_bce", counts=[10, 100, 1000])(logits, y)
    ref = F.binary_cross_entropy_with_logits(logits, y, pos_weight=weights, reduction="none")
    torch.testing.assert_close(out, ref.mean(1))
    with pytest.raises(ConfigError, match="beta"):
        build("class_balanced_bce", counts=[1, 2], beta=1.0)


def test_sigmoid_focal_is_torchvision_on_one_hot_labels():
    """The IDRiD paper's classification focal loss: sigmoid form on one-hot labels."""
    logits, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    loss = build("focal", form="sigmoid", alpha=0.75, gamma=4.0)(logits, y)
    one_hot = F.one_hot(y, 5).float()
    ref = sigmoid_focal_loss(logits, one_hot, alpha=0.75, gamma=4.0, reduction="none").mean(1)
    torch.testing.assert_close(loss, ref)


def test_softmax_focal_formula_and_gamma_zero_is_cross_entropy():
    logits, y = torch.randn(7, 4), torch.randint(0, 4, (7,))
    p_t = logits.softmax(1).gather(1, y[:, None]).squeeze(1)
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.4])
    expected = -alpha[y] * (1 - p_t) ** 2 * p_t.log()
    torch.testing.assert_close(build("focal", alpha=alpha.tolist())(logits, y), expected)
    torch.testing.assert_close(
        build("focal", gamma=0.0)(logits, y), F.cross_entropy(logits, y, reduction="none")
    )


def test_dice_loss_forms():
    logits = torch.full((2, 1, 4, 4), -20.0)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, :2] = 1
    logits[0, 0, :2] = 20.0
    loss = build("dice", smooth=1.0)(logits, mask)
    assert loss.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)  # perfect and empty-vs-empty
    logits[1, 0] = 20.0  # predicts 16 pixels where there are none
    assert build("dice", smooth=1.0)(logits, mask)[1].item() == pytest.approx(1 - 1 / 17, abs=1e-5)
    multi = torch.randn(3, 4, 6, 6)
    index = torch.randint(0, 4, (3, 6, 6))
    p, g = multi.softmax(1), F.one_hot(index, 4).permute(0, 3, 1, 2).float()
    inter, total = (p * g).sum((2, 3)), p.sum((2, 3)) + g.sum((2, 3))
    expected = (1 - (2 * inter + 1) / (total + 1)).mean(1)
    torch.testing.assert_close(build("dice")(multi, index), expected)
    no_bg = build("dice", include_background=False)(multi, index)
    torch.testing.assert_close(no_bg, (1 - (2 * inter + 1) / (total + 1))[:, 1:].mean(1))


def test_regression_losses():
    preds, y = torch.randn(4, 1), torch.randn(4)
    torch.testing.assert_close(build("l1")(preds, y), (preds[:, 0] - y).abs())
    torch.testing.assert_close(build("mse")(preds, y), (preds[:, 0] - y) ** 2)


def test_losses_are_per_sample_so_batches_split_exactly():
    logits, y = torch.randn(8, 1, 6, 6), torch.randint(0, 2, (8, 1, 6, 6)).float()
    for name in ("bce", "dice", "focal", "l1", "mse"):
        loss = build(name)
        whole = loss(logits, y)
        halves = torch.cat([loss(logits[:3], y[:3]), loss(logits[3:], y[3:])])
        torch.testing.assert_close(whole, halves)
        assert math.isfinite(whole.sum().item())


def test_unknown_option_is_named():
    with pytest.raises(RegistryError, match="does not accept 'gama'"):
        build("focal", gama=2)
    with pytest.raises(ConfigError, match="form"):
        build("focal", form="tanh")
