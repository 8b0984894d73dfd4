"""VAE augmentation: balance a training split with images generated per minority class
(``moekit data vae-augment``; the ODIR study's Task 4a).

1. The dataset's training split is read without augmentation, every image as the model sees
   it (un-normalised to ``[0, 1]``, resized to the VAE's size).
2. Positives per class come from the labels; with ``M`` the largest count, every class with
   ``n_c < M`` is a minority class.
3. For each minority class one small convolutional VAE (:class:`moekit.models.vae.ConvVAE`,
   latent 128, MSE + KL) is trained on that class's training images only — those whose only
   label is ``c`` (all its positives when none is single-label) — and ``M − n_c`` images are
   sampled from it, each labelled ``c`` alone.
4. The dataset type's layout writer (:data:`LAYOUT_WRITERS`, e.g. the ODIR study's layout in
   :mod:`moekit.projects.odir.vae_layout`) copies the dataset folder to ``OUT`` and adds the
   images with their single-label rows, so ``OUT`` loads with the same dataset config (its
   ``root`` changed); ``OUT/generated.csv`` lists them (:mod:`moekit.data.generated`), so
   ``label_counts`` — and class-balanced losses with ``counts: auto`` — keep the real counts.
   The original folder is not touched.
5. ``OUT/vae_samples.png`` shows real and generated images of every minority class;
   ``OUT/vae_augment.json`` the counts before and after, the settings and each VAE's losses.

Training shows a progress bar per class (its epochs, with the loss).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from moekit import config as config_io
from moekit.data.generated import GENERATED_FILE, write_generated
from moekit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from moekit.errors import ConfigError, DataError, did_you_mean
from moekit.fileio import atomic_write_text
from moekit.models.vae import ConvVAE, vae_loss


@dataclass(frozen=True)
class GeneratedImage:
    """One generated training image: ``uint8 [H, W, 3]``, its class and its label vector."""

    image: np.ndarray
    class_name: str
    labels: tuple[int, ...]


Writer = Callable[[Any, Path, Sequence[GeneratedImage]], list[str]]
LAYOUT_WRITERS: dict[str, Writer] = {}
"""Per dataset type: ``writer(dataset, out, images) -> ids`` copies the dataset's folder to
``out`` and adds ``images`` to its split in the same layout, returning their ids."""


def layout_writer(dataset_type: str) -> Callable[[Writer], Writer]:
    """Register the layout writer of a dataset type (``@layout_writer("odir")``)."""

    def register(writer: Writer) -> Writer:
        LAYOUT_WRITERS[dataset_type] = writer
        return writer

    return register


@dataclass
class VaeSettings:
    """The VAEs' size and training (``moekit data vae-augment`` options)."""

    size: tuple[int, int] = (64, 64)
    channels: tuple[int, ...] = (32, 64, 128, 256)
    latent: int = 128
    epochs: int = 60
    batch_size: int = 32
    lr: float = 1e-3
    beta: float = 1.0
    seed: int = 0
    device: str = "cpu"


@dataclass
class ClassReport:
    """What happened for one minority class."""

    name: str
    real: int
    trained_on: int
    generated: int
    losses: list[float] = field(default_factory=list)


def dataset_spec(path: str | Path) -> dict[str, Any]:
    """An experiment config whose ``data.train`` is the dataset to augment, from a YAML file
    holding either an experiment config (its ``data.train``) or one dataset mapping."""
    cfg = config_io.load(path)
    if isinstance(cfg.get("data"), Mapping) and cfg["data"].get("train") is not None:
        return cfg
    if isinstance(cfg.get("type"), str):
        return {"data": {"train": dict(cfg)}}
    raise ConfigError(
        f"{path}: expected a dataset config ({{type: ..., root: ...}}) or an experiment config "
        "with data.train"
    )


def training_dataset(cfg: Mapping[str, Any]) -> Any:
    """``data.train`` of ``cfg`` built without augmentation."""
    from moekit.engine.experiment import build_dataset
    from moekit.registry import DATASETS, accepted_kwargs, import_user_modules

    import_user_modules(cfg)
    spec = dict(cfg["data"]["train"])
    if "augment" in accepted_kwargs(DATASETS.get(spec["type"]))[0]:
        spec["augment"] = False
    return build_dataset({**cfg, "data": {**cfg["data"], "train": spec}}, "train")


