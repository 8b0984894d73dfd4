"""Training engine on accelerate: build_experiment, Trainer, checkpoints, run directory."""

from moekit.autoimport import import_submodules

import_submodules(__name__)
