"""Optimizer parameter groups, LR schedules, freezing and phase schedules."""

import itertools
import math

import pytest
import torch
from torch import nn

from moekit.engine.optim import build_optimizer, build_scheduler, param_groups, set_frozen
from moekit.engine.schedule import parse_phases, phase_index, router_config
from moekit.errors import ConfigError


def toy():
    model = nn.Module()
    model.backbone = nn.Linear(2, 2)
    model.head = nn.Linear(2, 1)
    return model


def test_param_groups_idrid_style():
    """The IDRiD paper: lr 3e-5 for the backbone, 3e-4 for the rest, weight decay 1e-4."""
    model = toy()
    named = [*model.named_parameters(), ("weighting.log_vars", nn.Parameter(torch.zeros(2)))]
    cfg = {
        "optimizer": {
            "type": "adamw",
            "lr": 3e-4,
            "weight_decay": 1e-4,
            "param_groups": [{"params": "backbone\\..*", "lr": 3e-5, "name": "backbone"}],
        }
    }
    optimizer = build_optimizer(named, cfg)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"backbone", "default", "weighting"}
    assert groups["backbone"]["lr"] == 3e-5 and len(groups["backbone"]["params"]) == 2
    assert groups["default"]["lr"] == 3e-4 and groups["default"]["weight_decay"] == 1e-4
    assert groups["weighting"]["weight_decay"] == 0.0
    assert isinstance(optimizer, torch.optim.AdamW)
    sgd = build_optimizer(named, {"optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.8}})
    assert sgd.param_groups[0]["momentum"] == 0.8


def test_param_group_errors_name_the_key():
    named = list(toy().named_parameters())
    with pytest.raises(ConfigError, match=r"param_groups\[0\].params.*matches no parameter"):
        param_groups(named, [{"params": "encoder\\..*"}])
    with pytest.raises(ConfigError, match=r"optimizer.type.*'adamw'"):
        build_optimizer(named, {"optimizer": {"type": "adamww"}})
    with pytest.raises(ConfigError, match=r"optimizer\.lrr"):
        build_optimizer(named, {"optimizer": {"lrr": 1}})


def lrs(kind, epochs=4, per_epoch=5, **options):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(
        optimizer, {"scheduler": {"type": kind, **options}}, per_epoch, epochs
    )
    out = []
    for _ in range(epochs * per_epoch):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_schedules_with_warmup():
    cosine = lrs("cosine", warmup_epochs=1)
    assert cosine[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert cosine[5] == 1.0 and cosine[6] == pytest.approx(0.5 * (1 + math.cos(math.pi / 15)))
    assert cosine[-1] < 0.02 and all(a >= b for a, b in itertools.pairwise(cosine[4:]))
    step = lrs("step", step_size=2, gamma=0.1)
    assert step[9] == 1.0 and step[10] == pytest.approx(0.1)
    assert lrs("constant", warmup_steps=2)[:3] == [0.5, 1.0, 1.0]
    with pytest.raises(ConfigError, match=r"LR_SCHEDULERS: unknown type 'cosin'.*'cosine'"):
        lrs("cosin")


def test_freezing_sets_requires_grad_on_parameters():
    model = toy()
    named = list(model.named_parameters())
    assert set_frozen(named, ["backbone\\..*"], "train.freeze") == 2
    assert not model.backbone.weight.requires_grad and model.head.weight.requires_grad
    assert set_frozen(named, [], "train.freeze") == 0
    assert model.backbone.weight.requires_grad
    with pytest.raises(ConfigError, match=r"train.freeze.*matches no parameter"):
        set_frozen(named, ["decoder"], "train.freeze")


def test_phase_schedules():
    phases = parse_phases(
        [{"until": 0.5, "router": "softmax"}, {"router": "top_p", "p": 0.5}], "routing_schedule"
    )
    assert [phase_index(phases, e, 10) for e in (0, 4, 5, 9)] == [0, 0, 1, 1]
    assert router_config(phases[1], "x") == ({"type": "top_p", "p": 0.5}, None)
    assert phase_index([], 3, 10) is None
    with pytest.raises(ConfigError, match=r"routing_schedule\[0\].until': only the last"):
        parse_phases([{"router": "softmax"}, {"router": "topk"}], "routing_schedule")
    with pytest.raises(ConfigError, match=r"\[1\].until': expected a fraction in \(0.5, 1\]"):
        parse_phases([{"until": 0.5}, {"until": 0.4}, {}], "routing_schedule")
