"""``moekit bench moe``: MoE-MLP speed and memory against FLOP-matched dense layers.

Three measurements, each taken in one process with alternating repetitions (dense, MoE,
dense, MoE, ...) and reported as medians, so that drifting machine load hits every variant:

1. training step (forward + backward) of a MoE-MLP (``E`` experts, top-k, expert hidden
   ``H``) against a dense MLP of hidden ``k * H``: the same active FLOPs (Mod-Squad's
   ``H_e = H / k`` rule). Each dispatch strategy is timed (on several threads, ``loop`` also
   with its expert blocks in turn instead of side by side), plus the Mod-Squad reference code's
   layer (:mod:`moekit.bench.reference_moe`, routing the same pairs) and the "dense masked" MoE
   of the IDRiD paper's reference code, which computes every expert on every token and masks
   the unselected ones;
2. inference with top-p routing at several ``p`` against all-experts dense routing of the same
   layer (the same gate), with the mean number of experts selected: time should fall in
   proportion to the experts selected;
3. peak memory of forward + backward (tensors allocated inside the step, parameter gradients
   included), MoE against dense.

Every measurement runs in each of the requested dtypes (``--dtype float32 bfloat16``): bf16
under autocast (float32 master weights, as ``train.mixed_precision: bf16`` trains), all
dtypes' variants alternating in the same repetitions, each ratio against the dense layer of
its own dtype.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.bench.reference_moe import ReferenceMoEMLP
from moekit.bench.timing import (
    DTYPES,
    PeakMemory,
    add_dtype_argument,
    add_timing_arguments,
    autocast,
    check_clock,
    load_average,
    processor_name,
    summarize,
    time_alternating,
)
from moekit.moe.dispatch import STRATEGIES
from moekit.moe.expert_threads import in_turn, num_workers
from moekit.moe.mlp import MoEMLP


@dataclass
class BenchReport:
    """The measured numbers (``rows``: one dict per table row) and the markdown tables."""

    settings: dict[str, Any]
    train: list[dict[str, Any]] = field(default_factory=list)
    top_p: list[dict[str, Any]] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)

    def markdown(self) -> str:
        s = self.settings
        lines = [
            f"MoE-MLP benchmark: {s['batch']}x{s['tokens']} tokens, dim {s['dim']}, "
            f"{s['experts']} experts, top-{s['k']}, expert hidden {s['hidden']} "
            f"(dense hidden {s['k'] * s['hidden']}); device {s['device']} ({s['processor']}), "
            f"{s['threads']} threads, {s['reps']} alternating repetitions, {s['clock']} clock, "
            f"load average {s['load']} (1/5/15 min, at the end); median times, ratios are "
            "medians of per-repetition ratios to the dense MLP of the same dtype.",
            "",
            "| dtype | forward + backward | median ms | ratio to dense |",
            "|---|---|---:|---:|",
            *(
                f"| {r['dtype']} | {r['name']} | {r['ms']:.2f} | {r['ratio']:.3f} |"
                for r in self.train
            ),
            "",
            "| dtype | inference routing | mean experts / token | median ms | time ratio | "
            "expert ratio |",
            "|---|---|---:|---:|---:|---:|",
            *(
                f"| {r['dtype']} | {r['name']} | {r['experts']:.2f} | {r['ms']:.2f} | "
                f"{r['ratio']:.3f} | {r['expert_ratio']:.3f} |"
                for r in self.top_p
            ),
            "",
            "| dtype | forward + backward memory | peak MiB | of which parameter gradients | "
            "ratio to dense |",
            "|---|---|---:|---:|---:|",
            *(
                f"| {r['dtype']} | {r['name']} | {r['peak_mib']:.1f} | {r['grad_mib']:.1f} | "
                f"{r['ratio']:.3f} |"
                for r in self.memory
            ),
        ]
        return "\n".join(lines)


class DenseMLP(nn.Module):
    """``fc2(gelu(fc1(x)))``, the FLOP-matched dense baseline."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def dense_masked(layer: MoEMLP, x: Tensor) -> Tensor:
    """The IDRiD reference code's way: every expert on every token, unselected experts weighted
    by zero."""
    tokens = x.reshape(-1, x.shape[-1])
    weight = layer.router(tokens).dense_weight()
    h = torch.einsum("nc,ech->enh", tokens, layer.fc1.weight) + layer.fc1.bias[:, None]
    out = torch.einsum("enh,ehc->enc", layer.act(h), layer.fc2.weight) + layer.fc2.bias[:, None]
    return torch.einsum("ne,enc->nc", weight, out).view_as(x)


