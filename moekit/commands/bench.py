"""``moekit bench SECTION [options]``: benchmarks that print a markdown table.

Each section is a module exposing ``main(argv) -> int`` (and ``run(...)`` returning the
numbers), named in :data:`SECTIONS`: the generic benchmarks live in ``moekit/bench/``, a
system's own in its ``moekit/projects/<system>/`` package. ``moekit bench SECTION --help``
shows the section's options.
"""

from __future__ import annotations

import argparse
import importlib

SECTIONS = {
    "moe": "moekit.bench.moe",
    "prune": "moekit.bench.extraction",
    "idrid": "moekit.projects.idrid.bench",
}
"""Section name -> module (imported only when the section runs)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    available = sorted(SECTIONS)
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark section and print its table",
        description=f"Benchmark sections: {', '.join(available)}. "
        "Run 'moekit bench SECTION --help' for a section's options.",
    )
    parser.add_argument("section", choices=available, help="the benchmark to run")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="options of the section")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(SECTIONS[args.section])
    return int(module.main(args.options) or 0)
