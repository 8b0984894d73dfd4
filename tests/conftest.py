"""Shared test settings: quiet albumentations, deterministic CPU threads, hypothesis profile."""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(min(2, os.cpu_count() or 1))

settings.register_profile(
    "moekit",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("moekit")
