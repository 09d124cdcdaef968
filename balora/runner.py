"""Side-by-side comparison of arms on a task: every (seed, alpha, lr, arm) cell trained and written to a run.

    setup    resolve the options against the task's defaults, build the first problem (so bad options
             fail before anything is written), open the run directory
    train    for seed, alpha: build the problem once, snapshot the adapter weights;
             for lr, arm: restore the snapshot, train one cell, record it
    cleanup  summary rows with speed-ups over lora, status completed / interrupted / failed

All arms of one (seed, alpha) share the initial adapter weights and the data order; all arms
share the optimizer, lr, alpha and weight decay; only what defines an arm differs.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from balora import records, runs_folder
from balora.arms import Arm
from balora.cell import TERMINATING, Cell, handled_signals, signals_deferred, terminated
from balora.compare_config import CompareConfig, RunConfig, command_line, resolve
from balora.store import RunFolderTaken, RunWriter, environment_info, load_run
from balora.tasks import Problem, TaskSpec

# ---------------------------------------------------------------- the loop


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """torch's intra-op thread count set to n for the block, then restored (None: unchanged)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise terminated(signum)

    previous = {sig: signal.signal(sig, handler) for sig in handled_signals(TERMINATING)}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def run_compare(cfg: CompareConfig) -> Path:
    """Train every cell and write the run; returns its directory. Ctrl-C leaves a loadable 'interrupted' run."""
    run, task, arms = resolve(cfg)
    with _torch_threads(run.threads):
        return _run_with_writer(run, task, arms, cfg)


def _run_with_writer(run: RunConfig, task: TaskSpec, arms: list[Arm], cfg: CompareConfig) -> Path:
    from tqdm.auto import tqdm

    device = torch.device(run.device)
    build = _builder(run, task, device)
    # Built before anything is written: a bad task option (model path, size) leaves no run directory behind.
    first = build(run.seeds[0], run.alphas[0])
    run.problem = first.info
    writer = _open_writer(run, cfg)

    bar = tqdm(total=run.n_cells * run.steps, unit="step", disable=cfg.quiet, dynamic_ncols=True, leave=True)
    where = {"cell": "before the first cell"}
    done = {"done": 0, "total": run.n_cells, "steps_done": 0, "steps_total": run.n_cells * run.steps}
    writer.heartbeat(done, force=True)
    try:
        with writer, _sigterm_as_interrupt():
            try:
                _run_all(run, arms, build, first, device, writer, bar, where, done)
            except KeyboardInterrupt as e:
                # str(e), not e: an exception object is always true, and Ctrl-C's has no text
                writer.finish("interrupted", f"{str(e) or 'interrupted (Ctrl-C / SIGINT)'} during {where['cell']}")
                raise
            except Exception as e:
                writer.finish("failed", f"{type(e).__name__}: {e} (during {where['cell']})")
                raise
    finally:
        bar.close()
    return writer.path


def _open_writer(run: RunConfig, cfg: CompareConfig) -> RunWriter:
    """The run's writer. A default folder (runs/<task>-<time to the second>) that another run holds, e.g.
    a second `balora compare` started in the same second, moves on to <name>-2, -3, ...; --force applies
    only to a folder the user named, never to one that run picked. cfg.out is set to the folder taken
    (the CLI names it after Ctrl-C)."""
    base = run.out
    flag = "--out" if cfg.out else f"${runs_folder.ENV_VAR}" if os.environ.get(runs_folder.ENV_VAR) else "runs folder"
    for n in itertools.count(2):
        try:
            writer = RunWriter(run.out, asdict(run), environment_info(run.device), force=cfg.force and bool(cfg.out),
                               flag=flag)
            break
        except RunFolderTaken:
            if cfg.out:
                raise
            run.out = f"{base}-{n}"
            run.command_reconstructed = command_line(run)  # it names --out
            run.command = cfg.command or run.command_reconstructed
    cfg.out = run.out
    return writer


