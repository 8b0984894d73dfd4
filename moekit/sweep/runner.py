"""Run a study: every variant with every seed, one normal run directory each.

::

    <output_dir>/<study>[-<profile>]/
      study.json                 the parsed study (variants with their full override lists)
      status.json                per variant and seed: completed | failed (with the error)
      <variant>/seed-<s>/        a run directory (moekit train), or an extraction (moekit prune)
      results.csv, results.md    one row per variant (moekit.sweep.results)
      figures/<column>.png       a bar chart per column

Variants run one after the other in the study's order. A failing variant is recorded with its
error (and ``sweep-error.txt`` in its directory holds the traceback) and the study goes on.
With ``resume`` a finished run is not run again, an interrupted one continues from its last
checkpoint, and one that failed before its first checkpoint is moved aside and started over.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moekit.errors import ConfigError, MoekitError, did_you_mean
from moekit.fileio import atomic_write_text
from moekit.sweep.measure import measure_run
from moekit.sweep.study import PruneSpec, Study, Variant

STATUS_FILE = "status.json"
ERROR_FILE = "sweep-error.txt"


def run_state(variant: Variant, run_dir: Path) -> str:
    """``completed``, ``resumable`` (has a last checkpoint), ``incomplete`` (started, nothing to
    resume from) or ``pending`` (not started)."""
    if variant.prune is not None:
        if (run_dir / "prune.json").is_file():
            return "completed"
        return "incomplete" if run_dir.exists() else "pending"
    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("status") == "completed":
        return "completed"
    if (run_dir / "checkpoints" / "last").exists():
        return "resumable"
    return "incomplete" if run_dir.exists() and any(run_dir.iterdir()) else "pending"


@dataclass
class Outcome:
    """What happened to one (variant, seed): ``completed``, ``interrupted`` or ``failed``."""

    variant: str
    seed: int
    run_dir: str
    status: str
    error: str | None = None
    seconds: float = 0.0


def read_status(study: Study) -> dict[str, dict[str, Any]]:
    """``{"<variant>/<seed>": outcome dict}`` from the study's ``status.json``."""
    path = study.directory / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _error_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text if isinstance(exc, MoekitError) else f"{type(exc).__name__}: {text}"


