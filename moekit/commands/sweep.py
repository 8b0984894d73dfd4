"""``moekit sweep STUDY.yaml [--profile P] [--only NAME ...] [--dry-run] [--resume]``."""

from __future__ import annotations

import argparse
import sys

from moekit.commands.config import add_override_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="run an ablation study from experiments/ and write its results table",
        description="Run every variant of a study (one run directory each, in order), then "
        "write results.csv, results.md (mean ± std over seeds, best marked) and a bar chart per "
        "column into the study directory (docs/experiments.md). A failing variant is recorded "
        "and the study goes on.",
    )
    parser.add_argument("study", help="a study YAML file, e.g. experiments/idrid_routing.yaml")
    parser.add_argument(
        "--profile", help="a form of the study from its 'profiles' (e.g. cpu); default: full"
    )
    parser.add_argument(
        "--only", nargs="+", action="extend", metavar="NAME", help="run only these variants"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="resolve and check every variant, run nothing"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip finished variants, continue interrupted ones from their last checkpoint",
    )
    parser.add_argument("--output-dir", help="parent of the study directory (default: the study's)")
    add_override_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moekit.sweep import StudyRunner, load_study, write_results

    study = load_study(args.study, args.profile, args.output_dir)
    runner = StudyRunner(study, args.overrides)
    if args.dry_run:
        rows = runner.plan(args.only)
        print(f"study {study.name}: {len(rows)} runs into {study.directory}")
        for row in rows:
            print(f"- {row['variant']} seed {row['seed']} [{row['state']}] {row['what']}")
            if row["error"]:
                print(f"moekit: error: {row['variant']}: {row['error']}", file=sys.stderr)
        return 2 if any(row["error"] for row in rows) else 0
    outcomes = runner.run(args.only, resume=args.resume)
    results = write_results(study)
    print(results["markdown"], end="")
    print(f"\nstudy directory: {study.directory} (results.md, results.csv, figures/)")
    return 1 if any(o.status == "failed" for o in outcomes) else 0
