"""M4oE's baselines (late fusion, MMoE fusion, single modality) and what they share with the
m4oe model: absent modalities never read, null encoders, extraction, FLOPs, configs."""

import copy

import pytest
import torch

from moekit import config
from moekit.analysis.flops import count_flops, reference_macs
from moekit.errors import ConfigError
from moekit.registry import MODELS, import_builtins
from moekit.types import tasks_from_config

import_builtins()
TASKS = tasks_from_config(
    {
        "tasks": {
            "grade": {"kind": "multiclass", "num_classes": 3},
            "disc": {"kind": "segmentation", "num_classes": 1},
        }
    }
)
ENCODERS = config.load("configs/m4oe/_tiny_model.yaml")["model"]["modalities"]
PRESENT = torch.tensor([[True, True], [True, False], [False, True]])


def build(kind, seed=0, **extra):
    torch.manual_seed(seed)
    if kind == "m4oe":
        extra.setdefault("num_heads", 2)
    cfg = {"type": kind, "dim": 16, "modalities": copy.deepcopy(ENCODERS), **extra}
    return MODELS.build(cfg, tasks=TASKS).eval()


def inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        "fundus": torch.randn(batch, 3, 64, 64, generator=g),
        "oct": torch.randn(batch, 4, 32, 32, generator=g),
    }


@pytest.mark.parametrize("kind", ["late_fusion", "mmoe_fusion"])
def test_fused_feature_is_the_concatenation_of_pooled_modalities(kind):
    """z = [LN_f(mean X_f), LN_o(mean X_o)], zeros where absent; late fusion's grade head is
    linear in z; MMoE routes each (sample, task) row of z with its task's gate."""
    model = build(kind)
    x = inputs()
    out = model(x, present=PRESENT)
    assert out.preds["grade"].shape == (3, 3) and out.preds["disc"].shape == (3, 1, 64, 64)
    assert torch.equal(out.preds["disc"][2], torch.zeros(1, 64, 64))  # no fundus
    encoded = {m: model.encoders[m](x[m])[0] for m in ("fundus", "oct")}
    z = torch.cat([model.pool_norm[m](encoded[m].mean(1)) for m in ("fundus", "oct")], 1)
    z[1, 16:] = 0.0
    z[2, :16] = 0.0
    if kind == "late_fusion":
        torch.testing.assert_close(out.preds["grade"], model.heads["grade"](z))
        assert out.routing == []
    else:
        (record,) = out.routing
        assert torch.equal(record.task_ids, torch.tensor([0, 0, 0, 1, 1, 1]))
        hidden = model.shared(z)
        gates = torch.softmax(hidden @ model.experts.router.gate.weight[0], -1)
        experts = [model.experts.fc2.expert(e, model.experts.act(
            model.experts.fc1.expert(e, hidden))) for e in range(4)]  # fmt: skip
        mixture = sum(gates[:, e : e + 1] * experts[e] for e in range(4))
        grade = model.heads["grade"](model.norm(mixture))
        torch.testing.assert_close(out.preds["grade"], grade, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["late_fusion", "mmoe_fusion", "m4oe"])
def test_absent_modality_is_never_read_and_single_task_is_exact(kind):
    model = build(kind)
    x = inputs()
    out = model(x, present=PRESENT).preds
    poisoned = {k: v.clone() for k, v in x.items()}
    poisoned["fundus"][2] = float("nan")
    poisoned["oct"][1] = float("nan")
    again = model(poisoned, present=PRESENT).preds
    for task in out:
        assert torch.equal(out[task], again[task]), task
        single = copy.deepcopy(model)
        single.single_task(task)
        assert list(single.heads) == [task]
        torch.testing.assert_close(single(x, present=PRESENT).preds[task], out[task])


@pytest.mark.parametrize("kind", ["late_fusion", "m4oe"])
def test_null_encoder_is_a_modality_the_model_never_reads(kind):
    """A fundus-only model (``oct: null``) takes two-modality batches and ignores the OCT (its
    tensor, its presence), and takes the fundus tensor alone too."""
    model = build(kind, modalities={"fundus": ENCODERS["fundus"], "oct": None})
    assert model.modality_names == ["fundus"] and list(model.encoders) == ["fundus"]
    x = inputs()
    out = model(x, present=PRESENT).preds
    noise = {"fundus": x["fundus"], "oct": torch.full_like(x["oct"], float("nan"))}
    flipped = torch.stack([PRESENT[:, 0], ~PRESENT[:, 1]], 1)
    again = model(noise, present=flipped).preds
    alone = model(x["fundus"]).preds
    for task in out:
        assert torch.equal(out[task], again[task])
        torch.testing.assert_close(out[task][:2], alone[task][:2])
    with pytest.raises(ConfigError, match="every encoder is null"):
        build(kind, modalities={"fundus": None, "oct": None})
    with pytest.raises(ValueError, match="the model reads"):
        model({"oct": x["oct"]})


def test_flops_count_every_matmul_and_skip_absent_modalities():
    """fvcore's count equals torch's FlopCounterMode on the baselines, and a batch whose
    samples lack a modality costs less than the same batch with every modality present."""
    from moekit.types import Batch

    for kind in ("late_fusion", "mmoe_fusion"):
        model = build(kind)
        x = inputs()
        count = count_flops(model, x)
        assert count.matmul_total == reference_macs(model, x) > 0
    model = build("m4oe")
    full = Batch(inputs(), {}, {}, present=torch.ones(3, 2, dtype=torch.bool))
    partial = Batch(inputs(), {}, {}, present=PRESENT)
    assert count_flops(model, partial).total < count_flops(model, full).total
    assert count_flops(model, partial).matmul_total == reference_macs(model, partial)
