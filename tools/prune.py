"""Thin script over `moekit prune` (same arguments): `python tools/prune.py --help`."""

import sys

from moekit.cli import main

if __name__ == "__main__":
    sys.exit(main(["prune", *sys.argv[1:]]))
