"""Gate regularisers: score L1, usage entropy, per-token routing entropy, KL to uniform.

The IDRiD paper (its gates score each expert with an independent sigmoid) adds an L1 term on the
gate scores and the negative entropy of the gate distribution; the top-p paper (Huang et al.,
ACL 2024) adds a "dynamic" loss, the mean per-token routing entropy. Distributions here are the
scores normalised per token (a softmax is unchanged). The paper's balance term, KL(uniform ||
batch-mean scores), is computed on unnormalised scores there and goes negative;
:class:`KLUniformLoss` computes it on normalised distributions, where it is >= 0.

The paper's config (``configs/idrid/mtl_r50_topp.yaml``) reproduces its gate terms with
``gate_l1`` (weight 1) and ``usage_entropy`` (weight 1); its code's per-sample entropy term,
``-mean H`` (which *maximises* per-sample entropy, the opposite sign of the top-p paper's
dynamic loss), is ``routing_entropy`` with weight -1.
"""

from __future__ import annotations

import math

from torch import Tensor

from moekit.losses.aux_base import RoutingLoss, entropy, valid_rows
from moekit.registry import AUX_LOSSES
from moekit.routing.select import renormalize_weight
from moekit.routing.types import RoutingRecord


def _scores(record: RoutingRecord) -> Tensor:
    return valid_rows(record, record.routing.probs).float()


@AUX_LOSSES.register("gate_l1")
class GateL1Loss(RoutingLoss):
    """``mean_{tokens, experts} s`` of the gate scores (the IDRiD paper's sparsity term; the
    scores are non-negative, so this is their L1 norm divided by ``n E``).

    Config: ``{type: gate_l1, weight: 1.0, layers: null}``.
    """

    def layer_loss(self, record: RoutingRecord) -> Tensor:
        return _scores(record).mean()


@AUX_LOSSES.register("usage_entropy")
class UsageEntropyLoss(RoutingLoss):
    """``-H(q_bar)``, ``q_bar = mean_tokens normalised scores``: maximises the entropy of the
    batch's expert usage so the gate does not always pick the same experts (IDRiD paper).

    Config: ``{type: usage_entropy, weight: 1.0, layers: null}``.
    """

    def layer_loss(self, record: RoutingRecord) -> Tensor:
        return -entropy(renormalize_weight(_scores(record).float()).mean(dim=0))


@AUX_LOSSES.register("routing_entropy")
class RoutingEntropyLoss(RoutingLoss):
    """``mean_tokens H(P)``, ``H(P) = -sum_i P_i log P_i``: the dynamic loss of top-p routing
    (Huang et al., ACL 2024; beta = 1e-4 there). Minimising it sharpens routing so fewer experts
    are needed to pass ``p``.

    Config: ``{type: routing_entropy, weight: 1.0e-4, layers: null}``.
    """

    def layer_loss(self, record: RoutingRecord) -> Tensor:
        return entropy(renormalize_weight(_scores(record).float())).mean()


@AUX_LOSSES.register("kl_uniform")
class KLUniformLoss(RoutingLoss):
    """``KL(u || q_bar) = sum_e (1/E) log((1/E) / q_bar_e) >= 0``, ``q_bar`` the batch-mean
    normalised scores: a balance term (the IDRiD paper's, on normalised distributions).

    Config: ``{type: kl_uniform, weight: 1.0, layers: null}``.
    """

    def layer_loss(self, record: RoutingRecord) -> Tensor:
        usage = renormalize_weight(_scores(record).float()).mean(dim=0)
        num_experts = usage.shape[-1]
        return -math.log(num_experts) - usage.clamp_min(1e-8).log().mean()
