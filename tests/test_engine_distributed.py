"""Two CPU processes (torchrun, gloo on loopback) train like one process with the same
global batch: with batches where a process has no label for a task (unused heads and task
gates), an MoE block whose routing switches from dense to top-p halfway, and the
mutual-information loss whose routing statistics are reduced across processes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from moekit import config
from moekit.engine.data import EpochSampler
from moekit.engine.experiment import build_dataset

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "two_task.yaml"
EPOCHS = 4
OVERRIDES = [
    "data.train.num_samples=32",
    "data.val.num_samples=8",
    f"train.epochs={EPOCHS}",
    "+train.curves=false",
    "+model.moe={num_experts: 3, router: {type: softmax}}",
    "aux_losses=[{type: mutual_information, weight: 0.01}]",
    "routing_schedule=[{until: 0.5, router: softmax}, {router: top_p, p: 0.6}]",
]


def torchrun() -> str:
    found = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("torchrun is not installed beside this python")
    return found


def launch(command, run_dir, batch_size):
    args = ["-m", "moekit", "train", str(CONFIG), "--run-dir", str(run_dir), "--set",
            *OVERRIDES, f"data.batch_size={batch_size}"]  # fmt: skip
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


def test_some_process_batch_misses_a_task():
    """The 2-process run below really has steps where one process has no 'seg' label."""
    cfg = config.load(CONFIG, OVERRIDES)
    dataset = build_dataset(cfg, "train")
    sampler = EpochSampler(len(dataset), seed=cfg["seed"])
    missing = 0
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        order = list(sampler)
        for start in range(0, len(order), 4):  # per-process batches of 4
            missing += not any(dataset.labelled["seg"][i] for i in order[start : start + 4])
    assert missing > 0


@pytest.mark.timeout(300)
def test_two_processes_match_one_process(tmp_path):
    single = launch([sys.executable], tmp_path / "one", batch_size=8)
    two_procs = [torchrun(), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                 "--master_port", "29517"]  # fmt: skip
    double = launch(two_procs, tmp_path / "two", batch_size=4)
    assert single.keys() == double.keys()
    diff = max((single[k] - double[k]).abs().max().item() for k in single)
    assert diff < 1e-4, diff  # float reduction order only (measured 1e-7 to 3e-5)
    assert (tmp_path / "two" / "checkpoints" / "last" / "random_states_1.pkl").is_file()
    one = pd.read_csv(tmp_path / "one" / "metrics.csv").drop(columns="time")
    two = pd.read_csv(tmp_path / "two" / "metrics.csv").drop(columns="time")
    pd.testing.assert_frame_equal(one, two, atol=1e-4, rtol=1e-3)
    assert (one["aux/mutual_information"].dropna() < 0).all()  # -I(T;E): the loss is active
    log = (tmp_path / "two" / "train.log").read_text()
    assert "epoch 3: routing_schedule[1] -> 1 MoE layers" in log
