"""Task weightings: equal, fixed, uncertainty (Kendall et al. 2018)."""

import pytest
import torch

import moekit.losses.weighting  # noqa: F401  (registers WEIGHTINGS)
from moekit.errors import ConfigError
from moekit.registry import WEIGHTINGS
from moekit.types import Task

TASKS = {
    "cls": Task.from_config("cls", {"kind": "multiclass", "num_classes": 3}),
    "depth": Task.from_config("depth", {"kind": "regression"}),
}


def test_equal_and_fixed():
    losses = {"cls": torch.tensor(2.0), "depth": torch.tensor(3.0)}
    assert WEIGHTINGS.build({"type": "equal"}, tasks=TASKS)(losses).item() == 5.0
    fixed = WEIGHTINGS.build({"type": "fixed", "weights": {"depth": 0.5}}, tasks=TASKS)
    assert fixed(losses).item() == 3.5
    assert fixed.weights() == {"cls": 1.0, "depth": 0.5}
    with pytest.raises(ConfigError, match=r"unknown task 'dept'.*did you mean 'depth'"):
        WEIGHTINGS.build({"type": "fixed", "weights": {"dept": 1.0}}, tasks=TASKS)


def test_uncertainty_formula_with_half_factors():
    weighting = WEIGHTINGS.build({"type": "uncertainty"}, tasks=TASKS)
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([0.3, -0.7]))
    l_cls, l_depth = torch.tensor(1.5), torch.tensor(0.8)
    total = weighting({"cls": l_cls, "depth": l_depth})
    expected = (torch.exp(torch.tensor(-0.3)) * 1.5 + 0.15) + (
        0.5 * torch.exp(torch.tensor(0.7)) * 0.8 - 0.35
    )
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert weighting.weights()["depth"] == pytest.approx(0.5 * torch.exp(torch.tensor(0.7)).item())


def test_uncertainty_optimum_is_sigma_squared_equals_loss():
    """d/ds [exp(-s) L + s/2] = 0 at exp(s) = 2L; absent tasks get no gradient."""
    weighting = WEIGHTINGS.build({"type": "uncertainty"}, tasks=TASKS)
    optimizer = torch.optim.SGD(weighting.parameters(), lr=0.1)
    for _ in range(500):
        optimizer.zero_grad()
        weighting({"cls": torch.tensor(2.0)}).backward()
        optimizer.step()
    assert torch.exp(weighting.log_vars[0]).item() == pytest.approx(4.0, rel=1e-3)
    assert weighting.log_vars[1].item() == 0.0
