"""``Trainer``: one training loop on accelerate for every model and experiment of moekit.

Per epoch: apply the phase schedules, train (masked task losses, weighting, routing losses,
one ``accelerator.backward``, clipping, accumulation), evaluate on ``val``, append to
``metrics.csv``, save ``checkpoints/last`` (and ``best``) atomically, write ``summary.json``.
A non-finite loss stops the run with a :class:`TrainingError` naming the step and the task,
before anything is saved, so the last checkpoint stays the last good one.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from moekit.engine import checkpoint, finetune, resume
from moekit.engine.checkpoint import EpochProgress
from moekit.engine.config_check import check_config
from moekit.engine.curves import plot_curves
from moekit.engine.data import build_loader, set_epoch
from moekit.engine.evaluation import (
    MetricTracker,
    evaluate_loop,
    metric_directions,
    read_threshold_columns,
)
from moekit.engine.experiment import build_experiment
from moekit.engine.guards import NonFiniteWatch, SigtermFlag
from moekit.engine.launch import agree_on_path, make_accelerator, use_cpu
from moekit.engine.objective import StepOutput
from moekit.engine.optim import named_parameters, set_frozen
from moekit.engine.rundir import RunDir, close_log, json_safe, new_run_path
from moekit.engine.schedule import apply_routing, frozen_patterns, phase_index
from moekit.engine.stages import (
    Stage,
    build_stage_optimizer,
    freeze_outside,
    parse_stages,
    stage_of,
)
from moekit.errors import ConfigError, Preempted, TrainingError
from moekit.schema import object_entry
from moekit.sections import settings
from moekit.types import Task


class Trainer:
    """Train an experiment into a run directory, from a config or from built objects.

    Args:
        cfg: the resolved config (``moekit.config.load``), or None.
        run_dir: where to write the run (default ``<output_dir>/<name>-<timestamp>``).
        resume: a run directory to continue from its ``checkpoints/last``; the run continues
            in that directory.
        model: an ``nn.Module`` or the ``model`` config mapping.
        tasks: ``{name: Task}`` or the ``tasks`` config mapping.
        train_data, val_data, test_data: a ``Dataset``, a ``DataLoader`` or a dataset config.
        **sections: any other top-level config key (``train={"epochs": 2}``, ``optimizer``,
            ``seed``...), replacing the config's.

    Built objects are recorded in ``config.yaml`` by their class
    (``{python_object: pkg.Class, saved: ...}``): a model so given is saved by weights only,
    so loading the run needs the object again (``load_run(run, model=...)``); a dataset or a
    loader is not saved. A fresh run with a ``finetune`` section starts from
    ``finetune.init``'s weights (:mod:`moekit.engine.finetune`).

    Example::

        trainer = Trainer(config.load("configs/tiny/two_task.yaml"))
        trainer = Trainer(model=net, tasks=tasks, train_data=ds, train={"epochs": 2})
        summary = trainer.fit()
    """

    def __init__(
        self,
        cfg: Mapping[str, Any] | None = None,
        run_dir: str | Path | None = None,
        resume: str | Path | None = None,
        *,
        model: nn.Module | Mapping[str, Any] | None = None,
        tasks: Mapping[str, Any] | None = None,
        train_data: Any = None,
        val_data: Any = None,
        test_data: Any = None,
        **sections: Any,
    ) -> None:
        cfg, self.objects = compose(
            cfg, model, tasks, {"train": train_data, "val": val_data, "test": test_data}, sections
        )
        self.cfg = finetune.resolve(cfg) if resume is None else cfg
        check_config(self.cfg)  # every config mistake, before any file is written
        self.settings = settings(self.cfg, "train")
        if self.settings["freeze"] or self.cfg.get("freeze_schedule") or self.settings["stages"]:
            self.settings["find_unused_parameters"] = True  # frozen parameters get no gradient
        self.debug = settings(self.cfg, "debug")
        evaluation = settings(self.cfg, "eval")
        self.threshold = evaluation["threshold"]
        self.tune = evaluation["thresholds"] == "tune"
        target = Path(resume) if resume is not None else run_dir
        path = agree_on_path(
            None if target is None else Path(target),
            lambda: new_run_path(self.cfg),
            use_cpu(self.settings),
        )
        self.run = RunDir(path)
        self.accelerator = acc = make_accelerator(self.settings, self.run.path)
        created: list[Path] = []
        if acc.is_main_process:
            command = "moekit train" + (" --resume" if resume is not None else "")
            created = self.run.create(fresh=resume is None, command=command)
        acc.wait_for_everyone()
        self.log = self.run.open_log(acc.is_main_process)
        try:
            self._setup(evaluation, resume)
        except BaseException as exc:
            self.log.error(f"setup failed: {type(exc).__name__}: {exc}")
            close_log(self.log)
            if acc.is_main_process:
                self.run.lock.release()
                remove_created(created)  # a start that failed leaves nothing behind
            raise

    def _setup(self, evaluation: Mapping[str, Any], resume: str | Path | None) -> None:
        acc = self.accelerator
        self.exp = exp = build_experiment(self.cfg, acc.num_processes, objects=self.objects)
        if "train" not in exp.datasets:
            raise ConfigError("config key 'data.train': training needs a train dataset")
        if resume is None:
            started = finetune.initialise(exp.model, self.cfg)
            if started:
                self.log.info(started)
        self.seed = int(self.cfg.get("seed", 0))
        self._trainable = [
            (n, p)
            for n, p in named_parameters(exp.model, exp.objective.weighting)
            if p.requires_grad
        ]
        finetune.keep_frozen_batchnorm_in_eval(exp.model)
        self.stages = parse_stages(self.cfg)
        self._stage: Stage | None = None
        if self.stages:  # the optimizer of the stage the run starts (or resumes) in
            self._stage = self._first_stage(resume)
            exp.optimizer, exp.scheduler = self._stage_optimizer(self._stage)
        checkpoint.install_hooks(acc)
        loaders = {
            split: ds
            if isinstance(ds, DataLoader)
            else build_loader(ds, exp.data, train=split == "train", seed=self.seed)
            for split, ds in exp.datasets.items()
            if split in ("train", "val")
        }
        self.objective, self.optimizer, self.scheduler = acc.prepare(
            exp.objective, exp.optimizer, exp.scheduler
        )
        self.loaders = {split: acc.prepare(loader) for split, loader in loaders.items()}
        acc.unwrap_model(self.objective).set_distributed(
            acc.num_processes, lambda t: acc.reduce(t, "sum")
        )
        self.monitor, self.mode = self._monitor(evaluation)
        if self.tune and "val" not in self.loaders:
            raise ConfigError("config key 'eval.thresholds': tune needs a val dataset to tune on")
        self.state: dict[str, Any] = {
            "epoch": 0,
            "step": 0,
            "batch": 0,
            "best_value": None,
            "best_epoch": None,
        }
        if self._stage is not None:
            self.state["stage"] = self._stage.index
        self.history: list[dict[str, Any]] = []
        self._progress: EpochProgress | None = None
        self._phases: tuple[int | None, int | None] | None = None
        if resume is not None:
            self._resume()
        if self.state["epoch"] < self.settings["epochs"]:
            self._apply_phases(self.state["epoch"])  # also checks the patterns before any file
        if acc.is_main_process:
            self.run.save_config(self.cfg)
        if self.settings["log_with"]:
            acc.init_trackers(str(self.cfg.get("name", "run")), config=_scalars(self.cfg))

    # ------------------------------------------------------------------ setup
    def _monitor(self, evaluation: Mapping[str, Any]) -> tuple[str, str]:
        """The monitored ``split/column`` and its mode, checked against the known columns."""
        has_val = "val" in self.loaders
        monitor = evaluation["monitor"] or ("val/loss" if has_val else "train/loss")
        split, _, column = monitor.partition("/")
        columns = list(MetricTracker(self.exp.tasks, self.exp.mtl_delta, self.threshold).compute())
        minimised = ["objective", *(f"aux/{term.name}" for term in self.exp.objective.aux_terms)]
        if split == "train":
            columns += minimised  # logged by training only
        if split not in self.loaders or column not in columns:
            splits = list(self.loaders)
            valid = ", ".join(f"{s}/{c}" for s in splits for c in columns[:6])
            raise ConfigError(f"config key 'eval.monitor': '{monitor}' is not logged; e.g. {valid}")
        mode = evaluation["mode"]
        if mode is None:
            directions = metric_directions(self.exp.tasks)
            task_metric = "/".join(column.split("/")[:2])
            if column == "loss" or column.endswith("/loss") or column in minimised:
                mode = "min"
            elif column.startswith("mtl_delta/"):
                mode = "max"
            elif task_metric in directions:
                mode = "max" if directions[task_metric] else "min"
            else:
                raise ConfigError(f"config key 'eval.mode': set min or max for '{monitor}'")
        if mode not in ("min", "max"):
            raise ConfigError(f"config key 'eval.mode': '{mode}' is not min or max")
        return monitor, mode

    def _resume(self) -> None:
        """Load ``checkpoints/last``; apply (or refuse) what the config changed since."""
        path = checkpoint.resolve(self.run.checkpoints / "last")
        saved = checkpoint.read_config(path)
        checkpoint.check_compatible(path, saved, self.cfg)
        stage = None if self._stage is None else self._stage.index
        applied = resume.check_changes(resume.changes(saved, self.cfg), self.run.path, stage)
        fresh = resume.snapshot(self.optimizer, self.scheduler)
        state = checkpoint.load_training_state(self.accelerator, self.objective, path)
        resume.reapply_hyperparameters(self.optimizer, self.scheduler, fresh)
        saved_history = state.pop("history", None)
        self.state.update(state)
        self._progress = checkpoint.read_progress(path)
        self.history = self._read_history(saved_history)
        where = f"epoch {self.state['epoch']}" + (
            f" and {self.state['batch']} batches of the next" if self.state.get("batch") else ""
        )
        self.log.info(f"resumed {self.run.path} after {where} (step {self.state['step']})")
        if applied:
            for key, (old, new) in applied.items():
                self.log.info(f"resume applies config key '{key}': {old!r} -> {new!r}")
            if self.accelerator.is_main_process:
                resume.record(self.run.path, applied, self.state)

    def _read_history(self, saved: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """The rows of the finished epochs: ``metrics.csv``, or the checkpoint's copy when the
        file is missing, unreadable or short (then rewritten from it)."""
        epochs = self.state["epoch"]
        try:
            rows = self.run.read_metrics(epochs)
        except (OSError, ValueError) as exc:  # pandas' parse errors are ValueErrors
            rows, problem = None, f"unreadable ({type(exc).__name__})"
        else:
            problem = "missing" if not self.run.metrics_csv.exists() else "short"
            if (rows and max(r["epoch"] for r in rows) >= epochs) or not epochs:
                return rows
        if saved is None:
            raise TrainingError(
                f"{self.run.metrics_csv}: {problem}, and the checkpoint holds no copy of the "
                "history (saved by an older moekit); move the file aside to resume without it"
            )
        rows = [{k: v for k, v in row.items() if v is not None} for row in saved]
        self.log.warning(f"{self.run.metrics_csv}: {problem}; rebuilt from the checkpoint")
        if self.accelerator.is_main_process:
            self.run.write_metrics(rows)
        return rows

    def _first_stage(self, resume: str | Path | None) -> Stage:
        """The stage a run starts in: the first, or the one whose optimizer state the resumed
        checkpoint holds."""
        if resume is None:
            return self.stages[0]
        state = checkpoint.read_state(checkpoint.resolve(self.run.checkpoints / "last"))
        index = state.get("stage")
        if index is None:  # saved without stages: resume refuses the added stages
            return self.stages[0]
        if not 0 <= int(index) < len(self.stages):
            raise ConfigError(
                f"config key 'train.stages': the checkpoint is in stage {int(index) + 1}, the "
                f"config has {len(self.stages)} stages"
            )
        return self.stages[int(index)]

    def _stage_optimizer(self, stage: Stage) -> tuple[Any, Any]:
        named = named_parameters(self.exp.model, self.exp.objective.weighting)
        return build_stage_optimizer(named, self.cfg, stage, self.exp.steps_per_epoch)

    def _enter_stage(self, stage: Stage) -> None:
        """Replace the optimizer and the schedule by fresh ones of ``stage`` (also in the
        accelerator's lists, so checkpoints hold the new states only)."""
        acc = self.accelerator
        optimizer, scheduler = self._stage_optimizer(stage)
        acc._optimizers = [o for o in acc._optimizers if o is not self.optimizer]
        acc._schedulers = [s for s in acc._schedulers if s is not self.scheduler]
        self.optimizer = acc.prepare_optimizer(optimizer)
        self.scheduler = acc.prepare_scheduler(scheduler)
        self._stage = stage
        self.state["stage"] = stage.index

    def _apply_phases(self, epoch: int) -> None:
        exp, epochs = self.exp, self.settings["epochs"]
        routing = phase_index(exp.routing_schedule, epoch, epochs)
        freeze = phase_index(exp.freeze_schedule, epoch, epochs)
        stage = stage_of(self.stages, epoch)
        first = self._phases is None
        previous = self._phases or (None, None)
        if routing is not None and (first or routing != previous[0]):
            key = f"routing_schedule[{routing}]"
            layers = apply_routing(exp.model, exp.routing_schedule[routing], key)
            self.log.info(f"epoch {epoch + 1}: {key} -> {layers} MoE layers")
        new_stage = stage is not None and (first or stage is not self._stage)
        if stage is not None and stage is not self._stage:
            self._enter_stage(stage)
        if first or freeze != previous[1] or new_stage:
            phase = None if freeze is None else exp.freeze_schedule[freeze]
            patterns = [
                *self.settings["freeze"],
                *frozen_patterns(phase, f"freeze_schedule[{freeze}]"),
            ]
            frozen = set_frozen(self._trainable, patterns, "train.freeze / freeze_schedule")
            frozen += freeze_outside(stage, self._trainable)
            if stage is not None:
                self.log.info(
                    f"epoch {epoch + 1}: {stage.describe(len(self.stages))}; {frozen} "
                    "parameter tensors frozen"
                )
            elif patterns:
                self.log.info(f"epoch {epoch + 1}: {frozen} parameter tensors frozen")
        self._phases = (routing, freeze)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs; returns the summary (also in ``summary.json``)."""
        acc, epochs = self.accelerator, self.settings["epochs"]
        status = "completed"
        self.log.info(
            f"training {self.cfg.get('name', 'run')} in {self.run.path} on {acc.num_processes} "
            f"process(es), device {acc.device}, {self.exp.steps_per_epoch} steps/epoch"
        )
        try:
            with SigtermFlag() as self.sigterm:
                for epoch in range(self.state["epoch"], epochs):
                    self._run_epoch(epoch)
                    if self.debug["stop_after_epoch"] == epoch + 1 and epoch + 1 < epochs:
                        status = "interrupted"
                        self.log.info(f"stopping after epoch {epoch + 1} (debug.stop_after_epoch)")
                        break
        except Preempted as exc:
            status = "preempted"
            self.log.info(str(exc))
            raise
        except TrainingError as exc:
            status = "failed"
            self.log.error(str(exc))
            raise
        except KeyboardInterrupt:
            status = "interrupted"
            self.log.error("interrupted (KeyboardInterrupt); resume with --resume")
            raise
        except BaseException as exc:
            status = "failed"
            self.log.error(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            summary = self._finish(status)
        return summary

    def _run_epoch(self, epoch: int) -> None:
        acc, epochs = self.accelerator, self.settings["epochs"]
        self._apply_phases(epoch)
        start = time.perf_counter()
        train_values = self._train_epoch(epoch)
        rows = [{"epoch": epoch + 1, "split": "train", **train_values}]
        if "val" in self.loaders:
            rows.append({"epoch": epoch + 1, "split": "val", **self.evaluate_loader("val")})
            if self.tune:  # kept with the checkpoints, applied unchanged to other splits
                self.state["thresholds"] = read_threshold_columns(self.exp.tasks, rows[-1])
        rows[0]["time"] = time.perf_counter() - start
        self.history.extend(rows)
        self._check_parameters(epoch)
        self.state["epoch"], self.state["batch"] = epoch + 1, 0
        improved = self._update_best(rows)
        if acc.is_main_process:
            self.run.write_metrics(self.history)
        last, best = self.run.checkpoints / "last", self.run.checkpoints / "best"
        if improved and self.settings["save_best"]:
            # best first: a kill between the two saves leaves last one epoch behind (resume
            # redoes that epoch), never a best older than the state in last says
            self._save(best)
            checkpoint.copy(acc, best, last)
        else:
            self._save(last)
        if acc.is_main_process:
            self.run.write_summary(self._summary("running"))
        if self.settings["log_with"]:
            acc.log(
                {
                    f"{r['split']}/{k}": v
                    for r in rows
                    for k, v in r.items()
                    if k not in ("epoch", "split")
                },
                step=epoch + 1,
            )
        self.log.info(self._epoch_line(epoch, epochs, rows, improved))

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        acc = self.accelerator
        loader = self.loaders["train"]
        set_epoch(loader, epoch, self.seed, acc.process_index)
        self.objective.train()
        tracker = MetricTracker(self.exp.tasks, threshold=self.threshold)
        bare = acc.unwrap_model(self.objective)
        sums = torch.zeros(1 + len(bare.aux_terms), device=acc.device)
        done = int(self.state.get("batch", 0))  # batches of this epoch already trained
        used_lr = [group["lr"] for group in self.optimizer.param_groups]
        if done:  # resumed mid-epoch: the epoch goes on where the checkpoint left it
            tracker.total, sums = self._progress.tracker_total, self._progress.sums.to(sums)
            tracker.kept = [self._progress.kept] if self._progress.kept.numel() else []
            loader = acc.skip_first_batches(loader, done)
            used_lr = self.state.pop("epoch_lr", used_lr)  # of the last step before the stop
        clip = self.settings["clip_grad"]
        log_every = int(self.settings["log_every"])
        reduce_sum = lambda t: acc.reduce(t, "sum")  # noqa: E731
        watch = NonFiniteWatch(
            [f"task '{t}'" for t in self.exp.tasks]
            + [f"aux:{a.name}" for a in bare.aux_terms]
            + ["total"],
            acc.device,
        )
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{self.settings['epochs']}",
            leave=False,
            initial=done,
            total=done + len(loader),
            mininterval=0.5,
            disable=not sys.stderr.isatty() or not acc.is_main_process,
        )
        index = done - 1
        for index, batch in enumerate(bar, start=done):
            step = self.state["step"] + 1
            with acc.accumulate(self.objective):
                out = self._inject_nan(self.objective(batch), step)
                watch.observe(out.watched(), step, index)
                acc.backward(out.loss)
                if acc.sync_gradients and clip:
                    acc.clip_grad_norm_(self.objective.parameters(), float(clip))
                used_lr = [group["lr"] for group in self.optimizer.param_groups]
                self.optimizer.step()
                if acc.sync_gradients:
                    if not self.optimizer.step_was_skipped:
                        self.scheduler.step()
                    self.state["step"] = step
                    if step % log_every == 0:
                        watch.check(reduce_sum, epoch, self.state["epoch"])
                        self.log.debug(f"step {step} loss {out.loss.item():.6g}")
                self.optimizer.zero_grad()
            tracker.accumulate(tracker.rows(out.preds, batch, out.sample_losses))
            sums += out.logged()
            if not bar.disable and bar.last_print_t + bar.mininterval < time.time():
                bar.set_postfix(loss=f"{out.loss.item():.4f}", refresh=False)
            if acc.sync_gradients and self._preempted():
                watch.check(reduce_sum, epoch, self.state["epoch"])
                self._save_progress(epoch, index + 1, tracker, sums, used_lr)
        watch.check(reduce_sum, epoch, self.state["epoch"])
        batches = index + 1
        tracker.reduce(reduce_sum, acc.device)
        means = (acc.reduce(sums, "sum") / (batches * acc.num_processes)).tolist()
        values = tracker.compute()
        values["objective"] = means[0]
        values.update({f"aux/{a.name}": m for a, m in zip(bare.aux_terms, means[1:])})
        values.update({f"{t}/weight": w for t, w in bare.weighting.weights().items()})
        for group, lr in zip(self.optimizer.param_groups, used_lr, strict=True):
            values[f"lr/{group.get('name', 'default')}"] = lr  # of the epoch's last step
        return values

    def _inject_nan(self, out: StepOutput, step: int) -> StepOutput:
        """``debug.inject_nan_at_step``: make a task's loss NaN (a test hook, kept here in the
        loop, out of the objective)."""
        if self.debug["inject_nan_at_step"] != step:
            return out
        task = self.debug["nan_task"] or next(iter(self.exp.tasks))
        nan = out.task_losses[task] * float("nan")
        out.loss = out.loss + nan
        out.task_losses[task] = nan
        return out

    def _preempted(self) -> bool:
        """Whether SIGTERM arrived (on any process: the processes agree, one small all-reduce
        per step only when there are several)."""
        flag = self.sigterm.raised
        if self.accelerator.num_processes > 1:
            seen = torch.tensor([float(flag)], device=self.accelerator.device)
            flag = bool(self.accelerator.reduce(seen, "sum").item())
        return flag

    def _save(self, target: Path, progress: EpochProgress | None = None) -> None:
        state = {**self.state, "history": json_safe(self.history)}
        checkpoint.save(self.accelerator, self.objective, target, state, self.cfg, progress)

    def _save_progress(
        self,
        epoch: int,
        batches: int,
        tracker: MetricTracker,
        sums: torch.Tensor,
        used_lr: list[float],
    ) -> None:
        """Save ``checkpoints/last`` in the middle of ``epoch`` and stop (SIGTERM); the learning
        rates of the last step are kept for the epoch's row (a stop after its last batch logs
        them, not the next step's)."""
        self.state["batch"] = batches
        self.state["epoch_lr"] = used_lr
        kept = torch.cat(tracker.kept).cpu() if tracker.kept else torch.zeros(0)
        progress = EpochProgress(tracker.total.cpu(), kept, sums.detach().cpu())
        self._save(self.run.checkpoints / "last", progress)
        raise Preempted(
            f"preempted (SIGTERM) in epoch {epoch + 1} after step {self.state['step']}; "
            f"checkpoints/last resumes exactly: moekit train --resume {self.run.path}"
        )

    def _check_parameters(self, epoch: int) -> None:
        bare = self.accelerator.unwrap_model(self.objective)
        for name, param in bare.named_parameters():
            if not bool(torch.isfinite(param).all()):
                raise TrainingError(
                    f"parameter '{name}' became non-finite in epoch {epoch + 1} (last step "
                    f"{self.state['step']}); stopped, checkpoints/last holds epoch "
                    f"{self.state['epoch']}"
                )

    # ------------------------------------------------------------------ evaluation
    def evaluate_loader(self, split: str) -> dict[str, float]:
        """Losses and metrics of the current model on a prepared loader."""
        acc = self.accelerator
        bare = acc.unwrap_model(self.objective)
        bar = lambda it: tqdm(  # noqa: E731
            it,
            desc=f"eval {split}",
            leave=False,
            disable=not sys.stderr.isatty() or not acc.is_main_process,
        )
        return evaluate_loop(
            bare.model,
            bare,
            self.loaders[split],
            self.exp.tasks,
            self.exp.mtl_delta,
            bar,
            self.threshold,
            autocast=acc.autocast,
            gather=acc.gather_for_metrics,
            tune=self.tune and split == "val",
        )

    def _update_best(self, rows: list[dict[str, Any]]) -> bool:
        split, _, column = self.monitor.partition("/")
        value = next(r for r in rows if r["split"] == split).get(column, math.nan)
        if value is None or math.isnan(value):
            return False
        best = self.state["best_value"]
        better = best is None or (value < best if self.mode == "min" else value > best)
        if better:
            self.state["best_value"], self.state["best_epoch"] = float(value), rows[0]["epoch"]
        return better

    # ------------------------------------------------------------------ reporting
    def _epoch_line(
        self, epoch: int, epochs: int, rows: list[dict[str, Any]], improved: bool
    ) -> str:
        parts = [f"epoch {epoch + 1}/{epochs}"]
        for row in rows:
            parts.append(f"{row['split']}/loss {row.get('loss', math.nan):.4f}")
        split, _, column = self.monitor.partition("/")
        if column != "loss":
            value = next(r for r in rows if r["split"] == split).get(column, math.nan)
            parts.append(f"{self.monitor} {value:.4f}")
        parts.append(f"{rows[0]['time']:.1f}s")
        return "  ".join(parts) + ("  (best)" if improved else "")

    def _row_values(self, epoch: int | None) -> dict[str, float]:
        return {
            f"{row['split']}/{k}": v
            for row in self.history
            if row["epoch"] == epoch
            for k, v in row.items()
            if k not in ("epoch", "split")
        }

    def _stage_bests(self) -> list[dict[str, Any]]:
        """Per stage: its epochs and the best value of the monitor within them."""
        split, _, column = self.monitor.partition("/")
        found = []
        for stage in self.stages:
            epochs = range(stage.start + 1, stage.start + stage.epochs + 1)
            values = [
                (row[column], row["epoch"])
                for row in self.history
                if row["split"] == split
                and row["epoch"] in epochs
                and row.get(column) is not None
                and not math.isnan(row[column])
            ]
            pick = min if self.mode == "min" else max
            value, epoch = pick(values, key=lambda v: v[0]) if values else (None, None)
            found.append(
                {
                    "stage": stage.index + 1,
                    "epochs": [epochs.start, epochs.stop - 1],
                    "trainable": stage.trainable,
                    "best_epoch": epoch,
                    "best_value": value,
                }
            )
        return found

    def _summary(self, status: str) -> dict[str, Any]:
        last = self.state["epoch"]
        stages = {"stages": self._stage_bests()} if self.stages else {}
        return {
            "name": self.cfg.get("name", "run"),
            "run_dir": str(self.run.path),
            "status": status,
            "epochs_completed": last,
            "epochs": self.settings["epochs"],
            "steps": self.state["step"],
            "processes": self.accelerator.num_processes,
            "monitor": self.monitor,
            "mode": self.mode,
            "best": {
                "epoch": self.state["best_epoch"],
                "value": self.state["best_value"],
                "metrics": self._row_values(self.state["best_epoch"]),
            },
            "final": self._row_values(last),
            **stages,
        }

    def _finish(self, status: str) -> dict[str, Any]:
        acc = self.accelerator
        summary = self._summary(status)
        if acc.is_main_process:
            self.run.write_summary(summary)
            if self.settings["curves"] and self.run.metrics_csv.exists():
                plot_curves(self.run.metrics_csv, self.run.figures)
            self.log.log(
                logging.ERROR if status == "failed" else logging.INFO, f"{status}: {self.run.path}"
            )
        if self.settings["log_with"]:
            acc.end_training()
        close_log(self.log)
        if acc.is_main_process:
            self.run.lock.release()
        return summary


