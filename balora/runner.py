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
import math
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from balora.adapters.live import iter_lora_pairs
from balora.arms import Arm, get_arm
from balora.balance import BalanceError, balance_and_write
from balora.errors import InputError
from balora.pairs import FactorPair
from balora.report import pair_rows
from balora.compare_config import CompareConfig, RunConfig, resolve
from balora.store import RunWriter, environment_info, load_run
from balora.tasks import Problem, TaskSpec

# ---------------------------------------------------------------- the loop


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so the run is marked interrupted like Ctrl-C."""


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
def _signals_deferred():
    """Ctrl-C / SIGTERM wait until the block has run, so a cell's rows and summary are written together."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if signal.SIGTERM in pending:
        raise Terminated("terminated (SIGTERM)")
    if pending:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_compare(cfg: CompareConfig) -> Path:
    """Train every cell and write the run; returns its directory. Ctrl-C leaves a loadable 'interrupted' run."""
    run, task = resolve(cfg)
    with _torch_threads(run.threads):
        return _run_with_writer(run, task, cfg)


def _run_with_writer(run: RunConfig, task: TaskSpec, cfg: CompareConfig) -> Path:
    from tqdm.auto import tqdm

    device = torch.device(run.device)
    build = _builder(run, task, device)
    # Built before anything is written: a bad task option (model path, size) leaves no run directory behind.
    first = build(run.seeds[0], run.alphas[0])
    run.problem = first.info
    writer = RunWriter(run.out, asdict(run), environment_info(run.device), force=cfg.force)

    bar = tqdm(total=run.n_cells * run.steps, unit="step", disable=cfg.quiet, dynamic_ncols=True, leave=True)
    where = {"cell": "before the first cell"}
    done = {"done": 0, "total": run.n_cells, "steps_done": 0, "steps_total": run.n_cells * run.steps}
    writer.heartbeat(done, force=True)
    try:
        with writer, _sigterm_as_interrupt():
            try:
                _run_all(run, build, first, device, writer, bar, where, done)
            except KeyboardInterrupt as e:
                writer.finish("interrupted", f"{e or 'interrupted (Ctrl-C / SIGINT)'} during {where['cell']}")
                raise
            except Exception as e:
                writer.finish("failed", f"{type(e).__name__}: {e} (during {where['cell']})")
                raise
    finally:
        bar.close()
    return writer.path


def _builder(run: RunConfig, task: TaskSpec, device: torch.device):
    """(seed, alpha) -> task.build(cfg, seed, alpha, device), cfg = the task's defaults + the resolved options."""
    cfg = {**task.defaults,
           **{k: getattr(run, k) for k in ("steps", "optimizer", "rank", "dtype", "eval_every", "layers_every",
                                           "spectra_every", "threads")},
           "seeds": run.seeds, "lr": run.lrs, "device": run.device, **run.task_options}
    return lambda seed, alpha: task.build(dict(cfg, alpha=alpha), seed, alpha, device)


def _run_all(run: RunConfig, build, first: Problem, device: torch.device, writer: RunWriter, bar, where: dict,
             done: dict) -> None:
    arms = [get_arm(a) for a in run.arms]
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
                        done["steps_done"] = bar.n
                        writer.heartbeat(done, force=True)
                finally:  # also on Ctrl-C: the cells that ended keep their summary rows
                    with _signals_deferred():
                        writer.append("summary", with_speedups(group))


def _cell(problem: Problem, arm: Arm, run: RunConfig, key: dict, snapshot: dict, writer: RunWriter, bar,
          device: torch.device, group: list[dict]) -> None:
    reason = arm.unavailable()
    if reason is not None:
        bar.update(run.steps)
        group.append({**key, "status": "skipped", "reason": reason, "steps_done": 0})
        return
    _restore(problem.model, snapshot)
    cell = _Cell(problem, arm, run, key, writer, device)
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


def with_speedups(rows: list[dict]) -> list[dict]:
    """speedup_* = lora's steps/seconds to target / the cell's, within one (seed, lr, alpha) group."""
    lora = next((r for r in rows if r["arm"] == "lora"), None)
    for r in rows:
        for what in ("steps", "seconds"):
            mine = r.get(f"{what}_to_target", math.nan)
            ref = lora.get(f"{what}_to_target", math.nan) if lora else math.nan
            ok = all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in (mine, ref))
            r[f"speedup_{what}"] = ref / mine if ok else math.nan
    return rows


