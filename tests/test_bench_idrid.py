import pytest
import torch

from moekit import config
from moekit.moe import set_routing
from moekit.projects.idrid.bench import markdown, masked_like_reference, run
from moekit.registry import MODELS, import_builtins
from moekit.types import tasks_from_config

import_builtins()


def test_masked_like_reference_masking_computes_the_same_outputs():
    cfg = config.load("configs/idrid/demo.yaml")
    tasks = tasks_from_config(cfg)
    torch.manual_seed(0)
    model = MODELS.build({**cfg["model"], "backbone": {"name": "resnet18"}}, tasks=tasks).eval()
    set_routing(model, {"type": "top_p", "p": 0.8, "score": "sigmoid", "renormalize": True})
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        sparse = model(images).preds
        with masked_like_reference(model):
            masked = model(images).preds
        restored = model(images).preds
    for name in tasks:
        torch.testing.assert_close(masked[name], sparse[name], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(restored[name], sparse[name])


def test_bench_idrid_reports_both_steps_and_labels_the_untrained_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default config resolves to the checkout's
    result = run(batch=2, size=(32, 48), reps=1, warmup=0)
    assert [(r["step"], r["dtype"], r["memory_format"]) for r in result["rows"]] == [
        ("train", "float32", "contiguous"),
        ("infer", "float32", "contiguous"),
    ]
    for row in result["rows"]:
        assert row["sparse_ms"] > 0 and row["masked_ms"] > 0 and row["to_base"] == 1.0
    assert all(1 <= v <= result["experts"] for v in result["selected"].values())
    assert result["settings"]["trained"] is False
    assert result["settings"]["config"].endswith("configs/idrid/demo.yaml")
    table = markdown(result)
    assert "| train | float32 | contiguous |" in table and "| infer |" in table
    assert "mean experts selected" in table and "bf16 units" in table
    assert "untrained" in table and "UNTRAINED gates" in table and "resnet18 backbone" in table


def test_bench_idrid_times_every_dtype_and_memory_format_against_the_first(capsys):
    from moekit.cli import main

    args = ["--batch", "2", "--size", "32", "48", "--reps", "1", "--warmup", "0"]
    args += ["--dtype", "float32", "bfloat16", "--memory-format", "channels_last"]
    assert main(["bench", "idrid", *args]) == 0
    out = capsys.readouterr().out
    for dtype in ("float32", "bfloat16"):
        for step in ("train", "infer"):
            assert f"| {step} | {dtype} | channels_last |" in out
    assert "| contiguous |" not in out and "sparse / sparse (float32, channels_last)" in out


@pytest.mark.slow
def test_bench_idrid_runs_the_flagship_config_at_a_small_size():
    result = run("configs/idrid/mtl_r50_topp.yaml", batch=2, size=(32, 48), reps=1, warmup=0)
    assert result["settings"]["backbone"] == "resnet50" and result["experts"] == 3
    assert "configs/idrid/mtl_r50_topp.yaml" in markdown(result)
