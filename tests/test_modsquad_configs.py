"""Every runnable config of configs/modsquad resolves, passes `moekit config check` and builds
its model; the expert counts and losses are the paper's; the tiny models run a forward."""

from pathlib import Path

import pytest
import torch

from moekit import config
from moekit.cli import main
from moekit.moe import MoEAttention, MoEMLP
from moekit.registry import MODELS, import_builtins
from moekit.types import tasks_from_config

import_builtins()
FOLDER = Path(__file__).resolve().parents[1] / "configs" / "modsquad"
RUNNABLE = sorted(p for p in FOLDER.glob("*.yaml") if not p.name.startswith("_"))
SHAPES_TASKS = ["shape", "count", "semseg", "edge", "depth"]
PASCAL_TASKS = ["semseg", "human_parts", "sal", "normals", "edge"]


def build(cfg, device="meta"):
    with torch.device(device):
        return MODELS.build(cfg["model"], tasks=tasks_from_config(cfg))


def moe_layers(model, kind):
    return [m for m in model.modules() if isinstance(m, kind)]


def test_the_issue_lists_every_config():
    names = {p.stem for p in RUNNABLE}
    variants = ["mtl", "mmoe_balance", "m3vit", "moa_only", "mlp_only"]
    stl = [f"stl_{t}" for t in SHAPES_TASKS]
    expected = {"vit_small", "vit_base", *variants, *stl}
    expected |= {f"tiny_{v}" for v in [*variants, *stl]} | {"tiny_modsquad"}
    expected |= {"pascal_vit_small", "pascal_vit_base"} | {f"pascal_{v}" for v in variants}
    expected |= {f"pascal_stl_{t}" for t in PASCAL_TASKS}
    assert expected <= names


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: p.stem)
def test_config_checks_and_builds(path, capsys):
    no_data = ["--no-data"] if path.stem.startswith("pascal_") else []  # no PASCAL-Context here
    assert main(["config", "check", str(path), *no_data]) == 0
    cfg = config.load(path)
    assert cfg["name"] == path.stem
    model = build(cfg)
    tasks = list(cfg["tasks"])
    assert list(model.heads) == tasks
    if path.stem.startswith("tiny_"):
        assert cfg["data"]["train"]["image_size"] == 64 and cfg["model"]["dim"] == 96
        assert cfg["model"]["attention"]["head_dim"] == 32  # 2·C/num_heads, as the ViT-S
    if "stl" in path.stem:
        assert len(tasks) == 1 and cfg["data"]["train"]["tasks"] == tasks
    elif "finetune" not in path.stem and "dense" not in path.stem:
        assert tasks == (PASCAL_TASKS if path.stem.startswith("pascal_") else SHAPES_TASKS)


def test_paper_expert_counts_and_losses():
    small = config.load(FOLDER / "vit_small.yaml")
    base = config.load(FOLDER / "vit_base.yaml")
    assert small["model"]["img_size"] == base["model"]["img_size"] == 224
    assert small["aux_losses"] == [{"type": "mutual_information", "weight": 0.001}]
    for cfg, dim, experts, k in ((small, 384, 15, 6), (base, 768, 24, 12)):
        model = build(cfg)
        attention, mlp = moe_layers(model, MoEAttention), moe_layers(model, MoEMLP)
        assert len(attention) == len(mlp) == 6  # every second block of 12
        assert (attention[0].num_experts, attention[0].router.k) == (experts, k)
        assert attention[0].head_dim == 128  # 2·C/num_heads, as Mod-Squad's code
        assert (mlp[0].num_experts, mlp[0].router.k, mlp[0].hidden) == (16, 4, dim)
        assert attention[0].router.num_tasks == 5
    balance = config.load(FOLDER / "mmoe_balance.yaml")["aux_losses"]
    assert balance == [{"type": "switch_balance", "weight": 0.01}]
    m3vit = config.load(FOLDER / "m3vit.yaml")
    assert m3vit["aux_losses"][0]["per_task"] is True
    model = build(m3vit)
    assert not moe_layers(model, MoEAttention) and len(moe_layers(model, MoEMLP)) == 6
    assert not moe_layers(build(config.load(FOLDER / "mtl.yaml")), MoEMLP)
    assert not moe_layers(build(config.load(FOLDER / "moa_only.yaml")), MoEMLP)
    assert not moe_layers(build(config.load(FOLDER / "mlp_only.yaml")), MoEAttention)


@pytest.mark.parametrize("name", ["tiny_modsquad", "tiny_m3vit", "tiny_stl_depth"])
def test_tiny_models_run_forward(name):
    cfg = config.load(FOLDER / f"{name}.yaml")
    torch.manual_seed(0)
    model = build(cfg, "cpu").eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert set(out.preds) == set(cfg["tasks"])
    if "depth" in out.preds:
        assert out.preds["depth"].shape == (2, 1, 64, 64)


