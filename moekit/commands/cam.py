"""``moekit cam RUN (--images FILES | --split S) [--task T] [--class C ...] --out DIR``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cam",
        help="draw Grad-CAM class-activation maps of a trained run",
        description="Grad-CAM maps (Selvaraju et al. 2017) of a run's classification task for "
        "image files or a split's first images: OUT/<id>.png (the image, one panel per class "
        "with the probability, the decision at the run's thresholds and the truth) and "
        "OUT/cam.csv. The layer is the last stage of the backbone (ViT/Swin tokens on their "
        "grid) unless --layer names a module. --experts adds the map through each expert of "
        "the MoE head.",
    )
    parser.add_argument("run_dir", help="a run directory written by moekit train")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", help="image files or folders of images")
    source.add_argument("--split", help="train, val or test: its first --limit images")
    parser.add_argument("--task", help="the classification task (default: the first)")
    parser.add_argument(
        "--class", dest="classes", nargs="+", help="class names or indices (default: all)"
    )
    parser.add_argument("--layer", help="module path of the maps' layer (default: see above)")
    parser.add_argument("--experts", action="store_true", help="also the map through each expert")
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"))
    parser.add_argument("--limit", type=int, default=8, help="images of --split (default 8)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moekit.analysis.cam_report import cam_run
    from moekit.engine.rundir import run_lock
    from moekit.errors import ConfigError

    if args.limit < 1:
        raise ConfigError("--limit: expected a positive number of images")
    with run_lock(args.run_dir, "moekit cam"):
        rows = cam_run(
            args.run_dir,
            args.out,
            images=args.images,
            split=args.split,
            task=args.task,
            classes=args.classes,
            layer=args.layer,
            experts=args.experts,
            checkpoint=args.checkpoint,
            limit=args.limit,
        )
    images = len({row["id"] for row in rows})
    print(f"wrote Grad-CAM figures of {images} images to {args.out} (cam.csv)")
    return 0
