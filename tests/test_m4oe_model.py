"""The m4oe model: shapes, masked-modality invariance, task rows, extraction, the conditional
mutual information I(M;E|T) wired from its records, and FLOPs."""

import copy
import json
import math

import pytest
import torch
import yaml
from torch import nn

from moekit import config
from moekit.analysis.flops import (
    count_flops,
    count_parameters,
    flops_report,
    reference_macs,
    task_counts,
)
from moekit.cli import main
from moekit.data.gamma import gamma_tasks
from moekit.data.replicas.gamma import make_gamma_replica
from moekit.errors import ConfigError
from moekit.losses.aux_mutual_information import ConditionalMutualInformationLoss
from moekit.moe import MoEMLP, SoftMoE
from moekit.registry import BACKBONES, MODELS, import_builtins
from moekit.routing.types import Routing, RoutingRecord
from moekit.types import tasks_from_config

import_builtins()
TINY = "configs/m4oe/_tiny_model.yaml"
TASKS = tasks_from_config(
    {
        "tasks": {
            "grade": {"kind": "multiclass", "num_classes": 3},
            "disc": {"kind": "segmentation", "num_classes": 1},
            "cup": {"kind": "segmentation", "num_classes": 2},
        }
    }
)
SOFT = {"type": "soft_moe", "num_experts": 4, "slots_per_expert": 2}
VARIANTS = {
    "soft": {},
    "topk_gates": {
        "mtoe": {"moe": {"type": "moe_mlp", "num_experts": 4, "router": {"type": "topk", "k": 2}}}
    },
    "top_p_gates": {
        "mtoe": {
            "moe": {"type": "moe_mlp", "num_experts": 4, "router": {"type": "top_p", "p": 0.5}}
        },
        "fusion": {
            "moe": {"type": "moe_mlp", "num_experts": 3, "router": {"type": "noisy_topk", "k": 1}}
        },
    },
    "dense": {"msoe": {"moe": None}, "mtoe": {"moe": None}, "fusion": {"moe": None}},
    "mtoe_on_msoe": {"msoe": {"depth": 2}, "mtoe": {"input": "msoe", "depth": 2, "moe": SOFT}},
    "no_msoe_shared_fusion": {"msoe": {"depth": 0}, "fusion": {"per_task": False, "depth": 2}},
    "vit_and_3d_stem": {
        "modalities": {
            "fundus": {"type": "timm_tokens", "name": "test_vit", "timm_kwargs": {"img_size": 64}},
            "oct": {"type": "conv3d_tokens", "patch": [2, 16, 16], "hidden": 8},
        }
    },
}


def model_config(**overrides):
    cfg = copy.deepcopy(config.load(TINY)["model"])
    for key, value in overrides.items():
        merge = isinstance(value, dict) and key != "modalities"
        cfg[key] = {**cfg.get(key, {}), **value} if merge else value
    return cfg


def build(variant="soft", seed=0, tasks=TASKS):
    torch.manual_seed(seed)
    return MODELS.build(model_config(**VARIANTS[variant]), tasks=tasks).eval()


def inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        "fundus": torch.randn(batch, 3, 64, 64, generator=g),
        "oct": torch.randn(batch, 4, 32, 32, generator=g),
    }


PRESENT = torch.tensor([[True, True], [True, False], [False, True]])


