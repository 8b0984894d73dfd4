"""Start a run from another run's weights and fine-tune part of the model (``finetune:``).

Router fine-tuning (Mod-Squad, Chen et al., CVPR 2023, §4.3): a trained model learns new tasks
"by only tuning the lightweight routing network and the task-specific head with all other
parameters frozen". The config names the tasks of the new run; tasks it shares with the
initial run keep their trained router rows and heads, new tasks get fresh ones::

    finetune:
      init: runs/tiny_modsquad_dense-...   # or: moekit train CONFIG --init RUN_DIR
      checkpoint: best                      # best | last checkpoint of the init run
      mode: routers                         # all | heads | routers
      tasks: null                           # tasks to fine-tune (default: those init lacks)
      weights: null                         # what to load (default: all), see init_names

``finetune: routers`` is short for ``{mode: routers}``. Modes:

- ``all``: initialise from the run and train every parameter (plain warm start);
- ``heads``: train only the heads of the fine-tuned tasks (Mod-Squad's "Task" baseline);
- ``routers``: train the heads, the router gates and the task embeddings of the fine-tuned
  tasks. Gates stack one row per task (``gate.weight [T, dim, E]``, ``gate.bias [T, E]``, the
  noise gate's too) and so does the task embedding (``task_embed [T, dim]``), so these tensors
  are trainable and the rows of the *other* tasks are held: they are put back after every
  optimizer step, so neither gradients, weight decay nor momentum move them. A new task's
  embedding row starts from the model's fresh initialisation, as its gate rows do; it is part
  of the task's routing (it is added to the tokens before every block, Mod-Squad eq. 4), so it
  is tuned with them rather than left random.

Freezing sets ``requires_grad`` on parameters, never on modules; frozen batch-norm layers
run in eval mode even while the model trains (:func:`keep_frozen_batchnorm_in_eval`, the one
rule of every freezing mechanism): they normalise with their running statistics and never
update them, so the new tasks train on the features they are evaluated on.
Everything else stays as trained, so the tasks shared with the init run compute exactly what
they did. Weights are matched by name; per-task tensors (router gates and ``task_embed``) are
matched row by row by task name.

A fresh run without ``finetune.init`` whose model has a ``pretrained`` weights file (a dense
timm ViT to upcycle, :meth:`ModSquadViT.init_pretrained`) reads it here, in
:func:`initialise`: building a model never reads it, so a run's checkpoints load after that
file has moved.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.optim import Optimizer

from moekit.engine import checkpoint
from moekit.errors import CheckpointError, ConfigError, did_you_mean
from moekit.routing.gate import Gate
from moekit.sections import FINETUNE, value

TASK_EMBEDDING = "task_embed"


def finetune_settings(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """The validated ``finetune`` section, or None when the config has none."""
    settings = value(cfg, "finetune")
    if settings is None:
        return None
    unknown = [t for t in settings["tasks"] or () if t not in (cfg.get("tasks") or {})]
    if unknown:
        raise ConfigError(f"config key 'finetune.tasks': '{unknown[0]}' is not a task")
    return settings


def with_init(cfg: Mapping[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """``cfg`` with ``finetune.init`` set (``--init RUN_DIR``; mode ``all`` unless set)."""
    settings = finetune_settings(cfg) or FINETUNE.defaults()
    return {**cfg, "finetune": {**settings, "init": str(run_dir)}}


def _init_checkpoint(settings: Mapping[str, Any]) -> Path:
    return checkpoint.checkpoint_dir(settings["init"], settings["checkpoint"])


def resolve(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` with its ``finetune`` section complete: the default ``tasks`` (those the init
    run lacks) written out, so the saved config states what was fine-tuned."""
    settings = finetune_settings(cfg)
    if settings is None:
        return dict(cfg)
    if settings["init"] is None:
        if settings["mode"] != "all":
            raise ConfigError(
                f"config key 'finetune.init': fine-tuning {settings['mode']} needs the run to "
                "start from: moekit train CONFIG --init RUN_DIR"
            )
        return {**cfg, "finetune": settings}
    ckpt = _init_checkpoint(settings)  # fails early on a wrong path
    if settings["tasks"] is None and settings["mode"] != "all":
        old = checkpoint.read_config(ckpt).get("tasks") or {}
        settings["tasks"] = [t for t in cfg["tasks"] if t not in old]
        if not settings["tasks"]:
            raise ConfigError(
                "config key 'finetune.tasks': every task of the config is in the init run; "
                "name the tasks to fine-tune"
            )
    return {**cfg, "finetune": settings}


