import pytest
import torch

from moekit.data.collate import collate_samples
from moekit.errors import ConfigError, RegistryError
from moekit.registry import METRICS
from moekit.routing.types import Routing, RoutingRecord
from moekit.types import Batch, LossTerm, ModelOutput, Task, tasks_from_config


def test_task_from_config_parses_losses_and_metrics():
    task = Task.from_config(
        "rg",
        {
            "kind": "multiclass",
            "num_classes": 5,
            "loss": ["cross_entropy", {"type": "focal", "weight": 0.5, "gamma": 4}],
            "metrics": [{"type": "rmse_like", "higher_is_better": False}],
            "class_names": ["a", "b"],
        },
    )
    assert task.kind == "multiclass" and task.num_classes == 5
    assert task.loss == (LossTerm("cross_entropy"), LossTerm("focal", 0.5, {"gamma": 4}))
    assert task.loss[1].config() == {"type": "focal", "gamma": 4}
    assert task.metrics[0].name == "rmse_like" and task.metrics[0].higher_is_better is False
    assert task.options == {"class_names": ["a", "b"]}
    assert not task.is_dense


def test_metric_direction_comes_from_the_registry_class(monkeypatch):
    class Metric:
        higher_is_better = True

    monkeypatch.setitem(METRICS._entries, "_test_direction_metric", Metric)
    task = Task.from_config("t", {"kind": "regression", "metrics": ["_test_direction_metric"]})
    assert task.metrics[0].higher_is_better is True


def test_unknown_metric_and_bad_kind_are_clear_errors():
    with pytest.raises(RegistryError, match="unknown type 'no_such_metric'"):
        Task.from_config("t", {"kind": "regression", "metrics": ["no_such_metric"]})
    with pytest.raises(
        ConfigError, match=r"config key 'tasks.t.kind': 'segmentaton'.*did you mean 'segmentation'"
    ):
        Task.from_config("t", {"kind": "segmentaton"})
    with pytest.raises(ConfigError, match="num_classes"):
        Task.from_config("t", {"kind": "multiclass", "num_classes": 0})
    with pytest.raises(ConfigError, match=r"tasks.t.loss\[0\]"):
        Task.from_config("t", {"kind": "multiclass", "loss": [3]})


def test_tasks_from_config_keeps_order_and_requires_tasks():
    tasks = tasks_from_config(
        {
            "tasks": {
                "seg": {"kind": "segmentation"},
                "cls": {"kind": "multiclass", "num_classes": 3},
            }
        }
    )
    assert list(tasks) == ["seg", "cls"] and tasks["seg"].is_dense
    with pytest.raises(ConfigError, match="'tasks'"):
        tasks_from_config({})


def test_collate_builds_masked_batch():
    samples = [
        {
            "inputs": torch.full((3, 4, 4), float(i)),
            "targets": {"cls": torch.tensor(i), "seg": torch.zeros(1, 4, 4)},
            "has_target": {"cls": i % 2 == 0, "seg": i % 2 == 1},
            "meta": {"id": f"img{i}"},
        }
        for i in range(3)
    ]
    batch = collate_samples(samples)
    assert isinstance(batch, Batch) and batch.batch_size == 3
    assert batch.inputs.shape == (3, 3, 4, 4)
    assert batch.targets["cls"].tolist() == [0, 1, 2]
    assert batch.has_target["cls"].tolist() == [True, False, True]
    assert batch.has_target["seg"].dtype == torch.bool
    assert batch.meta["id"] == ["img0", "img1", "img2"]
    moved = batch.to("cpu")
    assert torch.equal(moved.inputs, batch.inputs)
    assert batch.labelled("absent").tolist() == [False, False, False]


def test_multimodal_inputs_batch_size():
    batch = Batch({"fundus": torch.zeros(2, 3, 8, 8), "oct": torch.zeros(2, 1, 8, 8)}, {}, {})
    assert batch.batch_size == 2


def test_routing_helpers_handle_empty_slots():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    routing = Routing(
        probs=probs,
        logits=probs.log(),
        index=torch.tensor([[0, 1], [2, -1]]),
        weight=torch.tensor([[0.5, 0.3], [0.8, 0.0]]),
    )
    assert routing.num_experts == 3
    assert routing.num_selected().tolist() == [2, 1]
    assert routing.selected_mask().tolist() == [[True, True, False], [False, False, True]]
    assert torch.allclose(routing.dense_weight(), torch.tensor([[0.5, 0.3, 0.0], [0.0, 0.0, 0.8]]))
    out = ModelOutput({"cls": torch.zeros(2, 3)}, [RoutingRecord("layer0", routing)])
    assert out.routing[0].layer == "layer0" and out.routing[0].task_ids is None
