"""A tiny trained MoE run shared by the analysis tests (trained once per test session).

``tiny_mtl`` with an MoE block of 6 convolutional experts, top-2 routing with one gate per task
and the mutual-information loss, on the generated two-task data: seconds on a CPU.
"""

from pathlib import Path

from moekit.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "two_task.yaml"
OVERRIDES = [
    "+model.moe={num_experts: 6, router: {type: topk, k: 2}}",
    "aux_losses=[{type: mutual_information, weight: 0.05}]",
    "data.train.num_samples=48",
    "data.val.num_samples=16",
    "data.test.num_samples=8",
    "train.epochs=5",
    "+train.curves=false",
]
_RUNS: dict[str, Path] = {}


def trained_run(tmp_path_factory) -> Path:
    """The run directory (trained on first use)."""
    if "run" not in _RUNS:
        path = tmp_path_factory.getbasetemp() / "analysis_run"
        assert main(["train", str(CONFIG), "--run-dir", str(path), "--set", *OVERRIDES]) == 0
        _RUNS["run"] = path
    return _RUNS["run"]