def task_tensors(model: nn.Module, num_tasks: int) -> dict[str, str]:
    """Names of the per-task tensors (dim 0 = task): gate parameters of task-conditioned
    routers and the task embedding, mapped to what they are (``gate`` / ``embedding``)."""
    names = {}
    for prefix, module in model.named_modules():
        if isinstance(module, Gate) and module.num_tasks == num_tasks:
            for name, _ in module.named_parameters(prefix=prefix):
                names[name] = "gate"
    for name, param in model.named_parameters():
        if name.split(".")[-1] == TASK_EMBEDDING and param.shape[0] == num_tasks:
            names[name] = "embedding"
    return names


Weights = str | Mapping[str, str]
"""``finetune.weights``: a regex of the model's tensor names, or ``{regex: init name}``."""


def init_names(names: Sequence[str], weights: Weights) -> dict[str, str]:
    """The model tensors ``weights`` selects, each with its name in the init run.

    A regex selects the tensors whose whole name it matches, under the same name; a mapping
    ``{regex: template}`` renames: the template is expanded with the match's groups
    (``{"backbone\\.(.*)": "backbone.body.\\1"}`` takes a model's ``backbone.*`` from another
    model's ``backbone.body.*``). A regex that selects nothing is a :class:`ConfigError`.
    """
    rules = {weights: None} if isinstance(weights, str) else dict(weights)
    chosen: dict[str, str] = {}
    for pattern, template in rules.items():
        regex = re.compile(pattern)
        matches = {n: m for n in names if n not in chosen and (m := regex.fullmatch(n))}
        if not matches:
            raise ConfigError(
                f"config key 'finetune.weights': '{pattern}' matches no tensor of the model"
                f"{did_you_mean(pattern, list(names))}"
            )
        chosen.update(
            {n: n if template is None else m.expand(template) for n, m in matches.items()}
        )
    return chosen


def load_init_weights(
    model: nn.Module, tasks: Sequence[str], ckpt: str | Path, weights: Weights | None = None
) -> dict[str, int]:
    """Load a checkpoint of a model trained on other (or more, or fewer) tasks, by name.

    Per-task rows are copied for the tasks both share; heads of tasks the checkpoint lacks keep
    their fresh initialisation. Any other difference (a missing, extra or reshaped tensor) is a
    :class:`CheckpointError` naming the tensor. ``weights`` (``finetune.weights``,
    :func:`init_names`) restricts all of this to the tensors it selects: the others keep their
    fresh initialisation, whatever the init run holds (``backbone\\..*`` takes a pretrained
    backbone under a new attention block and classifier). Returns counts of the tensors loaded.
    """
    ckpt = Path(ckpt)
    file = ckpt / checkpoint.MODEL_FILE
    old_tasks = list(checkpoint.read_config(ckpt).get("tasks") or {})
    state = load_file(str(file))
    own = model.state_dict()
    if weights is not None:
        names = init_names(list(own), weights)
        missing = [n for n, old in names.items() if old not in state]
        if missing:
            raise CheckpointError(
                f"{file}: the init run has no '{names[missing[0]]}' (for '{missing[0]}')"
            )
        own = {n: own[n] for n in names}
        state = {n: state[old] for n, old in names.items()}
    per_task = task_tensors(model, len(tasks))
    new_heads = tuple(f"heads.{t}." for t in tasks if t not in old_tasks)
    old_heads = tuple(f"heads.{t}." for t in old_tasks if t not in tasks)
    shared = [(i, old_tasks.index(t)) for i, t in enumerate(tasks) if t in old_tasks]
    loaded = {"tensors": 0, "task_rows": 0}
    with torch.no_grad():
        for key, target in own.items():
            if key.startswith(new_heads):
                continue
            if key not in state:
                raise CheckpointError(
                    f"{file}: the init run has no '{key}' (another architecture?)"
                )
            value = state[key]
            if key in per_task:
                if value.shape[1:] != target.shape[1:] or value.shape[0] != len(old_tasks):
                    raise CheckpointError(_shape_error(file, key, value, target))
                for row, old_row in shared:
                    target[row].copy_(value[old_row])
                loaded["task_rows"] += len(shared)
                continue
            if value.shape != target.shape:
                raise CheckpointError(_shape_error(file, key, value, target))
            target.copy_(value)
            loaded["tensors"] += 1
    extra = [k for k in state if k not in own and not k.startswith(old_heads)]  # weights: none
    if extra:
        raise CheckpointError(f"{file}: '{extra[0]}' of the init run has no place in the model")
    return loaded


def _shape_error(file: Path, key: str, value: Tensor, target: Tensor) -> str:
    return (
        f"{file}: '{key}' has shape {list(value.shape)} in the init run, the model "
        f"expects {list(target.shape)}"
    )


