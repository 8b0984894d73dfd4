"""Metrics (accuracy, F1, IoU/Dice, kappa, multi-task delta)."""

from moekit.autoimport import import_submodules

import_submodules(__name__)