def test_forward_shapes_and_records():
    model = build()
    out = model(inputs(), present=PRESENT)
    assert out.preds["grade"].shape == (3, 3)
    assert out.preds["disc"].shape == (3, 1, 64, 64)
    assert out.preds["cup"].shape == (3, 2, 64, 64)
    # sample 2 has no fundus image: no segmentation of it
    assert torch.equal(out.preds["disc"][2], torch.zeros(1, 64, 64))
    layers = {r.layer: r for r in out.routing}
    assert set(layers) == {"msoe.fundus.0.mlp", "msoe.oct.0.mlp", "mtoe.0.mlp", "fusion.0.mlp"}
    assert (layers["msoe.oct.0.mlp"].modality_ids == 1).all()
    mtoe = layers["mtoe.0.mlp"]
    fundus_tokens, oct_tokens = 4, 4  # a 2x2 feature map; one token per B-scan
    per_row = torch.tensor([0] * fundus_tokens + [1] * oct_tokens)
    assert torch.equal(mtoe.modality_ids, per_row.repeat(9))
    assert torch.equal(mtoe.task_ids, torch.arange(3).repeat_interleave(3 * 8))
    rows_present = PRESENT.repeat(3, 1)
    expected_valid = torch.cat(
        [rows_present[:, :1].expand(-1, fundus_tokens), rows_present[:, 1:].expand(-1, oct_tokens)],
        1,
    )
    assert torch.equal(mtoe.valid, expected_valid.reshape(-1))
    torch.testing.assert_close(mtoe.routing.probs.sum(-1), torch.ones(72))


INVARIANCE_CASES = [(v, "eval") for v in VARIANTS] + [
    (v, "train") for v in ("soft", "top_p_gates", "vit_and_3d_stem")
]


@pytest.mark.parametrize("variant,mode", INVARIANCE_CASES)
def test_absent_modality_tensor_is_never_read(variant, mode):
    """Whatever an absent modality's tensor holds (noise, huge values, NaN), the outputs and
    the gradients to the present inputs are identical."""
    model = build(variant).train(mode == "train")
    base = inputs()
    outputs, grads = [], []
    for filler in (None, 1e6, float("nan")):
        x = {k: v.clone() for k, v in base.items()}
        if filler is not None:
            x["fundus"][2] = filler
            x["oct"][1] = filler
        x = {k: v.requires_grad_(True) for k, v in x.items()}
        torch.manual_seed(5)  # noisy routing draws the same noise
        out = model(x, present=PRESENT)
        loss = sum(p.float().sum() for p in out.preds.values())
        loss = loss + sum(
            r.routing.probs[r.valid].sum() for r in out.routing if r.valid is not None
        )
        grad = torch.autograd.grad(loss, [x["fundus"], x["oct"]])
        outputs.append(out.preds)
        grads.append((grad[0][:2], grad[1][[0, 2]]))
        assert (grad[0][2] == 0).all() and (grad[1][1] == 0).all()
    for preds, grad in zip(outputs[1:], grads[1:], strict=True):
        for task in preds:
            assert torch.equal(preds[task], outputs[0][task]), task
        assert torch.equal(grad[0], grads[0][0]) and torch.equal(grad[1], grads[0][1])


@pytest.mark.parametrize("variant", ["soft", "topk_gates"])
def test_sample_missing_a_modality_equals_that_sample_alone(variant):
    """Alone, a sample missing a modality runs without that modality's tokens at all (no
    sample of the batch has it); in the batch its tokens exist but are masked out of
    attention, routing, pooling and fusion. Both give the same outputs."""
    model = build(variant)
    x = inputs()
    together = model(x, present=PRESENT).preds
    for b in range(3):
        alone = model({k: v[b : b + 1] for k, v in x.items()}, present=PRESENT[b : b + 1]).preds
        for task in together:
            torch.testing.assert_close(alone[task][0], together[task][b], rtol=1e-4, atol=1e-5)


def test_present_columns_follow_the_inputs_order():
    model = build()
    x = inputs()
    swapped = {"oct": x["oct"], "fundus": x["fundus"]}
    a = model(x, present=PRESENT).preds
    b = model(swapped, present=PRESENT.flip(1)).preds
    for task in a:
        assert torch.equal(a[task], b[task])


def test_task_mask_runs_only_the_labelled_rows():
    model = build()
    x = inputs()
    full = model(x, present=PRESENT)
    mask = {"grade": torch.tensor([True, False, True]), "disc": torch.tensor([False, True, True])}
    out = model(x, task_mask=mask, present=PRESENT)
    torch.testing.assert_close(out.preds["grade"][[0, 2]], full.preds["grade"][[0, 2]])
    assert (out.preds["grade"][1] == 0).all()
    torch.testing.assert_close(out.preds["disc"][1], full.preds["disc"][1])
    assert (out.preds["disc"][[0, 2]] == 0).all()  # not asked; sample 2 has no fundus either
    assert (out.preds["cup"] == 0).all()
    mtoe = next(r for r in out.routing if r.layer == "mtoe.0.mlp")
    assert torch.equal(mtoe.task_ids.unique(), torch.tensor([0, 1]))


