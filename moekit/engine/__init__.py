"""Training engine on accelerate: build_experiment, Trainer, checkpoints, run directory."""

from moekit.autoimport import import_submodules
from moekit.engine.checkpoint import load_model
from moekit.engine.eval_run import evaluate_run
from moekit.engine.experiment import Experiment, build_experiment
from moekit.engine.trainer import Trainer

import_submodules(__name__)

__all__ = ["Experiment", "Trainer", "build_experiment", "evaluate_run", "load_model"]
