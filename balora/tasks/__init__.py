"""Task registry: a task builds a Problem (model, data, loss); the runner does everything else.

A task is one module with a module-level `TASK: TaskSpec`, plus one entry in TASKS.
The runner calls `TASK.build(cfg, seed, alpha, device)` once per (seed, alpha), snapshots
the trainable LoRA state and restores it before each (arm, lr), so all arms start from
identical weights and see the same data order. The runner, not the task, makes the
optimizer, steps it, balances, times, measures, detects divergence and writes the run.

`cfg` is the merged dict of the task's defaults and the user's options: rank, alpha,
device, dtype ("float32" | "bfloat16"; a task may also accept "float64"), and the
task-specific keys (model/data paths...). `defaults["lr"]` may be a number, a list, or a
dict {optimizer name: lr} when a sensible lr depends on the optimizer.
"""

from __future__ import annotations

import importlib
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from balora.errors import InputError


@dataclass
class Problem:
    model: torch.nn.Module  # PEFT model; only LoRA params require grad; initial adapter weights fixed by the seed
    batches: Callable[[], Iterator[Any]]  # a fresh iterator, same order on every call (each arm calls it once)
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]  # training loss of one batch (model in train mode)
    eval_loss: Callable[[torch.nn.Module], float] | None = None  # run every eval_every steps (no_grad, model.eval())
    best_loss: float | None = None  # lowest achievable training loss (synthetic: best rank-r loss)
    target_loss: float | None = None  # default loss threshold for steps/seconds-to-target (user may override)
    info: dict = field(default_factory=dict)  # anything worth saving in config.json (model id, sizes...)


@dataclass
class TaskSpec:
    name: str
    build: Callable[[dict, int, float, torch.device], Problem]  # build(cfg, seed, alpha, device)
    defaults: dict  # defaults for every compare option (steps, seeds, optimizer, lr, alpha, rank, ...) + task keys


# name -> module defining TASK. Imported lazily: the lm task pulls in transformers models and data.
TASKS: dict[str, str] = {
    "synthetic": "balora.tasks.synthetic",
    "lm": "balora.tasks.lm",
    "encoder": "balora.tasks.encoder",
}


def target_fraction(cfg: dict) -> float:
    """cfg["target_fraction"], checked: a default target loss lies that fraction of the way from the task's
    floor (best loss) to its initial loss. Outside (0, 1) it is below the floor (never reached: every arm
    reads "never") or above the initial loss (reached before any update)."""
    value = cfg["target_fraction"]
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise InputError(f"--set target_fraction={value}: must be a number between 0 and 1 (the share of the "
                         "initial loss above the floor left at the target)")
    return float(value)


def get_task(name: str) -> TaskSpec:
    """The TaskSpec registered as `name`; InputError listing the available tasks otherwise."""
    if not isinstance(name, str):  # balora.compare(model): the repr of a model filled the message
        raise InputError(f"--task: a task name ({', '.join(TASKS)}), got a {type(name).__name__}; a model of your own "
                         "goes in --set model=FOLDER (lm, encoder)")
    if name not in TASKS:
        raise InputError(f"--task: unknown task {name!r}; available: {', '.join(TASKS)}")
    try:
        module = importlib.import_module(TASKS[name])
    except ModuleNotFoundError as e:
        if e.name != TASKS[name]:  # the task exists but something it imports is missing: show that
            raise
        raise InputError(
            f"--task: task {name!r} is registered but its module {TASKS[name]} is not installed; "
            f"available: {', '.join(available_tasks())}"
        ) from None
    return module.TASK


def available_tasks() -> list[str]:
    """Registered tasks whose module can be found (without importing it)."""
    import importlib.util

    return [n for n, m in TASKS.items() if importlib.util.find_spec(m) is not None]
