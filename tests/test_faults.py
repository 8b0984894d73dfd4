"""Faults a user meets, one test per class: nothing is lost, nothing is silently wrong, every
mistake is one line (exit 2), a bug keeps its traceback (exit 1), preemption is survivable.

Tests that need a signal or a second process drive the CLI in a subprocess; each checks the
run's files (checksums) before and after where something could have been destroyed.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from moekit.cli import main
from moekit.engine.rundir import RunLock

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny" / "two_task.yaml"
FAST = [
    "data.train.num_samples=24",
    "data.val.num_samples=8",
    "train.epochs=3",
    "train.curves=false",
]
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}

# A child that runs the CLI and acts at a chosen optimizer step: ACT=term sends itself SIGTERM,
# ACT=kill SIGKILLs itself, ACT=enospc makes the next checkpoint write fail as on a full disk.
CHILD = textwrap.dedent(
    """
    import errno, os, signal, sys
    from moekit.engine import checkpoint, trainer
    from moekit.cli import main

    act, at = os.environ.get("ACT"), int(os.environ.get("AT", "0"))
    original = trainer.Trainer._inject_nan

    def hook(self, out, step):
        if step == at and act == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        if step == at and act == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if step == at and act == "enospc":
            def full(model, filename, *args, **kwargs):
                with open(filename, "wb") as fh:
                    fh.write(b"part of a file")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
            checkpoint.save_model = full
        return original(self, out, step)

    trainer.Trainer._inject_nan = hook
    sys.exit(main(sys.argv[1:]))
    """
)


def moekit(*args, act=None, at=0, timeout=300):
    """``moekit ARGS`` in a child process (optionally acting at optimizer step ``at``)."""
    env = {**ENV, "ACT": act or "", "AT": str(at)}
    return subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )


def train_args(run_dir, *overrides):
    return ["train", CONFIG, "--run-dir", run_dir, "--set", *FAST, *overrides]


def checksums(folder):
    """``{relative path: sha256}`` of every file under ``folder``; the log, which a refused
    command appends to, by its first bytes only (its content so far must stay)."""
    sums = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path.name != ".moekit.lock":
            data = path.read_bytes()
            sums[str(path.relative_to(folder))] = (
                data if path.name == "train.log" else hashlib.sha256(data).hexdigest()
            )
    return sums


def unchanged(before, after):
    """Every file of ``before`` is still there with the same content (a log may only grow)."""
    assert before.keys() == after.keys()
    for name, old in before.items():
        new = after[name]
        assert new.startswith(old) if name.endswith("train.log") else new == old, name


def one_line_error(result):
    """The one error line of a failed command (exit 2, no traceback; a training command
    prints its progress lines on stderr before it)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in lines if line.startswith("moekit") and "error:" in line]
    assert errors == lines[-1:], result.stderr
    return lines[-1]


def same_weights(a, b):
    first = load_file(Path(a) / "checkpoints/last/model.safetensors")
    second = load_file(Path(b) / "checkpoints/last/model.safetensors")
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def metrics(run_dir):
    return pd.read_csv(Path(run_dir) / "metrics.csv").drop(columns="time")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the tiny config: what every recovered run must equal (in a
    child process like them: the thread count changes the rounding)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert moekit(*train_args(run_dir)).returncode == 0
    return run_dir


# ---------------------------------------------------------------- preemption and status
def test_sigterm_mid_epoch_saves_and_resumes_bit_exactly(reference, tmp_path):
    run_dir = tmp_path / "run"
    result = moekit(*train_args(run_dir), act="term", at=5)  # 3 steps per epoch: epoch 2
    assert result.returncode == 143, result.stderr
    assert "preempted (SIGTERM) in epoch 2 after step 5" in result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "preempted"
    state = json.loads((run_dir / "checkpoints/last/trainer_state.json").read_text())
    assert (state["epoch"], state["step"], state["batch"]) == (1, 5, 2)
    assert moekit("train", "--resume", run_dir).returncode == 0
    assert same_weights(run_dir, reference)
    pd.testing.assert_frame_equal(metrics(run_dir), metrics(reference))


def test_run_killed_before_its_first_checkpoint_can_be_restarted(reference, tmp_path):
    run_dir = tmp_path / "run"
    assert moekit(*train_args(run_dir), act="kill", at=2).returncode == -signal.SIGKILL
    line = one_line_error(moekit("train", "--resume", run_dir))
    assert "no checkpoint to resume" in line and "--run-dir" in line
    result = moekit("train", run_dir / "config.yaml", "--run-dir", run_dir)
    assert result.returncode == 0, result.stderr
    assert same_weights(run_dir, reference)


# ---------------------------------------------------------------- data loss
def test_one_process_owns_a_run_directory(reference, tmp_path):
    before = checksums(reference)
    lock = RunLock(reference, "a test holding the run").acquire()
    try:
        line = one_line_error(moekit("train", "--resume", reference, "--set", "train.epochs=4"))
        assert "in use by another moekit process" in line and "a test holding the run" in line
        assert "in use" in one_line_error(moekit("eval", reference))
    finally:
        lock.release()
    unchanged(before, checksums(reference))


