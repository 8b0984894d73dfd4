"""The intra-op thread count of a run: train.num_threads, OMP_NUM_THREADS, then the CPUs."""

import os

import torch

from moekit.engine.launch import intra_op_threads, make_accelerator
from moekit.sections import TRAIN


def test_the_config_wins_then_the_environment_then_the_cpus_per_local_process(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert intra_op_threads(5) == 5
    assert intra_op_threads(None) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    cpus = len(os.sched_getaffinity(0))
    assert intra_op_threads(None) == cpus
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cpus))
    assert intra_op_threads(None) == 1  # never 0


def test_the_accelerator_of_a_run_sets_the_thread_count():
    before = torch.get_num_threads()
    try:
        make_accelerator({**TRAIN.defaults(), "num_threads": 1})
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
