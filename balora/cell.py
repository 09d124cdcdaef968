"""One cell of a comparison: an (arm, seed, lr, alpha) trained from the model's current weights.

A cell records its steps, layer reports and spectra, and ends with one summary row whose
status says how it ended: "completed", "diverged" (its numbers blew up: the grid goes on),
"failed" (anything else: the run stops) or "interrupted" (Ctrl-C / SIGTERM).

"Its numbers blew up" is decided by `numeric_cause`: a non-finite loss, a decomposition that
failed (torch.linalg.LinAlgError, BalanceError), a floating-point error, or any error raised
while the cell's LoRA factors or last loss are no longer finite. A diverging cell's factors
reach every later computation (balancing, the layer report's SVDs, evaluation) before its
next loss does, so each of those places must end the cell, not the grid. A non-finite eval loss
ends it too, and so do factors left non-finite by the last update, which no loss follows.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from typing import Any

import torch

from balora import records
from balora.adapters.live import iter_lora_pairs
from balora.arms import Arm, trainable_parameters
from balora.balance import BalanceError, balance_and_write
from balora.errors import InputError
from balora.pairs import FactorPair
from balora.report import pair_rows
from balora.tasks import Problem
from balora.timing import synced_clock

FLUSH_S = 10.0  # write buffered rows as a part file at least this often, so a crash loses little

# Errors that are about the numbers by their type, whatever the factors look like afterwards.
NUMERIC_ERRORS: tuple[type[BaseException], ...] = (
    torch.linalg.LinAlgError, BalanceError, FloatingPointError, OverflowError, ZeroDivisionError,
)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, turned into an exception so the run is marked interrupted like Ctrl-C."""


# Signals that end a run as Ctrl-C does: SIGTERM (kill PID, a scheduler, the dashboard stopping its job) and
# SIGHUP (the terminal or ssh session that ran `balora compare` closed), which left the run "stalled".
TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def terminated(signum: int) -> Terminated:
    return Terminated(f"terminated ({signal.Signals(signum).name})")


def handled_signals(signals: tuple[int, ...]) -> tuple[int, ...]:
    """`signals` less those the process ignores: `nohup balora compare ...` ignores SIGHUP so that the run
    outlives its terminal, and a handler of ours must not undo that."""
    return tuple(sig for sig in signals if signal.getsignal(sig) is not signal.SIG_IGN)


@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C / SIGTERM / SIGHUP wait until the block has run, so a cell's rows and summary are written together."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
                for sig in handled_signals((signal.SIGINT, *TERMINATING))}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    ended = [sig for sig in pending if sig in TERMINATING]
    if ended:
        raise terminated(ended[0])
    if pending:
        raise KeyboardInterrupt


def numeric_cause(error: BaseException, factors: list[torch.Tensor], last_loss: float) -> str | None:
    """Why `error` is the cell's numbers blowing up ("non-finite factors", ...), or None when it is not.

    None means a bug or an environment problem: the run must stop and show it.
    """
    with torch.no_grad():
        if any(not bool(torch.isfinite(f).all()) for f in factors):
            return "non-finite factors"
    if not math.isfinite(last_loss):
        return "non-finite loss"
    if isinstance(error, NUMERIC_ERRORS):
        return "numerical failure"
    if isinstance(error, RuntimeError) and "overflow" in str(error):
        return "overflow"  # torch: a value (the lr, a product) does not fit the factors' dtype
    return None


class CellLog:
    """Buffers one cell's rows and appends them to the run as part files."""

    def __init__(self, writer, key: dict):
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
            report = pair_rows(pairs)
        self.last_rel_imbalance_max = records.max_rel_imbalance(report)
        layer_rows, spectra_rows = records.split_report(self.key, step, report, layers=layers, spectra=spectra)
        self.layers.extend(layer_rows)
        self.spectra.extend(spectra_rows)

    def maybe_flush(self) -> None:
        if time.monotonic() - self.last_flush >= FLUSH_S:
            with signals_deferred():
                self.flush()

    def flush(self) -> None:
        """Append the buffered rows (call with signals deferred: a half-done flush would write rows twice)."""
        for table in ("steps", "layers", "spectra"):
            self.writer.append(table, getattr(self, table))
        self.steps, self.layers, self.spectra = [], [], []
        self.last_flush = time.monotonic()
        self.writer.heartbeat()


