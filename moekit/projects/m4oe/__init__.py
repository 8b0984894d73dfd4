"""M4oE (Jiang et al. 2024): the multi-modal multi-task MoE model, its blocks and heads."""

from moekit.autoimport import import_submodules

import_submodules(__name__)
