"""Task losses, routing (aux) losses and task weightings."""

from moekit.autoimport import import_submodules
from moekit.losses.aux_mutual_information import (  # noqa: F401
    conditional_mutual_information,
    mutual_information,
)

import_submodules(__name__)
