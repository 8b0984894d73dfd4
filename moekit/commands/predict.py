"""``moekit predict RUN_OR_ARTIFACT INPUTS... --out DIR [--tta flip]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="predict on new image files with a trained run or an exported artifact",
        description="Run a trained model on image files of any size: each is brought to the "
        "run's input geometry the way its training images were (the run's preprocess step), "
        "and its predictions are mapped back to its own pixels. Writes DIR/predictions.csv "
        "(per task the probabilities, the decision at the run's thresholds, class names, the "
        "experts selected), DIR/masks/<id>_<task>.png at the input's resolution and "
        "DIR/overlays/<id>.png. An unreadable file is reported in one line and skipped; the "
        "status is then 2.",
    )
    parser.add_argument("source", help="a run directory or an artifact folder (moekit export)")
    parser.add_argument(
        "inputs",
        nargs="+",
        help="image files, folders of images, or CSV tables of files (one column per "
        "modality, named after it, or 'path'; an optional 'id' column; an empty cell: the "
        "modality is missing)",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"))
    parser.add_argument(
        "--split",
        default=None,
        help="a run's dataset the input pipeline is read from (default: its test, else val, "
        "else train split; artifacts record theirs)",
    )
    parser.add_argument(
        "--tta", default="none", choices=("none", "flip"), help="test-time augmentation"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (auto: GPU if any)")
    parser.add_argument("--no-overlays", action="store_true", help="skip the overlay figures")
    parser.add_argument(
        "--overwrite", action="store_true", help="write into a --out folder that is not empty"
    )
    parser.add_argument(
        "--submission",
        metavar="FILE",
        help="also write the ODIR study's submission CSV: the template's ids in order with "
        "0/1 D, G, A at the run's thresholds (moekit.projects.odir.submission)",
    )
    parser.add_argument(
        "--template",
        metavar="CSV",
        help="the submission template (default: onsite_test_submission.csv of the run's data)",
    )
    parser.set_defaults(func=run)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _claim(out: Path, source: Path, overwrite: bool) -> None:
    from moekit.errors import ConfigError

    out_abs, source_abs = out.resolve(), source.resolve()
    if out_abs == source_abs or out_abs in source_abs.parents:
        raise ConfigError(f"--out {out}: that is the source (or holds it); choose a new folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out}: is not empty; pass --overwrite to write into it")


def _submission(args: argparse.Namespace, source: Path, tasks: dict, rows: list) -> None:
    """Write ``--submission`` from the predictions (the ODIR study's format)."""
    from moekit.engine.checkpoint import checkpoint_dir, read_config
    from moekit.errors import ConfigError
    from moekit.projects.odir import submission

    labels = [name for name, task in tasks.items() if task.kind == "multilabel"]
    if not labels:
        raise ConfigError("--submission: the run has no multi-label task")
    if args.template is not None:
        template = Path(args.template)
    else:
        template = submission.template_of_run(read_config(checkpoint_dir(source, args.checkpoint)))
    decisions = submission.decisions_from_predictions(rows, labels[0])
    path = submission.write_submission(
        args.submission, submission.read_template(template), decisions
    )
    print(f"submission: {path} ({template})")


def run(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from moekit.engine.rundir import run_lock
    from moekit.inference.artifact import is_artifact

    source, out = Path(args.source), Path(args.out)
    _claim(out, source, args.overwrite)
    inside_run = not is_artifact(source) and source.resolve() in out.resolve().parents
    with run_lock(source, "moekit predict") if inside_run else nullcontext():
        return _predict(args, source, out)


def _predict(args: argparse.Namespace, source: Path, out: Path) -> int:
    from moekit.inference.inputs import collect_inputs
    from moekit.inference.predict import load_predictor, predict_to_folder

    predictor = load_predictor(source, args.checkpoint, args.split, args.tta, _device(args.device))
    items = collect_inputs(args.inputs, predictor.pipeline)
    result = predict_to_folder(predictor, items, out, overlays=not args.no_overlays)
    done = len(result.rows)
    print(f"predicted {done} of {len(items)} inputs: {result.csv or out}")
    if args.submission and not result.failures:
        _submission(args, source, predictor.tasks, result.rows)
    if not result.failures:
        return 0
    print(f"moekit: {len(result.failures)} of {len(items)} inputs failed:", file=sys.stderr)
    for item, _ in result.failures:
        print(f"  {item.where}", file=sys.stderr)
    return 2
