"""Test-time augmentation: probabilities per task kind, flip averaging of dense and class
predictions."""

import pytest
import torch
from torch import nn

from moekit.analysis.tta import predict_probabilities, task_probabilities
from moekit.errors import ConfigError
from moekit.types import Batch, ModelOutput, Task

TASKS = {
    "OD": Task("OD", "segmentation", 1, (), ()),
    "rg": Task("rg", "multiclass", 3, (), ()),
    "parts": Task("parts", "segmentation", 4, (), ()),
}


class Toy(nn.Module):
    """A model that sees where a pixel is: a horizontal ramp is added before a 1x1 conv, so
    its predictions on a mirror image are not the mirror of its predictions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.seg = nn.Conv2d(4, 1, 1)
        self.parts = nn.Conv2d(4, 4, 1)
        self.cls = nn.Linear(8, 3)

    def forward(self, inputs, task_mask=None):
        ramp = torch.linspace(-1, 1, inputs.shape[-1]).expand(
            *inputs.shape[:-3], 1, *inputs.shape[-2:]
        )
        x = torch.cat([inputs, ramp], dim=1)
        left, right = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        pooled = torch.cat([left.mean((2, 3)), right.mean((2, 3))], dim=1)
        return ModelOutput({"OD": self.seg(x), "parts": self.parts(x), "rg": self.cls(pooled)})


def _batch(seed=0):
    return Batch(torch.randn(2, 3, 6, 10, generator=torch.Generator().manual_seed(seed)), {}, {})


def test_probabilities_by_task_kind():
    logits = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(task_probabilities(TASKS["parts"], logits), logits.softmax(1))
    torch.testing.assert_close(
        task_probabilities(TASKS["OD"], logits[:, :1]), logits[:, :1].sigmoid()
    )
    regression = Task("depth", "regression", 1, (), ())
    torch.testing.assert_close(task_probabilities(regression, logits), logits)


def test_flip_averages_each_view_with_dense_maps_unflipped():
    model, batch = Toy().eval(), _batch()
    out = predict_probabilities(model, batch, TASKS, tta="flip")
    plain = model(batch.inputs).preds
    mirror = model(batch.inputs.flip(-1)).preds
    for name in TASKS:  # the reference, written out task by task
        first = task_probabilities(TASKS[name], plain[name])
        second = task_probabilities(TASKS[name], mirror[name])
        if TASKS[name].is_dense:
            second = second.flip(-1)
        torch.testing.assert_close(out[name], (first + second) / 2)
    torch.testing.assert_close(out["rg"].sum(1), torch.ones(2))
    assert not torch.allclose(out["OD"], predict_probabilities(model, batch, TASKS)["OD"])


def test_flip_tta_predictions_are_mirror_symmetric():
    """TTA of the mirror image is the mirror of TTA (what a flip-averaged model must satisfy)."""
    model, batch = Toy().eval(), _batch(1)
    mirrored = Batch(batch.inputs.flip(-1), {}, {})
    a = predict_probabilities(model, batch, TASKS, tta="flip")
    b = predict_probabilities(model, mirrored, TASKS, tta="flip")
    torch.testing.assert_close(a["OD"], b["OD"].flip(-1))
    torch.testing.assert_close(a["parts"], b["parts"].flip(-1))
    torch.testing.assert_close(a["rg"], b["rg"])


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="--tta: expected one of none, flip"):
        predict_probabilities(Toy(), _batch(), TASKS, tta="rotate")
