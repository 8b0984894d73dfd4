"""``moekit configs [--all]``: the shipped configs and studies, by name, with what each is.

The configs and studies ship inside the package (``moekit/configs``, ``moekit/experiments``), so
an installed moekit trains them from any directory by name: ``moekit train idrid/demo``.
Fragments (files that define no model: ``_*.yaml`` bases, task definitions) are listed with
``--all`` only.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "configs",
        help="list the shipped configs and studies (moekit train NAME)",
        description="List the configs and studies shipped with moekit, with the first "
        "paragraph of each file's leading comment. A config's NAME (e.g. idrid/demo) works "
        "wherever a config file does: moekit train NAME, moekit config show NAME.",
    )
    parser.add_argument(
        "--all", action="store_true", help="also list fragments (bases and task definitions)"
    )
    parser.set_defaults(func=run)


def description(path: Path) -> str:
    """The first paragraph of the file's leading ``#`` comment, on one line."""
    words: list[str] = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text:
            if words:
                break
            continue
        words.extend(text.split())
    return " ".join(words)


def config_name(path: Path, root: Path) -> str:
    """``idrid/demo`` for ``<root>/idrid/demo.yaml``: what ``moekit train`` accepts."""
    return path.relative_to(root).with_suffix("").as_posix()


def is_fragment(path: Path) -> bool:
    """A base or task fragment: a ``_`` file, or a file whose resolved config has no model."""
    from moekit import config

    return path.name.startswith("_") or "model" not in config.load(path)


def shipped_configs(include_fragments: bool = False) -> list[tuple[str, Path]]:
    """``[(name, path)]`` of the shipped configs, sorted by name."""
    from moekit.config import SHIPPED_CONFIGS

    paths = sorted(SHIPPED_CONFIGS.rglob("*.yaml"))
    return [
        (config_name(p, SHIPPED_CONFIGS), p)
        for p in paths
        if include_fragments or not is_fragment(p)
    ]


def _print_rows(rows: list[tuple[str, Path]], width: int) -> None:
    name_width = max((len(name) for name, _ in rows), default=0)
    room = max(width - name_width - 4, 20)
    for name, path in rows:
        text = description(path)
        if len(text) > room:
            text = text[: room - 1].rstrip() + "…"
        print(f"  {name:<{name_width}}  {text}".rstrip())


def run(args: argparse.Namespace) -> int:
    from moekit.config import SHIPPED_CONFIGS, SHIPPED_ROOT

    width = shutil.get_terminal_size((120, 24)).columns
    print(f"configs in {SHIPPED_CONFIGS} (moekit train NAME, moekit config show NAME)")
    _print_rows(shipped_configs(args.all), width)
    experiments = SHIPPED_ROOT / "experiments"
    studies = [(p.stem, p) for p in sorted(experiments.glob("*.yaml"))]
    print(f"\nstudies in {experiments} (moekit sweep experiments/NAME.yaml)")
    _print_rows(studies, width)
    return 0
