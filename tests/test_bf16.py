"""bf16 autocast numerics on CPU: routing and routing losses stay float32, every dispatch strategy
matches float32 within bf16 tolerance, and a bf16 training step's loss is float32's within
tolerance, for a Mod-Squad-like transformer block and for the IDRiD-like MoE heads."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moekit.moe import MoEAttention, MoEMLP, MoEModules
from moekit.moe.dispatch import STRATEGIES, DispatchPlan
from moekit.registry import AUX_LOSSES, ROUTERS, import_builtins
from moekit.routing.select import select_top_p

import_builtins()

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
ROUTER_CONFIGS = [{"type": name} for name in sorted(ROUTERS.names())] + [
    {"type": "top_p", "p": 0.8, "score": "sigmoid", "renormalize": True}
]


@pytest.mark.parametrize("cfg", ROUTER_CONFIGS, ids=lambda cfg: "-".join(map(str, cfg.values())))
def test_routers_compute_in_float32_under_autocast(cfg):
    torch.manual_seed(0)
    router = ROUTERS.build(cfg, dim=16, num_experts=6, num_tasks=2).eval()
    nn.init.normal_(router.gate.weight, std=0.5)
    x, task_ids = torch.randn(40, 16), torch.randint(0, 2, (40,))
    want = router(x, task_ids)
    with torch.autocast(**BF16):
        got = router(x, task_ids)
        from_bf16 = router(x.bfloat16(), task_ids)
    for field in ("probs", "logits", "weight"):
        assert getattr(got, field).dtype == torch.float32
        assert getattr(from_bf16, field).dtype == torch.float32
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert torch.equal(got.index, want.index)


def test_top_p_selects_the_same_experts_under_autocast_where_no_score_is_near_the_boundary():
    torch.manual_seed(1)
    p, margin = 0.6, 0.03
    proj = nn.Linear(32, 32)  # under autocast its output, the router's input, is bf16
    layer = MoEMLP(32, 16, 8, {"type": "top_p", "p": p}).eval()
    nn.init.normal_(layer.router.gate.weight, std=0.4)
    candidates = torch.randn(512, 32)
    with torch.no_grad():
        probs = layer.router(proj(candidates)).probs
        ranked = probs.sort(dim=-1, descending=True).values
        mass_before = F.pad(ranked.cumsum(-1)[:, :-1], (1, 0))
        kept = (mass_before <= p).sum(dim=-1, keepdim=True)
        gap_at_cut = ranked.gather(1, kept - 1) - ranked.gather(1, kept.clamp(max=7))
        clear = ((mass_before - p).abs() > margin).all(dim=-1) & (gap_at_cut[:, 0] > margin)
        x = candidates[clear]  # the fixed input: no cumulative mass near p, no tie at the cut
        _, want = layer(proj(x))
        with torch.autocast(**BF16):
            hidden = proj(x)
            y, got = layer(hidden)
    assert hidden.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    assert len(x) >= 100
    assert (got.routing.probs - want.routing.probs).abs().max() < margin / 4
    assert got.routing.num_selected().unique().numel() > 1, "top-p selects varying numbers"
    assert torch.equal(got.routing.selected_mask(), want.routing.selected_mask())
    assert torch.equal(got.routing.index, select_top_p(got.routing.probs, p)[0])


@pytest.fixture(scope="module")
def bf16_records():
    torch.manual_seed(2)
    layer = MoEMLP(16, 8, 6, {"type": "topk", "k": 2}, num_tasks=3)
    nn.init.normal_(layer.router.gate.weight, std=0.5)
    x, task_ids = torch.randn(4, 10, 16), torch.tensor([0, 1, 2, 1])
    with torch.autocast(**BF16):
        _, record = layer(torch.nn.Linear(16, 16)(x), task_ids)
    record.modality_ids = torch.arange(40) % 2
    return [record]


ROUTING_LOSSES = sorted(
    name for name, loss in AUX_LOSSES.items() if not getattr(loss, "needs_batch", False)
)  # the losses computed from the routing records alone (not, e.g., CAM-guided terms)


@pytest.mark.parametrize("name", ROUTING_LOSSES)
def test_routing_losses_are_float32_and_unchanged_under_autocast(name, bf16_records):
    records = bf16_records
    loss = AUX_LOSSES.build({"type": name})
    want = loss(records)
    with torch.autocast(**BF16):
        got = loss(records)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)


def test_combine_sums_the_pairs_of_a_row_in_float32():
    # bf16 has 8 significant bits: 1 + 2^-9 rounds back to 1, three times over, when summed in
    # bf16; summed in float32, 1 + 3 * 2^-9 rounds to the next bf16 number, 1 + 2^-7.
    index = torch.tensor([[0, 1, 2, 3]])
    plan = DispatchPlan.from_routing(index, torch.ones(1, 4), 4)
    y = torch.tensor([[1.0], [2**-9], [2**-9], [2**-9]], dtype=torch.bfloat16)
    out = plan.combine(y)
    assert out.dtype == torch.bfloat16
    assert out.item() == 1 + 2**-7


def _relative_error(got, want):
    return ((got.float() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("dim", [32, 20])  # 20: rows not 16-byte aligned in bf16 (loop fallback)
def test_every_strategy_matches_float32_under_autocast(strategy, dim):
    torch.manual_seed(3)
    mlp = MoEMLP(dim, 24, 6, {"type": "top_p", "p": 0.5}, strategy=strategy)
    attention = MoEAttention(dim, 6, 8, {"type": "topk", "k": 2}, strategy=strategy)
    x = torch.randn(3, 12, dim)
    for layer in (mlp, attention):
        params = [p for p in layer.parameters() if p.requires_grad]
        want, want_record = layer(x)
        want_grads = torch.autograd.grad(want.square().sum(), params)
        with torch.autocast(**BF16):
            got, got_record = layer(x)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got_record.routing.index, want_record.routing.index)
        assert _relative_error(got, want) < 1e-2
        got_grads = torch.autograd.grad(got.float().square().sum(), params)
        for g, w in zip(got_grads, want_grads, strict=True):
            assert g.dtype == torch.float32
            assert _relative_error(g, w) < 3e-2


class ModSquadLikeBlock(nn.Module):
    """A pre-norm transformer block with MoE attention and a MoE-MLP, task-conditioned routers."""

    def __init__(self, dim=32, num_tasks=2):
        super().__init__()
        self.embed = nn.Linear(12, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        router = {"type": "topk", "k": 2}
        self.attn = MoEAttention(dim, 6, 8, router, num_tasks=num_tasks)
        self.mlp = MoEMLP(dim, 16, 8, {"type": "topk", "k": 2}, num_tasks=num_tasks)
        self.head = nn.Linear(dim, 3)

    def forward(self, x, task_ids):
        x = self.embed(x)
        y, attn_record = self.attn(self.norm1(x), task_ids)
        x = x + y
        y, mlp_record = self.mlp(self.norm2(x), task_ids)
        return self.head(x + y).mean(dim=1), [attn_record, mlp_record]


def _train_step(model, batch, loss_fn, dtype):
    """Loss before a step and after one SGD step, from a copy of ``model``."""
    torch.manual_seed(4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = loss_fn(model, batch)
        assert loss.dtype == torch.float32
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses


def _assert_bf16_step_close(make_model, batch, loss_fn):
    torch.manual_seed(5)
    model = make_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    want = _train_step(model, batch, loss_fn, torch.float32)
    model.load_state_dict(state)
    got = _train_step(model, batch, loss_fn, torch.bfloat16)
    assert want[1] < want[0], "the step lowers the float32 loss"
    for g, w in zip(got, want, strict=True):
        assert abs(g - w) <= 5e-3 * abs(w), (got, want)


def test_bf16_training_step_of_a_mod_squad_like_block_matches_float32():
    torch.manual_seed(6)
    x, task_ids, target = torch.randn(6, 10, 12), torch.tensor([0, 1] * 3), torch.randn(6, 3)
    mutual_information = AUX_LOSSES.build({"type": "mutual_information", "num_tasks": 2})

    def loss_fn(model, batch):
        pred, records = model(batch[0], batch[1])
        return F.mse_loss(pred.float(), batch[2]) + 0.01 * mutual_information(records)

    _assert_bf16_step_close(ModSquadLikeBlock, (x, task_ids, target), loss_fn)


class IDRiDLikeHeads(nn.Module):
    """A conv trunk and a MoEModules head of three IDRiD-seed classification experts, with the
    seed's sigmoid top-p gate."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU())
        experts = dict(
            type="dsconv_cls",
            num_experts=3,
            num_classes=5,
            in_channels=16,
            mid_channels=8,
            hidden=8,
            pool_size=[4, 4],
            dropout=0.0,
        )
        router = {"type": "top_p", "p": 0.8, "score": "sigmoid", "renormalize": True}
        self.head = MoEModules(experts, {**router, "bias": True}, dim=16)
        nn.init.normal_(self.head.router.gate.weight, std=2.0)

    def forward(self, images):
        return self.head(self.trunk(images))


def test_bf16_training_step_of_idrid_like_moe_heads_matches_float32():
    torch.manual_seed(7)
    images, labels = torch.randn(8, 3, 24, 24), torch.randint(0, 5, (8,))
    aux = [AUX_LOSSES.build({"type": "usage_entropy"}), AUX_LOSSES.build({"type": "gate_l1"})]

    def loss_fn(model, batch):
        logits, record = model(batch[0])
        loss = F.cross_entropy(logits.float(), batch[1])
        return loss + 0.1 * sum(term([record]) for term in aux)

    _assert_bf16_step_close(IDRiDLikeHeads, (images, labels), loss_fn)
