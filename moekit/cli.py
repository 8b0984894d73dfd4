"""The ``moekit`` command line.

Each subcommand lives in ``moekit/commands/<module>.py`` and registers itself with
``register(subparsers)``. A user error (:class:`moekit.errors.MoekitError`: a config mistake, a
bad or missing data file, a bad checkpoint) prints one line to stderr and exits with status 2;
``--debug`` shows its traceback instead. Any other exception is a bug (in moekit or in a
component of the user's): its traceback is printed and the status is 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from moekit.errors import MoekitError, Preempted

PREEMPTED_STATUS = 143
"""Exit status after a SIGTERM that saved a resumable checkpoint (128 + SIGTERM, as a shell
reports a process ended by the signal)."""

COMMAND_MODULES = (
    "moekit.commands.listing",
    "moekit.commands.configs",
    "moekit.commands.config",
    "moekit.commands.train",
    "moekit.commands.eval",
    "moekit.commands.data",
    "moekit.commands.bench",
    "moekit.commands.usage",
    "moekit.commands.prune",
    "moekit.commands.export",
    "moekit.commands.predict",
    "moekit.commands.flops",
    "moekit.commands.viz",
    "moekit.commands.cam",
    "moekit.commands.results",
    "moekit.commands.sweep",
    "moekit.commands.demo",
)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit 2), like moekit's own."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="moekit",
        description="Mixture-of-Experts multi-task learning for vision and medical imaging.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=OneLineParser
    )
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MoekitError as exc:
        if args.debug:
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, Preempted):
            print(f"moekit: {message}", file=sys.stderr)
            return PREEMPTED_STATUS
        print(f"moekit: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moekit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (moekit ... | head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