def _builder(run: RunConfig, task: TaskSpec, device: torch.device):
    """(seed, alpha) -> task.build(cfg, seed, alpha, device), cfg = the task's defaults + the resolved options."""
    cfg = {**task.defaults,
           **{k: getattr(run, k) for k in ("steps", "optimizer", "rank", "dtype", "eval_every", "layers_every",
                                           "spectra_every", "threads")},
           "seeds": run.seeds, "lr": run.lrs, "device": run.device, **run.task_options}
    return lambda seed, alpha: task.build(dict(cfg, alpha=alpha), seed, alpha, device)


def _run_all(run: RunConfig, arms: list[Arm], build, first: Problem, device: torch.device, writer: RunWriter, bar,
             where: dict, done: dict) -> None:
    for seed in run.seeds:
        for alpha in run.alphas:
            where["cell"] = f"building task {run.task} (seed={seed}, alpha={alpha:g})"
            problem, first = (first, None) if first is not None else (build(seed, alpha), None)
            snapshot = _trainable_state(problem.model)
            for lr in run.lrs:
                group: list[dict] = []
                try:
                    for arm in arms:
                        key = {"arm": arm.name, "seed": seed, "lr": lr, "alpha": alpha}
                        where["cell"] = f"arm={arm.name} seed={seed} lr={lr:g} alpha={alpha:g}"
                        bar.set_description(f"{arm.name} s={seed} lr={lr:g} a={alpha:g}")
                        _cell(problem, arm, run, key, snapshot, writer, bar, device, group)
                        done["done"] += 1
                        # a cell that stopped early counts its whole budget, as the bar does (a disabled
                        # bar, --quiet, counts nothing: keep the count here)
                        done["steps_done"] += run.steps
                        writer.heartbeat(done, force=True)
                finally:  # also on Ctrl-C: the cells that ended keep their summary rows
                    with signals_deferred():
                        writer.append("summary", records.with_speedups(group))


def _cell(problem: Problem, arm: Arm, run: RunConfig, key: dict, snapshot: dict, writer: RunWriter, bar,
          device: torch.device, group: list[dict]) -> None:
    reason = arm.unavailable()
    if reason is not None:
        bar.update(run.steps)
        group.append({**key, "status": "skipped", "reason": reason, "steps_done": 0})
        return
    _restore(problem.model, snapshot)
    # The global RNG from the cell's seed: a model's own dropout (the encoder's MiniLM, GPT-2) draws from
    # it, and unseeded, the same command gave other losses and the arms of one cell other noise. Forked:
    # the caller's RNG is left as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(key["seed"]))
        cell = Cell(problem, arm, run, key, writer, device)
        try:
            cell.train(bar)
        finally:  # the summary row exists also when the cell was interrupted or failed
            if cell.summary is not None:
                group.append(cell.summary)


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _restore(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in snapshot.items():
            params[name].copy_(value)
            params[name].grad = None


# ---------------------------------------------------------------- the Python API


def compare(task: str = "synthetic", arms: str | list[str] | None = None, steps: int | None = None,
            seeds: int | str | list[int] | None = None, optimizer: str | None = None,
            lr: float | str | list[float] | None = None, alpha: float | str | list[float] | None = None,
            rank: int | None = None, device: str = "auto", out: str | Path | None = None, quiet: bool = False,
            *, dtype: str | None = None, eval_every: int | None = None, layers_every: int | None = None,
            spectra_every: int | None = None, target_loss: float | None = None, weight_decay: float | None = None,
            force: bool = False, select: str | None = None, threads: int | None = None, **task_options: Any):
    """Run a comparison and return the loaded run (balora.store.Run). Same options as `balora compare`.

        run = balora.compare("synthetic", arms="lora,balora", seeds=3, optimizer="sgd", lr=[0.05, 0.1])
        run.summary.groupby("arm").final_excess_loss.median()

    None takes the task's default; task-specific keys (e.g. depth=2, model="gpt2") go in **task_options.
    """
    cfg = CompareConfig(task=task, arms=arms, steps=steps, seeds=seeds, optimizer=optimizer, lr=lr, alpha=alpha,
                        rank=rank, weight_decay=weight_decay, device=device, threads=threads, dtype=dtype,
                        eval_every=eval_every, layers_every=layers_every, spectra_every=spectra_every,
                        target_loss=target_loss,
                        select=select, options=task_options, out=None if out is None else str(out), force=force,
                        quiet=quiet)
    return load_run(run_compare(cfg))
