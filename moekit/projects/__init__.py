"""One package per reproduced system: its model assembly, tables, figures and reference rows.

The generic layers (routing, moe, nn, losses, metrics, models, data, engine, analysis) never
name a dataset or a paper's task; what belongs to one paper lives here.
"""

from moekit.autoimport import import_submodules

import_submodules(__name__)