def _set_aside(run_dir: Path) -> Path:
    aside = run_dir.with_name(f"{run_dir.name}.failed-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(run_dir, aside)
    return aside


class StudyRunner:
    """Runs the variants of ``study`` (see the module docstring).

    Args:
        study: the parsed study.
        overrides: ``--set`` overrides applied to every trained variant, after its own.
        log: where progress lines go.
    """

    def __init__(
        self,
        study: Study,
        overrides: Sequence[str] = (),
        log: Callable[[str], None] = print,
    ) -> None:
        self.study = study
        self.overrides = tuple(overrides)
        self.log = log
        self._extractions: dict[tuple[Path, str], Any] = {}

    def selected(self, only: Iterable[str] | None) -> list[tuple[Variant, int, Path]]:
        """The runs of the variants named in ``only`` (all when ``None``)."""
        if only is None:
            return self.study.runs()
        names = {self.study.variant(name).name for name in only}
        return [run for run in self.study.runs() if run[0].name in names]

    def check_columns(self, cfg: Mapping[str, Any], variant: str) -> None:
        """Every ``metric`` column of one of the variant's tasks names a value its evaluation
        reports (a column of a task the variant lacks does not apply: ``–``)."""
        from moekit.engine.evaluation import logged_columns
        from moekit.types import tasks_from_config

        tasks = tasks_from_config(cfg)
        columns = logged_columns(tasks)
        for column in self.study.columns:
            delta = str(column.arg).startswith("mtl_delta/")  # needs the baselines
            task, slash, _ = str(column.arg).partition("/")
            other_task = bool(slash) and task not in tasks
            if column.kind == "metric" and column.arg not in columns and not (delta or other_task):
                raise ConfigError(
                    f"{self.study.path}: column '{column.label}': variant '{variant}' reports "
                    f"no metric '{column.arg}'{did_you_mean(str(column.arg), columns)}; "
                    f"e.g. {', '.join(columns[:6])}"
                )

    def plan(self, only: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """What a sweep would do, with each config resolved and checked (``--dry-run``)."""
        from moekit.engine.config_check import check_config

        rows = []
        for variant, seed, run_dir in self.selected(only):
            row = {
                "variant": variant.name,
                "seed": seed,
                "state": run_state(variant, run_dir),
                "run_dir": str(run_dir),
                "what": "",
                "error": None,
            }
            if variant.prune is not None:
                p = variant.prune
                rule = f"θ={p.threshold}" if p.threshold is not None else f"H={p.keep_top}"
                row["what"] = f"prune {p.source} --task {p.task} {rule}" + (
                    " --reduce-k" if p.reduce_k else ""
                )
            else:
                row["what"] = " ".join(
                    [str(variant.base), *(str(f) for f in variant.fragments)]
                    + [f"--set {o}" for o in (*variant.overrides, *self.overrides)]
                )
                try:
                    cfg = variant.config(seed, self.overrides)
                    check_config(cfg, source=variant.name)
                    self.check_columns(cfg, variant.name)
                except MoekitError as exc:
                    row["error"] = _error_line(exc)
            rows.append(row)
        return rows

    def run(self, only: Iterable[str] | None = None, resume: bool = False) -> list[Outcome]:
        """Run (or, with ``resume``, continue) the selected variants; returns their outcomes."""
        runs = self.selected(only)
        for variant, seed, _ in runs:  # a column naming no reported metric fails up front
            if variant.prune is None:
                self.check_columns(variant.config(seed, self.overrides), variant.name)
        if not resume:
            started = [
                str(run_dir)
                for variant, _, run_dir in runs
                if run_state(variant, run_dir) != "pending"
            ]
            if started:
                raise ConfigError(
                    f"{self.study.directory}: already holds runs of this study ({started[0]}"
                    f"{' and more' if len(started) > 1 else ''}); pass --resume to skip the "
                    "finished ones and continue the rest"
                )
        self.study.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            self.study.directory / "study.json", json.dumps(_describe(self.study), indent=2) + "\n"
        )
        outcomes = []
        for index, (variant, seed, run_dir) in enumerate(runs, start=1):
            self.log(f"[{index}/{len(runs)}] {variant.name} seed {seed}: {run_dir}")
            outcome = self._run_one(variant, seed, run_dir)
            self.log(
                f"[{index}/{len(runs)}] {variant.name} seed {seed}: {outcome.status}"
                + (f" ({outcome.error})" if outcome.error else f" in {outcome.seconds:.0f}s")
            )
            outcomes.append(outcome)
            status = read_status(self.study)
            status[f"{variant.name}/{seed}"] = asdict(outcome)
            atomic_write_text(
                self.study.directory / STATUS_FILE, json.dumps(status, indent=2) + "\n"
            )
        return outcomes

    def _run_one(self, variant: Variant, seed: int, run_dir: Path) -> Outcome:
        start = time.perf_counter()
        try:
            state = run_state(variant, run_dir)
            if state == "completed":
                self.log("  finished earlier: not run again")
                earlier = read_status(self.study).get(f"{variant.name}/{seed}", {})
                if earlier.get("status") == "completed":  # keep the time it took to run
                    start -= float(earlier.get("seconds", 0.0))
            else:
                if variant.prune is not None:
                    self._extract(variant.prune, seed, run_dir, state)
                else:
                    self._train(variant, seed, run_dir, state)
                state = run_state(variant, run_dir)
                if state != "completed":  # stopped early (debug.stop_after_epoch)
                    return Outcome(
                        variant.name,
                        seed,
                        str(run_dir),
                        "interrupted",
                        None,
                        time.perf_counter() - start,
                    )
            measure_run(run_dir, self.study.columns, self.study.evaluate)
        except Exception as exc:  # a failing variant is recorded, the study goes on
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / ERROR_FILE, traceback.format_exc())
            return Outcome(
                variant.name,
                seed,
                str(run_dir),
                "failed",
                _error_line(exc),
                time.perf_counter() - start,
            )
        return Outcome(
            variant.name, seed, str(run_dir), "completed", None, time.perf_counter() - start
        )

    def _train(self, variant: Variant, seed: int, run_dir: Path, state: str) -> None:
        from moekit import config as config_io
        from moekit.engine import Trainer

        if state == "resumable":
            cfg = config_io.load(run_dir / "config.yaml")
            Trainer(cfg, resume=run_dir).fit()
            return
        if state == "incomplete":
            self.log(f"  moved the unfinished run aside: {_set_aside(run_dir)}")
        Trainer(variant.config(seed, self.overrides), run_dir=run_dir).fit()

    def _extract(self, spec: PruneSpec, seed: int, run_dir: Path, state: str) -> None:
        from moekit.analysis.extraction_report import TaskExtraction

        source = self.study.run_dir(spec.source, seed)
        if run_state(self.study.variant(spec.source), source) != "completed":
            raise ConfigError(f"source run {source} (variant '{spec.source}') has not completed")
        if state == "incomplete":
            self.log(f"  moved the unfinished extraction aside: {_set_aside(run_dir)}")
        key = (source, spec.task)
        if key not in self._extractions:
            evaluate = self.study.evaluate
            self._extractions[key] = TaskExtraction(
                source,
                spec.task,
                evaluate["split"],
                evaluate["profile_split"],
                evaluate["checkpoint"],
            )
        self._extractions[key].extract(spec.threshold, spec.keep_top, spec.reduce_k, run_dir)


def _describe(study: Study) -> dict[str, Any]:
    return {
        "name": study.name,
        "path": str(study.path),
        "profile": study.profile,
        "seeds": list(study.seeds),
        "evaluate": study.evaluate,
        "variants": [
            {
                "name": v.name,
                "description": v.description,
                "base": None if v.base is None else str(v.base),
                "fragments": [str(f) for f in v.fragments],
                "set": list(v.overrides),
                "prune": None if v.prune is None else asdict(v.prune),
            }
            for v in study.variants
        ],
        "columns": [asdict(c) for c in study.columns],
    }
