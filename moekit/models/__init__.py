"""Backbones, heads and assembled models."""

from moekit.autoimport import import_submodules

import_submodules(__name__)
