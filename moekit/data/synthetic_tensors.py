"""A tiny generated two-task dataset for tests, docs and smoke runs (``synthetic_tensors``).

Every image is noise plus one bright disc in one colour channel. Tasks (their names are
fixed): ``cls`` is the channel of the disc (multiclass, ``num_classes`` classes), ``seg`` the
disc's mask (one binary channel) and ``size`` its radius over the image size (regression).
All of it is a function of ``(seed, split)``; ``label_fraction`` leaves a fixed subset of the
samples unlabelled per task so that ``has_target`` masking is exercised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from moekit.errors import ConfigError, did_you_mean
from moekit.registry import DATASETS

TASKS = ("cls", "seg", "size")
SPLITS = {"train": 0, "val": 1, "test": 2}


@DATASETS.register("synthetic_tensors")
class SyntheticTensors(Dataset):
    """Noise images with one bright disc; targets for ``cls``, ``seg`` and ``size``.

    Args:
        split: ``train``, ``val`` or ``test`` (disjoint random streams).
        num_samples: images in the split.
        image_size: side of the square images.
        num_classes: classes of ``cls`` (the disc's channel; at most ``channels``).
        channels: image channels.
        tasks: the tasks to return, a subset of ``cls, seg, size``.
        label_fraction: ``{task: fraction}`` of labelled samples (default 1.0 each).
        noise: standard deviation of the background noise.
        contrast: brightness the disc adds to its channel.
        seed: base seed.
    """

    def __init__(
        self,
        split: str = "train",
        num_samples: int = 32,
        image_size: int = 32,
        num_classes: int = 3,
        channels: int = 3,
        tasks: Sequence[str] = ("cls", "seg"),
        label_fraction: Mapping[str, float] | None = None,
        noise: float = 0.3,
        contrast: float = 1.5,
        seed: int = 0,
    ) -> None:
        if split not in SPLITS:
            raise ConfigError(
                f"synthetic_tensors.split: unknown split '{split}'; valid: {', '.join(SPLITS)}"
                f"{did_you_mean(str(split), SPLITS)}"
            )
        for task in [*tasks, *(label_fraction or {})]:
            if task not in TASKS:
                raise ConfigError(
                    f"synthetic_tensors: unknown task '{task}'; valid: {', '.join(TASKS)}"
                    f"{did_you_mean(str(task), TASKS)}"
                )
        if not 1 <= num_classes <= channels:
            raise ConfigError(
                f"synthetic_tensors.num_classes: expected 1..{channels}, got {num_classes}"
            )
        self.tasks = list(tasks)
        generator = torch.Generator().manual_seed(int(seed) * 1000 + SPLITS[split])
        size = int(image_size)
        self.inputs = noise * torch.randn(num_samples, channels, size, size, generator=generator)
        self.labels = torch.randint(0, num_classes, (num_samples,), generator=generator)
        radius = size * (0.12 + 0.16 * torch.rand(num_samples, generator=generator))
        centre = radius[:, None] + (size - 2 * radius[:, None]) * torch.rand(
            num_samples, 2, generator=generator
        )
        grid = torch.arange(size, dtype=torch.float32) + 0.5
        dist2 = (grid[None, :, None] - centre[:, 0, None, None]) ** 2 + (
            grid[None, None, :] - centre[:, 1, None, None]
        ) ** 2
        self.masks = (dist2 <= radius[:, None, None] ** 2).float().unsqueeze(1)
        self.inputs[torch.arange(num_samples), self.labels] += contrast * self.masks[:, 0]
        self.sizes = (radius / size).unsqueeze(1)
        fractions = dict(label_fraction or {})
        self.labelled = {}
        for task in TASKS:
            count = round(float(fractions.get(task, 1.0)) * num_samples)
            chosen = torch.randperm(num_samples, generator=generator)[:count]
            self.labelled[task] = torch.zeros(num_samples, dtype=torch.bool)
            self.labelled[task][chosen] = True

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        targets = {"cls": self.labels[index], "seg": self.masks[index], "size": self.sizes[index]}
        has_target = {task: bool(self.labelled[task][index]) for task in self.tasks}
        return {
            "inputs": self.inputs[index],
            "targets": {
                t: targets[t] if has_target[t] else torch.zeros_like(targets[t]) for t in self.tasks
            },
            "has_target": has_target,
            "meta": {"index": index},
        }
