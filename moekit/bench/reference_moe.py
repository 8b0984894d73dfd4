"""The Mod-Squad reference code's MoE-MLP, re-implemented as a speed baseline for ``bench moe``.

Mod-Squad (Chen et al., CVPR 2023) released its MoE-MLP as a layer built on the MoA code
(Zhang et al., EMNLP 2022). Its dispatch, as described here and written anew (not copied):

1. gate ``logits = x W_g``, softmax, top-k; the top-k weights scattered into a dense
   ``[n, E]`` gate matrix, whose non-zeros per column give each expert's group size;
2. the flattened top-k expert ids sorted, the token of every sorted pair gathered with advanced
   indexing (``x[batch_index]``, whose backward is an accumulating ``index_put_``);
3. each projection an autograd function that ``split``s the sorted rows by group size, runs one
   ``mm`` per expert and ``cat``s the outputs; its backward ``cat``s the input gradients and
   ``stack``s the per-expert weight and bias gradients;
4. the second projection's rows multiplied by their gate weight and summed into a zero
   ``[n, C]`` tensor with ``index_add``.

The noisy gating and the loss bookkeeping of the reference layer are left out: the baseline
routes exactly as a :class:`~moekit.moe.mlp.MoEMLP` with a ``topk`` router does, so the two
dispatch the same pairs and only the dispatch differs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.moe.mlp import MoEMLP


class _SplitLinear(torch.autograd.Function):
    """``y_g = x_g W_e + b_e`` over the ``split`` groups of ``x``, outputs concatenated."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: list[int], weight: Tensor, bias: Tensor) -> Tensor:
        pieces = x.split(sizes)
        out = torch.cat([torch.addmm(bias[e], p, weight[e]) for e, p in enumerate(pieces)])
        ctx.save_for_backward(x, weight)
        ctx.sizes = sizes
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        pieces, grads = x.split(ctx.sizes), grad.split(ctx.sizes)
        grad_x = torch.cat([g @ weight[e].t() for e, g in enumerate(grads)])
        grad_w = torch.stack([p.t() @ g for p, g in zip(pieces, grads, strict=True)])
        grad_b = torch.stack([g.sum(dim=0) for g in grads])
        return grad_x, None, grad_w, grad_b


class ReferenceMoEMLP(nn.Module):
    """The reference code's MoE-MLP dispatch (see the module docstring) with a copy of the
    parameters of ``layer`` (a single-task, GELU, biased :class:`MoEMLP` with a ``topk``
    router), so it computes the same function."""

    def __init__(self, layer: MoEMLP) -> None:
        super().__init__()
        router = layer.router
        if layer.num_tasks != 1 or router.gate.bias is not None or not hasattr(router, "k"):
            raise ValueError("ReferenceMoEMLP copies a single-task MoEMLP with a top-k router")
        if layer.fc1.bias is None or layer.activation != "gelu" or router.renormalize:
            raise ValueError("ReferenceMoEMLP copies a GELU MoEMLP with biases, no renormalize")
        self.k, self.num_experts = router.k, layer.num_experts
        self.w_gate = nn.Parameter(router.gate.weight.detach()[0].clone())
        self.w1 = nn.Parameter(layer.fc1.weight.detach().clone())
        self.b1 = nn.Parameter(layer.fc1.bias.detach().clone())
        self.w2 = nn.Parameter(layer.fc2.weight.detach().clone())
        self.b2 = nn.Parameter(layer.fc2.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        probs = (tokens @ self.w_gate).softmax(dim=-1)
        top_gates, top_index = probs.topk(self.k, dim=-1)
        gates = torch.zeros_like(probs).scatter(1, top_index, top_gates)
        sizes = (gates > 0).sum(dim=0).tolist()
        order = top_index.flatten().sort(dim=0).indices
        batch_index = order.div(self.k, rounding_mode="trunc")
        batch_gates = top_gates.flatten()[order]
        w1, b1, w2, b2 = self.w1, self.b1, self.w2, self.b2
        device = x.device.type
        if torch.is_autocast_enabled(device):  # as the reference's custom_fwd casts its inputs
            dtype = torch.get_autocast_dtype(device)
            w1, b1, w2, b2 = (t.to(dtype) for t in (w1, b1, w2, b2))
        h = F.gelu(_SplitLinear.apply(tokens[batch_index].to(w1.dtype), sizes, w1, b1))
        out = _SplitLinear.apply(h, sizes, w2, b2) * batch_gates[:, None].to(w2.dtype)
        y = out.new_zeros(tokens.shape).index_add(0, batch_index, out)
        return y.view_as(x)
