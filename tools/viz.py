"""Thin script over `moekit viz` (same arguments): `python tools/viz.py --help`."""

import sys

from moekit.cli import main

if __name__ == "__main__":
    sys.exit(main(["viz", *sys.argv[1:]]))
