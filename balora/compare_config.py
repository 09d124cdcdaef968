"""Options of a comparison: the user's CompareConfig, parsed and resolved against a task's
defaults into the RunConfig saved beside every run, and the equivalent command line."""

from __future__ import annotations

import math
import os
import shlex
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from balora.arms import ARMS, Arm, arm_options, resolve_arms
from balora.commands.arg_checks import max_threads
from balora.errors import InputError
from balora.optim import optimizer_class
from balora.runs_folder import new_run_dir
from balora.store import now_iso
from balora.tasks import TaskSpec, get_task


# Options every task's defaults may set; any other key in TaskSpec.defaults is task-specific.
COMPARE_KEYS = ("arms", "steps", "seeds", "optimizer", "lr", "alpha", "rank", "eval_every", "layers_every",
                "spectra_every", "target_loss", "weight_decay", "dtype", "threads", "select")
DTYPES = ("float32", "bfloat16", "float64")
# How a run's summaries pick each arm's best cell (balora.records.best_cells): "arm" one (lr, alpha) per arm,
# the lowest median over seeds; "seed" each seed its own best (lr, alpha), the paper's protocol.
SELECTS = ("arm", "seed")


@dataclass
class CompareConfig:
    """What the user asked for. None means "the task's default" (TaskSpec.defaults)."""

    task: str = "synthetic"  # a name in balora.tasks.TASKS
    arms: str | list[str] | None = None  # "lora,balora" or a list; None: the task's default arms
    steps: int | None = None  # optimizer steps per cell
    seeds: int | str | list[int] | None = None  # a count n (seeds 0..n-1), "0,4,7", or a list
    optimizer: str | None = None  # adam | adamw | sgd | sign
    lr: float | str | list[float] | None = None  # one value or a grid ("1e-3,1e-2")
    alpha: float | str | list[float] | None = None  # LoRA alpha, one value or a grid; task default None: = rank
    rank: int | None = None  # LoRA r
    weight_decay: float | None = None  # shared by all arms; 0 unless the task says otherwise
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    threads: int | None = None  # torch CPU threads during the run; None: the task's default (None there: torch's)
    dtype: str | None = None  # float32 | bfloat16 (| float64 where the task allows)
    eval_every: int | None = None  # eval loss every N steps (0: never)
    layers_every: int | None = None  # per-layer report every N steps (0: never)
    spectra_every: int | None = None  # singular values of dW, A, B every N steps (0: never)
    target_loss: float | None = None  # threshold for steps/seconds-to-target; None: the task's per-problem default
    select: str | None = None  # best-cell rule of the run's summaries (SELECTS); None: the task's, else "arm"
    options: dict[str, Any] = field(default_factory=dict)  # task keys and arm options (--set KEY=VALUE)
    out: str | None = None  # run directory; None: runs/<task>-<timestamp>
    force: bool = False  # replace an existing run directory at `out`
    quiet: bool = False  # no progress bar
    command: str | None = None  # the command line that made the run (None: reconstructed)


@dataclass
class RunConfig:
    """The resolved, concrete configuration: saved as config.json beside the run."""

    task: str
    arms: list[str]
    steps: int
    seeds: list[int]
    optimizer: str
    lrs: list[float]
    alphas: list[float]
    rank: int
    weight_decay: float
    device: str
    threads: int | None
    dtype: str
    eval_every: int
    layers_every: int
    spectra_every: int
    target_loss: float | None
    select: str  # best-cell rule of the run's summaries: "arm" (median over seeds) | "seed" (per seed, the paper's)
    task_options: dict[str, Any]
    arm_options: dict[str, Any]
    n_cells: int
    out: str
    command: str = ""
    command_reconstructed: str = ""
    created: str = ""
    problem: dict[str, Any] = field(default_factory=dict)  # Problem.info of the first build


# ---------------------------------------------------------------- parsing (shared with the CLI)


MAX_SEED = 2**32 - 1  # what every seeded generator takes (numpy's legacy seeding stops here)
MAX_COUNT = 10_000  # a seed count or a grid's N: each value is at least one training run


def parse_seeds(spec: int | str | list[int], flag: str = "--seeds") -> list[int]:
    """3 or "3" -> [0, 1, 2]; "0,4,7" or [0, 4, 7] -> [0, 4, 7]; "5," -> [5]."""
    if isinstance(spec, bool):
        raise InputError(f"{flag}: expected a count or a comma list of seeds, got {spec!r}")
    if isinstance(spec, int):
        if spec > MAX_COUNT:
            raise InputError(f"{flag} {spec}: at most {MAX_COUNT} seeds (each is a training run per cell)")
        seeds = list(range(spec)) if spec > 0 else []
    elif isinstance(spec, str) and "," not in spec:
        seeds = parse_seeds(_to_int(spec, flag), flag)
    else:
        items = spec.split(",") if isinstance(spec, str) else list(spec)
        seeds = [_to_int(s, flag) for s in items if str(s).strip() != ""]
    if not seeds:
        raise InputError(f"{flag} {spec}: give a positive count (3 means seeds 0,1,2) or a comma list (0,4,7)")
    if len(set(seeds)) != len(seeds) or min(seeds) < 0 or max(seeds) > MAX_SEED:
        raise InputError(f"{flag} {spec}: seeds must be distinct integers from 0 to {MAX_SEED}")
    return seeds


