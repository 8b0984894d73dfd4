"""One seed for everything random: Python, NumPy, torch, loader workers and augmentation."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool | str = "auto", cpu: bool = True) -> None:
    """Seed Python, NumPy and torch (all devices); choose deterministic kernels.

    ``deterministic: true`` makes torch raise on an operation without a deterministic
    implementation; ``"warn"`` only warns. Both disable cuDNN benchmarking and set
    ``CUBLAS_WORKSPACE_CONFIG`` as cuBLAS requires. ``"auto"`` (the default) is ``true`` for a
    run on the CPU, where it costs little (docs/training.md), and ``false`` on an accelerator.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic == "auto":
        deterministic = cpu
    torch.use_deterministic_algorithms(bool(deterministic), warn_only=deterministic == "warn")
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=deterministic == "warn")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