# ---------------------------------------------------------------- one cell

FLUSH_S = 10.0  # write buffered rows as a part file at least this often, so a crash loses little


class _CellLog:
    """Buffers one cell's rows and appends them to the run as part files."""

    def __init__(self, writer: RunWriter, key: dict):
        self.writer, self.key = writer, key
        self.steps: list[dict] = []
        self.layers: list[dict] = []
        self.spectra: list[dict] = []
        self.last_flush = time.monotonic()
        self.last_rel_imbalance_max = math.nan

    def diagnostics(self, pairs: list[FactorPair], step: int, layers: bool, spectra: bool) -> None:
        """The layer report's rows for `pairs` now -> layers rows and/or spectra rows (dW includes the scaling).

        Rows stay dicts until the flush: one DataFrame per part instead of one per report.
        """
        with torch.no_grad():
            rows = pair_rows(pairs)
        self.last_rel_imbalance_max = max((r["rel_imbalance"] for r in rows), default=math.nan)
        for row in rows:
            if layers:
                self.layers.append({**self.key, "step": step,
                                    **{k: v for k, v in row.items() if k not in ("sigma", "sigma_A", "sigma_B")}})
            if spectra:
                for which, values in (("dW", row["sigma"]), ("A", row["sigma_A"]), ("B", row["sigma_B"])):
                    self.spectra.extend({**self.key, "step": step, "module": row["module"], "adapter": row["adapter"],
                                         "which": which, "index": i, "value": float(v)} for i, v in enumerate(values))

    def maybe_flush(self) -> None:
        if time.monotonic() - self.last_flush >= FLUSH_S:
            with _signals_deferred():
                self.flush()

    def flush(self) -> None:
        """Append the buffered rows (call with signals deferred: a half-done flush would write rows twice)."""
        for table in ("steps", "layers", "spectra"):
            self.writer.append(table, getattr(self, table))
        self.steps, self.layers, self.spectra = [], [], []
        self.last_flush = time.monotonic()
        self.writer.heartbeat()


