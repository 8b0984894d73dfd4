"""Expert usage, per-task extraction, FLOPs, figures."""

from moekit.autoimport import import_submodules

import_submodules(__name__)
