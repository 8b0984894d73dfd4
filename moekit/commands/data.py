"""``moekit data ACTION``: dataset utilities (synthetic replicas of real dataset layouts).

Actions are listed in :data:`ACTIONS`: each is ``(help, add_arguments, run)``. Adding one (say
``make-pascal``) means writing its two functions and adding one entry.

``moekit data make-idrid DIR [--n-grading N] [--n-seg N] [--size WxH] [--seed S]`` writes a
synthetic IDRiD replica in the real download's layout. ``N`` counts training images; the test
split gets the release's proportion (grading 103/413 of N, segmentation 27/54 of N, rounded,
at least 1).

``moekit data make-pascal DIR [--n-train N] [--n-val N] [--size WxH] [--seed S] [--matlab]``
writes a synthetic PASCAL-Context replica in the ``PASCAL_MT`` layout (``docs/datasets.md``).

``moekit data make-gamma DIR`` (or ``--out DIR``) ``[--n-train 100] [--n-test 0] [--bscans 256]
[--field disc|full] [--fundus-size WxH] [--oct-size 64x128] [--uninformative 0.25]
[--missing 0] [--csv] [--seed S]`` writes a synthetic GAMMA replica (fundus photographs, OCT
volumes, disc/cup masks, the grading xlsx) in the real download's layout.

``moekit data make-multiview DIR`` (or ``--out DIR``) ``[--n-cases 120] [--size 96x128]
[--missing-view 0.1] [--seed S]`` writes a four-view mammography replica: ``cases.csv`` for
``DATASETS: multiview_csv`` with its PNG views and CC mass masks.

``moekit data make-odir DIR`` (or ``--out DIR``) ``[--layout study|odir5k] [--n-train 800]
[--n-val 200] [--n-offsite 200] [--n-onsite 250] [--n-patients 40] [--size 256] [--csv]
[--seed S]`` writes a synthetic ODIR replica: the ODIR study's layout (``DATASETS: odir``, the
study's label distribution) or the public ODIR-5K table and images (``DATASETS: odir5k``).

``moekit data vae-augment DATASET_CONFIG --out DIR [--task T] [--size 64x64] [--latent 128]
[--channels 32,64,128,256] [--epochs 60] [--batch-size 32] [--lr 1e-3] [--beta 1] [--seed S]``
balances a training split with the images of one VAE per minority class
(:mod:`moekit.data.vae_augment`), written as a new folder in the dataset's layout.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

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


def _out_dir(args: argparse.Namespace) -> str:
    """The folder given positionally or as ``--out`` (one of them, or both the same)."""
    if args.dir and args.out and args.dir != args.out:
        raise ConfigError(f"give the folder once: DIR {args.dir!r} or --out {args.out!r}")
    if not (args.dir or args.out):
        raise ConfigError("give the folder to write: DIR or --out DIR")
    return args.dir or args.out


def _add_out(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("dir", nargs="?", help=help_text)
    parser.add_argument("--out", metavar="DIR", help="the same folder, as an option")


def _add_make_gamma(parser: argparse.ArgumentParser) -> None:
    _add_out(parser, "folder to write (gets 'Glaucoma_grading', 'Disc_Cup_Segmentation')")
    parser.add_argument(
        "--n-train", type=int, default=100, metavar="N", help="graded training patients (100)"
    )
    parser.add_argument(
        "--n-test", type=int, default=0, metavar="N", help="graded test patients (default 0)"
    )
    parser.add_argument(
        "--bscans", type=int, default=256, metavar="N", help="B-scans per OCT volume (256)"
    )
    parser.add_argument(
        "--field",
        choices=("disc", "full"),
        default="disc",
        help="fundus framing: a 15° field centred on the optic disc (default) or the "
        "release's wide field",
    )
    parser.add_argument(
        "--fundus-size",
        type=parse_wxh,
        default=None,
        metavar="WxH",
        help="fundus photographs, width x height (default 256x256 disc, 384x256 full)",
    )
    parser.add_argument(
        "--oct-size",
        type=parse_wxh,
        default=(64, 128),
        metavar="WxH",
        help="B-scans, width x height (default 64x128)",
    )
    parser.add_argument(
        "--uninformative",
        type=float,
        default=0.25,
        metavar="P",
        help="share of patients whose fundus is degraded, and (others) whose OCT is (0.25)",
    )
    parser.add_argument(
        "--missing",
        type=float,
        default=0.0,
        metavar="P",
        help="share of graded patients missing their fundus or their OCT (default 0)",
    )
    parser.add_argument("--csv", action="store_true", help="write the grading table as CSV")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _run_make_gamma(args: argparse.Namespace) -> int:
    from moekit.data.replicas.gamma import GammaEvidence, make_gamma_replica

    out = _out_dir(args)
    if not 0.0 <= args.uninformative <= 0.5:
        raise ConfigError(f"--uninformative must be in [0, 0.5], got {args.uninformative}")
    evidence = GammaEvidence(
        uninformative_fundus=args.uninformative, uninformative_oct=args.uninformative
    )
    root = make_gamma_replica(
        out,
        n_train=args.n_train,
        n_test=args.n_test,
        num_bscans=args.bscans,
        fundus_size=args.fundus_size,
        field=args.field,
        oct_size=args.oct_size,
        missing_fraction=args.missing,
        evidence=evidence,
        table_format="csv" if args.csv else "xlsx",
        seed=args.seed,
    )
    print(
        f"wrote a GAMMA replica to {root}: {args.n_train} train / {args.n_test} test graded "
        f"patients, {args.bscans} B-scans each, {args.field}-field fundus"
    )
    return 0


def _add_make_multiview(parser: argparse.ArgumentParser) -> None:
    _add_out(parser, "folder to write (gets cases.csv, images/, masks/)")
    parser.add_argument("--n-cases", type=int, default=120, metavar="N", help="rows (120)")
    parser.add_argument(
        "--size",
        type=parse_wxh,
        default=(96, 128),
        metavar="WxH",
        help="each view, width x height (default 96x128)",
    )
    parser.add_argument(
        "--missing-view",
        type=float,
        default=0.1,
        metavar="P",
        help="probability that a view is missing (never all four; default 0.1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _run_make_multiview(args: argparse.Namespace) -> int:
    from moekit.data.replicas.mammography import make_mammography_replica

    out = _out_dir(args)
    if not 0.0 <= args.missing_view < 1.0:
        raise ConfigError(f"--missing-view must be in [0, 1), got {args.missing_view}")
    root = make_mammography_replica(
        out, args.n_cases, args.size, missing_view=args.missing_view, seed=args.seed
    )
    print(
        f"wrote a four-view mammography replica to {root}: {args.n_cases} cases in cases.csv, "
        f"{args.size[0]}x{args.size[1]} px views"
    )
    return 0


def _add_make_odir(parser: argparse.ArgumentParser) -> None:
    _add_out(parser, "folder to write (the study's CSVs and images/, or the ODIR-5K table)")
    parser.add_argument(
        "--layout",
        choices=("study", "odir5k"),
        default="study",
        help="the ODIR study's layout (default) or the public ODIR-5K one",
    )
    for split, default in (("train", 800), ("val", 200), ("offsite", 200), ("onsite", 250)):
        parser.add_argument(
            f"--n-{split}",
            type=int,
            default=default,
            metavar="N",
            help=f"study layout: {split} images (default {default}, the study's)",
        )
    parser.add_argument(
        "--n-patients", type=int, default=40, metavar="N", help="odir5k layout: patients (40)"
    )
    parser.add_argument(
        "--size", type=int, default=256, metavar="H", help="photograph height in px (256)"
    )
    parser.add_argument("--csv", action="store_true", help="odir5k: write the table as CSV")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _run_make_odir(args: argparse.Namespace) -> int:
    from moekit.data.replicas.odir import ODIR5K_TABLE, make_odir5k_replica, make_odir_replica

    out = _out_dir(args)
    numbers = (args.n_train, args.n_val, args.n_offsite, args.n_onsite, args.n_patients)
    if min(numbers) < 0 or args.n_train < 1 or args.n_patients < 1 or args.size < 32:
        raise ConfigError(
            "make-odir: --n-* must be >= 0 (--n-train and --n-patients >= 1), --size >= 32"
        )
    if args.layout == "odir5k":
        table = ODIR5K_TABLE.removesuffix(".xlsx") + ".csv" if args.csv else ODIR5K_TABLE
        root = make_odir5k_replica(out, args.n_patients, args.size, args.seed, table)
        print(f"wrote an ODIR-5K replica to {root}: {args.n_patients} patients, {table}")
        return 0
    counts = {
        "train": args.n_train,
        "val": args.n_val,
        "offsite_test": args.n_offsite,
        "onsite_test": args.n_onsite,
    }
    root = make_odir_replica(out, counts, args.size, args.seed)
    listed = " / ".join(f"{n} {split}" for split, n in counts.items())
    print(f"wrote an ODIR replica (the ODIR study's layout) to {root}: {listed}")
    return 0


def _add_vae_augment(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", help="a dataset config ({type, root, ...}) or an experiment config (data.train)"
    )
    parser.add_argument("--out", required=True, help="the new dataset folder (absent or empty)")
    parser.add_argument("--task", help="the multi-label task to balance (default: the only one)")
    parser.add_argument(
        "--size", type=parse_wxh, default=(64, 64), metavar="WxH", help="VAE image size (64x64)"
    )
    parser.add_argument("--latent", type=int, default=128, help="latent dimensions (128)")
    parser.add_argument(
        "--channels",
        default="32,64,128,256",
        help="encoder widths, one stride-2 block each (32,64,128,256)",
    )
    parser.add_argument("--epochs", type=int, default=60, help="epochs per VAE (60)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (1e-3)")
    parser.add_argument("--beta", type=float, default=1.0, help="weight of the KL term (1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda... (default cpu)")


def _run_vae_augment(args: argparse.Namespace) -> int:
    from moekit.data.vae_augment import VaeSettings, vae_augment
    from moekit.registry import import_builtins

    try:
        channels = tuple(int(v) for v in args.channels.split(","))
    except ValueError:
        raise ConfigError(
            f"--channels: expected widths like 32,64,128, got {args.channels!r}"
        ) from None
    if min(channels) < 1 or min(args.latent, args.epochs, args.batch_size) < 1 or args.lr <= 0:
        raise ConfigError("vae-augment: --channels, --latent, --epochs, --batch-size, --lr > 0")
    import_builtins()  # the layout writers of the projects
    settings = VaeSettings(
        size=(args.size[1], args.size[0]),
        channels=channels,
        latent=args.latent,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        beta=args.beta,
        seed=args.seed,
        device=args.device,
    )
    report = vae_augment(args.config, args.out, args.task, settings)
    before = ", ".join(f"{k} {v}" for k, v in report["counts_real"].items())
    after = ", ".join(f"{k} {v}" for k, v in report["counts_after"].items())
    print(f"wrote {args.out}: positives {before} -> {after} ({report['seconds']} s)")
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
    "make-gamma": (
        "write a synthetic GAMMA replica (fundus + OCT, disc/cup masks) in the real layout",
        _add_make_gamma,
        _run_make_gamma,
    ),
    "make-multiview": (
        "write a synthetic four-view mammography table (multiview_csv layout) with its images",
        _add_make_multiview,
        _run_make_multiview,
    ),
    "make-odir": (
        "write a synthetic ODIR replica (the ODIR study's layout, or ODIR-5K's) with its images",
        _add_make_odir,
        _run_make_odir,
    ),
    "vae-augment": (
        "balance a training split with images of one VAE per minority class, as a new folder",
        _add_vae_augment,
        _run_vae_augment,
    ),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="dataset utilities (synthetic replicas)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, (help_text, add_arguments, run) in ACTIONS.items():
        action = actions.add_parser(name, help=help_text, description=help_text)
        add_arguments(action)
        action.set_defaults(func=_into_folder(run))


def _into_folder(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``run`` after checking that its output folder (DIR or ``--out``) is not a file."""

    def checked(args: argparse.Namespace) -> int:
        from moekit.engine.rundir import make_dir

        for folder in (getattr(args, "dir", None), getattr(args, "out", None)):
            if folder:
                make_dir(Path(folder), "output folder")
        return run(args)

    return checked
