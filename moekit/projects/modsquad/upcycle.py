"""Initialise a Mod-Squad ViT from a dense timm ViT checkpoint, upcycling MLPs and attention.

Shared parts (patch embedding, class token, position embedding, norms, dense blocks) load
under their timm names. MoE layers are *upcycled* (Komatsuzaki et al., "Sparse Upcycling",
ICLR 2023) from the dense layer of the same block:

- **MoE MLP**, expert width ``H_e`` from a dense MLP of width ``H``: expert ``e`` takes the
  hidden units ``[(e·H_e) mod H, (e·H_e) mod H + H_e)`` of ``fc1`` (rows) and ``fc2``
  (columns), cyclically, so the experts tile the dense hidden layer; every expert keeps the
  dense ``fc2`` bias. With ``H_e = H`` every expert is a copy of the dense MLP and the MoE layer
  reproduces it exactly whenever the combine weights sum to one.
- **MoE attention (MoA)**, head width ``d_h`` a multiple ``g`` of the dense head width (``C``
  must be a multiple of ``d_h``): the dense heads are read in ``G = C / d_h`` groups of ``g``
  consecutive heads, i.e. ``d_h``-wide slices of the channels. Expert ``e`` takes slice
  ``s = e mod G``: the query rows ``[s·d_h, (s+1)·d_h)`` of ``qkv`` (with their bias) and the
  same columns of the output projection; the shared key and value projections are the mean of
  the ``G`` slices of the dense key and value projections; every expert keeps the dense output
  bias. With ``g = 1`` (``d_h`` = the dense head width) an expert is one dense head; with
  ``g = 2`` (Mod-Squad's ViT-S MoA, ``d_h = 2C/num_heads``) one softmax spans two dense heads'
  channels, so upcycled attention is a starting point, not a copy of the dense one.

Position embeddings are resampled (timm's ``resample_abs_pos_embed``) when the grid differs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from moekit.errors import CheckpointError
from moekit.moe import MoEAttention, MoEMLP


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint file: safetensors, or a PyTorch file read with
    ``weights_only=True`` (a ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: pretrained weights file not found (no downloads)")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot read weights ({type(exc).__name__}: {exc})"
        ) from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def upcycle_mlp(layer: MoEMLP, fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor, fc2_b: Tensor) -> None:
    """Fill a MoE MLP's experts from a dense MLP (``nn.Linear`` layouts ``[out, in]``)."""
    hidden = fc1_w.shape[0]
    width = layer.hidden
    with torch.no_grad():
        for e in range(layer.num_experts):
            units = (torch.arange(width) + e * width) % hidden
            layer.fc1.weight[e].copy_(fc1_w[units].T)
            layer.fc2.weight[e].copy_(fc2_w[:, units].T)
            if layer.fc1.bias is not None:
                layer.fc1.bias[e].copy_(fc1_b[units])
            if layer.fc2.bias is not None:
                layer.fc2.bias[e].copy_(fc2_b)


def upcycle_attention(
    layer: MoEAttention, qkv_w: Tensor, qkv_b: Tensor | None, proj_w: Tensor, proj_b: Tensor
) -> None:
    """Fill MoA experts from a dense multi-head attention (timm ``qkv`` and ``proj``)."""
    dim, d_h = layer.dim, layer.head_dim
    if dim % d_h:
        raise CheckpointError(f"cannot upcycle attention: dim {dim} is not a multiple of {d_h}")
    heads = dim // d_h
    q, k, v = qkv_w.view(3, heads, d_h, dim)
    bias = qkv_b.view(3, heads, d_h) if qkv_b is not None else None
    with torch.no_grad():
        for e in range(layer.num_experts):
            h = e % heads
            layer.q_proj.weight[e].copy_(q[h].T)
            layer.out_proj.weight[e].copy_(proj_w[:, h * d_h : (h + 1) * d_h].T)
            if layer.q_proj.bias is not None and bias is not None:
                layer.q_proj.bias[e].copy_(bias[0, h])
            if layer.out_proj.bias is not None:
                layer.out_proj.bias[e].copy_(proj_b)
        layer.kv.weight.copy_(torch.cat([k.mean(dim=0), v.mean(dim=0)]))
        if layer.kv.bias is not None and bias is not None:
            layer.kv.bias.copy_(torch.cat([bias[1].mean(dim=0), bias[2].mean(dim=0)]))


def load_dense_vit(model: nn.Module, path: str | Path) -> dict[str, int]:
    """Load a dense timm ViT checkpoint into a Mod-Squad ViT; returns counts of what was used.

    Raises a :class:`CheckpointError` naming the first tensor whose shape does not fit.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], list(grid), num_prefix_tokens=1
        )
    moe_prefixes = tuple(
        f"blocks.{i}.{part}."
        for i, block in enumerate(model.blocks)
        for part in ("attn", "mlp")
        if isinstance(getattr(block, part), MoEAttention | MoEMLP)
    )
    loaded = {}
    for key, value in state.items():
        if key in own and not key.startswith(moe_prefixes):
            if own[key].shape != value.shape:
                raise CheckpointError(
                    f"{path}: '{key}' has shape {tuple(value.shape)}, the model "
                    f"expects {tuple(own[key].shape)}"
                )
            loaded[key] = value
    model.load_state_dict(loaded, strict=False)
    upcycled = 0
    for i, block in enumerate(model.blocks):
        prefix = f"blocks.{i}."
        if isinstance(block.mlp, MoEMLP) and prefix + "mlp.fc1.weight" in state:
            upcycle_mlp(
                block.mlp,
                state[prefix + "mlp.fc1.weight"],
                state[prefix + "mlp.fc1.bias"],
                state[prefix + "mlp.fc2.weight"],
                state[prefix + "mlp.fc2.bias"],
            )
            upcycled += 1
        if isinstance(block.attn, MoEAttention) and prefix + "attn.qkv.weight" in state:
            upcycle_attention(
                block.attn,
                state[prefix + "attn.qkv.weight"],
                state.get(prefix + "attn.qkv.bias"),
                state[prefix + "attn.proj.weight"],
                state[prefix + "attn.proj.bias"],
            )
            upcycled += 1
    return {"loaded": len(loaded), "upcycled": upcycled}