def pixels01(image: Tensor) -> Tensor:
    """A model input ``[3, H, W]`` normalised with the ImageNet statistics (moekit's
    transforms' default) back to pixels in ``[0, 1]``."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image.float() * std + mean).clamp(0, 1)


def read_split(dataset: Any, task: str, size: Sequence[int]) -> tuple[Tensor, Tensor]:
    """``(images [N, 3, h, w] in [0, 1], labels [N, C] 0/1)`` of every sample."""
    images, labels = [], []
    for index in range(len(dataset)):
        sample = dataset[index]
        inputs = sample["inputs"]
        image = inputs if isinstance(inputs, Tensor) else next(iter(inputs.values()))
        if task not in sample["targets"]:
            raise ConfigError(
                f"--task: the dataset has no task '{task}'"
                f"{did_you_mean(task, list(sample['targets']))}; tasks: "
                f"{', '.join(sample['targets'])}"
            )
        target = sample["targets"][task]
        if target.dim() == 0:  # a class index
            raise ConfigError(f"--task: '{task}' holds class indices; VAE balancing is multi-label")
        images.append(F.interpolate(pixels01(image)[None], size=tuple(size), mode="area")[0])
        labels.append((target > 0.5).to(torch.int64))
    return torch.stack(images), torch.stack(labels)


def train_vae(
    images: Tensor, settings: VaeSettings, name: str, index: int
) -> tuple[ConvVAE, list[float]]:
    """One VAE fitted to ``images``; returns it and its mean loss per epoch."""
    torch.manual_seed(settings.seed * 1000 + index)
    vae = ConvVAE(settings.size, settings.channels, settings.latent).to(settings.device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=settings.lr)
    data = images.to(settings.device)
    losses: list[float] = []
    bar = tqdm(range(settings.epochs), desc=f"VAE {name} ({len(images)} images)", disable=None)
    for _ in bar:
        order = torch.randperm(len(data))
        total = 0.0
        for start in range(0, len(data), settings.batch_size):
            batch = data[order[start : start + settings.batch_size]]
            if len(batch) < 2:  # batch norm needs two images
                continue
            reconstruction, mu, logvar = vae(batch)
            loss, _, _ = vae_loss(reconstruction, batch, mu, logvar, settings.beta)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        losses.append(total / len(data))
        bar.set_postfix(loss=f"{losses[-1]:.1f}")
    return vae, losses


def plot_samples(
    real: Mapping[str, Tensor], generated: Mapping[str, Tensor], path: Path, per_row: int = 4
) -> Path:
    """One row per class: ``per_row`` real images, then ``per_row`` generated ones."""
    from moekit.analysis.figures import pyplot, save_figure

    plt = pyplot()
    names = list(real)
    cols = 2 * per_row
    fig, axes = plt.subplots(
        len(names), cols, figsize=(1.6 * cols, 1.8 * len(names) + 0.4), squeeze=False
    )
    for r, name in enumerate(names):
        for c in range(cols):
            source = real[name] if c < per_row else generated[name]
            k = c % per_row
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if k < len(source):
                ax.imshow(source[k].permute(1, 2, 0).clamp(0, 1).numpy())
            if c in (0, per_row):
                ax.set_title(f"{name}: {'real' if c == 0 else 'generated'}", fontsize=9)
    fig.suptitle("VAE augmentation: real (left) and generated (right) images per class")
    return save_figure(fig, path, tight=True)


def vae_augment(
    dataset_config: str | Path | Mapping[str, Any],
    out: str | Path,
    task: str | None = None,
    settings: VaeSettings | None = None,
) -> dict[str, Any]:
    """Balance the training split of a dataset with VAE-generated images (module docstring).

    Args:
        dataset_config: a YAML file (a dataset mapping or an experiment config) or a config.
        out: the new dataset folder (absent or empty).
        task: the multi-label task to balance (default: the dataset's only task).
        settings: the VAEs' size and training.

    Returns:
        The report also written to ``OUT/vae_augment.json``.
    """
    settings = settings or VaeSettings()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not empty; vae-augment writes a new folder")
    cfg = (
        dict(dataset_config)
        if isinstance(dataset_config, Mapping)
        else dataset_spec(dataset_config)
    )
    dataset = training_dataset(cfg)
    root = getattr(dataset, "root", None)
    if root is not None and (Path(root) / GENERATED_FILE).is_file():
        raise DataError(f"{root}: holds generated images already; augment the original folder")
    kind = cfg["data"]["train"]["type"]
    writer = LAYOUT_WRITERS.get(kind)
    if writer is None:
        raise ConfigError(
            f"vae-augment: no layout writer for dataset type '{kind}'; types with one: "
            f"{', '.join(sorted(LAYOUT_WRITERS)) or '(none)'}"
        )
    first = dataset[0]["targets"]
    task = task or (next(iter(first)) if len(first) == 1 else None)
    if task is None:
        raise ConfigError(f"--task: the dataset has several tasks ({', '.join(first)}); name one")
    names = [str(n) for n in getattr(dataset, "classes", ())]
    images, labels = read_split(dataset, task, settings.size)
    names = names if len(names) == labels.shape[1] else [str(c) for c in range(labels.shape[1])]
    counts = labels.sum(dim=0).tolist()
    majority = max(counts)
    started = time.perf_counter()
    added: list[GeneratedImage] = []
    reports, real_shown, generated_shown = [], {}, {}
    for c, name in enumerate(names):
        if counts[c] >= majority or counts[c] == 0:
            continue
        single = (labels[:, c] == 1) & (labels.sum(dim=1) == 1)
        chosen = single if bool(single.any()) else labels[:, c] == 1
        vae, losses = train_vae(images[chosen], settings, name, c)
        generator = torch.Generator().manual_seed(settings.seed * 1000 + c)
        samples = vae.sample(majority - counts[c], generator).cpu()
        one_hot = tuple(int(i == c) for i in range(len(names)))
        for sample in samples:
            pixels = (sample.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            added.append(GeneratedImage(pixels, name, one_hot))
        reports.append(ClassReport(name, counts[c], int(chosen.sum()), len(samples), losses))
        real_shown[name], generated_shown[name] = images[chosen][:4], samples[:4]
    if not added:
        raise DataError(f"{getattr(dataset, 'root', dataset)}: the classes are balanced already")
    ids = writer(dataset, out, added)
    split = getattr(dataset, "split", "train")
    write_generated(out, [(split, i, g.class_name) for i, g in zip(ids, added, strict=True)])
    plot_samples(real_shown, generated_shown, out / "vae_samples.png")
    after = [counts[c] + sum(g.labels[c] for g in added) for c in range(len(names))]
    report = {
        "source": str(getattr(dataset, "root", "")),
        "task": task,
        "classes": names,
        "counts_real": dict(zip(names, counts)),
        "counts_after": dict(zip(names, after)),
        "settings": {**asdict(settings), "size": list(settings.size)},
        "per_class": [asdict(r) for r in reports],
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_text(out / "vae_augment.json", json.dumps(report, indent=2) + "\n")
    return report
