"""M4oE (Wu et al., ICLR 2025): the multi-modal multi-task MoE model, its baselines, blocks,
heads and analysis."""

from moekit.autoimport import import_submodules

import_submodules(__name__)