def _zero_grads(*modules: nn.Module) -> Callable[[str], None]:
    def zero(_: str) -> None:
        for module in modules:
            module.zero_grad(set_to_none=True)

    return zero


def _train_step(
    layer: Callable[[Tensor], Any],
    x: Tensor,
    grad: Tensor,
    dtype: str = "float32",
    blocks_in_turn: bool = False,
) -> Callable[[], None]:
    """Forward (under autocast for bf16) and backward; ``blocks_in_turn`` runs the loop
    dispatch's expert blocks one after the other (:func:`~moekit.moe.expert_threads.in_turn`)."""

    def step() -> None:
        with in_turn() if blocks_in_turn else contextlib.nullcontext():
            with autocast(x.device, dtype):
                y = layer(x)
            y = y[0] if isinstance(y, tuple) else y
            y.backward(grad.to(y.dtype))

    return step


def run(
    batch: int = 8,
    tokens: int = 197,
    dim: int = 384,
    experts: int = 16,
    k: int = 4,
    hidden: int = 384,
    reps: int = 20,
    warmup: int = 3,
    p_values: Sequence[float] = (0.2, 0.4, 0.6, 0.8),
    threads: int | None = None,
    device: str = "cpu",
    masked: bool = True,
    seed: int = 0,
    dtypes: Sequence[str] = ("float32",),
    clock: str = "wall",
) -> BenchReport:
    """Run the three measurements in every dtype of ``dtypes`` and return their numbers (see
    the module docstring).

    Uses ``threads`` CPU threads (default: all cores) and restores the thread count and the
    global random state afterwards; times on ``clock`` (:data:`~moekit.bench.timing.CLOCKS`).
    """
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or not dtypes:
        raise ValueError(f"dtypes must be a non-empty subset of {DTYPES}, got {list(dtypes)}")
    dev = torch.device(device)
    check_clock(clock, dev)
    previous_threads = torch.get_num_threads()
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    settings = dict(
        batch=batch,
        tokens=tokens,
        dim=dim,
        experts=experts,
        k=k,
        hidden=hidden,
        reps=reps,
        device=str(dev),
        processor=processor_name(dev),
        threads=threads,
        dtypes=list(dtypes),
        clock=clock,
    )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            report = _measure(BenchReport(settings), warmup, p_values, dev, masked)
        report.settings["load"] = load_average()
        return report
    finally:
        torch.set_num_threads(previous_threads)


