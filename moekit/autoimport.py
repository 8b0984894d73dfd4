"""Import every module of a package so that its registry entries exist.

Adding a router, loss or model means adding one file with one ``@REGISTRY.register``: the
package's ``__init__`` calls :func:`import_submodules` and nothing else has to change.
"""

from __future__ import annotations

import importlib
import pkgutil


def import_submodules(package: str) -> None:
    """Import all modules and subpackages of ``package`` (private ``_x`` modules too)."""
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        importlib.import_module(f"{package}.{info.name}")