def test_two_trainers_started_together_on_one_directory(tmp_path):
    run_dir = tmp_path / "run"
    env = {**ENV, "ACT": "", "AT": "0"}
    command = [sys.executable, "-c", CHILD, *map(str, train_args(run_dir))]
    children = [
        subprocess.Popen(command, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(child.wait(timeout=300), child.stderr.read()) for child in children]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "in use by another moekit process" in loser or "already holds a run" in loser
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert len(metrics(run_dir)) == 6  # 3 epochs x (train, val), written once


def test_a_lock_left_by_a_killed_process_is_not_in_the_way(tmp_path):
    run_dir = tmp_path / "run"
    assert moekit(*train_args(run_dir), act="kill", at=4).returncode == -signal.SIGKILL
    assert (run_dir / ".moekit.lock").is_file()
    assert moekit("train", "--resume", run_dir).returncode == 0


def test_prune_never_replaces_the_source_run_or_an_existing_folder(tmp_path):
    run_dir = tmp_path / "run"
    moe = ["+model.moe={num_experts: 3, router: {type: topk, k: 2}}"]
    assert moekit(*train_args(run_dir, *moe)).returncode == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("a user's file")
    before, before_other = checksums(run_dir), checksums(other)
    prune = ["prune", run_dir, "--task", "cls", "--threshold", "0"]
    assert "source run" in one_line_error(moekit(*prune, "--out", run_dir))
    assert "source run" in one_line_error(moekit(*prune, "--out", tmp_path, "--overwrite"))
    assert "--overwrite" in one_line_error(moekit(*prune, "--out", other))
    unchanged(before, checksums(run_dir))
    unchanged(before_other, checksums(other))
    assert moekit(*prune, "--out", other, "--overwrite").returncode == 0
    assert not (other / "keep.txt").exists() and (other / "prune.json").is_file()
    unchanged(before, checksums(run_dir))


def test_a_full_disk_keeps_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    line = one_line_error(moekit(*train_args(run_dir), act="enospc", at=5))
    assert "No space left on device" in line and "previous copy is intact" in line
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))  # no partial checkpoint left
    state = json.loads((run_dir / "checkpoints/last/trainer_state.json").read_text())
    assert state["epoch"] == 1
    assert moekit("train", "--resume", run_dir).returncode == 0


def test_a_truncated_optimizer_file_is_named(reference, tmp_path):
    run_dir = tmp_path / "run"
    assert moekit(*train_args(run_dir)).returncode == 0
    optimizer = run_dir / "checkpoints/last/optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    line = one_line_error(moekit("train", "--resume", run_dir, "--set", "train.epochs=4"))
    assert str(optimizer) in line and "unreadable" in line


# ---------------------------------------------------------------- silent wrong results
@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("+aux_loss=[]", "'aux_loss' is not known; did you mean 'aux_losses'"),
        ("+routng_schedule=[]", "did you mean 'routing_schedule'"),
        ("+trian={epochs: 2}", "did you mean 'train'"),
        ("+train.epoch=3", "'train.epoch' is not known; did you mean 'epochs'"),
        ("+tasks.cls.metrcs=[accuracy]", "'tasks.cls.metrcs' is not known; did you mean 'metrics'"),
        ("+model.widht=8", "'model.widht': MODELS 'tiny_mtl' does not accept 'widht'"),
        ("+model.moe={router: {type: top_p, min_kk: 2}}", "'model.moe.router.min_kk'"),
    ],
)
def test_a_misspelt_key_is_an_error_in_config_check_and_train(override, named, tmp_path):
    check = ["config", "check", CONFIG, "--no-data", "--set", override]
    assert named in one_line_error(moekit(*check))
    run_dir = tmp_path / "run"
    assert named in one_line_error(moekit(*train_args(run_dir, override)))
    assert not run_dir.exists()  # a failed start leaves nothing behind


def test_config_check_ok_means_the_run_starts(tmp_path, capsys):
    assert main(["config", "check", str(CONFIG), "--set", "train.curves=false"]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["config", "show", str(CONFIG), "--set", "deterministic=true"]) == 0
    assert "deterministic: true" in capsys.readouterr().out  # documented: no '+' needed


def test_resume_applies_a_changed_learning_rate_or_refuses_the_change(tmp_path):
    run_dir, direct = tmp_path / "run", tmp_path / "direct"
    assert main(list(map(str, train_args(run_dir, "+debug.stop_after_epoch=1")))) == 0
    before = checksums(run_dir)
    line = one_line_error(moekit("train", "--resume", run_dir, "--set", "data.batch_size=4"))
    assert "'data.batch_size': a resumed run cannot change it (8 -> 4)" in line
    unchanged(before, checksums(run_dir))
    assert main(["train", "--resume", str(run_dir), "--set", "optimizer.lr=0.5"]) == 0
    assert main(list(map(str, train_args(direct, "optimizer.lr=0.5")))) == 0
    resumed, fresh = metrics(run_dir), metrics(direct)
    train_rows = resumed["split"] == "train"
    assert resumed.loc[train_rows, "lr/default"].iloc[1:].tolist() == pytest.approx(
        fresh.loc[fresh["split"] == "train", "lr/default"].iloc[1:].tolist()
    )
    history = [json.loads(line) for line in (run_dir / "config_history.jsonl").open()]
    assert history[-1]["changes"]["optimizer.lr"] == {"old": 0.02, "new": 0.5}
    assert "resume applies config key 'optimizer.lr'" in (run_dir / "train.log").read_text()


