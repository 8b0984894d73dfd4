import subprocess
import sys
from pathlib import Path

import pytest

from moekit.cli import main
from moekit.registry import ROUTERS


@pytest.fixture
def fake_router(monkeypatch):
    class TopP:
        """Dynamic top-p routing (Huang et al. 2024)."""

    monkeypatch.setitem(ROUTERS._entries, "top_p", TopP)


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "list" in out and "config" in out


def test_list_prints_names_with_first_docstring_line(capsys, fake_router):
    assert main(["list", "routers"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ROUTERS (")
    assert "top_p" in out and "Dynamic top-p routing (Huang et al. 2024)." in out


def test_list_unknown_registry_is_a_one_line_error(capsys):
    assert main(["list", "routrs"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'ROUTERS'" in err


def test_config_show_prints_resolved_config(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text("train: {epochs: 10}\nmodel: {type: tiny}\n")
    (tmp_path / "exp.yaml").write_text("_base_: base.yaml\nmodel: {dim: 8}\n")
    assert main(["config", "show", str(tmp_path / "exp.yaml"), "--set", "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert out == "train:\n  epochs: 3\nmodel:\n  type: tiny\n  dim: 8\n"


def test_config_check_reports_type_typo_with_key_and_suggestion(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    tasks = "tasks: {t: {kind: multiclass, num_classes: 2, loss: cross_entropy}}\n"
    model = "model:\n  type: tiny_mtl\n  moe:\n    router: {{type: {}, p: 0.4}}\n"
    cfg.write_text(tasks + model.format("top-p"))
    assert main(["config", "check", str(cfg), "--no-data"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"moekit: error: {cfg}: config key 'model.moe.router.type': ROUTERS: unknown type"
    )
    assert "did you mean 'top_p'" in err and err.count("\n") == 1
    cfg.write_text(tasks + model.format("top_p"))
    assert main(["config", "check", str(cfg), "--no-data"]) == 0


def test_missing_file_is_exit_2_and_debug_shows_traceback(tmp_path, capsys):
    missing = str(tmp_path / "none.yaml")
    assert main(["config", "show", missing]) == 2
    assert "config file not found" in capsys.readouterr().err
    with pytest.raises(Exception, match="config file not found"):
        main(["--debug", "config", "show", missing])


def test_console_script_runs_from_the_venv(tmp_path):
    script = Path(sys.executable).parent / "moekit"
    result = subprocess.run([str(script), "list", "ROUTERS"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("ROUTERS (")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {type: [\n")
    result = subprocess.run(
        [str(script), "config", "show", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.startswith("moekit: error:") and "Traceback" not in result.stderr
