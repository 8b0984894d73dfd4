"""Ablation studies: a base config, variants, seeds, one results table (docs/experiments.md)."""

from moekit.sweep.results import write_results
from moekit.sweep.runner import StudyRunner
from moekit.sweep.study import Study, load_study

__all__ = ["Study", "StudyRunner", "load_study", "write_results"]
