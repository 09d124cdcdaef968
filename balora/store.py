"""The run store: one directory per run, written incrementally and atomically, read by load_run().

    RUN/
      config.json    what was run: task, arms, seeds, steps, optimizer, lrs, alphas, rank, ..., "command"
      env.json       python/torch/peft/transformers/balora versions, device, cpu count, platform
      status.json    {"status": "running"|"completed"|"failed"|"interrupted", "started", "updated",
                      "finished" (ISO times, finished null while running), "message" (null or why it stopped),
                      "progress": {"done", "total"} (cells) + {"steps_done", "steps_total"}, "pid", "host"}
      steps/part-NNNNN.parquet     \
      layers/part-NNNNN.parquet     | tables, appended as new part files; columns below
      spectra/part-NNNNN.parquet    |
      summary/part-NNNNN.parquet   /

Every table starts with the cell key arm (string), seed (int64), lr (float64), alpha (float64):
  steps    step (1-based), loss (of the batch of that step, before its update), eval_loss (NaN when not
           evaluated), excess_loss (loss - best rank-r loss; NaN when unknown), time_s (cumulative training
           wall-clock of the cell: step + balancing, without diagnostics and eval), step_time_s (forward,
           backward, optimizer step), balance_time_s, diag_time_s (layer report + spectra), eval_time_s.
  layers   step (0 = before training, then every layers_every steps and the last step; after the update
           and the balancing of that step) + balora.REPORT_COLUMNS without the sigma lists.
  spectra  step, module, adapter, which ("dW" | "A" | "B"), index (0-based, descending), value.
           dW includes the LoRA scaling s. Written at step 0, every spectra_every steps and the last step.
  summary  one row per cell when it ends: status ("completed" | "diverged" | "failed" | "skipped" |
           "interrupted"), reason, steps_done, final_loss, min_loss, best_loss, final_excess_loss,
           final_eval_loss, final_rel_imbalance_max, target_loss, target_on ("loss" | "eval_loss"),
           steps_to_target, seconds_to_target (NaN when not reached), total_seconds, balance_seconds,
           diag_seconds, speedup_steps, speedup_seconds (the lora cell's steps/seconds to target divided by
           this cell's, for the lora cell of the same seed, lr and alpha; NaN when either did not reach it).

Atomicity: each part file and each JSON file is written under a temporary name in the same folder
and renamed into place, so a reader never sees half a file. A killed writer leaves complete parts
and a status that load_run reports as "running" with status_info["stale"] = True (the writing
process is gone, or `updated` is older than STALE_AFTER_S); Ctrl-C, SIGTERM and exceptions are
recorded as "interrupted" / "failed" by RunWriter's context manager. When a run finishes, each
table's parts are merged into one (rows are de-duplicated on load in case that merge was cut short).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from balora.errors import InputError
from balora.report import REPORT_COLUMNS

STATUSES = ("running", "completed", "failed", "interrupted")
CELL_STATUSES = ("completed", "diverged", "failed", "skipped", "interrupted")
STALE_AFTER_S = 600.0  # a "running" run not updated for this long is reported stale
HEARTBEAT_S = 30.0  # the runner rewrites status.json at least this often while running

KEY_COLUMNS: dict[str, str] = {"arm": "string", "seed": "int64", "lr": "float64", "alpha": "float64"}
_SPECTRA_LISTS = ("sigma", "sigma_A", "sigma_B")

TABLES: dict[str, dict[str, str]] = {
    "steps": {
        **KEY_COLUMNS,
        "step": "int64",
        "loss": "float64",
        "eval_loss": "float64",
        "excess_loss": "float64",
        "time_s": "float64",
        "step_time_s": "float64",
        "balance_time_s": "float64",
        "diag_time_s": "float64",
        "eval_time_s": "float64",
    },
    "layers": {**KEY_COLUMNS, "step": "int64",
               **{k: v for k, v in REPORT_COLUMNS.items() if k not in _SPECTRA_LISTS}},
    "spectra": {
        **KEY_COLUMNS,
        "step": "int64",
        "module": "string",
        "adapter": "string",
        "which": "string",
        "index": "int64",
        "value": "float64",
    },
    "summary": {
        **KEY_COLUMNS,
        "status": "string",
        "reason": "string",
        "steps_done": "int64",
        "final_loss": "float64",
        "min_loss": "float64",
        "best_loss": "float64",
        "final_excess_loss": "float64",
        "final_eval_loss": "float64",
        "final_rel_imbalance_max": "float64",
        "target_loss": "float64",
        "target_on": "string",
        "steps_to_target": "float64",
        "seconds_to_target": "float64",
        "total_seconds": "float64",
        "balance_seconds": "float64",
        "diag_seconds": "float64",
        "speedup_steps": "float64",
        "speedup_seconds": "float64",
    },
}
# Rows that are the same measurement: used to drop duplicates left by an interrupted merge.
UNIQUE: dict[str, list[str]] = {
    "steps": [*KEY_COLUMNS, "step"],
    "layers": [*KEY_COLUMNS, "step", "module", "adapter"],
    "spectra": [*KEY_COLUMNS, "step", "module", "adapter", "which", "index"],
    "summary": [*KEY_COLUMNS],
}


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(obj: Any) -> Any:
    """Strict JSON: non-finite floats become null, paths and other objects their str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def to_table(table: str, rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
    """Rows -> a frame with exactly the table's columns, in order, with their dtypes (also when empty)."""
    columns = TABLES[table]
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    df = df.reindex(columns=list(columns))
    return df.astype(columns)


def environment_info(device: str) -> dict:
    """Versions and machine facts worth keeping beside a run."""
    import numpy
    import peft
    import pyarrow
    import torch
    import transformers

    import balora

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "versions": {
            "balora": balora.__version__,
            "torch": torch.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
            "numpy": numpy.__version__,
            "pandas": pd.__version__,
            "pyarrow": pyarrow.__version__,
        },
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["cuda"] = {"name": torch.cuda.get_device_name(torch.device(device)), "version": torch.version.cuda}
    return info


def is_run_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "status.json").is_file()


