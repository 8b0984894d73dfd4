"""The ODIR study's layout as a target of VAE augmentation (``moekit data vae-augment``).

:func:`write_study_layout` copies the dataset folder (images hard-linked where the file system
allows, else copied) and adds the generated images to the split's folder as
``vae_<class>_<n>.png`` with a single-label row ``vae_G_0001.png,0,1,0`` each at the end of the
split's table; nothing in the original folder changes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from moekit.data.odir import STUDY_LAYOUT
from moekit.data.vae_augment import GeneratedImage, layout_writer


def _link_or_copy(source: str, target: str) -> str:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target


@layout_writer("odir")
def write_study_layout(dataset: Any, out: Path, images: Sequence[GeneratedImage]) -> list[str]:
    """Copy ``dataset.root`` to ``out`` and add ``images`` to ``dataset.split``; their ids."""
    shutil.copytree(dataset.root, out, copy_function=_link_or_copy, dirs_exist_ok=True)
    folder = STUDY_LAYOUT.image_dir(out, dataset.split)
    table = STUDY_LAYOUT.table(out, dataset.split)
    table.unlink()  # a link to the original table: write a new file instead
    text = STUDY_LAYOUT.table(dataset.root, dataset.split).read_text()
    lines = [text.rstrip("\n")]
    ids, numbers = [], dict.fromkeys({g.class_name for g in images}, 0)
    for generated in images:
        numbers[generated.class_name] += 1
        image_id = f"vae_{generated.class_name}_{numbers[generated.class_name]:04d}.png"
        Image.fromarray(generated.image).save(folder / image_id)
        lines.append(",".join([image_id, *(str(v) for v in generated.labels)]))
        ids.append(image_id)
    table.write_text("\n".join(lines) + "\n")
    return ids
