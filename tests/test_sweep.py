"""Studies: parsing, the results table (mean ± std, best, Δ) against plain computations, and a
small sweep end to end through the CLI with a failing variant, an interrupted one and resume."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from moekit.cli import main
from moekit.errors import ConfigError
from moekit.sweep import load_study, write_results
from moekit.sweep.measure import CACHE_FILE
from moekit.sweep.runner import STATUS_FILE

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "two_task.yaml"
FAST = [
    "data.train.num_samples=32",
    "data.val.num_samples=8",
    "data.test.num_samples=8",
    "train.epochs=2",
    "+train.curves=false",
]


def write_study(tmp_path, **study):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"base": str(TINY), **study}, sort_keys=False))
    return path


def test_variants_grid_profiles_and_config(tmp_path):
    path = write_study(
        tmp_path,
        name="s",
        set=["train.epochs=3"],
        variants={"a": [], "b": {"set": ["optimizer.lr=0.5"]}},
        grid={"model.width": [4, 8]},
        seeds=[0, 3],
        columns={"acc": {"metric": "cls/accuracy"}, "params": "params"},
        profiles={"cpu": {"set": ["train.epochs=1"], "seeds": [7]}},
    )
    study = load_study(path, output_dir=tmp_path / "out")
    assert [v.name for v in study.variants] == ["a-width=4", "a-width=8", "b-width=4", "b-width=8"]
    assert study.directory == tmp_path / "out" / "s"
    assert study.run_dir("a-width=4", 3) == tmp_path / "out" / "s" / "a-width=4" / "seed-3"
    cfg = study.variant("b-width=8").config(3)
    assert (cfg["seed"], cfg["name"], cfg["optimizer"]["lr"]) == (3, "b-width=8", 0.5)
    assert (cfg["model"]["width"], cfg["train"]["epochs"]) == (8, 3)
    assert [c.higher_is_better for c in study.columns] == [None, False]

    cpu = load_study(path, "cpu", tmp_path / "out")
    assert cpu.seeds == (7,) and cpu.directory == tmp_path / "out" / "s-cpu"
    assert cpu.variant("a-width=4").config(7)["train"]["epochs"] == 1


@pytest.mark.parametrize(
    ("study", "message"),
    [
        ({"variants": {"a": []}, "colums": {}}, "'colums' is not known; did you mean 'columns'"),
        ({"variants": {"a": []}, "columns": {"x": "flop"}}, "did you mean 'flops'"),
        (
            {
                "variants": {"p": {"prune": {"from": "a", "task": "cls", "threshold": 0}}},
                "columns": {"x": "params"},
            },
            "'a' is not an earlier variant",
        ),
        (
            {
                "variants": {"a": []},
                "columns": {"d": {"delta": {"baselines": {"cls/accuracy": "stl"}}}},
            },
            "'stl' is not a variant",
        ),
        ({"variants": {"a": ["no_equals_sign"]}, "columns": {"x": "params"}}, "key=value"),
        ({"variants": {"a": []}, "columns": {"x": "params"}, "seeds": []}, "seeds"),
    ],
)
def test_bad_studies_fail_naming_the_key(tmp_path, study, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_study(write_study(tmp_path, **study))


def test_unknown_profile_lists_the_profiles(tmp_path):
    path = write_study(tmp_path, variants={"a": []}, columns={"x": "params"}, profiles={"cpu": {}})
    with pytest.raises(ConfigError, match=r"no profile 'gpu'.*; profiles: cpu"):
        load_study(path, "gpu")


def fake_run(study, variant, seed, metrics, analysis=None):
    """A finished run as the sweep leaves it: its measurement cache and its status line."""
    run_dir = study.run_dir(variant, seed)
    run_dir.mkdir(parents=True)
    entry = {
        "metrics": metrics,
        "directions": {"cls/accuracy": True, "seg/dice": True, "cls/error": False},
        "analysis": analysis or {},
    }
    (run_dir / CACHE_FILE).write_text(json.dumps({"test-best": entry}))
    status_path = study.directory / STATUS_FILE
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    status[f"{variant}/{seed}"] = {"status": "completed", "error": None}
    status_path.write_text(json.dumps(status))


def test_results_table_mean_std_best_and_delta(tmp_path):
    path = write_study(
        tmp_path,
        name="t",
        variants={"stl": [], "mtl": [], "moe": []},
        seeds=[0, 1, 2],
        columns={
            "acc": {"metric": "cls/accuracy"},
            "err": {"metric": "cls/error"},
            "params": "params",
            "delta": {"delta": {"baselines": {"cls/accuracy": "stl", "seg/dice": "stl"}}},
        },
    )
    study = load_study(path, output_dir=tmp_path / "out")
    rng = np.random.default_rng(0)
    values = {}
    for variant in ("stl", "mtl", "moe"):
        for seed in (0, 1, 2):
            acc, dice, err = rng.uniform(0.2, 0.9, size=3)
            values[variant, seed] = (acc, dice, err)
            params_key = study.columns[2].key()
            fake_run(
                study,
                variant,
                seed,
                {"cls/accuracy": acc, "seg/dice": dice, "cls/error": err},
                {params_key: {"stl": 1.0, "mtl": 2.0, "moe": 3.0}[variant]},
            )
    frame = write_results(study)["frame"].set_index("variant")

    for variant in ("stl", "mtl", "moe"):
        accs = [values[variant, s][0] for s in range(3)]
        assert frame.loc[variant, "acc"] == pytest.approx(np.mean(accs))
        assert frame.loc[variant, "acc std"] == pytest.approx(np.std(accs, ddof=1))
        base_acc = np.mean([values["stl", s][0] for s in range(3)])
        base_dice = np.mean([values["stl", s][1] for s in range(3)])
        deltas = [
            100
            * (
                (values[variant, s][0] - base_acc) / base_acc
                + (values[variant, s][1] - base_dice) / base_dice
            )
            / 2
            for s in range(3)
        ]
        assert frame.loc[variant, "delta"] == pytest.approx(np.mean(deltas))

    table = (study.directory / "results.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| `")]
    row = {line.split("|")[1].strip(): line for line in lines}
    for label, higher in (("acc", True), ("err", False)):
        best = frame[label].idxmax() if higher else frame[label].idxmin()
        sign = 1 if higher else -1
        low = sign * frame.loc[best, label] - frame.loc[best, f"{label} std"]
        others = frame.drop(best)
        clear = low > (sign * others[label] + others[f"{label} std"]).max()
        bold = f"**{frame.loc[best, label]:.4g}" in row[f"`{best}`"]
        assert bold == clear, label  # marked only where the intervals separate
    assert table.count("**") // 2 == 1 + sum(
        f"**{frame.loc[v, c]:.4g}" in row[f"`{v}`"] for v in frame.index for c in ("acc", "err")
    )
    assert "**1 ± 0**" in row["`stl`"], "fewest parameters is best"
    assert "| 0 ± " in row["`stl`"], "a baseline's Δ against itself is 0"
    assert (study.directory / "figures" / "acc.png").is_file()
    csv = pd.read_csv(study.directory / "results.csv")
    assert list(csv["variant"]) == ["stl", "mtl", "moe"]
    assert set(csv["status"]) == {"completed"}


@pytest.mark.slow
def test_sweep_end_to_end_with_failure_interruption_and_resume(tmp_path, capsys):
    path = write_study(
        tmp_path,
        name="tiny",
        set=FAST,
        variants={
            "dense": [],
            "moe": [
                "+model.moe={num_experts: 4, router: {type: topk, k: 2}}",
                "+debug={stop_after_epoch: 1}",
            ],
            "broken": ["model.width=-3"],
        },
        columns={
            "cls acc": {"metric": "cls/accuracy"},
            "experts": "experts_selected",
            "params": "params",
        },
    )
    out = ["--output-dir", str(tmp_path / "out")]
    assert main(["sweep", str(path), *out, "--dry-run"]) == 0
    assert "dense seed 0 [pending]" in capsys.readouterr().out

    assert main(["sweep", str(path), *out]) == 1, "a failed variant makes the exit status 1"
    study = load_study(path, output_dir=tmp_path / "out")
    status = json.loads((study.directory / STATUS_FILE).read_text())
    assert status["dense/0"]["status"] == "completed"
    assert status["moe/0"]["status"] == "interrupted"
    assert status["broken/0"]["status"] == "failed"
    assert "negative dimension" in status["broken/0"]["error"]
    assert (study.run_dir("broken", 0) / "sweep-error.txt").is_file()
    first = pd.read_csv(study.directory / "results.csv").set_index("variant")
    assert first.loc["dense", "runs"] == "1/1" and first.loc["moe", "status"] == "interrupted"
    assert "- `broken`:" in (study.directory / "results.md").read_text()

    dense_weights = study.run_dir("dense", 0) / "checkpoints" / "last" / "model.safetensors"
    stamp = dense_weights.stat().st_mtime_ns
    assert main(["sweep", str(path), *out]) == 2, "without --resume, existing runs are kept"
    assert "pass --resume" in capsys.readouterr().err

    assert main(["sweep", str(path), *out, "--resume", "--only", "dense", "moe"]) == 0
    assert dense_weights.stat().st_mtime_ns == stamp, "the finished variant is not run again"
    resumed = json.loads((study.directory / STATUS_FILE).read_text())
    assert resumed["dense/0"]["seconds"] >= status["dense/0"]["seconds"], "its time is kept"
    moe_run = study.run_dir("moe", 0)
    assert "resumed" in (moe_run / "train.log").read_text()
    assert list(pd.read_csv(moe_run / "metrics.csv").query("split == 'train'")["epoch"]) == [1, 2]
    final = pd.read_csv(study.directory / "results.csv").set_index("variant")
    assert final.loc["dense", "cls acc"] == first.loc["dense", "cls acc"]
    assert final.loc["moe", "status"] == "completed" and final.loc["moe", "experts"] == 2.0
    assert final.loc["moe", "params"] > final.loc["dense", "params"]
    assert math.isnan(final.loc["dense", "experts"]), "a dense model selects no experts"
    assert final.loc["broken", "status"] == "failed"
    assert (study.directory / "figures" / "cls_acc.png").is_file()


def test_a_best_is_marked_only_where_its_interval_is_clear_of_the_others():
    from moekit.sweep.results import separated_best

    frame = pd.DataFrame(
        {
            "variant": ["a", "b", "c"],
            "runs": ["3/3", "3/3", "1/1"],
            "acc": [0.5, 0.8, 0.6],
            "acc std": [0.05, 0.05, math.nan],
            "loss": [0.30, 0.28, 0.5],
            "loss std": [0.05, 0.05, math.nan],
        }
    )
    seeds = {"a": 3, "b": 3, "c": 1}
    assert separated_best(frame, "acc", True, seeds) == "b"  # 0.75 > 0.6 and 0.55
    assert separated_best(frame, "loss", False, seeds) is None  # 0.28 ± 0.05 overlaps 0.30 ± 0.05
    assert separated_best(frame, "acc", None, seeds) is None  # no direction
    one_seed = frame.assign(**{"acc std": math.nan})
    assert separated_best(one_seed, "acc", True, {"a": 1, "b": 1, "c": 1}) is None
