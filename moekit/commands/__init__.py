"""One module per ``moekit`` subcommand; each exposes ``register(subparsers)``.

A command module stays cheap to import (heavy imports go inside its handler) so that
``moekit --help`` is fast.
"""
