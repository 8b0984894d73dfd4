"""``evaluate_run``: the metrics of a saved run's checkpoint on one split (``moekit eval``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moekit.engine import checkpoint
from moekit.engine.data import build_loader
from moekit.engine.evaluation import evaluate
from moekit.engine.experiment import build_experiment
from moekit.engine.launch import make_accelerator
from moekit.engine.rundir import json_safe
from moekit.engine.settings import train_settings
from moekit.fileio import atomic_write_text


def evaluate_run(run_dir: str | Path, split: str = "test", which: str = "best") -> dict[str, float]:
    """Evaluate ``checkpoints/<which>`` of ``run_dir`` on ``split``.

    Writes ``<run_dir>/eval/<split>-<which>.json`` and returns ``{"<split>/<column>": value}``.
    Runs on any number of processes (metrics are gathered across them).
    """
    run_dir = Path(run_dir)
    path = checkpoint.checkpoint_dir(run_dir, which)
    cfg = checkpoint.read_config(path)
    train = train_settings(cfg)
    accelerator = make_accelerator({**train, "log_with": None, "grad_accum": 1})
    exp = build_experiment(cfg, accelerator.num_processes, splits=[split])
    checkpoint.load_weights(exp.model, path / checkpoint.MODEL_FILE)
    checkpoint.restore_routing(exp.model, cfg, path)
    loader = build_loader(exp.datasets[split], exp.data, train=False, seed=int(cfg.get("seed", 0)))
    objective, loader = accelerator.prepare(exp.objective, loader)
    bare: Any = accelerator.unwrap_model(objective)
    values = evaluate(accelerator, bare.model, bare, loader, exp.tasks, exp.mtl_delta)
    result = {f"{split}/{k}": v for k, v in values.items()}
    if accelerator.is_main_process:
        out = run_dir / "eval" / f"{split}-{which}.json"
        atomic_write_text(
            out,
            json.dumps({"checkpoint": str(path), "metrics": json_safe(result)}, indent=2) + "\n",
        )
    return result
