"""Task losses, routing (aux) losses and task weightings."""

from moekit.autoimport import import_submodules

import_submodules(__name__)
