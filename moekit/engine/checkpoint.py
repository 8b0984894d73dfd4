"""Crash-safe checkpoints and loading models back.

A checkpoint is a directory::

    model.safetensors      the model's weights (what analysis tools load)
    objective.safetensors  learned non-model state (e.g. uncertainty log-variances)
    optimizer.bin, scheduler.bin, random_states_<process>.pkl
                           optimizer, LR scheduler and RNG states (accelerate save_state)
    trainer_state.json     completed epochs, optimizer steps, best value so far, batches of
                           the current epoch (0 at an epoch's end), the metrics history
    epoch_progress.safetensors
                           only in a checkpoint saved mid-epoch (on SIGTERM): the epoch's
                           training statistics so far, so the resumed epoch ends as it would have
    config.yaml            the resolved config the weights belong to

It is written into a staging directory beside its final place and renamed over it
(:func:`moekit.fileio.replace_dir`), so a kill during a save leaves the previous checkpoint
complete (under its name, or ``<name>.old`` during the instant between two renames, which
:func:`resolve` falls back to); a save that fails (a full disk) removes its staging directory
and leaves the previous checkpoint as it was. Weights load from safetensors and every other
file with ``torch.load(weights_only=True)`` (accelerate's loader), never with pickle.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils.other import load as accelerate_load
from safetensors import safe_open
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_file, save_model
from torch import nn

from moekit import config as config_io
from moekit.errors import CheckpointError
from moekit.fileio import cleaned_up, replace_dir

MODEL_FILE = "model.safetensors"
OBJECTIVE_FILE = "objective.safetensors"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
PROGRESS_FILE = "epoch_progress.safetensors"
COMPATIBLE_KEYS = ("model", "tasks")


@dataclass
class EpochProgress:
    """The training statistics of an epoch interrupted after some of its batches."""

    tracker_total: torch.Tensor
    kept: torch.Tensor
    sums: torch.Tensor


def install_hooks(accelerator: Any) -> None:
    """Make ``save_state``/``load_state`` skip model weights (moekit saves them itself).

    accelerate would store the prepared (possibly DDP-wrapped) objective, whose parameter
    names depend on the launch; moekit stores the bare model instead.
    """
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())


def resolve(path: str | Path) -> Path:
    """The checkpoint directory at ``path``, or its ``.old`` copy left by an interrupted save."""
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return path
    old = path.with_name(path.name + ".old")
    if (old / MODEL_FILE).is_file():
        return old
    raise CheckpointError(f"{path}: no checkpoint here (no {MODEL_FILE})")


def _fsync_tree(root: Path) -> None:
    for file in root.rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())


def save(
    accelerator: Any,
    objective: nn.Module,
    target: str | Path,
    state: Mapping[str, Any],
    cfg: Mapping[str, Any],
    progress: EpochProgress | None = None,
) -> Path:
    """Write a checkpoint of the prepared ``objective`` to ``target`` atomically.

    Call on every process: each writes its RNG state; the main process writes the rest. A
    failed write (``OSError``: a full disk...) removes the staging directory and raises a
    one-line :class:`~moekit.errors.WriteError`; ``target`` is untouched.
    """
    target = Path(target)
    staging = target.with_name(f".{target.name}.tmp")
    if accelerator.is_main_process:
        _restore_old(target)
        if staging.exists():
            shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    with cleaned_up(staging, target):
        accelerator.save_state(str(staging))
        if accelerator.is_main_process:
            bare = accelerator.unwrap_model(objective)
            save_model(bare.model, str(staging / MODEL_FILE))
            extra = {
                k: v.detach().contiguous().cpu()
                for k, v in bare.state_dict().items()
                if not k.startswith("model.")
            }
            save_file(extra, str(staging / OBJECTIVE_FILE))
            if progress is not None:
                tensors = {k: v.contiguous() for k, v in vars(progress).items()}
                save_file(tensors, str(staging / PROGRESS_FILE))
            (staging / STATE_FILE).write_text(json.dumps(dict(state), indent=2))
            (staging / CONFIG_FILE).write_text(config_io.dump(cfg))
            _fsync_tree(staging)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_dir(staging, target)
    accelerator.wait_for_everyone()
    return target


def _restore_old(target: Path) -> None:
    """Put back ``<target>.old`` left by a save interrupted between its two renames, so the
    next :func:`replace_dir` keeps a complete copy at every instant."""
    old = target.with_name(target.name + ".old")
    if not target.exists() and old.exists():
        os.replace(old, target)


def copy(accelerator: Any, source: str | Path, target: str | Path) -> None:
    """Copy a checkpoint directory atomically (``best`` from ``last``); main process only."""
    if accelerator.is_main_process:
        target = Path(target)
        staging = target.with_name(f".{target.name}.tmp")
        _restore_old(target)
        if staging.exists():
            shutil.rmtree(staging)
        shutil.copytree(source, staging)
        replace_dir(staging, target)
    accelerator.wait_for_everyone()


def read_state(path: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint."""
    file = Path(path) / STATE_FILE
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: unreadable trainer state ({exc})") from None


def read_config(path: str | Path) -> dict[str, Any]:
    """The config saved with a checkpoint."""
    return config_io.read_yaml(Path(path) / CONFIG_FILE)


