"""Conv building blocks: shapes, parameter counts against hand counts, gradients."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from moekit.errors import ConfigError
from moekit.nn.aspp import ASPP
from moekit.nn.attention_pool import SpatialSelfAttention
from moekit.nn.cls_head import DSConvClassifier
from moekit.nn.conv_stem import ConvStemPatchEmbed, stem_widths
from moekit.nn.deeplab_decoder import DeepLabDecoder
from moekit.nn.dsconv import DSConv
from moekit.nn.se import SqueezeExcitation
from moekit.registry import EXPERTS


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def assert_all_grads(module: nn.Module, *inputs: torch.Tensor) -> None:
    out = module(*inputs)
    out.square().mean().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    for x in inputs:
        if x.requires_grad:
            assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("stride", "dilation", "size", "out_size"), [(1, 1, 17, 17), (2, 1, 17, 9), (1, 6, 17, 17)]
)
def test_dsconv_shapes(stride, dilation, size, out_size):
    block = DSConv(8, 12, 3, stride=stride, dilation=dilation)
    assert block(torch.randn(2, 8, size, size)).shape == (2, 12, out_size, out_size)


def test_dsconv_parameter_counts():
    # depthwise 320·3·3, pointwise 320·256, BatchNorm 2·256, no biases before BN
    assert n_params(DSConv(320, 256, 3)) == 320 * 9 + 320 * 256 + 2 * 256 == 85_312
    # the IDRiD paper's form: biases on both convolutions, no norm
    assert (
        n_params(DSConv(2048, 1024, 3, norm=False, act=False))
        == 2048 * 9 + 2048 + 2048 * 1024 + 1024
    )
    dense = nn.Conv2d(320, 256, 3, bias=False)
    assert n_params(DSConv(320, 256, 3, norm=False, act=False, bias=False)) < n_params(dense) / 8


def test_dsconv_is_depthwise_then_pointwise():
    block = DSConv(4, 6, 5, dilation=2)
    assert block.depthwise.groups == 4 and block.depthwise.dilation == (2, 2)
    assert block.depthwise.padding == (4, 4) and block.pointwise.kernel_size == (1, 1)
    with pytest.raises(ValueError, match="odd"):
        DSConv(4, 6, 2)


def test_aspp_shape_and_parameter_count():
    aspp = ASPP(2048, 256, rates=(6, 12, 18))
    conv1x1 = 2048 * 256 + 2 * 256
    separable = 2048 * 9 + 2048 * 256 + 2 * 256
    pooling = 2048 * 256 + 256  # 1x1 conv with bias, no BatchNorm
    project = 1280 * 256 + 2 * 256
    assert n_params(aspp) == conv1x1 + 3 * separable + pooling + project == 3_007_232
    small = ASPP(32, 16, rates=(1, 2, 3))
    assert small(torch.randn(2, 32, 9, 13)).shape == (2, 16, 9, 13)


def test_aspp_gradients_flow():
    aspp = ASPP(16, 8, rates=(1, 2, 3), dropout=0.0)
    assert_all_grads(aspp, torch.randn(2, 16, 7, 9, requires_grad=True))


def test_deeplab_decoder_shapes_and_registry():
    decoder = EXPERTS.build({"type": "deeplab_decoder"}, num_classes=1)
    high, low = torch.randn(2, 256, 6, 8), torch.randn(2, 256, 24, 32)
    assert decoder(high, low).shape == (2, 1, 24, 32)
    assert decoder(high, low, out_size=(96, 128)).shape == (2, 1, 96, 128)
    project_low = 256 * 64 + 2 * 64
    fuse = 320 * 9 + 320 * 256 + 2 * 256
    classifier = 256 * 1 + 1
    assert n_params(decoder) == project_low + fuse + classifier


def test_deeplab_decoder_gradients_flow():
    decoder = DeepLabDecoder(
        2, high_channels=8, low_channels=6, low_proj_channels=4, channels=8, dropout=0.0
    )
    high = torch.randn(2, 8, 3, 4, requires_grad=True)
    low = torch.randn(2, 6, 12, 16, requires_grad=True)
    assert_all_grads(decoder, high, low)


def test_classifier_matches_the_seed_head():
    head = EXPERTS.build({"type": "dsconv_cls"}, num_classes=5)
    assert head(torch.randn(2, 2048, 45, 67)).shape == (2, 5)
    assert head.pool.output_size == (11, 16)
    seed_counts = (2048 * 9 + 2048) + (2048 * 1024 + 1024) + (1024 * 256 + 256) + (256 * 5 + 5)
    assert n_params(head) == seed_counts


def test_classifier_configurable_and_gradients_flow():
    torch.manual_seed(0)  # a ReLU unit dead for both samples would leave a filter without gradient
    head = DSConvClassifier(
        3, in_channels=16, mid_channels=8, hidden=4, pool_size=(3, 4), dropout=0.0, norm=True
    )
    assert_all_grads(head, torch.randn(2, 16, 10, 12, requires_grad=True))


def test_squeeze_excitation():
    se = SqueezeExcitation(64)
    assert n_params(se) == (64 * 4 + 4) + (4 * 64 + 64)
    x = torch.randn(2, 64, 5, 6)
    y = se(x)
    assert y.shape == x.shape
    ratio = y / x  # one gate in (0, 1) per sample and channel
    assert torch.allclose(ratio, ratio[:, :, :1, :1].expand_as(ratio), atol=1e-5)
    assert ((ratio > 0) & (ratio < 1)).all()
    assert_all_grads(se, torch.randn(2, 64, 3, 3, requires_grad=True))


def test_spatial_self_attention():
    attn = SpatialSelfAttention(32, num_heads=8)
    x = torch.randn(2, 32, 5, 7)
    assert attn(x).shape == x.shape
    assert n_params(attn) == 2 * 32 + (32 * 96 + 96) + (32 * 32 + 32)
    nn.init.zeros_(attn.proj.weight)
    nn.init.zeros_(attn.proj.bias)
    assert torch.equal(attn(x), x)  # residual: a zero projection is the identity
    with pytest.raises(ValueError, match="heads"):
        SpatialSelfAttention(30, num_heads=8)


def test_spatial_self_attention_mixes_positions_and_gradients_flow():
    attn = SpatialSelfAttention(16, num_heads=4).eval()
    x = torch.randn(1, 16, 4, 4)
    y = attn(x)
    x2 = x.clone()
    x2[0, :, 0, 0] = torch.randn(16)  # (a constant shift would vanish in the LayerNorm)
    assert not torch.allclose(attn(x2)[..., 3, 3], y[..., 3, 3])  # far position changes too
    assert_all_grads(attn.train(), torch.randn(2, 16, 3, 3, requires_grad=True))


def test_conv_stem_widths_and_errors():
    assert stem_widths(8, 96) == [24, 48, 96]
    assert stem_widths(16, 384) == [48, 96, 192, 384]
    assert stem_widths(2, 10) == [10]
    with pytest.raises(ConfigError, match="power-of-two patch_size"):
        stem_widths(6, 96)
    with pytest.raises(ConfigError, match="divisible by 4"):
        stem_widths(8, 90)
    with pytest.raises(ConfigError, match="not a multiple of patch_size 8"):
        ConvStemPatchEmbed((60, 64), 8, 3, 96)


def test_conv_stem_matches_stride_two_convolutions_bn_relu_then_projection():
    torch.manual_seed(0)
    stem = ConvStemPatchEmbed((32, 48), 8, 3, 16).eval()
    for module in stem.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    images = torch.randn(2, 3, 32, 48)
    x = images
    convs = [m for m in stem.stem if isinstance(m, nn.Conv2d)]
    norms = [m for m in stem.stem if isinstance(m, nn.BatchNorm2d)]
    for conv, norm in zip(convs, norms, strict=True):
        x = F.conv2d(x, conv.weight, stride=2, padding=1)
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        x = (x - norm.running_mean[:, None, None]) * scale[:, None, None] + norm.bias[:, None, None]
        x = x.clamp_min(0)
    w = stem.proj.weight[:, :, 0, 0]
    expected = torch.einsum("dc,bchw->bhwd", w, x).flatten(1, 2) + stem.proj.bias
    assert [c.out_channels for c in convs] == [4, 8, 16]
    assert stem.grid_size == (4, 6) and stem.num_patches == 24
    torch.testing.assert_close(stem(images), expected, atol=1e-5, rtol=1e-5)


def test_conv_stem_is_translation_equivariant_by_whole_patches():
    """Shifting the image by one patch shifts the token grid by one (away from the border)."""
    torch.manual_seed(0)
    stem = ConvStemPatchEmbed((64, 64), 8, 3, 16).eval()
    images = torch.zeros(1, 3, 64, 64)
    images[..., 20:36, 20:36] = torch.randn(3, 16, 16)
    shifted = torch.roll(images, shifts=8, dims=3)
    grid = stem(images).reshape(8, 8, 16)
    moved = stem(shifted).reshape(8, 8, 16)
    torch.testing.assert_close(moved[1:7, 2:7], grid[1:7, 1:6], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(moved[1:7, 1:6], grid[1:7, 1:6], atol=1e-3)
