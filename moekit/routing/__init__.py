"""Routers: gate logits -> Routing (which experts, with which weights)."""

from moekit.autoimport import import_submodules

import_submodules(__name__)