def first_difference(saved: Any, current: Any, prefix: str) -> tuple[str, Any, Any] | None:
    """The first dotted key where two config trees differ, with both values."""
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        for key in [*saved, *(k for k in current if k not in saved)]:
            found = first_difference(saved.get(key), current.get(key), f"{prefix}.{key}")
            if found:
                return found
        return None
    return None if saved == current else (prefix, saved, current)


def check_compatible(checkpoint: Path, saved: Mapping[str, Any], cfg: Mapping[str, Any]) -> None:
    """The ``model`` and ``tasks`` sections of a checkpoint must match the config's."""
    for key in COMPATIBLE_KEYS:
        diff = first_difference(saved.get(key), cfg.get(key), key)
        if diff:
            name, old, new = diff
            raise CheckpointError(
                f"{checkpoint}: checkpoint does not match the config at '{name}' "
                f"(checkpoint: {old!r}, config: {new!r})"
            )


def load_weights(module: nn.Module, file: str | Path) -> None:
    """Load safetensors weights into ``module``; a mismatch names the first differing key."""
    file = Path(file)
    try:
        with safe_open(str(file), framework="pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise CheckpointError(f"{file}: unreadable weights ({exc})") from None
    expected = module.state_dict()
    for key, tensor in expected.items():
        if key in shapes and shapes[key] != tuple(tensor.shape):
            raise CheckpointError(
                f"{file}: weights do not match the model at '{key}' "
                f"(checkpoint {list(shapes[key])}, model {list(tensor.shape)})"
            )
    unexpected = [k for k in shapes if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"{file}: weights do not match the model: unexpected key '{unexpected[0]}'"
        )
    missing, _ = load_safetensors_model(module, str(file), strict=False)
    if missing:
        raise CheckpointError(f"{file}: weights do not match the model: missing key '{missing[0]}'")


def load_training_state(accelerator: Any, objective: nn.Module, path: Path) -> dict[str, Any]:
    """Restore model, objective, optimizer, scheduler and RNG states; return trainer state."""
    bare = accelerator.unwrap_model(objective)
    load_weights(bare.model, path / MODEL_FILE)
    with safe_open(str(path / OBJECTIVE_FILE), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    own = {k: v for k, v in bare.state_dict().items() if not k.startswith("model.")}
    if set(tensors) != set(own):
        raise CheckpointError(
            f"{path / OBJECTIVE_FILE}: objective state keys {sorted(tensors)} do not match "
            f"{sorted(own)} (was the weighting changed?)"
        )
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)
    for file in sorted([*path.glob("*.bin"), *path.glob("*.pkl")]):
        try:  # name the damaged file before accelerate reads it
            accelerate_load(file, map_location="cpu")
        except Exception as exc:  # torch raises several types for a truncated file
            raise CheckpointError(f"{file}: unreadable ({type(exc).__name__}: {exc})") from None
    accelerator.load_state(str(path))
    return read_state(path)


def read_progress(path: str | Path) -> EpochProgress | None:
    """The epoch progress of a checkpoint saved mid-epoch (None at an epoch's end)."""
    file = Path(path) / PROGRESS_FILE
    if not file.is_file():
        return None
    with safe_open(str(file), framework="pt") as fh:
        return EpochProgress(**{k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118


def checkpoint_dir(path: str | Path, checkpoint: str = "best") -> Path:
    """A checkpoint directory from a run directory (``checkpoints/<checkpoint>``) or itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    if (path / "checkpoints").is_dir():
        try:
            return resolve(path / "checkpoints" / checkpoint)
        except CheckpointError:
            if checkpoint == "best" and (path / "checkpoints" / "last").exists():
                raise CheckpointError(
                    f"{path}: no 'best' checkpoint (train.save_best off, or no epoch improved "
                    "eval.monitor); use --checkpoint last"
                ) from None
            raise
    return resolve(path)


def load_model(
    path: str | Path,
    checkpoint: str = "best",
    device: str | torch.device = "cpu",
    model: nn.Module | None = None,
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Build a trained model from a run directory (or a checkpoint directory) for analysis.

    Returns ``(model, cfg, tasks)`` with the model in eval mode, its weights loaded and its
    MoE routing switched to the phase of ``routing_schedule`` the checkpoint was saved in.
    ``model`` is needed (and its weights are replaced) when the run was trained on a model
    object that its config cannot rebuild.
    """
    from moekit.engine.experiment import build_model, built_object
    from moekit.registry import import_user_modules
    from moekit.types import tasks_from_config

    ckpt = checkpoint_dir(path, checkpoint)
    cfg = read_config(ckpt)
    import_user_modules(cfg)
    tasks = tasks_from_config(cfg)
    model = built_object(cfg.get("model"), model, "model") or build_model(cfg, tasks)
    load_weights(model, ckpt / MODEL_FILE)
    restore_routing(model, cfg, ckpt)
    return model.to(device).eval(), cfg, tasks


def restore_routing(model: nn.Module, cfg: Mapping[str, Any], ckpt: Path) -> None:
    """Switch MoE layers to the ``routing_schedule`` phase of the checkpoint's last epoch."""
    from moekit.engine.schedule import apply_routing, parse_phases, phase_index
    from moekit.sections import settings

    phases = parse_phases(cfg.get("routing_schedule"), "routing_schedule")
    epochs = settings(cfg, "train")["epochs"]
    done = int(read_state(ckpt).get("epoch", epochs))
    index = phase_index(phases, max(done - 1, 0), epochs)
    if index is not None:
        apply_routing(model, phases[index], f"routing_schedule[{index}]")
