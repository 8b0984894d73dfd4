"""``moekit data ACTION``: dataset utilities (synthetic replicas of real dataset layouts).

Actions are listed in :data:`ACTIONS`: each is ``(help, add_arguments, run)``. Adding one (say
``make-pascal``) means writing its two functions and adding one entry.

``moekit data make-idrid DIR [--n-grading N] [--n-seg N] [--size WxH] [--seed S]`` writes a
synthetic IDRiD replica in the real download's layout. ``N`` counts training images; the test
split gets the release's proportion (grading 103/413 of N, segmentation 27/54 of N, rounded,
at least 1).

``moekit data make-pascal DIR [--n-train N] [--n-val N] [--size WxH] [--seed S] [--matlab]``
writes a synthetic PASCAL-Context replica in the ``PASCAL_MT`` layout (``docs/datasets.md``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from moekit.errors import ConfigError

Action = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def parse_wxh(text: str) -> tuple[int, int]:
    """``"384x256"`` -> ``(384, 256)`` (width, height)."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 384x256, got {text!r}")
    return int(parts[0]), int(parts[1])


def _test_count(n_train: int, test: int, train: int) -> int:
    return max(1, round(n_train * test / train)) if n_train > 0 else 0


def _add_make_idrid(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dir", help="folder to write (gets 'A. Segmentation', 'B. Disease Grading')"
    )
    parser.add_argument(
        "--n-grading",
        type=int,
        default=60,
        metavar="N",
        help="grading training images (test: 103/413 of N; default 60)",
    )
    parser.add_argument(
        "--n-seg",
        type=int,
        default=24,
        metavar="N",
        help="segmentation training images (test: N/2; default 24)",
    )
    parser.add_argument(
        "--size",
        type=parse_wxh,
        default=(384, 256),
        metavar="WxH",
        help="image size, width x height (default 384x256)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _run_make_idrid(args: argparse.Namespace) -> int:
    from moekit.data.replicas.idrid import make_idrid_replica

    if args.n_grading < 0 or args.n_seg < 0:
        raise ConfigError("--n-grading and --n-seg must be >= 0")
    counts = {
        "n_grading_train": args.n_grading,
        "n_grading_test": _test_count(args.n_grading, 103, 413),
        "n_seg_train": args.n_seg,
        "n_seg_test": _test_count(args.n_seg, 27, 54),
    }
    root = make_idrid_replica(args.dir, size=args.size, seed=args.seed, **counts)
    print(
        f"wrote an IDRiD replica to {root}: grading {counts['n_grading_train']} train / "
        f"{counts['n_grading_test']} test, segmentation {counts['n_seg_train']} train / "
        f"{counts['n_seg_test']} test, {args.size[0]}x{args.size[1]} px"
    )
    return 0


def _add_make_pascal(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="folder to write (the PASCAL_MT layout, docs/datasets.md)")
    parser.add_argument(
        "--n-train",
        type=int,
        default=8,
        metavar="N",
        help="images in ImageSets/Context/train.txt (default 8)",
    )
    parser.add_argument(
        "--n-val",
        type=int,
        default=4,
        metavar="N",
        help="images in ImageSets/Context/val.txt (default 4)",
    )
    parser.add_argument(
        "--size",
        type=parse_wxh,
        default=(128, 96),
        metavar="WxH",
        help="image size, width x height (default 128x96)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--matlab",
        action="store_true",
        help="write LabelMap and human parts as .mat, as the release (needs scipy)",
    )


def _run_make_pascal(args: argparse.Namespace) -> int:
    from moekit.data.replicas.pascal_context import make_pascal_context_replica

    if args.n_train < 0 or args.n_val < 0:
        raise ConfigError("--n-train and --n-val must be >= 0")
    width, height = args.size
    root = make_pascal_context_replica(
        args.dir, args.n_train, args.n_val, (height, width), args.seed, matlab=args.matlab
    )
    print(
        f"wrote a PASCAL-Context replica to {root}: {args.n_train} train / {args.n_val} val, "
        f"{width}x{height} px"
    )
    return 0


ACTIONS: dict[str, Action] = {
    "make-idrid": (
        "write a synthetic IDRiD replica in the real download's folder layout",
        _add_make_idrid,
        _run_make_idrid,
    ),
    "make-pascal": (
        "write a synthetic PASCAL-Context replica in the PASCAL_MT folder layout",
        _add_make_pascal,
        _run_make_pascal,
    ),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="dataset utilities (synthetic replicas)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, (help_text, add_arguments, run) in ACTIONS.items():
        action = actions.add_parser(name, help=help_text, description=help_text)
        add_arguments(action)
        action.set_defaults(func=run)
