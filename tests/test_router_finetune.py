"""Router fine-tuning (``finetune:``, ``moekit train --init``): loading a run trained on other
tasks by name, freezing by mode, holding the gate rows of the tasks that are not tuned."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_model

from moekit import config
from moekit.cli import main
from moekit.data.collate import collate_samples
from moekit.data.multitask_shapes import multitask_shapes_tasks
from moekit.engine import build_experiment, checkpoint, finetune
from moekit.errors import CheckpointError, ConfigError
from moekit.registry import MODELS, import_builtins
from moekit.types import tasks_from_config

import_builtins()
LOSSES = {"shape": ["cross_entropy"], "count": ["cross_entropy"], "semseg": ["cross_entropy"]}
LOSSES |= {"edge": ["bce"], "depth": ["l1"]}
MODEL = {
    "type": "modsquad_vit",
    "img_size": 32,
    "patch_size": 8,
    "patch_embed": "conv",  # batch norm in the (frozen) stem
    "dim": 32,
    "depth": 2,
    "num_heads": 2,
    "attention": {"num_experts": 3, "router": {"type": "noisy_topk", "k": 2}},
    "mlp": {"num_experts": 4, "router": {"type": "noisy_topk", "k": 2}},
}
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "modsquad"


def experiment_cfg(tasks, **extra):
    block = multitask_shapes_tasks(tasks=tasks)
    for name, spec in block.items():
        spec["loss"] = LOSSES[name]
    data = {"type": "multitask_shapes", "num_samples": 8, "image_size": 32, "tasks": tasks}
    return {
        "tasks": block,
        "model": MODEL,
        "data": {"train": {**data, "split": "train"}, "batch_size": 8},
        "optimizer": {"lr": 0.05, "weight_decay": 0.5},
        **extra,
    }


@pytest.fixture(scope="module")
def init_run(tmp_path_factory):
    """A checkpoint directory of a model trained (here: initialised) on semseg and depth."""
    path = tmp_path_factory.mktemp("init") / "checkpoints" / "best"
    path.mkdir(parents=True)
    cfg = experiment_cfg(["semseg", "depth"])
    torch.manual_seed(1)
    model = MODELS.build(cfg["model"], tasks=tasks_from_config(cfg))
    save_model(model, str(path / checkpoint.MODEL_FILE))
    (path / checkpoint.CONFIG_FILE).write_text(config.dump(cfg))
    return path.parents[1]


def gate_names(model):
    return [n for n, kind in finetune.task_tensors(model, 2).items() if kind == "gate"]


def finetuned(init_run, mode="routers", tasks=("semseg", "shape")):
    cfg = experiment_cfg(list(tasks), finetune={"init": str(init_run), "mode": mode})
    cfg = finetune.resolve(cfg)
    exp = build_experiment(cfg)
    assert finetune.initialise(exp.model, cfg).startswith(f"finetune {mode}")
    return exp, cfg


def test_new_tasks_default_to_those_the_init_run_lacks(init_run):
    _, cfg = finetuned(init_run)
    assert cfg["finetune"]["tasks"] == ["shape"]


def test_routers_mode_trains_gates_task_embeddings_and_new_heads_only(init_run):
    exp, _ = finetuned(init_run)
    named = dict(exp.model.named_parameters())
    gates = gate_names(exp.model)
    # 2 MoE layers x (gate + noise gate) of [2 tasks, 32, E] with E = 3 (attention), 4 (MLP)
    assert sum(named[n].numel() for n in gates) == 2 * 2 * 32 * (3 + 4)
    head = sum(p.numel() for n, p in named.items() if n.startswith("heads.shape."))
    assert head == 32 * 4 + 4
    assert named["task_embed"].shape == (2, 32)  # one row per task, dim 32
    trainable = sum(p.numel() for p in exp.model.parameters() if p.requires_grad)
    assert trainable == 2 * 2 * 32 * (3 + 4) + 2 * 32 + head
    expected = {*gates, "task_embed", *_heads(named, "shape")}
    assert {n for n, p in named.items() if p.requires_grad} == expected


def test_heads_mode_trains_the_new_heads_only(init_run):
    exp, _ = finetuned(init_run, mode="heads")
    named = dict(exp.model.named_parameters())
    assert {n for n, p in named.items() if p.requires_grad} == set(_heads(named, "shape"))


def _heads(named, task):
    return [n for n in named if n.startswith(f"heads.{task}.")]


def test_weights_load_by_task_name_and_shared_tasks_are_held(init_run):
    exp, _ = finetuned(init_run)
    model = exp.model
    old = load_file(str(init_run / "checkpoints" / "best" / checkpoint.MODEL_FILE))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name in gate_names(model):  # new row 0 = semseg = old row 0
        torch.testing.assert_close(before[name][0], old[name][0], rtol=0, atol=0)
    torch.testing.assert_close(before["task_embed"][0], old["task_embed"][0], rtol=0, atol=0)
    dataset = build_experiment(experiment_cfg(["semseg", "shape"]), splits=["train"])
    batch = collate_samples([dataset.datasets["train"][i] for i in range(8)])
    exp.objective.train()
    for _ in range(3):  # AdamW with weight decay 0.5 would move every row it owns
        exp.optimizer.zero_grad()
        exp.objective(batch).loss.backward()
        exp.optimizer.step()
    after = model.state_dict()
    for name, value in after.items():
        if name in gate_names(model) or name == "task_embed":
            # row 0 (semseg, from the init run) is held; row 1 (shape, new) is trained
            torch.testing.assert_close(value[0], before[name][0], rtol=0, atol=0)
            assert not torch.equal(value[1], before[name][1]) or "noise" in name
        elif name.startswith("heads.shape."):
            assert not torch.equal(value, before[name]), name
        else:  # frozen batch norm runs in eval mode: statistics and counter unchanged
            torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)


def test_frozen_batch_norm_normalises_with_its_running_statistics(init_run):
    exp, _ = finetuned(init_run)
    model = exp.model
    images = torch.randn(4, 3, 32, 32)
    model.eval()
    expected = model.patch_embed(images)
    model.train()
    torch.testing.assert_close(model.patch_embed(images), expected, rtol=0, atol=0)
    norms = [m for m in model.patch_embed.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms) and model.training


def test_errors_name_the_problem(init_run, tmp_path):
    with pytest.raises(ConfigError, match="--init RUN_DIR"):
        finetune.resolve(experiment_cfg(["shape"], finetune="routers"))
    with pytest.raises(ConfigError, match="every task of the config is in the init run"):
        finetune.resolve(
            experiment_cfg(["semseg"], finetune={"init": str(init_run), "mode": "routers"})
        )
    with pytest.raises(ConfigError, match="'router' is not one of all"):
        finetune.finetune_settings({"finetune": "router"})
    wider = experiment_cfg(["semseg", "shape"], finetune={"init": str(init_run), "mode": "all"})
    wider["model"] = {**MODEL, "dim": 48}
    model = MODELS.build(wider["model"], tasks=tasks_from_config(wider))
    with pytest.raises(CheckpointError, match="'cls_token' has shape"):
        finetune.initialise(model, finetune.resolve(wider))


@pytest.mark.slow
def test_cli_router_finetuning_of_the_tiny_configs(tmp_path):
    fast = ["data.train.num_samples=16", "data.val.num_samples=8", "data.test.num_samples=8"]
    fast += ["train.epochs=1", "+train.curves=false"]
    init = tmp_path / "dense"
    assert (
        main(
            [
                "train",
                str(CONFIGS / "tiny_modsquad_dense.yaml"),
                "--run-dir",
                str(init),
                "--set",
                *fast,
            ]
        )
        == 0
    )
    run = tmp_path / "router"
    args = ["train", str(CONFIGS / "tiny_router_finetune.yaml"), "--run-dir", str(run)]
    assert main([*args, "--init", str(init), "--set", *fast]) == 0
    saved = config.read_yaml(run / "config.yaml")["finetune"]
    assert saved["init"] == str(init) and saved["mode"] == "routers"
    assert "finetune routers from" in (run / "train.log").read_text()
    old = load_file(str(init / "checkpoints" / "best" / checkpoint.MODEL_FILE))
    new = load_file(str(run / "checkpoints" / "last" / checkpoint.MODEL_FILE))
    shared = [k for k in new if k in old and "router" not in k and k != "task_embed"]
    assert shared and all(torch.equal(new[k], old[k]) for k in shared)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
