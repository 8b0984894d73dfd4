"""Routers: gate logits -> Routing (which experts, with which weights)."""

from moekit.autoimport import import_submodules
from moekit.routing.base import Router
from moekit.routing.select import select_top_k, select_top_p
from moekit.routing.types import Routing, RoutingRecord

import_submodules(__name__)

__all__ = ["Router", "Routing", "RoutingRecord", "select_top_k", "select_top_p"]
