"""Grad-CAM (maps against a hand computation, transformer tokens on their grid, per expert,
hooks removed also on error) and CAM-guided training (the entropy term against a loop, its
gradient against finite differences, inside the objective's graph)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import moekit.projects  # noqa: F401  (registers transfer_classifier)
from moekit.analysis.gradcam import grad_cam, mass_inside
from moekit.engine.experiment import build_task_losses
from moekit.engine.objective import AuxTerm, MultiTaskObjective
from moekit.errors import ConfigError
from moekit.losses.cam_guided import CamEntropy, true_class_entropy
from moekit.moe import MoEModules
from moekit.nn.cam import find_cam_layer, to_grid, weighted_map
from moekit.registry import MODELS, WEIGHTINGS
from moekit.types import Batch, ModelOutput, Task

SPEC = {"kind": "multilabel", "num_classes": 3, "class_names": ["D", "G", "A"], "loss": ["bce"]}
TASKS = {"diagnosis": Task.from_config("diagnosis", SPEC)}


class TinyCnn(nn.Module):
    """conv -> tanh -> conv (the map layer) -> global average pool -> linear."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, dtype=dtype)
        self.last = nn.Conv2d(4, 5, 3, padding=1, dtype=dtype)
        self.fc = nn.Linear(5, 3, dtype=dtype)

    def forward(self, images, task_mask=None):
        maps = self.last(torch.tanh(self.stem(images)))
        return ModelOutput({"diagnosis": self.fc(maps.mean(dim=(2, 3)))}, [])


def hook_count(model):
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


# ---------------------------------------------------------------- Grad-CAM
def test_maps_equal_the_hand_computation():
    torch.manual_seed(0)
    model, images = TinyCnn(), torch.randn(2, 3, 8, 8)
    result = grad_cam(model, images, "diagnosis")
    assert result.layer == "last" and result.maps.shape == (2, 3, 8, 8)
    with torch.no_grad():
        activation = model.last(torch.tanh(model.stem(images))).numpy()
    weights = model.fc.weight.detach().numpy() / 64  # dy_c/dA_k,ij of a mean pool
    for b in range(2):
        for c in range(3):
            cam = np.maximum(np.tensordot(weights[c], activation[b], axes=1), 0)
            expected = cam / cam.max() if cam.max() > 0 else cam
            np.testing.assert_allclose(result.maps[b, c].numpy(), expected, atol=1e-5)


def test_transformer_tokens_go_back_to_their_grid():
    backbone = {"name": "vit_tiny_patch16_224", "timm_kwargs": {"img_size": [32, 64]}}
    model = MODELS.build({"type": "transfer_classifier", "backbone": backbone}, tasks=TASKS)
    layer = find_cam_layer(model)
    assert (layer.name, layer.prefix) == ("backbone.blocks.11.norm1", 1)
    tokens = torch.arange(2 * 9 * 4, dtype=torch.float32).view(2, 9, 4)  # 1 prefix + 2x4 grid
    grid = to_grid(tokens, layer, (32, 64))
    assert grid.shape == (2, 4, 2, 4) and torch.equal(grid[0, :, 0, 1], tokens[0, 2])
    result = grad_cam(model, torch.randn(2, 3, 32, 64), "diagnosis", classes=[1])
    assert result.maps.shape == (2, 1, 32, 64) and float(result.maps.amax()) == 1.0
    swin = {
        "name": "swin_tiny_patch4_window7_224",
        "timm_kwargs": {"img_size": 64, "window_size": 2},
    }
    model = MODELS.build({"type": "transfer_classifier", "backbone": swin}, tasks=TASKS)
    assert find_cam_layer(model).layout == "NHWC"
    assert grad_cam(model, torch.randn(1, 3, 64, 64), "diagnosis").maps.shape == (1, 3, 64, 64)


def test_hooks_are_removed_after_use_and_when_it_raises():
    model = MODELS.build(
        {"type": "transfer_classifier", "classifier": {"type": "moe", "num_experts": 2}},
        tasks=TASKS,
    )
    images = torch.randn(1, 3, 32, 32)
    grad_cam(model, images, "diagnosis", experts=True)
    assert hook_count(model) == 0
    with pytest.raises(ConfigError, match="no task 'diagnoses'; did you mean"):
        grad_cam(model, images, "diagnosis".replace("sis", "ses"))
    assert hook_count(model) == 0

    class Broken(TinyCnn):
        def forward(self, images, task_mask=None):
            self.last(self.stem(images))
            raise RuntimeError("broken model")

    broken = Broken()
    with pytest.raises(RuntimeError, match="broken model"):
        grad_cam(broken, images, "diagnosis")
    assert hook_count(broken) == 0
    assert model.training and all(p.requires_grad for p in model.parameters())