def _to_int(text: Any, flag: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise InputError(f"{flag}: {text!r} is not an integer") from None


GRID_KINDS = ("lin", "log")  # lin:START:STOP:N evenly spaced, log:START:STOP:N evenly spaced in log scale


def parse_grid(spec: str, flag: str) -> list[float]:
    """"lin:START:STOP:N" -> N evenly spaced values from START to STOP (both included); "log:..." -> evenly
    spaced in log scale (numpy's linspace / geomspace)."""
    import numpy as np

    kind, *parts = spec.strip().split(":")
    usage = f"{flag} {spec}: expected {kind}:START:STOP:N, e.g. {kind}:1e-5:0.3:50"
    if kind not in GRID_KINDS:
        raise InputError(f"{flag} {spec}: unknown grid {kind!r}; use lin:START:STOP:N or log:START:STOP:N")
    if len(parts) != 3:
        raise InputError(usage)
    try:
        start, stop, n = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise InputError(usage) from None
    if not 1 <= n <= MAX_COUNT:
        raise InputError(f"{flag} {spec}: N must be an integer from 1 to {MAX_COUNT}")
    if kind == "log" and not (start > 0 and stop > 0):
        raise InputError(f"{flag} {spec}: a log grid needs START and STOP > 0")
    values = np.linspace(start, stop, n) if kind == "lin" else np.geomspace(start, stop, n)
    return [float(v) for v in values]


def parse_floats(spec: float | str | list[float], flag: str) -> list[float]:
    """0.01, "1e-3,1e-2", "lin:1e-5:0.3:50", "log:1e-4:1e-1:7" or [1e-3, 1e-2] -> distinct positive floats.

    Items of a comma list may themselves be lin:/log: grids.
    """
    items = spec.split(",") if isinstance(spec, str) else (list(spec) if isinstance(spec, (list, tuple)) else [spec])
    values = []
    for s in items:
        if str(s).strip() == "":
            continue
        if isinstance(s, str) and ":" in s:
            values.extend(parse_grid(s, flag))
            continue
        try:
            values.append(float(s))
        except (TypeError, ValueError):
            raise InputError(f"{flag}: {s!r} is not a number; give one value, a comma list such as 1e-3,1e-2, "
                             "or a grid lin:START:STOP:N / log:START:STOP:N") from None
    for v in values:
        if not math.isfinite(v) or v <= 0:
            raise InputError(f"{flag} {spec}: {v!r} must be a positive finite number")
    if not values:
        raise InputError(f"{flag}: no value given")
    if len(set(values)) != len(values):
        raise InputError(f"{flag} {spec}: a value is listed twice")
    return values


def parse_value(text: str) -> Any:
    """A --set value: int, float, true/false, none, or the string itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_set(items: list[str]) -> dict[str, Any]:
    """["model=gpt2", "depth=2"] -> {"model": "gpt2", "depth": 2}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {item}: expected KEY=VALUE, e.g. --set depth=2")
        out[key.strip()] = parse_value(value)
    return out


# ---------------------------------------------------------------- resolving against the task


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name}: not a device; use auto, cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):  # meta, mps, ...: the runner is written and tested for these two
        raise InputError(f"--device {name}: balora compare runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        # else torch fails inside the first cell ("invalid device ordinal"), after the run folder is written
        raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def _positive_int(value: Any, flag: str, minimum: int = 1) -> int:
    v = _to_int(value, flag)
    if v < minimum:
        raise InputError(f"{flag} {value}: must be an integer >= {minimum}")
    return v


def _thread_count(value: Any) -> int:
    """--threads, bounded as inspect and balance bound it (max_threads): torch takes a C int."""
    v = _positive_int(value, "--threads")
    if v > max_threads():
        raise InputError(f"--threads {value}: must be an integer from 1 to {max_threads()}")
    return v


def _lr_for(lr: Any, optimizer: str, task: str) -> Any:
    """The lr option, or the task's default for `optimizer` when its default is a dict per optimizer."""
    if isinstance(lr, dict):
        if optimizer not in lr:
            raise InputError(f"--lr: task {task!r} has no default lr for --optimizer {optimizer}; pass --lr")
        lr = lr[optimizer]
    if lr is None:
        raise InputError(f"--lr: task {task!r} has no default learning rate; pass --lr")
    return lr


def _target_loss(value: Any) -> float:
    try:
        target = float(value)
    except (TypeError, ValueError):
        raise InputError(f"--target-loss {value!r}: not a number") from None
    if not (math.isfinite(target) and target > 0):
        raise InputError(f"--target-loss {value}: must be a positive finite number (a loss the run can reach)")
    return target


def _weight_decay(value: Any) -> float:
    """Checked here, not by the optimizer: torch refuses a negative or NaN one only when the first cell builds
    it (a run folder marked failed), and takes an infinite one (every cell ruined, the run "completed")."""
    try:
        decay = float(value)
    except (TypeError, ValueError):
        raise InputError(f"--weight-decay {value!r}: not a number") from None
    if not (math.isfinite(decay) and decay >= 0):
        raise InputError(f"--weight-decay {value}: must be a finite number >= 0 (0: no weight decay)")
    return decay


def _select(value: Any) -> str:
    if value not in SELECTS:
        raise InputError(f"--select {value}: use arm (one lr per arm, median over seeds) or seed (each seed "
                         "its own best lr, the paper's protocol)")
    return str(value)


class Resolved(NamedTuple):
    run: RunConfig  # saved as config.json
    task: TaskSpec
    arms: list[Arm]  # run.arms, looked up once


def resolve(cfg: CompareConfig) -> Resolved:
    """Fill every None from the task's defaults and validate; InputErrors name the flag."""
    task = get_task(cfg.task)
    d = task.defaults

    def pick(name: str, fallback: Any = None) -> Any:
        value = getattr(cfg, name)
        return value if value is not None else d.get(name, fallback)

    arms = resolve_arms(pick("arms", "lora,balora"))
    names = [a.name for a in arms]
    optimizer = str(pick("optimizer", "adam"))
    optimizer_class(optimizer)
    lr = _lr_for(pick("lr"), optimizer, task.name)
    rank = _positive_int(pick("rank", 8), "--rank")
    alpha = pick("alpha")
    dtype = str(pick("dtype", "float32"))
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    target = pick("target_loss")
    select = _select(pick("select", "arm"))
    weight_decay = _weight_decay(pick("weight_decay", 0.0))

    task_keys = {k: v for k, v in d.items() if k not in COMPARE_KEYS}
    arm_keys = {k for a in ARMS.values() for k in a.defaults}
    unknown = sorted(set(cfg.options) - set(task_keys) - arm_keys)
    if unknown:
        known = sorted(set(task_keys) | arm_keys)
        raise InputError(f"--set {unknown[0]}: unknown option for task {task.name!r}; known: {', '.join(known)}")
    device = resolve_device(cfg.device)

    run = RunConfig(
        task=task.name,
        arms=names,
        steps=_positive_int(pick("steps", 100), "--steps"),
        seeds=parse_seeds(pick("seeds", 1)),
        optimizer=optimizer,
        lrs=parse_floats(lr, "--lr"),
        alphas=parse_floats(alpha if alpha is not None else rank, "--alpha"),
        rank=rank,
        weight_decay=weight_decay,
        device=str(device),
        threads=None if pick("threads") is None else _thread_count(pick("threads")),
        dtype=dtype,
        eval_every=_positive_int(pick("eval_every", 0), "--eval-every", 0),
        layers_every=_positive_int(pick("layers_every", 10), "--layers-every", 0),
        spectra_every=_positive_int(pick("spectra_every", 10), "--spectra-every", 0),
        target_loss=None if target is None else _target_loss(target),
        select=select,
        task_options={**task_keys, **{k: v for k, v in cfg.options.items() if k in task_keys}},
        arm_options=arm_options(names, cfg.options, weight_decay),
        n_cells=0,
        out=os.path.expanduser(cfg.out) if cfg.out else new_run_dir(task.name),  # `--out=~/x`: no shell expands it
        created=now_iso(),
    )
    run.n_cells = len(run.arms) * len(run.seeds) * len(run.lrs) * len(run.alphas)
    run.command_reconstructed = command_line(run)
    run.command = cfg.command or run.command_reconstructed
    return Resolved(run, task, arms)


def seed_list(seeds: list[int]) -> str:
    """--seeds for exactly these seeds: "0,4,7"; one seed "4," (a bare 4 reads back as a count, seeds 0..3)."""
    return ",".join(map(str, seeds)) + ("," if len(seeds) == 1 else "")


def command_line(run: RunConfig) -> str:
    """An equivalent `balora compare` command with every option explicit."""
    def nums(xs):
        return ",".join(repr(float(x)) for x in xs)

    args = ["balora", "compare", "--task", run.task, "--arms", ",".join(run.arms), "--steps", str(run.steps),
            "--seeds", seed_list(run.seeds), "--optimizer", run.optimizer, "--lr", nums(run.lrs),
            "--alpha", nums(run.alphas), "--rank", str(run.rank), "--weight-decay", repr(run.weight_decay),
            "--device", run.device, *(["--threads", str(run.threads)] if run.threads else []),
            "--dtype", run.dtype, "--eval-every", str(run.eval_every),
            "--layers-every", str(run.layers_every), "--spectra-every", str(run.spectra_every)]
    if run.target_loss is not None:
        args += ["--target-loss", repr(run.target_loss)]
    args += ["--select", run.select]
    for key, value in {**run.task_options, **{k: v for k, v in run.arm_options.items() if k != "weight_decay"}}.items():
        args += ["--set", f"{key}={value}"]
    args += ["--out", run.out]
    return shlex.join(args)
