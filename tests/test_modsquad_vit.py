import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from moekit.data.multitask_shapes import multitask_shapes_tasks
from moekit.errors import CheckpointError, ConfigError
from moekit.moe import MoEAttention, MoEMLP
from moekit.registry import MODELS, import_builtins
from moekit.types import tasks_from_config

import_builtins()
TASKS = tasks_from_config({"tasks": multitask_shapes_tasks()})
TINY = {
    "type": "modsquad_vit",
    "img_size": 32,
    "patch_size": 8,
    "dim": 32,
    "depth": 4,
    "num_heads": 2,
    "attention": {"num_experts": 5, "router": {"type": "topk", "k": 2}},
    "mlp": {"num_experts": 6, "router": {"type": "topk", "k": 2}},
}


def build(**overrides):
    torch.manual_seed(0)
    return MODELS.build({**TINY, **overrides}, tasks=TASKS).eval()


def test_moe_blocks_follow_every_and_explicit_lists():
    model = build()
    kinds = [(type(b.attn).__name__, type(b.mlp).__name__) for b in model.blocks]
    assert kinds == [("Attention", "Mlp"), ("MoEAttention", "MoEMLP")] * 2
    model = build(moe_attention_blocks=[0], moe_mlp_every=None)
    assert isinstance(model.blocks[0].attn, MoEAttention)
    assert not any(isinstance(b.mlp, MoEMLP) for b in model.blocks)
    with pytest.raises(ConfigError, match=r"outside 0\.\.3"):
        build(moe_mlp_blocks=[4])


def test_expert_width_is_flop_matched_by_default():
    model = build()
    assert model.blocks[1].mlp.hidden == 4 * 32 // 2  # mlp_ratio * dim / k
    assert model.blocks[1].attn.head_dim == 16  # dim / num_heads


def test_heads_shapes_and_records():
    model = build()
    out = model(torch.randn(3, 3, 32, 32))
    assert out.preds["shape"].shape == (3, 4) and out.preds["count"].shape == (3, 4)
    assert out.preds["semseg"].shape == (3, 5, 32, 32)
    assert out.preds["edge"].shape == (3, 1, 32, 32)
    assert out.preds["depth"].shape == (3, 1, 32, 32)
    assert [r.layer for r in out.routing] == [
        "blocks.1.attn",
        "blocks.1.mlp",
        "blocks.3.attn",
        "blocks.3.mlp",
    ]
    # every image runs all five tasks: 3 images x 5 tasks x 16 tokens (+1 class token each)
    assert out.routing[0].task_ids.shape == (3 * 5 * 17,)


def test_patch_decoder_head_shape():
    model = build(heads={"depth": "patch_decoder"})
    assert model(torch.randn(2, 3, 32, 32)).preds["depth"].shape == (2, 1, 32, 32)
    with pytest.raises(ConfigError, match="no task named 'dept'"):
        build(heads={"dept": "patch_decoder"})


def test_mixed_task_batch_equals_per_task_forwards():
    model = build()
    images = torch.randn(4, 3, 32, 32)
    mask = {
        "shape": torch.tensor([True, False, True, True]),
        "count": torch.tensor([False, True, True, False]),
        "semseg": torch.tensor([True, True, False, False]),
        "edge": torch.tensor([False, False, False, True]),
        "depth": torch.tensor([True, True, True, True]),
    }
    mixed = model(images, mask).preds
    for task, rows in mask.items():
        alone = model(images, {task: rows}).preds[task]
        torch.testing.assert_close(mixed[task][rows], alone[rows], atol=1e-5, rtol=1e-5)
        assert torch.count_nonzero(mixed[task][~rows]) == 0


def test_a_token_of_task_i_uses_router_i_only():
    model = build()
    images = torch.randn(2, 3, 32, 32)
    before = model(images).preds
    shape_id = model.task_names.index("shape")
    with torch.no_grad():
        for block in model.blocks:
            for layer in (block.attn, block.mlp):
                if isinstance(layer, MoEAttention | MoEMLP):
                    for t in range(len(TASKS)):
                        if t != shape_id:
                            layer.router.gate.weight[t].normal_()
    after = model(images).preds
    torch.testing.assert_close(after["shape"], before["shape"])
    assert not torch.allclose(after["count"], before["count"])


def test_task_embedding_is_added_per_task():
    model = build(moe_attention_every=None, moe_mlp_every=None)
    images = torch.randn(1, 3, 32, 32)
    rows = torch.zeros(1, dtype=torch.long)
    same, _ = model.features(images, rows, torch.tensor([0]))
    with torch.no_grad():
        model.task_embed[1].normal_()
    other, _ = model.features(images, rows, torch.tensor([1]))
    unchanged, _ = model.features(images, rows, torch.tensor([0]))
    assert not torch.allclose(same, other)
    torch.testing.assert_close(same, unchanged)
    assert build(task_embedding=False).task_embed is None


def dense_vit_file(tmp_path):
    torch.manual_seed(1)
    dense = timm.models.vision_transformer.VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=4,
        num_heads=2,
        num_classes=0,
        qkv_bias=True,
    ).eval()
    path = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(path))
    return dense, path


def upcycled(**overrides):
    model = build(**overrides)
    model.init_pretrained()
    return model


