"""Plain building blocks: DSConv, ASPP, DeepLabV3+ decoder, SE, attention pooling."""

from moekit.autoimport import import_submodules

import_submodules(__name__)