class RunWriter:
    """Creates a run directory and appends to it. Use as a context manager:

        with RunWriter(out, config, env) as w:   # exit: completed; Ctrl-C/SIGTERM: interrupted; error: failed
            w.append("steps", rows)

    force: replace an existing run directory (a folder that is not a balora run is never removed).
    """

    def __init__(self, path: str | Path, config: dict, env: dict | None = None, *, force: bool = False,
                 flag: str = "--out"):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"{flag} {self.path}: exists and is not a directory; choose another path")
        if self.path.is_dir() and any(self.path.iterdir()):
            if not force:
                raise InputError(f"{flag} {self.path}: directory exists and is not empty; choose another path "
                                 "or pass --force to replace a previous run there")
            if not is_run_dir(self.path):
                raise InputError(f"{flag} {self.path}: not empty and not a balora run, so --force will not delete it; "
                                 "choose another path")
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        for table in TABLES:
            (self.path / table).mkdir(exist_ok=True)
        self.config = dict(config)
        self._parts = {table: 0 for table in TABLES}
        self._last_beat = 0.0
        self.status: dict[str, Any] = {
            "status": "running",
            "started": now_iso(),
            "updated": now_iso(),
            "finished": None,
            "message": None,
            "progress": {"done": 0, "total": 0, "steps_done": 0, "steps_total": 0},
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        write_json_atomic(self.path / "config.json", self.config)
        write_json_atomic(self.path / "env.json", env or {})
        write_json_atomic(self.path / "status.json", self.status)

    @property
    def finished(self) -> bool:
        return self.status["status"] != "running"

    def update_config(self, **extra: Any) -> None:
        self.config.update(extra)
        write_json_atomic(self.path / "config.json", self.config)

    def append(self, table: str, rows: list[dict] | pd.DataFrame) -> Path | None:
        """Write rows as the next part file of `table` (temp name, then rename). No rows: no file."""
        df = to_table(table, rows)
        if df.empty:
            return None
        self._parts[table] += 1
        part = self.path / table / f"part-{self._parts[table]:05d}.parquet"
        tmp = part.with_name(f".{part.name}.tmp")
        df.to_parquet(tmp, index=False)
        os.replace(tmp, part)
        return part

    def heartbeat(self, progress: dict | None = None, *, force: bool = False) -> None:
        """Refresh `updated` (and progress) in status.json; at most every HEARTBEAT_S unless forced."""
        if progress:
            self.status["progress"].update(progress)
        t = time.monotonic()
        if force or t - self._last_beat >= HEARTBEAT_S:
            self._last_beat = t
            self.status["updated"] = now_iso()
            write_json_atomic(self.path / "status.json", self.status)

    def finish(self, status: str, message: str | None = None) -> None:
        """Mark the run finished; merges each table's parts into one first (best effort)."""
        if status not in STATUSES[1:]:
            raise ValueError(f"finish: status must be one of {STATUSES[1:]}, got {status!r}")
        try:
            self.compact()
        except Exception as e:  # the parts are still there and loadable; only tidiness is lost
            message = f"{message or ''} (parts not merged: {type(e).__name__}: {e})".strip()
        self.status.update(status=status, message=message, finished=now_iso(), updated=now_iso())
        write_json_atomic(self.path / "status.json", self.status)

    def compact(self) -> None:
        """Replace each table's part files by one, so a finished run is a handful of files."""
        for table in TABLES:
            parts = sorted((self.path / table).glob("part-*.parquet"))
            if len(parts) < 2:
                continue
            frames = [pd.read_parquet(p) for p in parts]
            self._parts[table] = max(self._parts[table], _part_number(parts[-1]))
            merged = self.append(table, pd.concat(frames, ignore_index=True))
            for p in parts:
                if p != merged:
                    p.unlink()

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.finished:
            return False
        if exc_type is None:
            self.finish("completed")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("interrupted", str(exc) or "interrupted (Ctrl-C / SIGINT)")
        else:
            self.finish("failed", f"{exc_type.__name__}: {exc}")
        return False


def _part_number(path: Path) -> int:
    try:
        return int(path.stem.split("-")[1])
    except (IndexError, ValueError):
        return 0


@dataclass
class Run:
    """A loaded run. Tables keep their columns when empty; `warnings` lists what could not be read."""

    path: Path
    config: dict
    env: dict
    status: str  # running | completed | failed | interrupted (or "unknown" if status.json is unreadable)
    status_info: dict  # status.json + "stale" (bool) + "stale_reason"
    steps: pd.DataFrame
    layers: pd.DataFrame
    spectra: pd.DataFrame
    summary: pd.DataFrame
    warnings: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.status == "completed"

    @property
    def stale(self) -> bool:
        return bool(self.status_info.get("stale"))

    def __repr__(self) -> str:
        stale = " (stale)" if self.stale else ""
        return (f"Run({str(self.path)!r}, task={self.config.get('task')!r}, status={self.status!r}{stale}, "
                f"steps={len(self.steps)} rows, cells={len(self.summary)})")


def _read_json(path: Path, warnings: list[str]) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        warnings.append(f"{path.name}: missing")
    except (OSError, ValueError) as e:
        warnings.append(f"{path.name}: unreadable ({type(e).__name__}: {e})")
    return {}


def _read_table(run: Path, table: str, warnings: list[str]) -> pd.DataFrame:
    frames = []
    for part in sorted((run / table).glob("part-*.parquet")):
        try:
            frames.append(pd.read_parquet(part))
        except Exception as e:  # truncated or corrupted: skip it, say so, never crash
            warnings.append(f"{table}/{part.name}: unreadable, skipped ({type(e).__name__}: {e})")
    columns = TABLES[table]
    if not frames:
        return to_table(table, [])
    df = pd.concat(frames, ignore_index=True)
    extra = [c for c in df.columns if c not in columns]
    try:
        df = pd.concat([to_table(table, df), df[extra]], axis=1)
    except (ValueError, TypeError) as e:
        warnings.append(f"{table}: columns do not have the documented dtypes ({e}); left as read")
        return df
    before = len(df)
    df = df.drop_duplicates(subset=UNIQUE[table], keep="last", ignore_index=True)
    if len(df) < before and table != "summary":
        warnings.append(f"{table}: {before - len(df)} duplicate row(s) dropped (an interrupted merge of parts)")
    return df


def _stale(status: dict, stale_after_s: float) -> tuple[bool, str | None]:
    if status.get("status") != "running":
        return False, None
    pid, host = status.get("pid"), status.get("host")
    if isinstance(pid, int) and host == socket.gethostname() and pid != os.getpid():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True, f"the writing process (pid {pid}) is gone"
        except PermissionError:  # alive, owned by someone else
            pass
    try:
        updated = _dt.datetime.fromisoformat(status["updated"])
    except (KeyError, TypeError, ValueError):
        return True, "no valid 'updated' time in status.json"
    age = (_dt.datetime.now(_dt.timezone.utc) - updated).total_seconds()
    if age > stale_after_s:
        return True, f"not updated for {age / 60:.0f} min"
    return False, None


def load_run(path: str | Path, *, stale_after_s: float = STALE_AFTER_S) -> Run:
    """Read a run directory (complete, partial, or from a crashed writer) into a Run."""
    run = Path(path)
    if not run.is_dir():
        raise InputError(f"{run}: no such run directory; pass a folder written by `balora compare` or RunRecorder")
    if not (run / "config.json").is_file() and not (run / "status.json").is_file():
        raise InputError(f"{run}: not a balora run (no config.json or status.json); pass a folder written by "
                         "`balora compare` or RunRecorder")
    warnings: list[str] = []
    config = _read_json(run / "config.json", warnings)
    env = _read_json(run / "env.json", warnings)
    status = _read_json(run / "status.json", warnings)
    stale, why = _stale(status, stale_after_s)
    info = {**status, "stale": stale, "stale_reason": why}
    tables = {t: _read_table(run, t, warnings) for t in TABLES}
    return Run(run, config, env, status.get("status", "unknown"), info, warnings=warnings, **tables)


def list_runs(root: str | Path, max_depth: int = 3) -> pd.DataFrame:
    """One row per run directory at or below `root` (config and status only: cheap)."""
    columns = {"path": "string", "name": "string", "task": "string", "status": "string", "stale": "bool",
               "started": "string", "finished": "string", "arms": "string", "seeds": "string",
               "n_cells": "int64", "done": "int64"}
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such directory; pass the folder that holds your runs")
    rows = []
    for run in _find_runs(root, max_depth):
        warnings: list[str] = []
        config = _read_json(run / "config.json", warnings)
        status = _read_json(run / "status.json", warnings)
        stale, _ = _stale(status, STALE_AFTER_S)
        progress = status.get("progress") or {}
        rows.append({
            "path": str(run),
            "name": run.name,
            "task": config.get("task"),
            "status": status.get("status", "unknown"),
            "stale": stale,
            "started": status.get("started"),
            "finished": status.get("finished"),
            "arms": ",".join(map(str, config.get("arms") or [])),
            "seeds": ",".join(map(str, config.get("seeds") or [])),
            "n_cells": int(config.get("n_cells") or progress.get("total") or 0),
            "done": int(progress.get("done") or 0),
        })
    return pd.DataFrame(rows, columns=list(columns)).astype(columns)


def _find_runs(root: Path, max_depth: int) -> list[Path]:
    if is_run_dir(root):
        return [root]
    if max_depth == 0:
        return []
    found: list[Path] = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found.extend(_find_runs(child, max_depth - 1))
    return found