@pytest.mark.slow
def test_vit_small_flops_and_params_against_the_paper():
    """Mod-Squad (Table 3, PASCAL-Context): MTL ViT-S 21M / 4.6 GFLOPs, Mod-Squad ViT-S
    50M / 5.2 GFLOPs (multiply-adds).

    moekit counts one (image, task) pass of the backbone. The dense ViT-S/16 at 224 is 4.6 G
    and 21.7M. With MoA heads of width 2·C/num_heads = 128 (Mod-Squad's code) the MoE ViT-S
    has the paper's 50M parameters and computes 4.92 G per task alone (4.97 G as counted here,
    where one matmul applies the gates of all five tasks): 5 % under the paper's 5.2 G, a number
    the paper also gives for M3ViT, whose MoE MLP costs what the dense MLP costs
    (docs/modsquad.md, "FLOPs and parameters"). With the dense head width (64) it would be
    44.9M and 4.33 G, under the dense model, which this range rejects.
    """
    from moekit.analysis.flops import count_flops

    image = torch.randn(1, 3, 224, 224)
    backbone, params = {}, {}
    for name in ("vit_small", "mtl", "m3vit"):
        torch.manual_seed(0)
        model = build(config.load(FOLDER / f"{name}.yaml"), "cpu").eval()
        counted = count_flops(model, image, {"shape": torch.tensor([True])})
        backbone[name] = counted.total - counted.per_module["heads"]
        params[name] = sum(
            p.numel() for n, p in model.named_parameters() if not n.startswith("heads.")
        )
    assert backbone["mtl"] == pytest.approx(4.6e9, rel=0.01)
    assert params["mtl"] == pytest.approx(21.7e6, rel=0.01)
    assert 4.85e9 < backbone["vit_small"] < 5.0e9
    assert 49e6 < params["vit_small"] < 51e6
    assert backbone["m3vit"] == pytest.approx(backbone["mtl"], rel=0.02)  # k·H/k = H
    assert params["m3vit"] == pytest.approx(43.3e6, rel=0.01)  # paper: 42M


# Trivial-baseline bar of the tiny tasks on the test split: (metric, higher is better). Each
# of these ends far from its bar (measured: count 0.72 vs 0.28, semseg mIoU 0.39 vs 0.18, edge
# F1 0.44 vs 0.11, depth RMSE 0.087 vs 0.151), so the test holds on CPUs whose kernels round
# differently. shape (0.41 vs 0.29) is closer to its bar: that result is a study's claim
# (docs/modsquad.md), not a test's.
BARS = {
    "count": ("accuracy", True),
    "semseg": ("miou", True),
    "edge": ("f1", True),
    "depth": ("rmse", False),
}


@pytest.fixture(scope="module")
def tiny_modsquad_run(tmp_path_factory):
    """tiny_modsquad trained as configured (1024 images, 6 epochs: about four minutes on one
    core; only the validation split is cut to 64 images) and evaluated on its full test split,
    with the trivial baselines of that split."""
    import json

    from moekit.data.multitask_shapes import trivial_baselines
    from moekit.registry import DATASETS

    run = tmp_path_factory.mktemp("tiny_modsquad") / "run"
    fast = ["data.val.num_samples=64"]
    args = ["train", str(FOLDER / "tiny_modsquad.yaml"), "--run-dir", str(run)]
    assert main([*args, "--set", *fast, "+train.curves=false"]) == 0
    assert main(["eval", str(run), "--split", "test", "--checkpoint", "best"]) == 0
    scores = json.loads((run / "eval" / "test-best.json").read_text())
    test_data = config.read_yaml(run / "config.yaml")["data"]["test"]
    return scores, trivial_baselines(DATASETS.build(test_data))


@pytest.mark.slow
@pytest.mark.parametrize("task", list(BARS))
def test_tiny_modsquad_beats_the_trivial_baselines(tiny_modsquad_run, task):
    scores, baselines = tiny_modsquad_run
    metric, higher = BARS[task]
    value, bar = _score(scores, f"{task}/{metric}"), baselines[task][metric]
    assert (value > bar) if higher else (value < bar), f"{task}/{metric} {value} vs {bar}"


def _score(scores, key):
    """A metric from the JSON of ``moekit eval`` (flat ``split/task/metric`` keys or nested)."""
    flat = scores.get("metrics", scores)
    for name in (key, f"test/{key}"):
        if name in flat:
            return float(flat[name])
    raise KeyError(f"{key} not in the eval output: {sorted(flat)[:8]}")
