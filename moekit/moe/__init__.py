"""Sparse dispatch and MoE layers."""

from moekit.autoimport import import_submodules
from moekit.moe.attention import MoEAttention
from moekit.moe.base import MoELayer
from moekit.moe.mlp import MoEMLP
from moekit.moe.modules import MoEModules
from moekit.moe.naming import keep_task_routers, moe_layers, name_moe_layers, set_routing
from moekit.moe.soft_moe import SoftMoE

import_submodules(__name__)

__all__ = [
    "MoEAttention",
    "MoELayer",
    "MoEMLP",
    "MoEModules",
    "SoftMoE",
    "keep_task_routers",
    "moe_layers",
    "name_moe_layers",
    "set_routing",
]