def test_upcycled_identical_experts_reproduce_the_dense_vit(tmp_path):
    dense, path = dense_vit_file(tmp_path)
    model = upcycled(
        moe_attention_every=None,
        moe_mlp_every=1,
        task_embedding=False,
        mlp={"num_experts": 3, "hidden": 128, "router": {"type": "softmax"}},
        pretrained=str(path),
    )
    images = torch.randn(2, 3, 32, 32)
    tokens, _ = model.features(images, torch.arange(2), torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(tokens, dense.forward_features(images), atol=1e-5, rtol=1e-4)


def test_upcycled_narrow_experts_tile_the_dense_mlp(tmp_path):
    dense, path = dense_vit_file(tmp_path)
    model = upcycled(pretrained=str(path))
    fc1 = dense.state_dict()["blocks.1.mlp.fc1.weight"]
    layer = model.blocks[1].mlp  # 6 experts of width 64 over a dense hidden of 128
    torch.testing.assert_close(layer.fc1.weight[0], fc1[:64].T)
    torch.testing.assert_close(layer.fc1.weight[1], fc1[64:].T)
    torch.testing.assert_close(layer.fc1.weight[2], fc1[:64].T)
    q = dense.state_dict()["blocks.1.attn.qkv.weight"][:32]
    torch.testing.assert_close(model.blocks[1].attn.q_proj.weight[3], q[16:].T)


def test_upcycled_wide_heads_take_groups_of_dense_heads(tmp_path):
    """MoA heads twice the dense head width (Mod-Squad's ViT-S): a 32-wide expert over two
    16-wide dense heads takes 32 consecutive query rows, i.e. two dense heads."""
    dense, path = dense_vit_file(tmp_path)
    attention = {"num_experts": 3, "head_dim": 32, "router": {"type": "topk", "k": 2}}
    model = upcycled(attention=attention, pretrained=str(path))
    qkv = dense.state_dict()["blocks.1.attn.qkv.weight"]
    layer = model.blocks[1].attn
    for e in range(3):  # a single group (dim 32 / head_dim 32): every expert is the whole query
        torch.testing.assert_close(layer.q_proj.weight[e], qkv[:32].T)
    torch.testing.assert_close(layer.kv.weight, qkv[32:])
    proj = dense.state_dict()["blocks.1.attn.proj.weight"]
    torch.testing.assert_close(layer.out_proj.weight[1], proj.T)


def test_pretrained_errors_name_the_file(tmp_path):
    missing = build(pretrained=str(tmp_path / "none.safetensors"))  # building reads nothing
    with pytest.raises(CheckpointError, match="not found"):
        missing.init_pretrained()
    bad = tmp_path / "bad.safetensors"
    save_file({"patch_embed.proj.weight": torch.zeros(1, 1, 1, 1)}, str(bad))
    with pytest.raises(CheckpointError, match=r"patch_embed\.proj\.weight"):
        upcycled(pretrained=str(bad))
    with pytest.raises(ConfigError, match=r"model\.pretrained: not set"):
        build().init_pretrained()


def test_building_does_not_read_the_pretrained_file(tmp_path):
    _, path = dense_vit_file(tmp_path)
    fresh = build()
    recorded = build(pretrained=str(path))
    assert recorded.pretrained == str(path)
    for (name, a), (_, b) in zip(fresh.state_dict().items(), recorded.state_dict().items()):
        assert torch.equal(a, b), name  # same seed, nothing loaded


@pytest.mark.slow
def test_a_run_upcycled_from_a_file_loads_after_the_file_is_deleted(tmp_path):
    """``moekit train`` upcycles a fresh run from ``model.pretrained``; the run's checkpoints
    load (load_model, as eval/prune/flops do) and resume once that file is gone."""
    from moekit import config
    from moekit.engine import Trainer, load_model
    from moekit.engine.checkpoint import MODEL_FILE

    dense, path = dense_vit_file(tmp_path)
    tasks = multitask_shapes_tasks(tasks=["shape", "depth"])
    tasks["shape"]["loss"], tasks["depth"]["loss"] = ["cross_entropy"], ["l1"]
    data = {"type": "multitask_shapes", "num_samples": 8, "image_size": 32}
    data["tasks"] = ["shape", "depth"]
    cfg = {
        "seed": 0,
        "tasks": tasks,
        "model": {**TINY, "pretrained": str(path)},
        "data": {"train": {**data, "split": "train"}, "batch_size": 8, "num_workers": 0},
        "optimizer": {"type": "adamw", "lr": 1.0e-4, "weight_decay": 0.0},
        "train": {"epochs": 1, "curves": False},
    }
    run = tmp_path / "run"
    Trainer(cfg, run_dir=run).fit()
    assert "initialised from pretrained" in (run / "train.log").read_text()
    path.unlink()

    model, saved, _ = load_model(run, "last")
    assert saved["model"]["pretrained"] == str(path)  # the saved config is unchanged
    trained = load_file(str(run / "checkpoints" / "last" / MODEL_FILE))
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name
    # one AdamW step of lr 1e-4 from the upcycled weights: still next to the dense ones, while
    # the same architecture without upcycling starts far from them
    qkv = "blocks.0.attn.qkv.weight"
    dense_qkv = dense.state_dict()[qkv]
    assert (trained[qkv] - dense_qkv).abs().max() < 1e-3
    assert (build().state_dict()[qkv] - dense_qkv).abs().max() > 1e-2

    resumed = config.read_yaml(run / "config.yaml")
    resumed["train"]["epochs"] = 2
    assert Trainer(resumed, resume=run).fit()["status"] == "completed"


def test_conv_stem_patch_embedding():
    model = build(patch_embed="conv")
    assert model.patch_embed.grid_size == (4, 4)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.preds["shape"].shape == (2, 4) and out.preds["semseg"].shape == (2, 5, 32, 32)
    with pytest.raises(ConfigError, match=r"patch_embed: unknown 'cnv'.*did you mean 'conv'"):
        build(patch_embed="cnv")


def test_a_dense_timm_file_does_not_fit_a_conv_stem(tmp_path):
    _, path = dense_vit_file(tmp_path)
    with pytest.raises(CheckpointError, match=r"patch_embed\.proj\.weight"):
        upcycled(patch_embed="conv", pretrained=str(path))