@pytest.mark.parametrize("variant", ["soft", "topk_gates", "dense"])
def test_single_task_computes_what_the_task_computed(variant):
    model = build(variant)
    x = inputs()
    full = model(x, present=PRESENT).preds
    for task in TASKS:
        single = copy.deepcopy(model)
        single.single_task(task)
        assert list(single.heads) == [task]
        for layer in (m for m in single.modules() if isinstance(m, SoftMoE | MoEMLP)):
            assert layer.num_tasks == 1
        alone = single(x, present=PRESENT).preds
        assert list(alone) == [task]
        torch.testing.assert_close(alone[task], full[task], rtol=1e-5, atol=1e-6)


def mi_by_hand(probs, modality_ids, task_ids):
    """I(M;E|T) = Σ_t P(t) Σ_{m,e} P(m,e|t) log[P(m,e|t) / (P(m|t) P(e|t))], plain loops."""
    total, n = 0.0, len(task_ids)
    for t in sorted(set(task_ids.tolist())):
        rows = [i for i in range(n) if task_ids[i] == t]
        p_t = len(rows) / n
        mods = sorted({int(modality_ids[i]) for i in rows})
        joint = {
            (m, e): sum(float(probs[i, e]) for i in rows if modality_ids[i] == m) / len(rows)
            for m in mods
            for e in range(probs.shape[1])
        }
        p_m = {m: sum(1 for i in rows if modality_ids[i] == m) / len(rows) for m in mods}
        p_e = {e: sum(joint[m, e] for m in mods) for e in range(probs.shape[1])}
        for (m, e), p in joint.items():
            if p > 0:
                total += p_t * p * math.log(p / (p_m[m] * p_e[e]))
    return total


@pytest.mark.parametrize("variant", ["soft", "topk_gates"])
def test_conditional_mi_reads_the_mtoe_records_present_tokens_only(variant):
    model = build(variant).train()
    out = model(inputs(), present=PRESENT)
    loss = ConditionalMutualInformationLoss(layers="mtoe", num_modalities=2, num_tasks=3)
    value = loss(out.routing)
    record = next(r for r in out.routing if r.layer == "mtoe.0.mlp")
    keep = record.valid
    probs = record.routing.probs.detach()[keep]
    expected = mi_by_hand(probs, record.modality_ids[keep], record.task_ids[keep])
    assert expected > 0
    assert value.item() == pytest.approx(-expected, rel=1e-4, abs=1e-7)
    (grad,) = torch.autograd.grad(value, [model.mtoe[0].mlp.router.gate.weight])
    assert grad.abs().sum() > 0


def constructed_tokens(batch=4, per_modality=3, dim=8, strength=20.0):
    """Modality 0 tokens along +e0, modality 1 tokens along -e0 (plus small noise)."""
    g = torch.Generator().manual_seed(0)
    x = 0.01 * torch.randn(batch, 2 * per_modality, dim, generator=g)
    x[:, :per_modality, 0] += strength
    x[:, per_modality:, 0] -= strength
    return x, torch.tensor([0] * per_modality + [1] * per_modality)


@pytest.mark.parametrize("kind", ["soft_moe", "moe_mlp"])
def test_conditional_mi_is_log2_when_modalities_use_different_experts(kind):
    x, modality_ids = constructed_tokens()
    if kind == "soft_moe":
        layer = SoftMoE(8, 8, 2, 1, num_tasks=2, normalize=False)
        weight = layer.router.gate.weight
    else:
        layer = MoEMLP(8, 8, 2, {"type": "topk", "k": 1}, num_tasks=2)
        weight = layer.router.gate.weight
    task_ids = torch.tensor([0, 1, 0, 1])
    loss = ConditionalMutualInformationLoss(num_modalities=2, num_tasks=2)
    with torch.no_grad():
        weight.zero_()
    _, ignoring = layer(x, task_ids, modality_ids=modality_ids.expand(4, -1))
    assert loss([ignoring]).item() == 0.0
    with torch.no_grad():
        weight[:, 0, 0], weight[:, 0, 1] = 1.0, -1.0
    _, separating = layer(x, task_ids, modality_ids=modality_ids.expand(4, -1))
    assert -loss([separating]).item() == pytest.approx(math.log(2), abs=1e-3)


