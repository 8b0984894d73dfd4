"""One seed for everything random: Python, NumPy, torch, loader workers and augmentation."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool | str = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally force deterministic kernels.

    ``deterministic: true`` makes torch raise on an operation without a deterministic
    implementation; ``"warn"`` only warns. Both disable cuDNN benchmarking and set
    ``CUBLAS_WORKSPACE_CONFIG`` as cuBLAS requires.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=deterministic == "warn")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
