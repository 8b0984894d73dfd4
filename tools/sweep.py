"""Thin script over `moekit sweep` (same arguments): `python tools/sweep.py --help`."""

import sys

from moekit.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