class RoutedHead(nn.Module):
    """A tiny CNN whose classifier is an MoE of two linear experts with top-1 routing."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh())
        router = {"type": "topk", "k": 1, "renormalize": True}
        self.head = MoEModules([nn.Linear(6, 3), nn.Linear(6, 3)], router=router, dim=6)

    def forward(self, images, task_mask=None):
        pooled = self.backbone(images).mean(dim=(2, 3))
        logits, record = self.head(pooled)
        return ModelOutput({"diagnosis": logits}, [record])


def test_per_expert_maps_go_through_the_selected_expert_only():
    torch.manual_seed(1)
    model = RoutedHead()
    result = grad_cam(model, torch.randn(4, 3, 8, 8), "diagnosis", layer="backbone.1", experts=True)
    assert result.expert_maps.shape == (4, 3, 2, 8, 8)
    for b in range(4):
        chosen = int(result.expert_weights[b, 0].argmax())
        assert result.expert_weights[b, :, chosen].tolist() == [1.0, 1.0, 1.0]
        torch.testing.assert_close(result.expert_maps[b, :, chosen], result.maps[b])
        assert float(result.expert_maps[b, :, 1 - chosen].abs().max()) == 0.0
    with pytest.raises(ConfigError, match="no MoE layer"):
        grad_cam(TinyCnn(), torch.randn(1, 3, 8, 8), "diagnosis", experts=True)


def test_mass_inside_a_mask():
    maps = torch.zeros(2, 4, 4)
    maps[0, :2, :2] = 1.0
    maps[1] = 1.0
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2, :2] = True
    assert mass_inside(maps, mask).tolist() == [1.0, 0.25]
    assert math.isnan(float(mass_inside(torch.zeros(4, 4), mask)))


# ---------------------------------------------------------------- CAM-guided training
def entropy_loop(activation, logits_fn, positives):
    """The term by a plain loop: one autograd call per (sample, class), numpy entropy."""
    values = []
    for b in range(positives.shape[0]):
        for c in range(positives.shape[1]):
            if not positives[b, c]:
                continue
            act = activation.detach().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(logits_fn(act)[b, c], act)
            cam = weighted_map(act[b : b + 1], grad[b : b + 1])[0].detach().numpy()
            cam = np.maximum(cam, 0).ravel() + 1e-8
            p = cam / cam.sum()
            values.append(-(p * np.log(p)).sum() / math.log(p.size))
    return float(np.mean(values))


def test_the_entropy_term_equals_a_loop():
    torch.manual_seed(2)
    model = TinyCnn(torch.float64)
    images = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    activation = model.last(torch.tanh(model.stem(images)))
    logits_fn = lambda a: model.fc(a.mean(dim=(2, 3)))  # noqa: E731
    positives = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    value = true_class_entropy(activation, logits_fn(activation), positives)
    assert float(value) == pytest.approx(entropy_loop(activation, logits_fn, positives), abs=1e-10)
    none = true_class_entropy(activation, logits_fn(activation), torch.zeros(3, 3, dtype=bool))
    assert float(none) == 0.0 and none.requires_grad


def test_the_gradient_of_the_term_matches_finite_differences():
    torch.manual_seed(3)
    model = TinyCnn(torch.float64)
    images = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    positives = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool)

    def term():
        activation = model.last(torch.tanh(model.stem(images)))
        return true_class_entropy(activation, model.fc(activation.mean(dim=(2, 3))), positives)

    term().backward()
    analytic = {  # fc.bias does not reach the maps: no gradient
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for n, p in model.named_parameters()
    }
    step = 1e-6

    def moved(flat, i, delta):
        with torch.no_grad():
            flat[i] += delta
        return float(term())  # the term itself needs autograd

    for name, param in model.named_parameters():
        flat = param.view(-1)
        for i in range(0, flat.numel(), max(1, flat.numel() // 6)):
            up, down = moved(flat, i, step), moved(flat, i, -2 * step)
            moved(flat, i, step)
            numeric = (up - down) / (2 * step)
            assert analytic[name].view(-1)[i].item() == pytest.approx(
                numeric, rel=1e-4, abs=1e-8
            ), name
    # with the CAM weights detached (the study's way, no create_graph) the gradient differs
    for param in model.parameters():
        param.grad = None
    activation = model.last(torch.tanh(model.stem(images)))
    logits = model.fc(activation.mean(dim=(2, 3)))
    detached = []
    for c in range(3):
        (grad,) = torch.autograd.grad(
            logits[positives[:, c], c].sum(), activation, retain_graph=True
        )
        cam = torch.relu(weighted_map(activation, grad))[positives[:, c]].flatten(1) + 1e-8
        p = cam / cam.sum(1, keepdim=True)
        detached.append(-(p * p.log()).sum(1) / math.log(36))
    torch.cat(detached).mean().backward()
    assert model.fc.weight.grad is None  # the classifier's share in the maps' weights is lost
    assert float(analytic["fc.weight"].abs().max()) > 1e-4


def objective_with(model, loss):
    return MultiTaskObjective(
        model,
        TASKS,
        build_task_losses(TASKS),
        WEIGHTINGS.build({"type": "equal"}, tasks=TASKS),
        [AuxTerm("cam_entropy", 0.5, loss)],
    )


def test_the_objective_adds_the_term_inside_its_graph():
    torch.manual_seed(4)
    model = TinyCnn()
    objective = objective_with(model, CamEntropy("diagnosis", layer="last"))
    labels = torch.tensor([[1.0, 0, 0], [0, 1, 1]])
    labelled = {"diagnosis": torch.ones(2, dtype=torch.bool)}
    batch = Batch(torch.randn(2, 3, 8, 8), {"diagnosis": labels}, labelled)
    out = objective(batch)
    assert hook_count(model) == 0  # watched for the forward only
    assert 0.0 < float(out.aux_losses["cam_entropy"]) <= 1.0
    expected = float(out.task_losses["diagnosis"]) + 0.5 * float(out.aux_losses["cam_entropy"])
    assert float(out.loss) == pytest.approx(expected, rel=1e-6)
    out.loss.backward()
    assert model.stem.weight.grad is not None
    with pytest.raises(ConfigError, match="cam_entropy task 'other'"):
        objective_with(model, CamEntropy("other", layer="last"))(batch)
    assert hook_count(model) == 0


def test_the_term_reaches_the_head_when_the_trunk_is_frozen():
    torch.manual_seed(5)
    model = TinyCnn()
    for layer in (model.stem, model.last):
        layer.requires_grad_(False)  # a head-only stage of staged fine-tuning
    labels = torch.tensor([[1.0, 0, 0], [0, 1, 1]])
    batch = Batch(
        torch.randn(2, 3, 8, 8),
        {"diagnosis": labels},
        {"diagnosis": torch.ones(2, dtype=torch.bool)},
    )
    grads = []
    for weight in (0.5, 0.0):
        objective = objective_with(model, CamEntropy("diagnosis", layer="last"))
        objective.aux_terms[0] = AuxTerm("cam_entropy", weight, objective.aux_terms[0].loss)
        model.zero_grad()
        out = objective(batch)
        assert 0.0 < float(out.aux_losses["cam_entropy"]) <= 1.0
        out.loss.backward()
        grads.append(model.fc.weight.grad.clone())
    assert model.last.weight.grad is None
    assert not torch.allclose(grads[0], grads[1])  # the term's gradient through alpha


# ---------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def odir_run(tmp_path_factory):
    """A tiny ODIR run with the MoE head, trained for an epoch with the CAM-guided term."""
    from moekit.cli import main
    from moekit.data.replicas.odir import make_odir_replica

    root = tmp_path_factory.mktemp("odir")
    counts = {"train": 16, "val": 8, "offsite_test": 8, "onsite_test": 2}
    replica = make_odir_replica(root / "replica", counts, size=48)
    overrides = [
        *(f"data.{s}.root={replica}" for s in ("train", "val", "test")),
        *(f"data.{s}.image_size=[64, 64]" for s in ("train", "val", "test")),
        "train.epochs=1",
        "train.curves=false",
        "model.classifier={type: moe, num_experts: 2}",
        "aux_losses=[{type: cam_entropy, task: diagnosis, weight: 0.1}]",
        "eval.thresholds=tune",
    ]
    run = root / "run"
    config = "configs/odir/replica_resnet18.yaml"
    assert main(["train", config, "--run-dir", str(run), "--set", *overrides]) == 0
    return run, replica


@pytest.mark.slow
def test_cam_command_on_a_split_and_on_files(odir_run, tmp_path, capsys):
    import pandas as pd

    from moekit.cli import main

    run, replica = odir_run
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics.loc[metrics.split == "train", "aux/cam_entropy"].between(0, 1).all()
    split = tmp_path / "split"
    args = ["cam", str(run), "--split", "test", "--limit", "3", "--experts", "--out", str(split)]
    assert main(args) == 0
    table = pd.read_csv(split / "cam.csv")
    assert len(table) == 9 and set(table["class"]) == {"D", "G", "A"}
    assert {"expert_0_weight", "expert_1_weight"} <= set(table.columns)
    assert table["truth"].isin([0, 1]).all() and len(list(split.glob("*.png"))) == 3
    files = [str(f) for f in sorted((replica / "images/onsite_test").glob("*.jpg"))]
    given = tmp_path / "files"
    assert main(["cam", str(run), "--images", *files, "--class", "G", "--out", str(given)]) == 0
    table = pd.read_csv(given / "cam.csv")
    assert list(table["class"]) == ["G", "G"] and table["truth"].isna().all()
    assert main(["cam", str(run), "--split", "test", "--class", "g", "--out", str(given)]) == 2
    assert "'g' is not a class of 'diagnosis'; valid: D, G, A" in capsys.readouterr().err