def test_a_changed_parameter_group_is_refused_on_resume(reference):
    groups = "optimizer.param_groups=[{params: 'heads\\..*', lr: 0.01}]"
    line = one_line_error(moekit("train", "--resume", reference, "--set", groups))
    assert "'optimizer.param_groups.0.params'" in line


def test_a_deleted_or_damaged_metrics_file_is_rebuilt_from_the_checkpoint(reference, tmp_path):
    for damage in ("delete", "garble"):
        run_dir = tmp_path / damage
        stop = "+debug.stop_after_epoch=2"
        assert moekit(*train_args(run_dir, stop)).returncode == 0
        csv = run_dir / "metrics.csv"
        if damage == "delete":
            csv.unlink()
        else:
            csv.write_text('epoch,split\n"unterminated,')
        assert moekit("train", "--resume", run_dir).returncode == 0
        pd.testing.assert_frame_equal(metrics(run_dir), metrics(reference))
        assert "rebuilt from the checkpoint" in (run_dir / "train.log").read_text()


def test_a_sweep_column_naming_no_metric_fails_the_dry_run(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(
        f"base: {CONFIG}\nvariants: {{a: [train.epochs=1]}}\n"
        "columns: {acc: {metric: cls/acuracy}}\n"
    )
    result = moekit("sweep", study, "--dry-run", "--output-dir", tmp_path / "out")
    assert result.returncode == 2
    assert "no metric 'cls/acuracy'; did you mean 'cls/accuracy'" in result.stderr
    assert "ERROR" not in result.stdout


def test_prune_of_a_run_without_experts_says_so(reference):
    line = one_line_error(moekit("prune", reference, "--task", "cls", "--threshold", "0"))
    assert "has no MoE layer" in line


def test_a_missing_best_checkpoint_points_to_last(tmp_path):
    run_dir = tmp_path / "run"
    assert main(list(map(str, train_args(run_dir, "train.save_best=false")))) == 0
    assert "--checkpoint last" in one_line_error(moekit("eval", run_dir))


def test_the_same_seed_gives_the_same_numbers(reference, tmp_path):
    run_dir = tmp_path / "again"
    assert moekit(*train_args(run_dir)).returncode == 0
    assert same_weights(run_dir, reference)
    pd.testing.assert_frame_equal(metrics(run_dir), metrics(reference))


# ---------------------------------------------------------------- one line, exit 2
@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--set", "data.batch_size=0"], "'data.batch_size': expected an integer >= 1, got 0"),
        (["--set", "data.batch_size=eight"], "'data.batch_size'"),
        (["--set", "optimizer.lr=-1"], "'optimizer.lr': expected a number > 0, got -1"),
        (["--set", "optimizer.lr=fast"], "'optimizer.lr'"),
    ],
)
def test_bad_values_are_one_line(args, named, tmp_path):
    run_dir = tmp_path / "run"
    assert named in one_line_error(moekit("train", CONFIG, "--run-dir", run_dir, *args))
    assert not run_dir.exists()


def test_bad_paths_and_arguments_are_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    vit = ROOT / "configs" / "modsquad" / "tiny_modsquad.yaml"
    cases = [
        (["train", vit, "--run-dir", tmp_path / "v", "--set", "model.num_heads=5"], "num_heads"),
        (["train", CONFIG, "--run-dir", a_file], "is a file"),
        (["train", CONFIG, "--run-dir", a_file / "run"], "a part of the path is a file"),
        (["flops", CONFIG, "--batch", "0"], "--batch: expected an integer >= 1"),
        (["flops", CONFIG, "--input-size", "0", "0"], "--input-size: expected an integer >= 1"),
        (["data", "make-idrid", a_file], "is a file"),
    ]
    for args, named in cases:
        assert named in one_line_error(moekit(*args)), args
    assert a_file.read_text() == "not a folder"


def test_a_bug_in_a_component_keeps_its_traceback(tmp_path):
    (tmp_path / "broken_model.py").write_text(
        textwrap.dedent(
            """
            from torch import nn
            from moekit.registry import MODELS

            @MODELS.register("broken")
            class Broken(nn.Module):
                def __init__(self, tasks):
                    super().__init__()
                    self.layer = nn.Linear(2, 2)

                def forward(self, inputs, task_mask=None):
                    raise RuntimeError("a bug in the user's model")
            """
        )
    )
    env = {**ENV, "PYTHONPATH": str(tmp_path)}
    command = [
        sys.executable, "-m", "moekit.cli", "train", str(CONFIG), "--run-dir",
        str(tmp_path / "run"), "--set", *FAST, "+imports=[broken_model]", "model={type: broken}",
        "optimizer.param_groups=[]",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "a bug in the user's model" in result.stderr
    assert "moekit: error" not in result.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"
