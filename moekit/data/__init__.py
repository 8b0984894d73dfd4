"""Datasets on real on-disk layouts, synthetic replicas, transforms, collate."""

from moekit.autoimport import import_submodules

import_submodules(__name__)
