"""``moekit bench idrid``: the flagship's MoE heads, sparse dispatch vs the reference code's
masking.

The IDRiD paper's reference code computes every expert of every task on every image and then
multiplies the unselected ones by zero, so its top-p phase saves nothing. moekit runs each
expert once, on the samples that selected it. This benchmark times one training step (forward +
backward, half grading and half segmentation images, each head on its labelled images) and one
inference step (every head on every image) of a config's model in its top-p phase, both ways,
in one process with alternating repetitions (medians of paired ratios), and prints the mean
number of experts selected on the benchmark's random images.

The default model is ``configs/idrid/demo.yaml``'s (ResNet-18, narrow heads); ``--config
configs/idrid/mtl_r50_topp.yaml`` benchmarks the flagship (ResNet-50, the IDRiD paper's head
shapes) at the small ``--size``. Config paths are looked up relative to the current directory,
then in the moekit checkout. Its models are *untrained* (random initialisation): their sigmoid
gate scores sit near 0.5, so top-p with p = 0.8 keeps 2 of 3 experts almost everywhere — the
printed experts-selected mean describes that untrained state, not trained routing; ``--run
RUN_DIR`` benchmarks a trained run's model instead (its checkpoint's gates).

``--dtype float32 bfloat16`` also times every step under bf16 autocast and ``--memory-format
contiguous channels_last`` with the model and images in channels-last (NHWC) layout; all
variants alternate in the same repetitions, and each row's last column is its sparse time
against the sparse float32 contiguous model's.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from moekit import config
from moekit.bench.timing import (
    DTYPES,
    add_dtype_argument,
    add_timing_arguments,
    autocast,
    check_clock,
    load_average,
    processor_name,
    summarize,
    time_alternating,
)
from moekit.moe import MoEModules, moe_layers, set_routing
from moekit.moe.modules import pool
from moekit.registry import MODELS, import_builtins
from moekit.routing.types import RoutingRecord
from moekit.types import tasks_from_config


def masked_modules_forward(
    layer: MoEModules,
    x: Tensor | Sequence[Tensor],
    task_ids: Tensor | None = None,
    *,
    gate_input: Tensor | None = None,
    valid: Tensor | None = None,
) -> tuple[Tensor, RoutingRecord]:
    """The reference code's way: every expert on every sample, weighted by the (mostly zero) dense
    routing weights."""
    inputs = (x,) if isinstance(x, Tensor) else tuple(x)
    routing, record = layer.route(
        pool(inputs[0] if gate_input is None else gate_input), task_ids, valid
    )
    weights = routing.dense_weight()
    out = 0
    for e, expert in enumerate(layer.experts):
        y = expert(*inputs)
        out = out + weights[:, e].to(y.dtype).view(-1, *([1] * (y.dim() - 1))) * y
    return out, record


@contextmanager
def masked_like_reference(model: nn.Module) -> Iterator[None]:
    """Temporarily run every ``MoEModules`` of ``model`` the reference code's way."""
    layers = [layer for _, layer in moe_layers(model) if isinstance(layer, MoEModules)]
    for layer in layers:
        layer.forward = partial(masked_modules_forward, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


DEFAULT_CONFIG = "configs/idrid/demo.yaml"

MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def run(
    config_path: str = DEFAULT_CONFIG,
    batch: int = 8,
    size: Sequence[int] = (128, 192),
    p: float = 0.8,
    reps: int = 10,
    warmup: int = 2,
    threads: int | None = None,
    device: str = "cpu",
    run_dir: str | None = None,
    checkpoint: str = "best",
    dtypes: Sequence[str] = ("float32",),
    memory_formats: Sequence[str] = ("contiguous",),
    clock: str = "wall",
) -> dict[str, Any]:
    """Time training and inference steps, sparse and masked as the reference code does, in every
    dtype and memory format; return the numbers.

    The model is ``config_path``'s, untrained, or with ``run_dir`` the run's trained model
    (``checkpoint``), whose config then replaces ``config_path``. Times on ``clock``
    (:data:`~moekit.bench.timing.CLOCKS`).
    """
    if not dtypes or any(d not in DTYPES for d in dtypes):
        raise ValueError(f"dtypes must be a non-empty subset of {DTYPES}, got {list(dtypes)}")
    if not memory_formats or any(f not in MEMORY_FORMATS for f in memory_formats):
        raise ValueError(
            f"memory_formats must be a non-empty subset of {list(MEMORY_FORMATS)}, "
            f"got {list(memory_formats)}"
        )
    dev = torch.device(device)
    check_clock(clock, dev)
    import_builtins()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    if run_dir is not None:
        from moekit.engine import load_model

        model, cfg, tasks = load_model(run_dir, checkpoint)
        model = model.to(dev)
        source = f"{run_dir} ({checkpoint} checkpoint), trained"
    else:
        config_path = str(config.shipped_path(config_path))
        cfg = config.load(config_path)
        tasks = tasks_from_config(cfg)
        model = MODELS.build(cfg["model"], tasks=tasks).to(dev)
        source = f"{config_path}, untrained (random initialisation)"
    set_routing(model, {"type": "top_p", "p": p, "score": "sigmoid", "renormalize": True})
    images = torch.randn(batch, 3, *size, device=dev)
    grading = torch.arange(batch, device=dev) < batch // 2
    mask = {name: ~grading if task.is_dense else grading for name, task in tasks.items()}
    models = {
        fmt: copy.deepcopy(model).to(memory_format=MEMORY_FORMATS[fmt]) for fmt in memory_formats
    }
    inputs = {fmt: images.contiguous(memory_format=MEMORY_FORMATS[fmt]) for fmt in memory_formats}

    def train_step(fmt: str, dtype: str) -> Callable[[], None]:
        def step() -> None:
            models[fmt].zero_grad(set_to_none=True)
            with autocast(dev, dtype):
                out = models[fmt](inputs[fmt], mask)
            sum(pred.float().square().mean() for pred in out.preds.values()).backward()

        return step

    def infer_step(fmt: str, dtype: str) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad(), autocast(dev, dtype):
                models[fmt](inputs[fmt])

        return step

    def masked_way(fmt: str, step: Callable[[], None]) -> Callable[[], None]:
        def masked_step() -> None:
            with masked_like_reference(models[fmt]):
                step()

        return masked_step

    variants = [(dtype, fmt) for dtype in dtypes for fmt in memory_formats]

    def timed(name: str, make: Callable[[str, str], Callable[[], None]]) -> list[dict[str, Any]]:
        fns = {}
        for dtype, fmt in variants:
            fns[f"{dtype}/{fmt}/sparse"] = make(fmt, dtype)
            fns[f"{dtype}/{fmt}/masked"] = masked_way(fmt, make(fmt, dtype))
        times = time_alternating(fns, reps, warmup, dev, clock=clock)
        base = f"{variants[0][0]}/{variants[0][1]}/sparse"
        rows = []
        for dtype, fmt in variants:
            key = f"{dtype}/{fmt}"
            pair = summarize(
                {"sparse": times[f"{key}/sparse"], "masked": times[f"{key}/masked"]}, "masked"
            )
            to_base = summarize({"sparse": times[f"{key}/sparse"], "base": times[base]}, "base")
            rows.append(
                dict(
                    step=name,
                    dtype=dtype,
                    memory_format=fmt,
                    sparse_ms=pair["sparse"][0],
                    masked_ms=pair["masked"][0],
                    ratio=pair["sparse"][1],
                    to_base=to_base["sparse"][1],
                )
            )
        return rows

    for m in models.values():
        m.train()
    rows = timed("train", train_step)
    for m in models.values():
        m.eval()
    rows += timed("infer", infer_step)
    with torch.no_grad():
        records = model.eval()(images).routing
    selected = {r.layer: float(r.routing.num_selected().float().mean()) for r in records}
    experts = len(model.heads[next(iter(tasks))].experts)
    return {
        "settings": {
            "config": config_path if run_dir is None else None,
            "model": source,
            "backbone": str(cfg["model"].get("backbone", {}).get("name", "?")),
            "trained": run_dir is not None,
            "batch": batch,
            "size": list(size),
            "p": p,
            "threads": torch.get_num_threads(),
            "device": str(dev),
            "processor": processor_name(dev),
            "reps": reps,
            "clock": clock,
            "load": load_average(),
            "base": f"{variants[0][0]}, {variants[0][1]}",
        },
        "rows": rows,
        "selected": selected,
        "experts": experts,
    }


def markdown(result: dict[str, Any]) -> str:
    """The benchmark's table."""
    s = result["settings"]
    mean_selected = sum(result["selected"].values()) / len(result["selected"])
    lines = [
        f"IDRiD MoE heads, model {s['model']} ({s['backbone']} backbone): batch {s['batch']} at "
        f"{s['size'][0]}x{s['size'][1]}, top-p p={s['p']} (sigmoid scores), {s['device']} "
        f"({s['processor']}), {s['threads']} threads, "
        f"{s['reps']} alternating repetitions, {s['clock']} clock, load average {s['load']} "
        "(1/5/15 min, at the end); median times, ratios are medians of per-repetition ratios.",
        "",
        f"| step | dtype | memory format | sparse ms | masked (reference) ms | sparse / masked | "
        f"sparse / sparse ({s['base']}) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['step']} | {r['dtype']} | {r['memory_format']} | {r['sparse_ms']:.1f} | "
            f"{r['masked_ms']:.1f} | {r['ratio']:.3f} | {r['to_base']:.3f} |"
        )
    state = "trained gates" if s["trained"] else "UNTRAINED gates: an artefact of the random init"
    lines += [
        "",
        f"mean experts selected per image ({state}; random input images): "
        f"{mean_selected:.2f} of {result['experts']} ("
        + ", ".join(f"{k.removeprefix('heads.')} {v:.2f}" for k, v in result["selected"].items())
        + ")",
    ]
    if not s["trained"]:
        lines.append(
            "(untrained sigmoid gates score every expert about 0.5, so top-p keeps 2 of 3 "
            "almost everywhere; --run RUN_DIR measures a trained model's routing)"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit bench idrid",
        description="IDRiD flagship: experts computed only when selected vs all experts masked.",
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"model config (default: {DEFAULT_CONFIG}, the demo's ResNet-18 model; the "
        "flagship: configs/idrid/mtl_r50_topp.yaml); untrained",
    )
    parser.add_argument("--run", help="a run directory: benchmark its trained model instead")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=[128, 192], metavar=("H", "W"))
    parser.add_argument("--p", type=float, default=0.8)
    add_timing_arguments(parser, reps=10, warmup=2)
    add_dtype_argument(parser)
    parser.add_argument(
        "--memory-format",
        nargs="+",
        choices=list(MEMORY_FORMATS),
        default=["contiguous"],
        help="contiguous (NCHW) and/or channels_last (NHWC) model and images",
    )
    parser.add_argument("--device", default="cpu")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    result = run(
        args.config,
        args.batch,
        args.size,
        args.p,
        args.reps,
        args.warmup,
        args.threads,
        args.device,
        args.run,
        args.checkpoint,
        args.dtype,
        args.memory_format,
        args.clock,
    )
    print(markdown(result))
    return 0
