"""RunRecorder: write a user's own transformers Trainer run into the run-store format.

    trainer = Trainer(model=peft_model, args=args, ..., callbacks=[RunRecorder("runs/my-run")])

The run then loads with balora.load_run and shows up in the dashboard next to `balora compare`
runs: one cell (arm, seed, lr, alpha), the Trainer's logged losses as steps rows, and the
layer report and spectra every `layers_every` / `spectra_every` optimizer steps.
"""

from __future__ import annotations

import atexit
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from balora import records
from balora.adapters.live import iter_lora_pairs, peft_configs
from balora.errors import InputError
from balora.report import pair_rows
from balora.safe_io import user_path
from balora.store import RunWriter, environment_info
from balora.timing import model_device, synced_clock


class RunRecorder(TrainerCallback):
    """Record a Trainer run as a balora run directory.

    out_dir: the run directory (refused if it exists and is not empty, unless force=True and it is a run).
        A Trainer resumed from a checkpoint (`train(resume_from_checkpoint=...)`) goes on writing the run
        this recorder wrote there for the same arm and seed: what it recorded after the checkpoint's
        step, and its summary, are dropped and recorded again (force is not needed, and not used); refused
        while the process that wrote it still runs on this machine (both would write the same part files).
    arm: the arm name the run is shown under ("trainer"; e.g. "balora" when you also use BalanceCallback).
        The cell's alpha is the adapter's lora_alpha (0 for a model without LoRA: a full fine-tune baseline).
    layers_every / spectra_every: per-layer report / singular values every N optimizer steps (0: never;
        spectra_every None: same as layers_every). Also recorded before the first and after the last step.
    seed: the cell's seed (default: TrainingArguments.seed).
    target_loss: threshold for steps/seconds-to-target in the summary (default: none).
    balance_callback: the BalanceCallback of the same Trainer, to record the time spent balancing.
    config: extra keys saved in config.json (e.g. {"model": "gpt2", "data": "train.txt"}).
    On a GPU each step's time is read after the device's queued work (a synchronize at the start and
    end of every step), so the recorded times are what the steps cost, at that small price.
    """

    def __init__(self, out_dir: str | Path, arm: str = "trainer", *, layers_every: int = 50,
                 spectra_every: int | None = None, seed: int | None = None, target_loss: float | None = None,
                 adapter: str | None = None, balance_callback=None, config: dict[str, Any] | None = None,
                 force: bool = False):
        if layers_every < 0 or (spectra_every is not None and spectra_every < 0):
            raise ValueError("RunRecorder: layers_every and spectra_every must be >= 0")
        self.out_dir, self.arm, self.force = user_path(out_dir), arm, force
        self.layers_every = layers_every
        self.spectra_every = layers_every if spectra_every is None else spectra_every
        self.seed, self.target_loss, self.adapter = seed, target_loss, adapter
        self.balance_callback, self.extra_config = balance_callback, dict(config or {})
        self.writer: RunWriter | None = None
        self._writes = True  # rank 0 (or one process) writes; set per run in on_train_begin
        self._start()

    def _start(self) -> None:
        """What one train() call records, from nothing: a training resumed in the same process (a notebook,
        after Ctrl-C) takes it up from the run on disk, not from what the interrupted call left here (its
        held row, its losses past the checkpoint, its signs of divergence: the resumed run read diverged)."""
        self._rows: dict[int, dict] = {}  # step -> steps row, written once the Trainer has moved past the step
        self._train_s = self._diag_s = 0.0
        self._step_t0 = 0.0
        self._step_s: dict[int, float] = {}  # step -> its wall-clock (without this callback's diagnostics)
        self._time_at: dict[int, float] = {}  # step -> cumulative training wall-clock after it
        self._losses: list[tuple[int, float, float]] = []  # (step, loss, time_s)
        self._eval: list[tuple[int, float, float]] = []
        self._last_rel = math.nan
        self._nonfinite_factors_at: int | None = None  # first step after the last diagnostics with finite factors
        self._last_finite_diag = 0  # the last step whose diagnostics found every factor finite
        self._nonfinite_grad_at: int | None = None  # first logged non-finite grad_norm
        self._balance_s0 = 0.0  # balancing time of the run before a resume (the callback counts this train() call's)
        self._diag_at: int | None = None  # the step of the latest diagnostics (on every rank)

    # -------------------------------------------------------------- Trainer events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # Distributed (DDP, FSDP2): every rank runs the callbacks. Rank 0 writes the run; the others only
        # take their part in the diagnostics' collectives (FSDP2 gathers the factors). Each rank writing
        # made the second one refuse the folder and stop training on every rank.
        self._start()  # a recorder trained again (resumed in the same process) starts from the run on disk
        self._writes = bool(getattr(state, "is_world_process_zero", True))
        if self._writes:
            self._open(args, state, model)
        if model is not None and state.global_step == 0:  # later: the factors are a checkpoint's, not step 0's
            self._diagnostics(model, 0, self.layers_every > 0, self.spectra_every > 0)

    def _open(self, args, state, model) -> None:
        """Start the run in out_dir, or take up the one a resumed training continues."""
        lora = _lora_config(model, self.adapter)
        self.key = {"arm": self.arm, "seed": int(args.seed if self.seed is None else self.seed),
                    "lr": float(args.learning_rate), "alpha": _alpha(lora)}
        device = str(getattr(args, "device", "cpu"))
        config = {
            "task": "trainer", "source": "RunRecorder", "arms": [self.arm], "seeds": [self.key["seed"]],
            "steps": int(state.max_steps), "optimizer": _optim_name(args), "lrs": [self.key["lr"]],
            "alphas": [self.key["alpha"]], "rank": lora.get("r"), "weight_decay": float(args.weight_decay),
            "device": device, "layers_every": self.layers_every, "spectra_every": self.spectra_every,
            "eval_every": _eval_every(args, state),
            "target_loss": self.target_loss, "n_cells": 1, "lora": lora,
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "",
            **self.extra_config,
        }
        before = self._resumable(config, state.global_step) if state.global_step > 0 else None
        if before is not None:
            self._restore(before, state.global_step)
            self.writer.update_config(steps=int(state.max_steps))
        else:  # a new run (an earlier one there is refused, or replaced with force)
            self.writer = RunWriter(self.out_dir, config, environment_info(device), force=self.force,
                                    flag="RunRecorder(out_dir)")
        self.writer.heartbeat({"done": 0, "total": 1, "steps_done": int(state.global_step),
                               "steps_total": int(state.max_steps)}, force=True)
        atexit.register(self._at_exit)

    def _resumable(self, config: dict, step: int):
        """The run (balora.store.Run) in out_dir that this resumed training continues: one a RunRecorder
        wrote for this cell (arm, seed, lr, alpha, rank), readable and recorded at least up to `step`;
        else None."""
        from balora.store import is_marked, is_run_dir, load_run

        if not (is_marked(self.out_dir) and is_run_dir(self.out_dir)):
            return None
        try:
            before = load_run(self.out_dir)
        except InputError:  # damaged: not continued (refused, or replaced with force)
            return None
        same = all(before.config.get(k) == config[k] for k in ("source", "arms", "seeds", "lrs", "alphas", "rank"))
        return before if same and len(before.steps) > 0 and int(before.steps["step"].max()) >= step else None

    def _restore(self, before, step: int) -> None:
        """Reopen the run `before` (as _resumable read it) and take up its counts through `step`
        (losses, times, last balance)."""
        old = before.summary.iloc[-1] if len(before.summary) else None
        self.writer = RunWriter.reopen(self.out_dir, step, flag="RunRecorder(out_dir)")
        # The old totals cover the whole earlier process: usable only if it stopped at the checkpoint.
        # Else they are unknown (NaN), not counted twice.
        upto = old is not None and int(old["steps_done"]) <= step
        self._diag_s = float(old["diag_seconds"]) if upto else math.nan
        self._balance_s0 = float(old["balance_seconds"]) if upto else math.nan
        steps = before.steps[before.steps["step"] <= step].sort_values("step")
        for r in steps.itertuples(index=False):
            self._time_at[r.step] = float(r.time_s)
            if r.step_time_s == r.step_time_s:
                self._step_s[r.step] = float(r.step_time_s)
            if r.loss == r.loss:
                self._losses.append((r.step, float(r.loss), float(r.time_s)))
            if r.eval_loss == r.eval_loss:
                self._eval.append((r.step, float(r.eval_loss), float(r.time_s)))
        self._train_s = float(steps["time_s"].max()) if len(steps) else 0.0
        self._step_s.setdefault(step, math.nan)  # steps_done counts the steps before the checkpoint
        layers = before.layers[before.layers["step"] <= step]
        if len(layers):
            self._last_rel = float(layers[layers["step"] == layers["step"].max()]["rel_imbalance"].max())

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._step_t0 = synced_clock(model_device(model))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        self._step_s[step] = synced_clock(model_device(model)) - self._step_t0
        self._train_s += self._step_s[step]
        self._time_at[step] = self._train_s
        # The last step is recorded here, not in on_train_end: by then load_best_model_at_end has put an
        # earlier checkpoint's factors back, and they were recorded as the last step's.
        last = state.max_steps
        layers, spectra = records.due(step, self.layers_every, last), records.due(step, self.spectra_every, last)
        if model is not None and (self.writer is not None or not self._writes) and (layers or spectra):
            self._diagnostics(model, step, layers, spectra)
        if self.writer is not None:
            self.writer.heartbeat({"steps_done": step})

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not logs or self.writer is None:
            return
        step = state.global_step
        grad_norm = logs.get("grad_norm")
        if (self._nonfinite_grad_at is None and isinstance(grad_norm, (int, float))
                and not math.isfinite(grad_norm)):  # logged as it is, where the loss may be a stand-in
            self._nonfinite_grad_at = step
        if "loss" in logs:
            diverged_at = self._diverged_at()
            if diverged_at is None and grad_norm is None and model is not None and not _trained_factors_finite(model):
                # No gradient norm logged (transformers 4.x logs it only when clipping, max_grad_norm > 0): the
                # factors tell instead, else stand-ins went into the steps table until the next diagnostics.
                self._nonfinite_factors_at = diverged_at = self._last_finite_diag + 1
            # From the first sign of divergence on, the Trainer's logged loss is a stand-in (0.0 once all are
            # NaN): the steps table gets no value there, as the summary keeps none (a curve falling to 0).
            diverged = diverged_at is not None and diverged_at <= step
            self._row(step)["loss"] = math.nan if diverged else float(logs["loss"])
            self._losses.append((step, float(logs["loss"]), self._train_s))
        if "eval_loss" in logs:
            self._row(step)["eval_loss"] = float(logs["eval_loss"])
            self._eval.append((step, float(logs["eval_loss"]), self._train_s))
        self._flush(before=step)

    def on_save(self, args, state, control, **kwargs):
        # A checkpoint is saved after its step's logs and evaluation: write that step's buffered row now.
        # Held until the next log, a process killed before then (kill -9, the OOM killer) left the run
        # without the checkpoint's step, and a resume from that checkpoint was refused.
        if self.writer is not None and not self.writer.finished:
            self._flush(before=None)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        # The Trainer leaves its epoch loop here when it stops (max_steps, early stopping, a callback), before
        # load_best_model_at_end puts an earlier checkpoint back: the last factors are still the run's own.
        # (EarlyStoppingCallback needs load_best_model_at_end: on_train_end never saw its stop step's factors.)
        if control.should_training_stop:
            self._record_final(model, state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._writes and (self.writer is None or self.writer.finished):
            return
        # A run that ended without on_epoch_end seeing the stop: its last step, unless the Trainer has
        # reloaded the best checkpoint (its factors are not that step's).
        if not (args.load_best_model_at_end and state.best_model_checkpoint):
            self._record_final(model, state)
        if self._writes:
            self.close("completed")

    def _record_final(self, model, state) -> None:
        """The last step's layers and spectra, and the summary's final imbalance (also with
        layers_every=0), unless on_step_end took this step's diagnostics (the last step is due there)."""
        step = state.global_step
        if model is None or self._diag_at == step or (self._writes and (self.writer is None or self.writer.finished)):
            return
        self._diagnostics(model, step, layers=self.layers_every > 0, spectra=self.spectra_every > 0)

    # -------------------------------------------------------------- writing

    def close(self, status: str = "completed", message: str | None = None) -> None:
        """Write what is buffered, the summary row, and mark the run (called by on_train_end)."""
        if self.writer is None or self.writer.finished:
            return
        self._flush(before=None)
        self.writer.append("summary", [self._summary(status)])
        self.writer.heartbeat({"done": 1}, force=True)
        self.writer.finish(status, message)
        atexit.unregister(self._at_exit)

    def _at_exit(self) -> None:
        self.close("interrupted", "the process ended before training finished (crash or Ctrl-C)")

    def _row(self, step: int) -> dict:
        return self._rows.setdefault(step, {**self.key, "step": step})

    def _flush(self, before: int | None) -> None:
        steps = sorted(s for s in self._rows if before is None or s < before)
        rows = []
        for s in steps:
            row = self._rows.pop(s)
            row.update(time_s=self._time_at.get(s, self._train_s), step_time_s=self._step_s.get(s, math.nan),
                       balance_time_s=math.nan, diag_time_s=math.nan, eval_time_s=math.nan)
            rows.append(row)
        self.writer.append("steps", rows)

    def _diagnostics(self, model, step: int, layers: bool = True, spectra: bool = True) -> None:
        """Layer report rows of the model now -> layers and/or spectra rows (dW includes the scaling)."""
        self._diag_at = step
        t = synced_clock(model_device(model))  # the training kernels still queued are not the diagnostics'
        pairs = [p for p in iter_lora_pairs(model, self.adapter) if p.skip_reason is None]
        if self.writer is None:  # a rank other than 0: its part in the collectives (the walk) is done
            return
        with torch.no_grad():
            rows = pair_rows(pairs)
        self._last_rel = records.max_rel_imbalance(rows)
        if any(r["status"].startswith("non-finite") for r in rows):
            if self._nonfinite_factors_at is None:  # they went bad after the last finite diagnostics
                self._nonfinite_factors_at = self._last_finite_diag + 1
        elif self._nonfinite_factors_at is None:
            self._last_finite_diag = step
        layer_rows, spectra_rows = records.split_report(self.key, step, rows, layers=layers, spectra=spectra)
        self.writer.append("layers", layer_rows)
        self.writer.append("spectra", spectra_rows)
        self._diag_s += time.perf_counter() - t

    def _diverged_at(self) -> int | None:
        """The first step with a sign of divergence seen so far (non-finite gradient norm or factors)."""
        signs = [s for s in (self._nonfinite_grad_at, self._nonfinite_factors_at) if s is not None]
        return min(signs, default=None)

    def _summary(self, status: str) -> dict:
        # Divergence shows in the logged loss, an eval loss or the factors. The Trainer's default
        # logging_nan_inf_filter logs a NaN training loss as a finite stand-in (0.0 once all are NaN),
        # so losses logged from the first sign on are not kept as results.
        signs = [(s, f"non-finite logged loss at step {s}") for s, v, _ in self._losses if not math.isfinite(v)][:1]
        signs += [(s, f"non-finite eval loss at step {s}") for s, v, _ in self._eval if not math.isfinite(v)][:1]
        if self._nonfinite_grad_at is not None:
            signs.append((self._nonfinite_grad_at, f"non-finite gradient norm at step {self._nonfinite_grad_at}"))
        if self._nonfinite_factors_at is not None:
            signs.append((self._nonfinite_factors_at, "non-finite LoRA factors after step "
                          f"{self._nonfinite_factors_at - 1}"))
        first, reason = min(signs) if signs else (None, None)
        if first is not None and status == "completed":
            status = "diverged"
        else:
            reason = None
        losses = [x for x in self._losses if first is None or x[0] < first]
        evals = [x for x in self._eval if first is None or x[0] < first]
        on_eval = bool(self._eval)
        balance_s = (self._balance_s0 + float(self.balance_callback.balance_seconds)
                     if self.balance_callback is not None else math.nan)
        return records.summary_row(
            self.key, status, reason, steps_done=max(self._step_s, default=0), losses=[v for _, v, _ in losses],
            final_eval_loss=evals[-1][1] if evals else math.nan, rel_imbalance_max=self._last_rel,
            target=self.target_loss, target_on="eval_loss" if on_eval else "loss",
            reached=records.first_reached(evals if on_eval else losses, self.target_loss),
            total_seconds=self._train_s, balance_seconds=balance_s, diag_seconds=self._diag_s)


def _trained_factors_finite(model) -> bool:
    """Whether every trained LoRA factor this process holds is finite: local (an FSDP2 shard is read where
    it is), so it needs no collective in on_log, which rank 0 alone acts on."""
    from balora.distributed import local_storage

    return all(bool(torch.isfinite(local_storage(p.detach())).all()) for n, p in model.named_parameters()
               if p.requires_grad and ".lora_" in n)


def _eval_every(args, state) -> int | None:
    """Optimizer steps between the Trainer's evaluations: its eval_steps as it resolved them (a fraction of
    the run made a count; logging_steps when unset), 0 without evaluation, None per epoch (no fixed count)."""
    strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
    if strategy != "steps":
        return 0 if strategy == "no" else None
    return int(getattr(state, "eval_steps", None) or args.eval_steps or args.logging_steps or 0)


def _optim_name(args) -> str:
    """TrainingArguments.optim as its name ("adamw_torch_fused"): transformers 5's str() of the enum gave its repr."""
    optim = getattr(args, "optim", "")
    return str(getattr(optim, "value", optim))


def _alpha(lora: dict) -> float:
    """The cell's alpha: the adapter's lora_alpha, 0 for a model without a LoRA adapter (a full fine-tune,
    another PEFT method). Not NaN: config.json holds numbers only, and the tables are grouped by it."""
    alpha = lora.get("lora_alpha")
    return float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else 0.0


def _lora_config(model, adapter: str | None) -> dict:
    """r, lora_alpha, target modules... of the PEFT adapter, as plain JSON values ({} if not a PEFT model)."""
    configs = peft_configs(model)
    cfg = configs.get(adapter or "default") or next(iter(configs.values()), None)
    if cfg is None:
        return {}
    out = {}
    for key in ("r", "lora_alpha", "use_rslora", "use_dora", "lora_dropout", "target_modules", "init_lora_weights"):
        value = getattr(cfg, key, None)
        out[key] = sorted(value) if isinstance(value, set) else value
    return out
