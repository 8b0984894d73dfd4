"""M4oE (Wu et al., ICLR 2025): the multi-modal multi-task MoE model, its baselines, blocks,
heads and analysis.

The modules that register models are imported here; :mod:`.analysis` (a command-line entry,
``python -m moekit.projects.m4oe.analysis STUDY_DIR``) is imported where it is used.
"""

from moekit.projects.m4oe import baselines, m4oe_model

__all__ = ["baselines", "m4oe_model"]
