"""Thin script over `moekit usage` (same arguments): `python tools/usage.py --help`."""

import sys

from moekit.cli import main

if __name__ == "__main__":
    sys.exit(main(["usage", *sys.argv[1:]]))
