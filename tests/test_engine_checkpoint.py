"""Checkpoints survive a kill during a save, fall back to ``.old``, and resume afterwards."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moekit.cli import main
from moekit.engine import load_model
from moekit.engine.checkpoint import first_difference, resolve
from moekit.errors import CheckpointError

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "two_task.yaml"
OVERRIDES = [
    "data.train.num_samples=16",
    "data.val.num_samples=8",
    "train.epochs=3",
    "+train.curves=false",
]

# Runs the CLI in a child process whose second checkpoint save writes half a weights file
# and then SIGKILLs the process: a real kill, at a deterministic point of the save.
KILL_DURING_SECOND_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    from moekit.engine import checkpoint
    from moekit.cli import main

    original, calls = checkpoint.save_model, []

    def save_then_die(model, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            with open(filename, "wb") as fh:
                fh.write(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(model, filename, *args, **kwargs)

    checkpoint.save_model = save_then_die
    sys.exit(main(sys.argv[1:]))
    """
)


def test_kill_during_save_leaves_previous_checkpoint_and_resume_finishes(tmp_path):
    run_dir = tmp_path / "killed"
    args = ["train", str(CONFIG), "--run-dir", str(run_dir), "--set", *OVERRIDES]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    child = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SECOND_SAVE, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    last = run_dir / "checkpoints" / "last"
    assert (run_dir / "checkpoints" / ".last.tmp").is_dir()  # the interrupted save
    assert json.loads((last / "trainer_state.json").read_text())["epoch"] == 1
    model, _, _ = load_model(run_dir, "last")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert json.loads((last / "trainer_state.json").read_text())["epoch"] == 3
    assert not (run_dir / "checkpoints" / ".last.tmp").exists()


def test_interrupted_rename_falls_back_to_old(tmp_path):
    run_dir = tmp_path / "run"
    assert (
        main(
            ["train", str(CONFIG), "--run-dir", str(run_dir), "--set", *OVERRIDES, "train.epochs=1"]
        )
        == 0
    )
    checkpoints = run_dir / "checkpoints"
    # replace_dir renames last -> last.old, then the staging dir -> last; stop in between
    shutil.move(checkpoints / "last", checkpoints / "last.old")
    assert resolve(checkpoints / "last") == checkpoints / "last.old"
    load_model(run_dir, "last")
    assert main(["train", "--resume", str(run_dir), "--set", "train.epochs=2"]) == 0
    assert json.loads((checkpoints / "last" / "trainer_state.json").read_text())["epoch"] == 2
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        resolve(tmp_path)


def test_first_difference_names_the_key():
    saved = {"model": {"type": "tiny_mtl", "width": 8, "heads": {"cls": 1}}}
    current = {"model": {"type": "tiny_mtl", "width": 8, "heads": {"cls": 2}}}
    assert first_difference(saved["model"], current["model"], "model") == ("model.heads.cls", 1, 2)
    assert first_difference(saved, saved, "") is None