def remove_created(paths: list[Path]) -> None:
    """Remove what a failed start created (the run directory itself, or what it added)."""
    for path in reversed(paths):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def compose(
    cfg: Mapping[str, Any] | None,
    model: Any,
    tasks: Mapping[str, Any] | None,
    data: Mapping[str, Any],
    sections: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config of a run given as a config and/or built objects, and the objects by the
    config entry they stand for (``model``, ``train``, ``val``, ``test``)."""
    cfg = copy.deepcopy(dict(cfg or {}))
    cfg.update(copy.deepcopy(dict(sections)))
    objects: dict[str, Any] = {}
    if isinstance(model, nn.Module):
        objects["model"] = model
        cfg["model"] = object_entry(model, "weights only: pass the model again to load the run")
    elif model is not None:
        cfg["model"] = dict(model)
    if tasks is not None:
        cfg["tasks"] = {
            name: spec.config() if isinstance(spec, Task) else spec for name, spec in tasks.items()
        }
    given = {split: obj for split, obj in data.items() if obj is not None}
    if given:
        cfg["data"] = dict(cfg.get("data") or {})
    for split, obj in given.items():
        if isinstance(obj, Mapping):
            cfg["data"][split] = dict(obj)
        else:
            objects[split] = obj
            cfg["data"][split] = object_entry(obj, "not saved: pass it again to resume")
    return cfg, objects


def _scalars(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config flattened to scalar hyper-parameters (for TensorBoard)."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_scalars(value, name + "."))
        elif isinstance(value, int | float | str | bool):
            flat[name] = value
    return flat
