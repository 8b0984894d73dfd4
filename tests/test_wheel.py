"""moekit installed like a package: shipped configs by name, and a wheel that works from any
directory (``pip install .``, not editable, then ``moekit configs|train|bench|demo``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from moekit import config
from moekit.cli import main
from moekit.commands.configs import description, shipped_configs
from moekit.config import SHIPPED_CONFIGS, SHIPPED_ROOT, shipped_path
from moekit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "moekit")


def test_shipped_configs_resolve_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo = SHIPPED_CONFIGS / "idrid" / "demo.yaml"
    assert shipped_path("idrid/demo") == demo
    assert shipped_path("idrid/demo.yaml") == demo
    assert shipped_path("configs/idrid/demo.yaml") == demo
    study = SHIPPED_ROOT / "experiments" / "idrid_routing.yaml"
    assert shipped_path("experiments/idrid_routing.yaml") == study
    assert shipped_path("config.py") == Path("config.py")  # package modules are not configs
    assert shipped_path("idrid/nope") == Path("idrid/nope")
    assert config.load("tiny/two_task")["name"] == "two_task"
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "two_task.yaml").write_text("name: mine\n")
    assert config.load("tiny/two_task.yaml")["name"] == "mine"  # a local file wins


def test_a_base_may_name_a_shipped_config(tmp_path):
    (tmp_path / "mine.yaml").write_text("_base_: tiny/two_task\nname: mine\n")
    cfg = config.load(tmp_path / "mine.yaml")
    assert cfg["name"] == "mine" and cfg["model"]["type"] == "tiny_mtl"
    (tmp_path / "bad.yaml").write_text("_base_: tiny/nope\n")
    with pytest.raises(ConfigError, match="'tiny/nope' not found"):
        config.load(tmp_path / "bad.yaml")


def test_configs_command_lists_runnable_configs_and_studies(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert {"idrid/demo", "tiny/two_task", "modsquad/tiny_modsquad", "idrid_routing"} <= set(names)
    assert not any(name.split("/")[-1].startswith("_") for name in names)  # fragments: --all
    assert "A tiny two-task experiment" in out
    assert main(["configs", "--all"]) == 0
    assert "idrid/_cpu" in capsys.readouterr().out


def test_every_listed_config_defines_a_model_and_a_description():
    listed = shipped_configs()
    assert len(listed) >= 10
    for name, path in listed:
        assert "model" in config.load(name), name
        assert description(path), f"{path}: no leading comment"


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh virtual environment with moekit installed from its wheel; its dependencies come
    from the test's own environment (a path line in a .pth file), so nothing downloads."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    env = {**os.environ, "PIP_NO_INDEX": "1", "OMP_NUM_THREADS": "1"}
    _run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", "dist"], work, env)
    wheel = next((work / "dist").glob("moekit-*.whl"))
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], work, env)
    python = venv / "bin" / "python"
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work, env
    ).strip()
    (Path(purelib) / "moekit-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], work, env)
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    return wheel, venv / "bin", env


@pytest.mark.slow
def test_wheel_carries_every_shipped_config_and_study(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        p.relative_to(SHIPPED_ROOT.parent).as_posix()
        for folder in ("configs", "experiments")
        for p in (SHIPPED_ROOT / folder).rglob("*.yaml")
    }
    assert shipped and shipped <= names
    assert any(name.endswith("licenses/LICENSE") for name in names)


@pytest.mark.slow
def test_installed_wheel_runs_from_another_directory(installed, tmp_path):
    _, bin_dir, env = installed
    moekit = str(bin_dir / "moekit")
    where = _run(
        [str(bin_dir / "python"), "-c", "import moekit; print(moekit.__file__)"], tmp_path, env
    )
    assert where.startswith(str(bin_dir.parent)), where  # the wheel, not the checkout

    assert "idrid/demo" in _run([moekit, "configs"], tmp_path, env)

    _run(
        [moekit, "train", "tiny/two_task", "--set", "train.epochs=1", "--run-dir", "runs/tiny"],
        tmp_path,
        env,
    )
    assert (tmp_path / "runs" / "tiny" / "checkpoints").is_dir()

    bench = [
        "--batch",
        "2",
        "--tokens",
        "16",
        "--dim",
        "16",
        "--experts",
        "4",
        "--k",
        "2",
        "--hidden",
        "32",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
    ]
    assert "MoE-MLP top-2" in _run([moekit, "bench", "moe", *bench], tmp_path, env)

    replica = ["data/idrid-replica", "--n-grading", "16", "--n-seg", "8", "--size", "192x128"]
    _run([moekit, "data", "make-idrid", *replica], tmp_path, env)
    short = [f"data.{s}.image_size=[48, 72]" for s in ("train", "val", "test")]
    out = _run(
        [moekit, "demo", "--run-dir", "runs/demo", "--set", *short, "train.epochs=1"], tmp_path, env
    )
    assert "| model" in out
    assert (tmp_path / "runs" / "demo" / "results.csv").is_file()