def _measure(
    report: BenchReport,
    warmup: int,
    p_values: Sequence[float],
    dev: torch.device,
    masked: bool,
) -> BenchReport:
    s = report.settings
    dim, experts, k, hidden, reps, dtypes = (
        s[key] for key in ("dim", "experts", "k", "hidden", "reps", "dtypes")
    )
    x = torch.randn(s["batch"], s["tokens"], dim, device=dev)
    grad = torch.randn_like(x)
    dense = DenseMLP(dim, k * hidden).to(dev)
    moe = {
        name: MoEMLP(dim, hidden, experts, {"type": "topk", "k": k}, strategy=name).to(dev)
        for name in STRATEGIES
    }
    reference = ReferenceMoEMLP(moe["loop"])
    layers: dict[str, Callable[[Tensor], Any]] = {"dense": dense, **moe}
    if num_workers(dev, experts) > 1:
        layers["loop_in_turn"] = moe["loop"]
    layers["reference"] = reference
    if masked:
        layers["masked"] = partial(dense_masked, moe["loop"])
    labels = {
        "dense": f"dense MLP, hidden {k * hidden}",
        **{name: f"MoE-MLP top-{k}, dispatch `{name}`" for name in moe},
        "loop_in_turn": f"MoE-MLP top-{k}, dispatch `loop`, expert blocks in turn (no workers)",
        "reference": f"MoE-MLP top-{k}, the Mod-Squad reference code's layer (re-implemented)",
        "masked": f"MoE-MLP top-{k}, dense masked (every expert computed, as the reference code)",
    }
    fns = {
        f"{dtype}/{name}": _train_step(layer, x, grad, dtype, name == "loop_in_turn")
        for dtype in dtypes
        for name, layer in layers.items()
    }
    modules = [dense, *moe.values(), reference]
    times = time_alternating(fns, reps, warmup, dev, _zero_grads(*modules), s["clock"])
    for dtype in dtypes:
        own = {name: times[f"{dtype}/{name}"] for name in layers}
        for name, (ms, ratio) in summarize(own, "dense").items():
            report.train.append(dict(dtype=dtype, name=labels[name], key=name, ms=ms, ratio=ratio))

    layer = copy.deepcopy(moe["loop"]).eval()  # its router changes; the memory rows keep top-k
    nn.init.normal_(layer.router.gate.weight, std=1.5 / math.sqrt(dim))
    routers = {"all": {"type": "softmax"}}
    routers.update({f"p={p}": {"type": "top_p", "p": p} for p in p_values})
    records: dict[str, Any] = {}

    def infer(key: str, dtype: str) -> Callable[[], None]:
        def fn() -> None:
            with torch.no_grad(), autocast(dev, dtype):
                records[key] = layer(x)[1]

        return fn

    keys = [f"{dtype}/{name}" for dtype in dtypes for name in routers]
    times = time_alternating(
        {key: infer(key, key.split("/")[0]) for key in keys},
        reps,
        warmup,
        dev,
        lambda key: layer.set_router(routers[key.split("/", 1)[1]]),
        s["clock"],
    )
    for dtype in dtypes:
        own = {name: times[f"{dtype}/{name}"] for name in routers}
        for name, (ms, ratio) in summarize(own, "all").items():
            selected = float(records[f"{dtype}/{name}"].routing.num_selected().float().mean())
            report.top_p.append(
                dict(
                    dtype=dtype,
                    name="all experts (dense softmax)" if name == "all" else f"top-p, {name}",
                    key=name,
                    experts=selected,
                    ms=ms,
                    ratio=ratio,
                    expert_ratio=selected / experts,
                )
            )

    for dtype in dtypes:
        rows = []
        for name, module in [("dense", dense), *moe.items(), ("reference", reference)]:
            module.train()
            module.zero_grad(set_to_none=True)
            tracker = PeakMemory()
            with tracker:
                _train_step(module, x, grad, dtype)()
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            rows.append(
                dict(
                    dtype=dtype,
                    name=labels[name],
                    key=name,
                    peak_mib=tracker.peak / 2**20,
                    grad_mib=sum(g.numel() * g.element_size() for g in grads) / 2**20,
                )
            )
        for row in rows:
            row["ratio"] = row["peak_mib"] / rows[0]["peak_mib"]
        report.memory.extend(rows)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit bench moe",
        description="MoE-MLP forward+backward, top-p inference and memory vs dense layers.",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=384, help="hidden size of each expert")
    add_timing_arguments(parser, reps=20, warmup=3)
    add_dtype_argument(parser)
    parser.add_argument("--p", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-masked", action="store_true", help="skip the dense-masked MoE")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    report = run(
        batch=args.batch,
        tokens=args.tokens,
        dim=args.dim,
        experts=args.experts,
        k=args.k,
        hidden=args.hidden,
        reps=args.reps,
        warmup=args.warmup,
        p_values=args.p,
        threads=args.threads,
        device=args.device,
        masked=not args.no_masked,
        dtypes=args.dtype,
        clock=args.clock,
    )
    print(report.markdown())
    return 0