def initialise(model: nn.Module, cfg: Mapping[str, Any]) -> str | None:
    """Initialise the weights of a fresh run's ``model``; returns a log line (None: nothing).

    From ``finetune.init``'s checkpoint when there is one; otherwise from the model's
    ``pretrained`` file when it has one (``model.init_pretrained()``, e.g. upcycling a dense
    ViT). A resumed run, ``load_model`` and the analysis tools never call this.
    """
    settings = finetune_settings(cfg)
    if settings is None or settings["init"] is None:
        init_pretrained = getattr(model, "init_pretrained", None)
        if init_pretrained is None or getattr(model, "pretrained", None) is None:
            return None
        counts = init_pretrained()
        return (
            f"initialised from pretrained {model.pretrained}: {counts['loaded']} tensors "
            f"loaded, {counts['upcycled']} MoE layers upcycled"
        )
    ckpt = _init_checkpoint(settings)
    counts = load_init_weights(model, list(cfg["tasks"]), ckpt, settings["weights"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (
        f"finetune {settings['mode']} from {ckpt}: {counts['tensors']} tensors and "
        f"{counts['task_rows']} task rows loaded; tasks {settings['tasks'] or 'all'}; "
        f"{trainable} of {total} parameters require gradients"
    )


FROZEN_BN_HOOK = "_moekit_frozen_bn_hook"
"""Attribute marking a batch-norm layer that has the hook of
:func:`keep_frozen_batchnorm_in_eval`."""


def _is_frozen(module: nn.Module) -> bool:
    params = list(module.parameters(recurse=False))
    return bool(params) and not any(p.requires_grad for p in params)


def _eval_if_frozen(module: nn.Module, _inputs: tuple) -> None:
    """Forward pre-hook of a batch-norm layer: while none of its parameters requires a gradient,
    normalise with the running statistics and leave them as they are (``model.train()``
    switches it back to training mode before every epoch; the hook decides again at every
    forward, so a layer unfrozen by a later stage trains normally)."""
    if module.training and _is_frozen(module):
        module.train(False)


def keep_frozen_batchnorm_in_eval(model: nn.Module) -> int:
    """Make every batch-norm layer of ``model`` run in eval mode whenever its parameters are
    frozen, by whatever mechanism (``train.freeze``, ``freeze_schedule``, ``train.stages``,
    ``finetune``, or ``requires_grad_(False)`` by hand).

    A frozen layer that kept training mode would still move its running mean and variance with
    every batch, so the "frozen" backbone would change, and it would normalise each batch with
    that batch's statistics while training but with the running ones at evaluation. Installs a
    forward pre-hook once per layer (a second call adds none); returns the layers hooked now.
    """
    hooked = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not getattr(
            module, FROZEN_BN_HOOK, False
        ):
            module.register_forward_pre_hook(_eval_if_frozen)
            setattr(module, FROZEN_BN_HOOK, True)
            hooked += 1
    return hooked


def freeze(
    model: nn.Module,
    tasks: Sequence[str],
    cfg: Mapping[str, Any],
    optimizer: Optimizer | None = None,
) -> None:
    """Freeze what the ``finetune.mode`` does not train; hold the other tasks' rows of the
    per-task tensors that train (gates and task embedding, in ``routers`` mode).

    ``optimizer``: where to hold the rows (after every step); None when not training.
    """
    settings = finetune_settings(cfg)
    if settings is None or settings["mode"] == "all":
        return
    if value(cfg, "train")["stages"]:
        raise ConfigError(
            f"config key 'train.stages': finetune.mode {settings['mode']} decides what trains "
            "too; use one of them (a stage's trainable can name the same parameters)"
        )
    tuned = settings["tasks"]
    if tuned is None:
        raise ConfigError(
            "config key 'finetune.tasks': not set; name the tasks to fine-tune (a run's own "
            "config.yaml has them)"
        )
    heads = tuple(f"heads.{t}." for t in tuned)
    per_task = set(task_tensors(model, len(tasks)))  # router gates and the task embedding
    named = dict(model.named_parameters())
    for t, prefix in zip(tuned, heads):
        if not any(n.startswith(prefix) for n in named):
            raise ConfigError(f"config key 'finetune.tasks': the model has no 'heads.{t}.*'")
    routers = settings["mode"] == "routers"
    for name, param in named.items():
        param.requires_grad_(name.startswith(heads) or (routers and name in per_task))
    keep_frozen_batchnorm_in_eval(model)
    if routers and optimizer is not None:
        held = torch.tensor([i for i, t in enumerate(tasks) if t not in tuned], dtype=torch.long)
        if held.numel():
            hold_rows(optimizer, [named[n] for n in sorted(per_task)], held)


def hold_rows(optimizer: Optimizer, params: Sequence[nn.Parameter], rows: Tensor) -> None:
    """Keep ``rows`` (dim 0) of ``params`` as they are across every ``optimizer.step()``."""
    saved: list[Tensor] = []

    def before(*_: Any) -> None:
        saved[:] = [p.detach()[rows.to(p.device)].clone() for p in params]

    def after(*_: Any) -> None:
        with torch.no_grad():
            for param, value in zip(params, saved):
                param[rows.to(param.device)] = value

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)
