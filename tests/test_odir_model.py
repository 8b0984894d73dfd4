"""``transfer_classifier``: the ODIR study's head on timm backbones, SE / MHSA on maps and tokens,
the per-label MoE head, views, task masks, local weights; ViT-B/16 and Swin-S train a step."""

import pytest
import timm
import torch
from safetensors.torch import save_file

import moekit.projects  # noqa: F401  (registers transfer_classifier)
from moekit.errors import ConfigError
from moekit.nn.attention_pool import SpatialSelfAttention
from moekit.nn.se import SqueezeExcitation
from moekit.registry import MODELS
from moekit.types import Task

TASKS = {
    "diagnosis": Task.from_config(
        "diagnosis", {"kind": "multilabel", "num_classes": 3, "loss": ["bce"]}
    )
}


def build(**kwargs):
    return MODELS.build({"type": "transfer_classifier", **kwargs}, tasks=TASKS)


def test_study_head_on_the_backbones_own_pooled_features():
    torch.manual_seed(0)
    model = build(backbone={"name": "resnet18"}).eval()
    head = model.heads["diagnosis"]
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert (head[0].in_features, head[0].out_features, head[2].p) == (512, 512, 0.5)
    assert head[3].out_features == 3
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = head(model.backbone(images))  # timm's forward with num_classes=0: pooled
        torch.testing.assert_close(model(images).preds["diagnosis"], expected)
    linear = build(backbone={"name": "efficientnet_b0"}, classifier="linear")
    assert isinstance(linear.heads["diagnosis"], torch.nn.Linear)
    assert linear.heads["diagnosis"].in_features == 1280


@pytest.mark.parametrize("attention", ["se", "mhsa"])
def test_attention_on_a_cnn_map_equals_the_map_blocks(attention):
    torch.manual_seed(1)
    model = build(backbone={"name": "resnet18"}, attention=attention).eval()
    reference = SqueezeExcitation(512) if attention == "se" else SpatialSelfAttention(512)
    reference.load_state_dict(model.attention.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(model.backbone.forward_features(images))
        torch.testing.assert_close(model.feature_map(images), expected)


def test_moe_head_mixes_expert_heads_with_one_gate_per_label():
    torch.manual_seed(2)
    model = build(
        backbone={"name": "resnet18"}, classifier={"type": "moe", "num_experts": 3}
    ).eval()
    head = model.heads["diagnosis"]
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        out = model(images)
        pooled = model.encode(images)
        experts = torch.stack([e(pooled) for e in head.moe.experts])  # [E, B, C]
    (record,) = out.routing
    assert record.layer == "heads.diagnosis.moe"
    assert record.task_ids.tolist() == [0, 1, 2] * 4  # row b·C + c routes label c
    # a plain loop over samples and labels: label c mixes the experts' c-th logits
    probs = record.routing.probs.view(4, 3, 3)
    for b in range(4):
        for c in range(3):
            mixed = sum(probs[b, c, e] * experts[e, b, c] for e in range(3))
            assert out.preds["diagnosis"][b, c].item() == pytest.approx(mixed.item(), abs=1e-5)
    assert probs.sum(-1).allclose(torch.ones(4, 3))


def test_views_average_the_present_views_and_task_masks_select_rows():
    torch.manual_seed(3)
    model = build(backbone={"name": "resnet18"}).eval()
    left, right = torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64)
    present = torch.tensor([[True, True], [True, False], [False, True]])
    with torch.no_grad():
        both = model({"left": left, "right": right}, present=present).preds["diagnosis"]
        head = model.heads["diagnosis"]
        pooled_left, pooled_right = model.encode(left), model.encode(right)
        torch.testing.assert_close(both[0], head((pooled_left[0] + pooled_right[0]) / 2))
        torch.testing.assert_close(both[1], head(pooled_left[1]))
        torch.testing.assert_close(both[2], head(pooled_right[2]))
        images = torch.randn(4, 3, 64, 64)
        full = model(images).preds["diagnosis"]
        mask = {"diagnosis": torch.tensor([True, False, True, False])}
        masked = model(images, task_mask=mask).preds["diagnosis"]
    torch.testing.assert_close(masked[[0, 2]], full[[0, 2]])
    assert masked[[1, 3]].abs().sum() == 0


def test_pretrained_from_a_local_file(tmp_path):
    torch.manual_seed(4)
    source = timm.create_model("resnet18", num_classes=1000)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = build(backbone={"name": "resnet18", "pretrained": str(path)})
    torch.testing.assert_close(model.backbone.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    with pytest.raises(ConfigError, match="not found"):
        build(backbone={"name": "resnet18", "pretrained": str(tmp_path / "none.pth")})


def test_single_task_and_config_errors():
    tasks = {
        "a": Task.from_config("a", {"kind": "multilabel", "num_classes": 3, "loss": ["bce"]}),
        "b": Task.from_config("b", {"kind": "multiclass", "num_classes": 2, "loss": ["bce"]}),
    }
    model = MODELS.build(
        {"type": "transfer_classifier", "classifier": "linear"}, tasks=tasks
    ).eval()
    model.single_task("b")
    assert list(model(torch.randn(1, 3, 32, 32)).preds) == ["b"]
    with pytest.raises(ConfigError, match="did you mean 'mhsa'"):
        build(attention="mhas")
    with pytest.raises(ConfigError, match=r"'mixture' is not one of mlp, linear, moe"):
        build(classifier="mixture")
    with pytest.raises(
        ConfigError, match=r"model.classifier.width': unknown; valid: hidden, dropout"
    ):
        build(classifier={"type": "mlp", "width": 3})
    with pytest.raises(ConfigError, match=r"model.attention.heads': unknown"):
        build(attention={"type": "mhsa", "heads": 4})
    with pytest.raises(ConfigError, match="timm has no model"):
        build(backbone={"name": "resnet1888"})
    dense = {"seg": Task.from_config("seg", {"kind": "segmentation", "loss": ["dice"]})}
    with pytest.raises(ConfigError, match="per image"):
        MODELS.build({"type": "transfer_classifier"}, tasks=dense)


@pytest.mark.slow  # ViT-B/16 and Swin-S at random init: ~1 s to build each, twice
@pytest.mark.parametrize("backbone", ["vit_base_patch16_224", "swin_small_patch4_window7_224"])
@pytest.mark.parametrize("attention", ["se", "mhsa"])
def test_transformers_train_one_step_with_attention(backbone, attention):
    torch.manual_seed(5)
    model = build(backbone={"name": backbone, "timm_kwargs": {"img_size": 64}}, attention=attention)
    images, targets = torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    features = model.feature_map(images)
    expected = (2, 17, 768) if backbone.startswith("vit") else (2, 2, 2, 768)  # tokens / NHWC
    assert features.shape == expected
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.attention.parameters()]
    logits = model(images).preds["diagnosis"]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.attention.parameters()))
    assert model.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