def test_flops_count_every_matmul_of_the_model():
    tasks = {name: TASKS[name] for name in ("grade", "disc")}
    model = build(tasks=tasks)
    x = inputs(batch=2)
    count = count_flops(model, x)
    assert count.matmul_total == reference_macs(model, x)
    assert not {
        op
        for op in count.uncounted_ops
        if any(k in op for k in ("mm", "linear", "conv", "einsum", "attention"))
    }
    assert not count.unknown_ops
    computing = (nn.Linear, nn.Conv2d, SoftMoE)
    for name, module in model.named_modules():
        if isinstance(module, computing) or name.endswith(".attn"):
            assert count.per_module.get(name, 0) > 0, name
    report = flops_report(model, x, list(tasks))
    assert report["flops"] == count.total and report["params"] == count_parameters(model)
    grade = task_counts(model, x, list(tasks), "grade")
    assert 0 < grade["flops"] < report["flops"]
    assert grade["counted"] == "this task's head and gate rows"


def test_config_errors():
    with pytest.raises(ConfigError, match=r"model\.msoe\.dpeth.*did you mean 'depth'"):
        MODELS.build(model_config(msoe={"dpeth": 1}), tasks=TASKS)
    with pytest.raises(ConfigError, match=r"model\.mtoe\.input"):
        MODELS.build(model_config(mtoe={"input": "fusion"}), tasks=TASKS)
    with pytest.raises(ConfigError, match=r"model\.heads\.disc\.modality"):
        MODELS.build(model_config(heads={"disc": {"modality": "oct"}}), tasks=TASKS)
    with pytest.raises(ConfigError, match=r"model\.heads\.disc\.hiden.*did you mean .hidden."):
        MODELS.build(model_config(heads={"disc": {"hiden": 3}}), tasks=TASKS)
    model = build()
    with pytest.raises(ValueError, match="modalities"):
        model({"fundus": torch.randn(1, 3, 64, 64)})
    with pytest.raises(TypeError, match="modality"):
        model(torch.randn(1, 3, 64, 64))


def test_token_encoders_shapes_and_grids():
    cnn = BACKBONES.build({"type": "timm_tokens", "name": "test_resnet", "stage": 2}, dim=16)
    tokens, grid = cnn(torch.randn(2, 3, 64, 48))
    assert grid == (8, 6) and tokens.shape == (2, 48, 16)
    vit = BACKBONES.build(
        {"type": "timm_tokens", "name": "test_vit", "timm_kwargs": {"img_size": 32}}, dim=16
    )
    tokens, grid = vit(torch.randn(2, 3, 32, 32))
    assert grid == (2, 2) and tokens.shape == (2, 4, 16)  # the class token dropped
    inner = {"type": "timm_tokens", "name": "test_resnet", "in_chans": 1}
    stack = BACKBONES.build({"type": "slice_stack", "encoder": inner, "pool": False}, dim=16)
    tokens, grid = stack(torch.randn(2, 3, 64, 64))
    assert grid is None and tokens.shape == (2, 3 * 4, 16)
    # each slice is encoded alone: changing one slice changes only its own tokens
    volume = torch.randn(1, 3, 64, 64)
    changed = volume.clone()
    changed[0, 1] = 0
    a, b = stack.eval()(volume)[0], stack(changed)[0]
    assert torch.equal(a[:, :4], b[:, :4]) and not torch.equal(a[:, 4:8], b[:, 4:8])
    pooled = BACKBONES.build({"type": "slice_stack", "encoder": inner, "num_slices": 3}, dim=16)
    assert pooled(torch.randn(2, 3, 32, 32))[0].shape == (2, 3, 16)
    with pytest.raises(ValueError, match="num_slices is 3"):
        pooled(torch.randn(2, 5, 32, 32))
    stem = BACKBONES.build({"type": "conv3d_tokens", "patch": [2, 8, 8], "hidden": 4}, dim=16)
    assert stem(torch.randn(2, 4, 32, 16))[0].shape == (2, 2 * 4 * 2, 16)


