"""``moekit bench SECTION [options]``: benchmarks that print a markdown table.

Each section is a module ``moekit/analysis/bench_<section>.py`` exposing ``main(argv) -> int``
(and ``run(...)`` returning the numbers); adding a section means adding such a module, nothing
here changes. ``moekit bench SECTION --help`` shows the section's options.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import pkgutil

PREFIX = "bench_"


def sections() -> list[str]:
    """The available sections, found without importing them."""
    spec = importlib.util.find_spec("moekit.analysis")
    if spec is None or spec.submodule_search_locations is None:
        return []
    names = pkgutil.iter_modules(list(spec.submodule_search_locations))
    return sorted(info.name[len(PREFIX) :] for info in names if info.name.startswith(PREFIX))


def register(subparsers: argparse._SubParsersAction) -> None:
    available = sections()
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
    module = importlib.import_module(f"moekit.analysis.{PREFIX}{args.section}")
    return int(module.main(args.options) or 0)
