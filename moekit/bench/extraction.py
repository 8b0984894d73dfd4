"""``moekit bench prune``: a task extracted from a Mod-Squad model against the full model.

Mod-Squad (Chen et al., CVPR 2023, §3.5) extracts a single-task model by keeping the experts the
task uses: far fewer parameters, and fewer FLOPs only where ``k`` falls with the experts kept
(``reduce_k``). This benchmark measures both on one process with alternating repetitions:
inference of the full model running every task, the full model running task ``T`` alone, the
model reduced to ``T`` with every expert kept (its head, gate rows and task embedding:
:func:`moekit.analysis.flops.task_model`), and the models extracted for ``T`` with each keep-top
fraction ``H`` (``reduce_k`` on), with their parameters and FLOPs per image. Expert usage is
counted on the first validation batches.

By default the model is an untrained ``configs/modsquad/tiny_modsquad.yaml`` (its gates are
near uniform, so the keep-top rule decides what is kept); ``--run RUN_DIR`` benchmarks a trained
run instead. Times are medians; ratios are medians of per-repetition ratios to the full model
reduced to ``T`` with every expert.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from moekit.analysis.extraction import prune_model
from moekit.analysis.flops import count_flops, count_parameters, task_model
from moekit.analysis.runs import TrainedRun, check_task, only_task, split_loader, untrained_model
from moekit.analysis.usage import collect_usage
from moekit.bench.timing import (
    add_timing_arguments,
    check_clock,
    load_average,
    summarize,
    time_alternating,
)


def _inference(model: nn.Module, inputs: Any, mask: Any) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            model(inputs, task_mask=mask)

    return step


def run(
    config: str = "configs/modsquad/tiny_modsquad.yaml",
    run_dir: str | None = None,
    task: str | None = None,
    keep_tops: Sequence[float] = (0.5, 0.25),
    profile_batches: int = 4,
    reps: int = 10,
    warmup: int = 2,
    threads: int | None = None,
    clock: str = "wall",
) -> dict[str, Any]:
    """Measure the full and extracted models on ``clock``; returns rows and settings (CPU
    only)."""
    check_clock(clock, torch.device("cpu"))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        if run_dir is not None:
            trained = TrainedRun.load(run_dir)
            model, cfg, tasks = trained.model, trained.cfg, trained.tasks
        else:
            model, cfg, tasks = untrained_model(config)
        names = list(tasks)
        task = task or names[0]
        check_task(names, task, run_dir or config)
        loader = split_loader(cfg, "val")
        usage = collect_usage(model, loader, names, max_batches=profile_batches)
        inputs = next(iter(loader)).inputs
        batch = inputs.shape[0]
        mask = only_task(names, task, batch, "cpu")
        baseline = f"{task} alone, all experts"
        models: dict[str, tuple[nn.Module, Any]] = {
            "full, all tasks": (model, None),
            f"full, {task} only": (model, mask),
            baseline: (task_model(model, task), None),
        }
        for h in keep_tops:
            pruned, _ = prune_model(model, usage, task, keep_top=h, reduce_k=True)
            models[f"{task} extracted, keep top {h:.0%}, reduce k"] = (pruned, None)
        times = time_alternating(
            {name: _inference(m, inputs, mk) for name, (m, mk) in models.items()},
            reps,
            warmup,
            torch.device("cpu"),
            clock=clock,
        )
        summary = summarize(times, baseline)
        rows = [
            {
                "name": name,
                "params": count_parameters(m),
                "flops": count_flops(m, inputs, mk).total / batch,
                "ms": summary[name][0],
                "ratio": summary[name][1],
            }
            for name, (m, mk) in models.items()
        ]
        settings = {
            "source": run_dir or f"{config} (untrained)",
            "task": task,
            "baseline": baseline,
            "batch": batch,
            "threads": torch.get_num_threads(),
            "reps": reps,
            "clock": clock,
            "load": load_average(),
        }
        return {"settings": settings, "rows": rows}
    finally:
        torch.set_num_threads(previous)


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    full = next(r for r in result["rows"] if r["name"] == s["baseline"])
    lines = [
        f"Per-task extraction of {s['source']}: task {s['task']}, batch {s['batch']}, cpu, "
        f"{s['threads']} threads, {s['reps']} alternating repetitions, {s['clock']} clock, load "
        f"average {s['load']} (1/5/15 min, at the end); median times, ratios are medians of "
        f"per-repetition ratios to '{s['baseline']}'.",
        "",
        "| inference | params (M) | params ratio | GFLOPs / image | median ms | time ratio |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {r['name']} | {r['params'] / 1e6:.3f} | {r['params'] / full['params']:.3f} | "
            f"{r['flops'] / 1e9:.4f} | {r['ms']:.2f} | {r['ratio']:.3f} |"
            for r in result["rows"]
        ),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit bench prune",
        description="A task extracted from a Mod-Squad model (keep-top H, reduce k) against the "
        "full model: parameters, FLOPs and inference time.",
    )
    parser.add_argument("--config", default="configs/modsquad/tiny_modsquad.yaml")
    parser.add_argument("--run", help="a trained run directory instead of an untrained config")
    parser.add_argument("--task", help="the task to extract (default: the first)")
    parser.add_argument("--keep-top", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--profile-batches", type=int, default=4)
    add_timing_arguments(parser, reps=10, warmup=2)
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    result = run(
        args.config,
        args.run,
        args.task,
        args.keep_top,
        args.profile_batches,
        args.reps,
        args.warmup,
        args.threads,
        args.clock,
    )
    print(markdown(result))
    return 0