def test_moekit_flops_counts_m4oe_on_a_gamma_replica(tmp_path, capsys):
    """End to end: ``moekit flops CONFIG --check`` on GAMMA replica samples (fundus + OCT)."""
    root = make_gamma_replica(
        tmp_path / "gamma",
        n_train=4,
        num_bscans=4,
        fundus_size=(96, 64),
        oct_size=(32, 32),
        seg_fraction=1.0,
        seg_only_fraction=0.0,
    )
    data = {"type": "gamma", "root": str(root), "num_bscans": 4, "fundus_size": [64, 96]}
    data.update(oct_size=[32, 32], val_fraction=0.5)
    cfg = {
        "name": "m4oe_tiny",
        "tasks": gamma_tasks(),
        "data": {"train": {**data, "split": "train"}, "val": {**data, "split": "val"}},
        "model": model_config(),
    }
    path = tmp_path / "m4oe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["flops", str(path), "--batch", "2", "--check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["input_shape"] == {"fundus": [2, 3, 64, 96], "oct": [2, 4, 32, 32]}
    assert report["matmul_flops"] == report["reference_matmul_flops"] > 0
    for part in ("encoders", "msoe", "mtoe", "mtoe.0.mlp", "fusion", "heads.disc"):
        assert report["per_module"][part]["flops"] > 0, part


def _mi_records(seed=4):
    """Routing records of 40 tokens: probabilities, modality and task ids, a present mask."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(40, 5, generator=g) * 2
    modality_ids = torch.tensor([0, 0, 1, 1, 1] * 8)
    task_ids = torch.tensor([0, 1] * 20)
    valid = torch.rand(40, generator=g) > 0.3
    return logits, modality_ids, task_ids, valid


def _two_rank_cmi_worker(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    logits, modality_ids, task_ids, valid = _mi_records()
    rows = slice(0, 25) if rank == 0 else slice(25, 40)
    local = logits[rows].clone().requires_grad_()
    probs = local.softmax(-1)
    routing = Routing(probs, local, torch.arange(5).expand(probs.shape[0], 5), probs)
    record = RoutingRecord("mtoe.0.mlp", routing, task_ids[rows], modality_ids[rows], valid[rows])
    value = ConditionalMutualInformationLoss(num_modalities=2, num_tasks=2)([record])
    value.backward()
    results[rank] = (value.item(), local.grad.clone())
    dist.destroy_process_group()


@pytest.mark.slow
def test_conditional_mi_is_all_reduced_over_processes(tmp_path):
    """Two processes holding halves of the tokens compute the I(M;E|T) of the whole batch
    (present tokens only), and each rank gets world_size x its share of the gradient."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_two_rank_cmi_worker, args=(str(tmp_path / "init"), results), nprocs=2)
        results = dict(results)
    logits, modality_ids, task_ids, valid = _mi_records()
    full = logits.clone().requires_grad_()
    probs = full.softmax(-1)
    expected = -mi_by_hand(probs.detach()[valid], modality_ids[valid], task_ids[valid])
    assert results[0][0] == pytest.approx(expected, abs=1e-6)
    assert results[1][0] == pytest.approx(expected, abs=1e-6)
    loss = ConditionalMutualInformationLoss(num_modalities=2, num_tasks=2, reduce=None)
    index = torch.arange(5).expand(40, 5)
    record = RoutingRecord("mtoe.0.mlp", Routing(probs, full, index, probs), task_ids)
    record.modality_ids, record.valid = modality_ids, valid
    loss([record]).backward()
    torch.testing.assert_close(results[0][1], 2 * full.grad[:25], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results[1][1], 2 * full.grad[25:], rtol=1e-4, atol=1e-6)
