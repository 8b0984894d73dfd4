"""Expert activations with their backward, so fused dispatch can skip autograd inside a block."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Activation:
    """An elementwise activation ``a = f(h)`` and ``backward(grad_a, h) -> grad_h``."""

    name: str
    forward: Callable[[Tensor], Tensor]
    backward: Callable[[Tensor, Tensor], Tensor]

    def __call__(self, h: Tensor) -> Tensor:
        return self.forward(h)


ACTIVATIONS: dict[str, Activation] = {
    "gelu": Activation("gelu", F.gelu, torch.ops.aten.gelu_backward),
    "gelu_tanh": Activation(
        "gelu_tanh",
        lambda h: F.gelu(h, approximate="tanh"),
        lambda grad, h: torch.ops.aten.gelu_backward(grad, h, approximate="tanh"),
    ),
    "relu": Activation(
        "relu", F.relu, lambda grad, h: torch.ops.aten.threshold_backward(grad, h, 0)
    ),
    "silu": Activation("silu", F.silu, torch.ops.aten.silu_backward),
}


def get_activation(name: str) -> Activation:
    """The activation called ``name``: ``gelu``, ``gelu_tanh``, ``relu`` or ``silu``."""
    if name not in ACTIVATIONS:
        raise ConfigError(
            f"unknown activation '{name}'; valid: {', '.join(ACTIVATIONS)}"
            f"{did_you_mean(str(name), ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]
