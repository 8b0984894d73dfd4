"""M4oE: modality-specific MoE (MSoE), modality-shared modality-task MoE (MToE) and fusion.

Wu, Shuai, Tang, Wang and Shen, "Dynamic Modeling of Patients, Modalities and Tasks via
Multi-modal Multi-task Mixture of Experts" (M4oE, ICLR 2025). For a sample with modalities
``m ∈ present`` and a task ``t``:

1. **Encoders**: one token encoder per modality (``BACKBONES``: a timm CNN's feature map or
   a ViT's patch tokens, an OCT volume as a stack of B-scans through a shared 2-D encoder, a
   3-D stem), ``X_m [N_m, C]``, plus a learned modality embedding.
2. **MSoE**: per modality, transformer blocks whose MLP is an MoE layer with that modality's
   own router and experts; pooled to ``p_m = mean(MSoE_m(X_m))``.
3. **MToE**: a block over the tokens of all present modalities ``[X_m]_m`` (the encoders'
   tokens, or the MSoE outputs) with task-specific routing — a task-slotted Soft MoE
   (per-task slots and task embeddings) or a token-choice MoE with per-task gates and task
   embeddings — giving per task the summary token ``s_t = mean over present tokens``.
4. **Fusion** per task: the sequence ``[s_t, p_m for m ∈ present]`` through MoE transformer
   block(s) (task-routed by default); the fused feature ``f_t`` is its first token.
5. **Heads**: a linear head on ``f_t`` (classification, regression), or a segmentation head
   decoding one spatial modality's encoder map conditioned on ``f_t``.

Missing modalities (``present [B, M]`` false) are masked out everywhere — the paper's stated
handling, where the reference code feeds zero images instead: an absent modality's tensor is
never read (each encoder runs on the samples that have its modality), its tokens serve as no
attention key, take no part in routing (nor in the ``I(M; E | T)`` statistics: ``valid``),
pooling or fusion, so a sample's outputs are the same whatever that tensor holds.

The MoE layers receive per-token modality ids, so the MToE records feed M4oE's
``conditional_mutual_information`` loss, ``L = Σ_t L_t − α·I(M; E | T)``, and the per-task
routing mass per modality (records with ``modality_ids`` and ``task_ids``) for utilisation
analysis. Every part is a config choice (see ``docs/m4oe.md``).

As in Mod-Squad's model, a batch is expanded into (sample, task) rows — every sample runs
every task it is labelled for (all with ``task_mask=None``) — and each row is routed with its
own task's gates/slots; attention over the modality tokens runs once per sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from moekit.errors import ConfigError, did_you_mean
from moekit.models.heads import scatter_rows
from moekit.moe import keep_task_routers, name_moe_layers
from moekit.projects.m4oe.base import Encoded, MultiModalTaskModel, task_rows
from moekit.projects.m4oe.blocks import MoEBlock, masked_mean
from moekit.registry import MODELS
from moekit.routing.types import RoutingRecord
from moekit.types import ModelOutput, Task

MSOE_DEFAULTS: dict[str, Any] = {
    "depth": 1,
    "moe": {"type": "soft_moe", "num_experts": 8, "slots_per_expert": 1},
}
MTOE_DEFAULTS: dict[str, Any] = {
    "depth": 1,
    "input": "encoder",
    "task_embedding": True,
    "moe": {"type": "soft_moe", "num_experts": 8, "slots_per_expert": 1},
}
FUSION_DEFAULTS: dict[str, Any] = {
    "depth": 1,
    "per_task": True,
    "task_embedding": True,
    "moe": {"type": "soft_moe", "num_experts": 4, "slots_per_expert": 1},
}
MTOE_INPUTS = ("encoder", "msoe")


def part_settings(given: Mapping[str, Any] | None, defaults: dict[str, Any], where: str) -> dict:
    """``defaults`` updated with the config's ``model.<where>`` mapping (unknown keys fail)."""
    if given is None:
        return dict(defaults)
    if not isinstance(given, Mapping):
        raise ConfigError(f"config key 'model.{where}': expected a mapping, got {given!r}")
    for key in given:
        if key not in defaults:
            raise ConfigError(
                f"config key 'model.{where}.{key}': unknown; valid: {', '.join(defaults)}"
                f"{did_you_mean(str(key), defaults)}"
            )
    return {**defaults, **given}


def check_depth(depth: Any, where: str, minimum: int) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < minimum:
        raise ConfigError(f"config key 'model.{where}.depth': expected an int >= {minimum}")
    return depth


