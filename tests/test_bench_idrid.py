import pytest
import torch

from moekit import config
from moekit.moe import set_routing
from moekit.projects.idrid.bench import markdown, run, seed_style
from moekit.registry import MODELS, import_builtins
from moekit.types import tasks_from_config

import_builtins()


def test_seed_style_masking_computes_the_same_outputs():
    cfg = config.load("configs/idrid/demo.yaml")
    tasks = tasks_from_config(cfg)
    torch.manual_seed(0)
    model = MODELS.build({**cfg["model"], "backbone": {"name": "resnet18"}}, tasks=tasks).eval()
    set_routing(model, {"type": "top_p", "p": 0.8, "score": "sigmoid", "renormalize": True})
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        sparse = model(images).preds
        with seed_style(model):
            masked = model(images).preds
        restored = model(images).preds
    for name in tasks:
        torch.testing.assert_close(masked[name], sparse[name], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(restored[name], sparse[name])


def test_bench_idrid_reports_both_steps_and_labels_the_untrained_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default config resolves to the checkout's
    result = run(batch=2, size=(32, 48), reps=1, warmup=0)
    for step in ("train", "infer"):
        assert set(result[step]) == {"sparse_ms", "masked_ms", "ratio"}
        assert result[step]["sparse_ms"] > 0 and result[step]["masked_ms"] > 0
    assert all(1 <= v <= result["experts"] for v in result["selected"].values())
    assert result["settings"]["trained"] is False
    assert result["settings"]["config"].endswith("configs/idrid/demo.yaml")
    table = markdown(result)
    assert "| train |" in table and "| infer |" in table and "mean experts selected" in table
    assert "untrained" in table and "UNTRAINED gates" in table and "resnet18 backbone" in table


@pytest.mark.slow
def test_bench_idrid_runs_the_flagship_config_at_a_small_size():
    result = run("configs/idrid/mtl_r50_topp.yaml", batch=2, size=(32, 48), reps=1, warmup=0)
    assert result["settings"]["backbone"] == "resnet50" and result["experts"] == 3
    assert "configs/idrid/mtl_r50_topp.yaml" in markdown(result)
