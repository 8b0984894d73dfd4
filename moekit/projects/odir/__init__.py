"""The ODIR transfer-learning study: the ``transfer_classifier`` model on any timm backbone and
the ODIR-2019 challenge score."""

from moekit.autoimport import import_submodules

import_submodules(__name__)
