"""Mod-Squad: a ViT with MoE attention (MoA) and MoE MLP blocks and per-task routing.

Chen et al., "Mod-Squad: Designing Mixtures of Experts As Modular Multi-Task Learners",
CVPR 2023. Each MoE layer holds one router per task; a learned task embedding ``e_i`` is added to
the hidden state before every block, so an MoE layer computes (eq. 4)

    y = Σ_k G_i^k(x) · E_k(x + e_i)

for a token of task ``i``. Unlike the reference code, which runs the whole backbone once per
task and can only route one task per forward, moekit expands a batch into (image, task) rows —
every image runs every task it has labels for — and routes each row with its own task's gate in
one forward pass. The patch embedding is computed once per image, before the expansion.

Parameter names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.{i}.norm1/attn/norm2/mlp``, ``norm``) so a dense timm checkpoint can
initialise the shared parts (see :mod:`moekit.projects.modsquad.upcycle`). That checkpoint
(``pretrained``) is an initialisation, not part of the architecture: building the model never
reads it; :meth:`ModSquadViT.init_pretrained` does, and ``moekit train`` calls it once for a
fresh run (:func:`moekit.engine.finetune.initialise`). So loading a trained run
(``load_model``, ``moekit eval``/``prune``/``flops``, ``--resume``) works after the dense file
has moved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from moekit.errors import ConfigError, did_you_mean
from moekit.models.heads import default_head_type, scatter_rows
from moekit.models.single_task import task_position
from moekit.moe import MoEAttention, MoEMLP, keep_task_routers, name_moe_layers
from moekit.moe.base import MoELayer
from moekit.nn.conv_stem import ConvStemPatchEmbed
from moekit.registry import HEADS, MODELS
from moekit.routing.types import RoutingRecord
from moekit.types import ModelOutput, Task


def moe_block_indices(
    depth: int, every: int | None, explicit: Sequence[int] | None, what: str
) -> set[int]:
    """Blocks that hold an MoE layer: an explicit list, or every ``every``-th block.

    ``every: 2`` gives blocks 1, 3, 5, ... (the second of every pair, as in Mod-Squad).
    """
    if explicit is not None:
        bad = [i for i in explicit if not 0 <= int(i) < depth]
        if bad:
            raise ConfigError(f"model.{what}_blocks: block {bad[0]} is outside 0..{depth - 1}")
        return {int(i) for i in explicit}
    if not every:
        return set()
    if every < 1:
        raise ConfigError(f"model.{what}_every: expected a positive int, got {every}")
    return {i for i in range(depth) if (i + 1) % every == 0}


PATCH_EMBEDS = ("linear", "conv")


def build_patch_embed(
    kind: str, img_size: tuple[int, int], patch_size: int, in_chans: int, dim: int
) -> nn.Module:
    """``linear``: timm's ``PatchEmbed`` (one ``p×p`` stride-``p`` convolution, as the paper);
    ``conv``: a convolutional stem (:class:`moekit.nn.conv_stem.ConvStemPatchEmbed`)."""
    if kind == "linear":
        return PatchEmbed(img_size, patch_size, in_chans, dim)
    if kind == "conv":
        return ConvStemPatchEmbed(img_size, patch_size, in_chans, dim)
    raise ConfigError(
        f"model.patch_embed: unknown '{kind}'; valid: {', '.join(PATCH_EMBEDS)}"
        f"{did_you_mean(str(kind), PATCH_EMBEDS)}"
    )


def expert_hidden(mlp: Mapping[str, Any], dim: int, mlp_ratio: float) -> int:
    """Expert width: the config's ``hidden``, else ``mlp_ratio·dim / k`` (FLOP-matched, as in
    Mod-Squad)."""
    if mlp.get("hidden"):
        return int(mlp["hidden"])
    k = mlp.get("router", {}).get("k")
    if not k:
        raise ConfigError("model.mlp.hidden: set it when the MLP router has no 'k'")
    return int(mlp_ratio * dim / k)


class Block(nn.Module):
    """A pre-norm transformer block whose attention and/or MLP may be an MoE layer."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: float,
        attention_moe: dict[str, Any] | None,
        mlp_moe: dict[str, Any] | None,
        num_tasks: int,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn: nn.Module = (
            MoEAttention(dim=dim, num_tasks=num_tasks, **attention_moe)
            if attention_moe
            else Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp: nn.Module = (
            MoEMLP(dim=dim, num_tasks=num_tasks, **mlp_moe)
            if mlp_moe
            else Mlp(dim, int(dim * mlp_ratio))
        )
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @staticmethod
    def _run_layer(layer: nn.Module, x: Tensor, task_ids: Tensor, records: list[RoutingRecord]):
        if isinstance(layer, MoELayer):
            y, record = layer(x, task_ids)
            records.append(record)
            return y
        return layer(x)

    def forward(self, x: Tensor, task_ids: Tensor, records: list[RoutingRecord]) -> Tensor:
        x = x + self.drop_path1(self._run_layer(self.attn, self.norm1(x), task_ids, records))
        return x + self.drop_path2(self._run_layer(self.mlp, self.norm2(x), task_ids, records))


@MODELS.register("modsquad_vit")
class ModSquadViT(nn.Module):
    """Mod-Squad MoE ViT (Chen et al., CVPR 2023): MoA and MoE-MLP blocks, task routers,
    task embeddings, one head per task; dense blocks where no MoE is configured.

    ``attention`` configures the MoA layers (:class:`moekit.moe.MoEAttention`): ``num_experts``,
    ``router`` and ``head_dim`` (default ``dim / num_heads``, the dense head width; Mod-Squad's
    ViT-S doubles it, see ``configs/modsquad/_modsquad.yaml``). ``mlp`` configures the MoE MLPs
    (:class:`moekit.moe.MoEMLP`); its ``hidden`` defaults to ``mlp_ratio·dim / k``.
    ``patch_embed``: ``linear`` (the paper's patchify convolution) or ``conv`` (a convolutional
    stem, Xiao et al. 2021; the CPU-sized configs use it).
    ``pretrained``: a dense timm ViT weights file, recorded here and read by
    :meth:`init_pretrained` only.
    """

    def __init__(
        self,
        tasks: Mapping[str, Task],
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        patch_embed: str = "linear",
        in_chans: int = 3,
        dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        moe_attention_every: int | None = 2,
        moe_mlp_every: int | None = 2,
        moe_attention_blocks: Sequence[int] | None = None,
        moe_mlp_blocks: Sequence[int] | None = None,
        attention: Mapping[str, Any] | None = None,
        mlp: Mapping[str, Any] | None = None,
        task_embedding: bool = True,
        heads: Mapping[str, Any] | None = None,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ConfigError(
                f"config key 'model.num_heads': {num_heads!r} heads do not divide the width "
                f"dim={dim}; choose a divisor of {dim}"
            )
        self.task_names = list(tasks)
        num_tasks = len(self.task_names)
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_embed = build_patch_embed(patch_embed, img_size, patch_size, in_chans, dim)
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], dim))
        self.task_embed = nn.Parameter(torch.zeros(num_tasks, dim)) if task_embedding else None

        attention = dict(attention or {"num_experts": 15, "router": {"type": "noisy_topk", "k": 6}})
        attention.setdefault("head_dim", dim // num_heads)
        mlp = dict(mlp or {"num_experts": 16, "router": {"type": "noisy_topk", "k": 4}})
        mlp["hidden"] = expert_hidden(mlp, dim, mlp_ratio)
        attn_blocks = moe_block_indices(
            depth, moe_attention_every, moe_attention_blocks, "moe_attention"
        )
        mlp_blocks = moe_block_indices(depth, moe_mlp_every, moe_mlp_blocks, "moe_mlp")
        self.blocks = nn.ModuleList(
            Block(
                dim,
                num_heads,
                mlp_ratio,
                qkv_bias,
                drop_path * i / max(depth - 1, 1),
                attention if i in attn_blocks else None,
                mlp if i in mlp_blocks else None,
                num_tasks,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        head_cfgs = dict(heads or {})
        unknown = set(head_cfgs) - set(self.task_names)
        if unknown:
            raise ConfigError(f"model.heads: no task named '{sorted(unknown)[0]}'")
        self.heads = nn.ModuleDict(
            {
                name: HEADS.build(
                    head_cfgs.get(name) or default_head_type(task.is_dense),
                    dim=dim,
                    out_channels=task.num_classes,
                    patch_size=patch_size,
                    grid=grid,
                )
                for name, task in tasks.items()
            }
        )
        self._init_weights()
        self.pretrained = str(pretrained) if pretrained else None
        name_moe_layers(self)

    def init_pretrained(self) -> dict[str, int]:
        """Initialise from the ``pretrained`` dense ViT file: load the shared parts and upcycle
        the MoE layers (:func:`moekit.projects.modsquad.upcycle.load_dense_vit`); returns its
        counts.

        Call it on a freshly built model; ``moekit train`` does for a new run.
        """
        if self.pretrained is None:
            raise ConfigError("model.pretrained: not set; nothing to initialise from")
        from moekit.projects.modsquad.upcycle import load_dense_vit

        return load_dense_vit(self, self.pretrained)

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.task_embed is not None:
            trunc_normal_(self.task_embed, std=0.02)

    def single_task(self, task: str) -> None:
        """Keep only ``task``: its gate in every MoE layer, its task embedding and its head.

        Per-task extraction (Chen et al., CVPR 2023, §3.5); the model then serves ``task`` alone
        (task id 0) and computes exactly what it computed for ``task`` before.
        """
        t = task_position(self.task_names, task)
        keep_task_routers(self, t)
        if self.task_embed is not None:
            self.task_embed = nn.Parameter(self.task_embed.detach()[t : t + 1].clone())
        self.heads = nn.ModuleDict({task: self.heads[task]})
        self.task_names = [task]

    def task_rows(self, task_mask: Mapping[str, Tensor] | None, batch: int, device) -> tuple:
        """Expand images into (image, task) rows: every image runs every task it is labelled
        for (all tasks when ``task_mask`` is None). Returns ``(image_index, task_ids)``."""
        images, task_ids = [], []
        for t, name in enumerate(self.task_names):
            if task_mask is None:
                idx = torch.arange(batch, device=device)
            else:
                mask = task_mask.get(name)
                if mask is None:
                    continue
                idx = mask.to(device).nonzero().squeeze(1)
            images.append(idx)
            task_ids.append(torch.full_like(idx, t))
        return torch.cat(images), torch.cat(task_ids)

    def embed(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed

    def features(
        self, inputs: Tensor, image_index: Tensor, task_ids: Tensor
    ) -> tuple[Tensor, list[RoutingRecord]]:
        """Normed tokens ``[R, 1 + N, C]`` of the (image, task) rows, and the routing records."""
        x = self.embed(inputs)[image_index]
        records: list[RoutingRecord] = []
        for block in self.blocks:
            if self.task_embed is not None:
                x = x + self.task_embed[task_ids].unsqueeze(1)
            x = block(x, task_ids, records)
        return self.norm(x), records

    def forward(self, inputs: Tensor, task_mask: Mapping[str, Tensor] | None = None) -> ModelOutput:
        batch = inputs.shape[0]
        image_index, task_ids = self.task_rows(task_mask, batch, inputs.device)
        tokens, records = self.features(inputs, image_index, task_ids)
        tokens = tokens[:, 1:]
        preds = {}
        for t, name in enumerate(self.task_names):
            rows = (task_ids == t).nonzero().squeeze(1)
            head = self.heads[name]
            if rows.numel() == 0:
                preds[name] = tokens.new_zeros((batch, *head.output_shape()))
                continue
            preds[name] = scatter_rows(head(tokens[rows]), image_index[rows], batch)
        return ModelOutput(preds, records)
