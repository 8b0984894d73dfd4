"""``timm_features`` for every timm family (CNN pyramids, ViT and Swin maps) and the three forms
of ``pretrained`` (local file, timm's hub, none)."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from moekit.errors import ConfigError
from moekit.models.backbones import TimmFeatures, pretrained_kwargs
from moekit.registry import BACKBONES


def test_cnn_pyramid_native_and_dilated_stride():
    native = TimmFeatures("resnet18", out_indices=(1, 4))
    assert native.channels == [64, 512] and native.reductions == [4, 32]
    low, high = native(torch.randn(2, 3, 64, 64))
    assert low.shape == (2, 64, 16, 16) and high.shape == (2, 512, 2, 2)
    dilated = BACKBONES.build(
        {"type": "timm_features", "name": "resnet18", "output_stride": 16, "out_indices": [4]}
    )
    assert dilated.reductions == [16]
    assert dilated(torch.randn(1, 3, 64, 64))[0].shape == (1, 512, 4, 4)


@pytest.mark.slow  # builds ViT-B/16 and Swin-S (seconds each)
@pytest.mark.parametrize(
    ("name", "grid"),
    [("vit_base_patch16_224", 4), ("swin_small_patch4_window7_224", 2)],
)
def test_transformers_give_channels_first_maps(name, grid):
    backbone = TimmFeatures(name, out_indices=(-1,), timm_kwargs={"img_size": 64}).eval()
    images = torch.randn(2, 3, 64, 64)
    (features,) = backbone(images)
    assert features.shape == (2, 768, grid, grid)
    assert backbone.channels == [768]
    if backbone.channels_last:  # Swin: timm's own channels-last map, permuted
        torch.testing.assert_close(features, backbone.body(images)[-1].permute(0, 3, 1, 2))
    with pytest.raises(ConfigError, match="has no output_stride"):
        TimmFeatures(name, output_stride=16, out_indices=(-1,), timm_kwargs={"img_size": 64})
    assert backbone.channels_last == name.startswith("swin")


def test_pretrained_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet18")
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = TimmFeatures("resnet18", out_indices=(4,), pretrained=str(path))
    torch.testing.assert_close(loaded.body.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    with pytest.raises(ConfigError, match="not found"):
        TimmFeatures("resnet18", pretrained=str(tmp_path / "missing.safetensors"))


def test_pretrained_forms_and_unknown_names():
    assert pretrained_kwargs(None, "w") == {"pretrained": False}
    assert pretrained_kwargs(False, "w") == {"pretrained": False}
    assert pretrained_kwargs(True, "w") == {"pretrained": True}  # timm's hub, never in tests
    with pytest.raises(ConfigError, match="expected a weights file, true or null"):
        pretrained_kwargs(3, "w")
    with pytest.raises(ConfigError, match="did you mean 'resnet18'"):
        TimmFeatures("resnet81")