def _clock(device: torch.device) -> float:
    """perf_counter after the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _endless(problem: Problem, task: str):
    """problem.batches(), called again whenever it runs out (one more epoch, same order)."""
    while True:
        empty = True
        for batch in problem.batches():
            empty = False
            yield batch
        if empty:
            raise InputError(f"task {task!r}: its data yields no batches; check the task's data options (--set ...)")


def _due(step: int, every: int, last: int) -> bool:
    return every > 0 and (step % every == 0 or step == last)


class _Diverged(Exception):
    """A cell stops here: the training blew up; the other cells go on."""


class _Cell:
    """One (arm, seed, lr, alpha) cell: trains from the model's current weights, records rows and a summary."""

    def __init__(self, problem: Problem, arm: Arm, run: RunConfig, key: dict, writer: RunWriter,
                 device: torch.device):
        self.problem, self.arm, self.run, self.key, self.device = problem, arm, run, key, device
        self.model = problem.model
        self.optimizer = arm.make_optimizer(self.model, run.optimizer, key["lr"], run.arm_options)
        # Views of the parameters: the optimizer updates them in place and balancing writes through them.
        self.pairs = [p for p in iter_lora_pairs(self.model) if p.skip_reason is None]
        self.log = _CellLog(writer, key)
        self.target = run.target_loss if run.target_loss is not None else problem.target_loss
        self.target_on = "eval_loss" if problem.eval_loss is not None and run.eval_every > 0 else "loss"
        self.total = {"train": 0.0, "balance": 0.0, "diag": 0.0}
        self.hit: dict[str, float] = {}
        self.losses: list[float] = []
        self.final_eval = math.nan
        self.status, self.reason = "interrupted", None
        self.summary: dict | None = None  # set when train() ends, however it ends

    def train(self, bar) -> None:
        """Every step; a non-finite loss or unbalanceable factors stop the cell as "diverged".

        Ctrl-C and other errors mark the cell "interrupted" / "failed" and propagate; the rows written so far
        and the summary row (appended to self.summary) are kept either way.
        """
        run = self.run
        self.model.train()
        t = time.perf_counter()
        if run.layers_every or run.spectra_every:
            self.log.diagnostics(self.pairs, 0, run.layers_every > 0, run.spectra_every > 0)
        self.total["diag"] += time.perf_counter() - t
        data = _endless(self.problem, run.task)
        step = shown = 0
        try:
            for step in range(1, run.steps + 1):
                self._step(step, next(data))
                bar.update(1)
                shown += 1
                self.log.maybe_flush()
            self.status = "completed"
        except _Diverged as e:
            self.status, self.reason = "diverged", str(e)
        except BalanceError as e:
            self.status, self.reason = "diverged", f"balancing failed at step {step}: {e}"
        except KeyboardInterrupt:
            self.reason = f"interrupted at step {step}"
            raise
        except Exception as e:
            self.status, self.reason = "failed", f"{type(e).__name__}: {e} (step {step})"
            raise
        finally:
            bar.update(run.steps - shown)  # a cell that stopped early still moves the bar to its end
            with _signals_deferred():
                self.log.flush()
                self.summary = self._summary()

    def _step(self, step: int, batch: Any) -> None:
        run, device, best = self.run, self.device, self.problem.best_loss
        t0 = _clock(device)
        loss = self.problem.loss(self.model, batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            self.losses.append(value)
            self.log.steps.append({**self.key, "step": step, "loss": value,
                                   "time_s": self.total["train"] + self.total["balance"]})
            raise _Diverged(f"non-finite loss ({value}) at step {step}")
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t1 = t2 = _clock(device)  # an arm without balancing spends exactly 0 s on it
        if self.arm.balance:
            balance_and_write(self.pairs, self.arm.balance, on_rank_deficient="skip", on_nonfinite="raise", check=False)
            t2 = _clock(device)
        layers_due, spectra_due = _due(step, run.layers_every, run.steps), _due(step, run.spectra_every, run.steps)
        if layers_due or spectra_due:
            self.log.diagnostics(self.pairs, step, layers_due, spectra_due)
        t3 = _clock(device)
        eval_value = math.nan
        if self.target_on == "eval_loss" and _due(step, run.eval_every, run.steps):
            self.model.eval()
            with torch.no_grad():
                eval_value = self.final_eval = float(self.problem.eval_loss(self.model))
            self.model.train()
        t4 = _clock(device)

        self.total["train"] += t1 - t0
        self.total["balance"] += t2 - t1
        self.total["diag"] += t3 - t2
        self.losses.append(value)
        time_s = self.total["train"] + self.total["balance"]
        self.log.steps.append({**self.key, "step": step, "loss": value, "eval_loss": eval_value,
                               "excess_loss": value - best if best is not None else math.nan, "time_s": time_s,
                               "step_time_s": t1 - t0, "balance_time_s": t2 - t1, "diag_time_s": t3 - t2,
                               "eval_time_s": t4 - t3})
        reached = value if self.target_on == "loss" else eval_value
        if self.target is not None and "steps" not in self.hit and reached <= self.target:
            self.hit.update(steps=step, seconds=time_s)

    def _summary(self) -> dict:
        finite = [v for v in self.losses if math.isfinite(v)]
        best, nan = self.problem.best_loss, math.nan
        return {
            **self.key, "status": self.status, "reason": self.reason, "steps_done": len(finite),
            "final_loss": finite[-1] if finite else nan,
            "min_loss": min(finite) if finite else nan,
            "best_loss": best if best is not None else nan,
            "final_excess_loss": finite[-1] - best if finite and best is not None else nan,
            "final_eval_loss": self.final_eval, "final_rel_imbalance_max": self.log.last_rel_imbalance_max,
            "target_loss": self.target if self.target is not None else nan, "target_on": self.target_on,
            "steps_to_target": self.hit.get("steps", nan), "seconds_to_target": self.hit.get("seconds", nan),
            "total_seconds": self.total["train"] + self.total["balance"], "balance_seconds": self.total["balance"],
            "diag_seconds": self.total["diag"],
        }


# ---------------------------------------------------------------- the Python API


def compare(task: str = "synthetic", arms: str | list[str] | None = None, steps: int | None = None,
            seeds: int | str | list[int] | None = None, optimizer: str | None = None,
            lr: float | str | list[float] | None = None, alpha: float | str | list[float] | None = None,
            rank: int | None = None, device: str = "auto", out: str | Path | None = None, quiet: bool = False,
            *, dtype: str | None = None, eval_every: int | None = None, layers_every: int | None = None,
            spectra_every: int | None = None, target_loss: float | None = None, weight_decay: float | None = None,
            force: bool = False, **task_options: Any):
    """Run a comparison and return the loaded run (balora.store.Run). Same options as `balora compare`.

        run = balora.compare("synthetic", arms="lora,balora", seeds=3, optimizer="sgd", lr=[0.05, 0.1])
        run.summary.groupby("arm").final_excess_loss.median()

    None takes the task's default; task-specific keys (e.g. depth=2, model="gpt2") go in **task_options.
    """
    cfg = CompareConfig(task=task, arms=arms, steps=steps, seeds=seeds, optimizer=optimizer, lr=lr, alpha=alpha,
                        rank=rank, weight_decay=weight_decay, device=device, dtype=dtype, eval_every=eval_every,
                        layers_every=layers_every, spectra_every=spectra_every, target_loss=target_loss,
                        options=task_options, out=None if out is None else str(out), force=force, quiet=quiet)
    return load_run(run_compare(cfg))


# ---------------------------------------------------------------- reading a comparison


def arm_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per arm, each at its own best (lr, alpha) cell, plus how flat its grid is.

    metric: final_excess_loss when known, else final_eval_loss when known, else final_loss; a cell's
    value is the median over seeds, diverged seeds counting as +inf. Columns: arm, cells, completed,
    diverged, best_lr, best_alpha, metric, best, worst (median metric at the best/worst grid cell),
    within_2x / within_5pct (fraction of grid cells whose median is within 2x / 5% of the best: 2x suits
    excess losses, which go to 0, 5% raw losses, which have a floor), steps_to_target (median
    at the best cell), speedup_vs_lora (median over seeds of lora-at-its-best / arm-at-its-best steps).
    """
    cols = ["arm", "cells", "completed", "diverged", "best_lr", "best_alpha", "metric", "best", "worst",
            "within_2x", "within_5pct", "steps_to_target", "speedup_vs_lora"]
    if summary.empty:
        return pd.DataFrame(columns=cols)
    metric = next((m for m in ("final_excess_loss", "final_eval_loss", "final_loss")
                   if summary[m].notna().any()), "final_loss")
    s = summary.copy()
    s["value"] = s[metric].where(s["status"] == "completed", math.inf).astype(float)
    rows, best_cells = [], {}
    for arm, g in s.groupby("arm", sort=False):
        grid = g.groupby(["lr", "alpha"])["value"].median()
        ran = g[g["status"] != "skipped"]
        if ran.empty:
            rows.append({"arm": arm, "cells": len(g), "completed": 0, "diverged": 0, "metric": metric})
            continue
        (blr, balpha), best = grid.idxmin(), float(grid.min())
        best_cells[arm] = g[(g["lr"] == blr) & (g["alpha"] == balpha)].set_index("seed")
        finite_best = best if math.isfinite(best) and best > 0 else math.nan
        rows.append({
            "arm": arm, "cells": len(g), "completed": int((g["status"] == "completed").sum()),
            "diverged": int((g["status"] == "diverged").sum()), "best_lr": blr, "best_alpha": balpha,
            "metric": metric, "best": best, "worst": float(grid.max()),
            "within_2x": float((grid <= 2 * finite_best).mean()) if finite_best == finite_best else math.nan,
            "within_5pct": float((grid <= 1.05 * finite_best).mean()) if finite_best == finite_best else math.nan,
            "steps_to_target": float(best_cells[arm]["steps_to_target"].median()),
        })
    for row in rows:
        if "lora" in best_cells and row["arm"] in best_cells:
            ratio = best_cells["lora"]["steps_to_target"] / best_cells[row["arm"]]["steps_to_target"]
            row["speedup_vs_lora"] = float(ratio.median())
    return pd.DataFrame(rows, columns=cols)