@MODELS.register("m4oe")
class M4oE(MultiModalTaskModel):
    """M4oE (Wu et al., ICLR 2025): encoders, MSoE, MToE, fusion and heads (module docstring).

    Args:
        tasks: the experiment's tasks.
        modalities: ``{name: token encoder config}`` in the inputs' modality order
            (``timm_tokens``, ``slice_stack``, ``conv3d_tokens``; ``dim`` is filled in).
        dim: token width ``C``.
        num_heads: attention heads of every block.
        mlp_ratio: dense MLP width / ``C`` (and the default expert width).
        qkv_bias: attention biases.
        drop_path: stochastic depth rate of every block.
        modality_embedding: add a learned embedding per modality to its tokens.
        msoe: ``{depth: 1, moe: <MOE_LAYERS config | null for dense>}``; ``depth: 0`` pools
            the encoder tokens directly.
        mtoe: ``{depth: 1, input: encoder|msoe, task_embedding: true, moe: ...}``; the MoE
            layer gets ``num_tasks = T`` (task-slotted Soft MoE, or per-task gates).
        fusion: ``{depth: 1, per_task: true, task_embedding: true, moe: ...}``; ``per_task``
            routes each task's rows with its own gates/slots.
        heads: ``{task: {type: linear, dropout: 0.0} | {type: film_decoder, modality: m,
            hidden: 64}}``; default: ``film_decoder`` on the first spatial modality for dense
            tasks, ``linear`` otherwise.
    """

    def __init__(
        self,
        tasks: Mapping[str, Task],
        modalities: Mapping[str, Mapping[str, Any]],
        dim: int = 384,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        modality_embedding: bool = True,
        msoe: Mapping[str, Any] | None = None,
        mtoe: Mapping[str, Any] | None = None,
        fusion: Mapping[str, Any] | None = None,
        heads: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(tasks, modalities, dim, heads)
        num_tasks, num_modalities = len(self.task_names), len(self.modality_names)
        msoe_cfg = part_settings(msoe, MSOE_DEFAULTS, "msoe")
        mtoe_cfg = part_settings(mtoe, MTOE_DEFAULTS, "mtoe")
        fusion_cfg = part_settings(fusion, FUSION_DEFAULTS, "fusion")
        if mtoe_cfg["input"] not in MTOE_INPUTS:
            raise ConfigError(
                f"config key 'model.mtoe.input': '{mtoe_cfg['input']}' is unknown; valid: "
                f"{', '.join(MTOE_INPUTS)}{did_you_mean(str(mtoe_cfg['input']), MTOE_INPUTS)}"
            )
        self.mtoe_input = mtoe_cfg["input"]

        def block(moe: Any, tasks_routed: int, task_embedding: bool) -> MoEBlock:
            return MoEBlock(
                dim, num_heads, mlp_ratio, moe, tasks_routed, task_embedding, qkv_bias, drop_path
            )

        self.modality_embed = (
            nn.Parameter(torch.zeros(num_modalities, dim)) if modality_embedding else None
        )
        depth = check_depth(msoe_cfg["depth"], "msoe", 0)
        self.msoe = nn.ModuleDict(
            {
                name: nn.ModuleList(block(msoe_cfg["moe"], 1, False) for _ in range(depth))
                for name in self.modality_names
            }
        )
        self.msoe_norm = nn.ModuleDict({name: nn.LayerNorm(dim) for name in self.modality_names})
        depth = check_depth(mtoe_cfg["depth"], "mtoe", 1)
        self.mtoe = nn.ModuleList(
            block(mtoe_cfg["moe"], num_tasks, mtoe_cfg["task_embedding"]) for _ in range(depth)
        )
        self.mtoe_norm = nn.LayerNorm(dim)
        depth = check_depth(fusion_cfg["depth"], "fusion", 1)
        fusion_tasks = num_tasks if fusion_cfg["per_task"] else 1
        self.fusion_embed = nn.Parameter(torch.zeros(1 + num_modalities, dim))
        self.fusion = nn.ModuleList(
            block(fusion_cfg["moe"], fusion_tasks, fusion_cfg["task_embedding"])
            for _ in range(depth)
        )
        self.fusion_per_task = bool(fusion_cfg["per_task"])
        self.fusion_norm = nn.LayerNorm(dim)
        for param in (self.modality_embed, self.fusion_embed):
            if param is not None:
                trunc_normal_(param, std=0.02)
        name_moe_layers(self)

    def single_task(self, task: str) -> None:
        """Keep only ``task``: its slots/gates and task embeddings in the MToE and fusion
        blocks, and its head; the model then serves ``task`` alone (task id 0) and computes
        exactly what it computed for ``task`` before (per-task extraction)."""
        t = self.keep_task_head(task)
        keep_task_routers(self, t)
        for block in [*self.mtoe, *self.fusion]:
            block.keep_task(t)

    def embedded(self, name: str, tokens: Tensor) -> Tensor:
        if self.modality_embed is None:
            return tokens
        return tokens + self.modality_embed[self.modality_names.index(name)]

    def run_msoe(
        self, encoded: dict[str, Encoded], records: list[RoutingRecord]
    ) -> dict[str, Tensor]:
        """Each present modality's tokens through its own MSoE blocks (modality ids in the
        records)."""
        out = {}
        for name, enc in encoded.items():
            x = self.embedded(name, enc.tokens)
            ids = torch.full(
                (x.shape[1],), self.modality_names.index(name), dtype=torch.long, device=x.device
            )
            for block in self.msoe[name]:
                x = block(x, records, modality_ids=ids)
            out[name] = x
        return out

    def pool_msoe(
        self, msoe_out: dict[str, Tensor], encoded: dict[str, Encoded], batch: int
    ) -> Tensor:
        """``p_m [B, M, C]``: each modality's normed MSoE tokens averaged (0 where absent)."""
        dim = self.fusion_embed.shape[-1]
        pooled = [
            scatter_rows(self.msoe_norm[m](msoe_out[m]).mean(dim=1), encoded[m].samples, batch)
            if m in msoe_out
            else self.fusion_embed.new_zeros(batch, dim)
            for m in self.modality_names
        ]
        return torch.stack(pooled, dim=1)

    def run_mtoe(
        self,
        sources: dict[str, Tensor],
        encoded: dict[str, Encoded],
        present: Tensor,
        rows: Tensor,
        task_ids: Tensor,
        records: list[RoutingRecord],
    ) -> Tensor:
        """Summary token ``s_t [R, C]`` of every (sample, task) row from the MToE blocks over
        all present modalities' tokens."""
        batch = present.shape[0]
        tokens, valid, modality_ids = [], [], []
        for name, enc in encoded.items():
            m = self.modality_names.index(name)
            x = scatter_rows(sources[name], enc.samples, batch)
            tokens.append(x)
            valid.append(present[:, m, None].expand(-1, x.shape[1]))
            modality_ids.append(torch.full((x.shape[1],), m, dtype=torch.long, device=x.device))
        x, keys, ids = torch.cat(tokens, 1), torch.cat(valid, 1), torch.cat(modality_ids)
        for i, block in enumerate(self.mtoe):
            x = block(
                x,
                records,
                valid=keys if i == 0 else keys.index_select(0, rows),
                rows=rows if i == 0 else None,
                task_ids=task_ids,
                modality_ids=ids,
            )
        return masked_mean(self.mtoe_norm(x), keys.index_select(0, rows))

    def run_fusion(
        self,
        summary: Tensor,
        pooled: Tensor,
        present: Tensor,
        rows: Tensor,
        task_ids: Tensor,
        records: list[RoutingRecord],
    ) -> Tensor:
        """Fused feature ``f_t [R, C]``: ``[s_t, p_m ...]`` through the fusion blocks."""
        x = torch.cat([summary.unsqueeze(1), pooled.index_select(0, rows)], 1) + self.fusion_embed
        first = torch.ones(rows.shape[0], 1, dtype=torch.bool, device=rows.device)
        valid = torch.cat([first, present.index_select(0, rows)], 1)
        routed = task_ids if self.fusion_per_task else None
        for block in self.fusion:
            x = block(x, records, valid=valid, task_ids=routed)
        return self.fusion_norm(x)[:, 0]

    def forward(
        self,
        inputs: Mapping[str, Tensor] | Tensor,
        task_mask: Mapping[str, Tensor] | None = None,
        present: Tensor | None = None,
    ) -> ModelOutput:
        inputs, present = self.presence(inputs, present)
        batch, device = present.shape[0], present.device
        rows, task_ids = task_rows(self.task_names, task_mask, batch, device)
        records: list[RoutingRecord] = []
        encoded = self.encode(inputs, present)
        msoe_out = self.run_msoe(encoded, records)
        pooled = self.pool_msoe(msoe_out, encoded, batch)
        fused = pooled.new_zeros(0, pooled.shape[-1])
        if encoded and rows.numel():
            sources = (
                msoe_out
                if self.mtoe_input == "msoe"
                else {name: self.embedded(name, enc.tokens) for name, enc in encoded.items()}
            )
            summary = self.run_mtoe(sources, encoded, present, rows, task_ids, records)
            fused = self.run_fusion(summary, pooled, present, rows, task_ids, records)
        preds = self.predict_all(fused, rows, task_ids, inputs, encoded, present)
        return ModelOutput(preds, records)
