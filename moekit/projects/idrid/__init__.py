"""The IDRiD multi-task MoE model (Roy 2025): model, Table 1, demo and benchmark."""

from moekit.autoimport import import_submodules

import_submodules(__name__)
