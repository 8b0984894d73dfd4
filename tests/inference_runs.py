"""Tiny trained runs of every model family, for the predict and export tests (each trained
once per test session, seconds on a CPU), and photographs of several sizes to predict on.

Families: the flagship ``mtl_cnn`` (IDRiD replica), Mod-Squad's ``modsquad_vit``
(MultiTaskShapes), ``tiny_mtl`` with an MoE block (tests/analysis_run.py), the multi-modal
``m4oe`` (GAMMA replica, fundus + OCT) and the multi-label ``transfer_classifier`` (ODIR
replica).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from moekit import config
from moekit.cli import main
from moekit.data.gamma import gamma_tasks
from moekit.data.replicas.gamma import make_gamma_replica
from moekit.data.replicas.idrid import make_idrid_replica
from moekit.data.replicas.odir import make_odir_replica

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NO_CURVES = "+train.curves=false"
_CACHE: dict[str, Path] = {}


def _cached(name: str, factory, build) -> Path:
    if name not in _CACHE:
        _CACHE[name] = build(factory.getbasetemp() / name)
    return _CACHE[name]


def _train(config_path: Path, run: Path, overrides: list[str]) -> Path:
    settings = ["--set", *overrides] if overrides else []
    assert main(["train", str(config_path), "--run-dir", str(run), *settings]) == 0
    return run


def idrid_replica(factory) -> Path:
    return _cached(
        "idrid_replica", factory, lambda p: make_idrid_replica(p, 8, 4, 4, 4, size=(192, 128))
    )


def flagship_run(factory) -> Path:
    """The IDRiD demo's model (ResNet-18 from scratch, 7 heads of 3 experts, top-p phase) at
    32x48, 2 epochs."""
    root = idrid_replica(factory)
    overrides = [f"data.{s}.root={root}" for s in ("train", "val", "test")]
    overrides += [f"data.{s}.image_size=[32, 48]" for s in ("train", "val", "test")]
    overrides += ["train.epochs=2", NO_CURVES]
    return _cached(
        "flagship_run", factory, lambda p: _train(CONFIGS / "idrid" / "demo.yaml", p, overrides)
    )


def modsquad_run(factory) -> Path:
    """The tiny Mod-Squad ViT (MoA and MoE MLP, 5 tasks: classification, counting,
    segmentation, edges, depth) on 32 generated images, one epoch."""
    overrides = ["data.train.num_samples=32", "data.val.num_samples=8"]
    overrides += ["data.test.num_samples=8", "data.batch_size=8", "train.epochs=1", NO_CURVES]
    path = CONFIGS / "modsquad" / "tiny_modsquad.yaml"
    return _cached("modsquad_run", factory, lambda p: _train(path, p, overrides))


def gamma_replica(factory) -> Path:
    return _cached(
        "gamma_replica",
        factory,
        lambda p: make_gamma_replica(
            p,
            n_train=8,
            n_test=4,
            num_bscans=6,
            fundus_size=(96, 64),
            oct_size=(32, 32),
            seg_fraction=1.0,
            seg_only_fraction=0.0,
        ),
    )


def m4oe_run(factory) -> Path:
    """The tiny M4oE (fundus + 4 OCT B-scans, Soft MoE) on the GAMMA replica, one epoch."""
    root = gamma_replica(factory)

    def build(run: Path) -> Path:
        tasks = gamma_tasks()
        tasks["grade"].update(loss=["cross_entropy"], metrics=["accuracy"])
        for name in ("disc", "cup"):
            tasks[name].update(loss=["bce"], metrics=["dice"])
        data = {"type": "gamma", "root": str(root), "num_bscans": 4, "fundus_size": [64, 96]}
        data.update(oct_size=[32, 32], val_fraction=0.25)
        cfg = {
            "name": "m4oe_tiny",
            "tasks": tasks,
            "data": {
                **{s: {**data, "split": s} for s in ("train", "val", "test")},
                "batch_size": 4,
            },
            "model": config.load(CONFIGS / "m4oe" / "_tiny_model.yaml")["model"],
            "train": {"epochs": 1, "curves": False},
        }
        path = run.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return _train(path, run, [])

    return _cached("m4oe_run", factory, build)


def odir_run(factory) -> Path:
    """The ODIR study's classifier (ResNet-18 from scratch, MLP head, multi-label D, G, A) at
    32x32, one epoch."""
    root = _cached(
        "odir_replica",
        factory,
        lambda p: make_odir_replica(
            p, {"train": 16, "val": 8, "offsite_test": 8, "onsite_test": 4}, size=64
        ),
    )
    overrides = [f"data.{s}.root={root}" for s in ("train", "val", "test")]
    overrides += [f"data.{s}.image_size=[32, 32]" for s in ("train", "val", "test")]
    overrides += ["train.epochs=1", NO_CURVES]
    path = CONFIGS / "odir" / "replica_resnet18.yaml"
    return _cached("odir_run", factory, lambda p: _train(path, p, overrides))


def photographs(folder: Path, source: Path) -> list[Path]:
    """Three files made from the photograph ``source``: as it is (JPEG), enlarged to another
    size (PNG), and placed in a black square (another aspect ratio, PNG)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = np.asarray(Image.open(source).convert("RGB"))
    height, width = image.shape[:2]
    paths = [folder / "as_is.jpg", folder / "enlarged.png", folder / "square.png"]
    Image.fromarray(image).save(paths[0], quality=95)
    Image.fromarray(image).resize((width * 7 // 3, height * 7 // 3)).save(paths[1])
    side = max(height, width) + 40
    square = np.zeros((side, side, 3), np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = image
    Image.fromarray(square).save(paths[2])
    return paths
