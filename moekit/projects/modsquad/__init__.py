"""Mod-Squad (Chen et al., CVPR 2023): the MoE ViT and its upcycling from a dense timm ViT."""

from moekit.autoimport import import_submodules

import_submodules(__name__)