def _endless(problem: Problem, task: str):
    """problem.batches(), called again whenever it runs out (one more epoch, same order)."""
    while True:
        empty = True
        for batch in problem.batches():
            empty = False
            yield batch
        if empty:
            raise InputError(f"task {task!r}: its data yields no batches; check the task's data options (--set ...)")


class _Diverged(Exception):
    """A cell stops here: the training blew up; the other cells go on."""


class Cell:
    """One (arm, seed, lr, alpha) cell: trains from the model's current weights, records rows and a summary."""

    def __init__(self, problem: Problem, arm: Arm, run, key: dict, writer, device: torch.device):
        self.problem, self.arm, self.run, self.key, self.device = problem, arm, run, key, device
        self.model = problem.model
        self.optimizer = arm.make_optimizer(self.model, run.optimizer, key["lr"], run.arm_options)
        # Views of the parameters: the optimizer updates them in place and balancing writes through them.
        self.pairs = [p for p in iter_lora_pairs(self.model) if p.skip_reason is None]
        self.log = CellLog(writer, key)
        self.target_on = "eval_loss" if problem.eval_loss is not None and run.eval_every > 0 else "loss"
        # A task with an eval loss sets its default target on it: with no eval recorded (--eval-every 0)
        # it is not applied to the noisier training loss (a user's --target-loss is, as asked).
        task_target = None if problem.eval_loss is not None and self.target_on == "loss" else problem.target_loss
        self.target = run.target_loss if run.target_loss is not None else task_target
        self.total = {"train": 0.0, "balance": 0.0, "diag": 0.0}
        self.hit: dict[str, float] = {}
        self.losses: list[float] = []
        self.final_eval = math.nan
        self.phase = "setup"  # where the cell is within a step, named in a diverged cell's reason
        self.unrecorded: tuple[int, float] | None = None  # (step, loss) of a step whose row is not written yet
        self.status, self.reason = "interrupted", None
        self.summary: dict | None = None  # set when train() ends, however it ends

    def train(self, bar) -> None:
        """Every step; a cell whose numbers blow up (numeric_cause) stops as "diverged", the grid goes on.

        Ctrl-C and other errors mark the cell "interrupted" / "failed" and propagate; the rows written so far
        and the summary row (self.summary) are kept either way.
        """
        run = self.run
        self.model.train()
        step = shown = 0
        try:
            self._diagnostics(0, run.layers_every > 0, run.spectra_every > 0)
            data = _endless(self.problem, run.task)
            for step in range(1, run.steps + 1):
                self._step(step, next(data))
                bar.update(1)
                shown += 1
                self.log.maybe_flush()
            self._check_last_update(step)
            self.status = "completed"
        except _Diverged as e:
            self.status, self.reason = "diverged", str(e)
        except KeyboardInterrupt:
            self.reason = f"interrupted at step {step}"
            raise
        except Exception as e:
            self._classify(e, step)
        finally:
            bar.update(run.steps - shown)  # a cell that stopped early still moves the bar to its end
            with signals_deferred():
                self.log.flush()
                self.summary = self._summary()

    def _check_last_update(self, step: int) -> None:
        """No training loss follows the last update, so factors it made non-finite are caught here: else the
        cell read "completed", ranked by its last finite loss, while a balanced arm met them in balancing."""
        with torch.no_grad():
            if not all(bool(torch.isfinite(p).all()) for p in trainable_parameters(self.model)):
                raise _Diverged(f"non-finite factors after the update of step {step}, the last")

    def _classify(self, error: Exception, step: int) -> None:
        """Diverged (the grid goes on) when the error comes from the cell's numbers; else failed, re-raised."""
        factors = [t for p in self.pairs for t in (p.A, p.B)]
        cause = numeric_cause(error, factors, self.losses[-1] if self.losses else 0.0)
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        if cause is None:
            self.status, self.reason = "failed", f"{message} (step {step}, {self.phase})"
            raise error
        self.status, self.reason = "diverged", f"{cause} at step {step} during {self.phase}: {message}"
        if self.unrecorded is not None:  # the step's loss was measured before its numbers blew up: keep it
            self._record_loss(*self.unrecorded)

    def _record_loss(self, step: int, value: float) -> None:
        """A steps row holding only the loss of a step that did not finish (its timings are unknown)."""
        self.losses.append(value)
        self.log.steps.append({**self.key, "step": step, "loss": value,
                               "time_s": self.total["train"] + self.total["balance"]})

    def _diagnostics(self, step: int, layers: bool, spectra: bool) -> None:
        if layers or spectra:
            self.phase = "diagnostics"
            t = time.perf_counter()
            self.log.diagnostics(self.pairs, step, layers, spectra)
            self.total["diag"] += time.perf_counter() - t

    def _step(self, step: int, batch: Any) -> None:
        run, device, best = self.run, self.device, self.problem.best_loss
        t0 = synced_clock(device)
        self.phase = "the loss"
        loss = self.problem.loss(self.model, batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            self._record_loss(step, value)
            raise _Diverged(f"non-finite loss ({value}) at step {step}")
        self.unrecorded = (step, value)
        self.phase = "the optimizer step"
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t1 = t2 = synced_clock(device)  # an arm without balancing spends exactly 0 s on it
        if self.arm.policy is not None:
            self.phase = "balancing"
            balance_and_write(self.pairs, self.arm.policy)
            t2 = synced_clock(device)
        layers_due = records.due(step, run.layers_every, run.steps)
        spectra_due = records.due(step, run.spectra_every, run.steps)
        if layers_due or spectra_due:
            self.phase = "diagnostics"
            self.log.diagnostics(self.pairs, step, layers_due, spectra_due)
        t3 = synced_clock(device)
        eval_value = math.nan
        evaluated = self.target_on == "eval_loss" and records.due(step, run.eval_every, run.steps)
        if evaluated:
            self.phase = "evaluation"
            self.model.eval()
            with torch.no_grad():
                eval_value = self.final_eval = float(self.problem.eval_loss(self.model))
            self.model.train()
        t4 = synced_clock(device)

        self.total["train"] += t1 - t0
        self.total["balance"] += t2 - t1
        self.total["diag"] += t3 - t2
        self.losses.append(value)
        time_s = self.total["train"] + self.total["balance"]
        self.log.steps.append({**self.key, "step": step, "loss": value, "eval_loss": eval_value,
                               "excess_loss": value - best if best is not None else math.nan, "time_s": time_s,
                               "step_time_s": t1 - t0, "balance_time_s": t2 - t1, "diag_time_s": t3 - t2,
                               "eval_time_s": t4 - t3})
        self.unrecorded = None
        reached = value if self.target_on == "loss" else eval_value
        if self.target is not None and "steps" not in self.hit and reached <= self.target:
            self.hit.update(steps=step, seconds=time_s)
        if evaluated and not math.isfinite(eval_value):  # the model blew up: at the last step no loss would say so
            raise _Diverged(f"non-finite eval loss ({eval_value}) at step {step}")

    def _summary(self) -> dict:
        return records.summary_row(
            self.key, self.status, self.reason, steps_done=sum(map(math.isfinite, self.losses)), losses=self.losses,
            best_loss=self.problem.best_loss, final_eval_loss=self.final_eval,
            rel_imbalance_max=self.log.last_rel_imbalance_max, target=self.target, target_on=self.target_on,
            reached=(self.hit.get("steps", math.nan), self.hit.get("seconds", math.nan)),
            total_seconds=self.total["train"] + self.total["balance"], balance_seconds=self.total["balance"],
            diag_seconds=self.total["diag"])
