"""Thin script over `moekit flops` (same arguments): `python tools/flops.py --help`."""

import sys

from moekit.cli import main

if __name__ == "__main__":
    sys.exit(main(["flops", *sys.argv[1:]]))
