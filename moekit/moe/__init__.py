"""Sparse dispatch and MoE layers."""

from moekit.autoimport import import_submodules

import_submodules(__name__)
