"""Writing a run directory: RunWriter (incremental, atomic), and replacing an earlier run with --force."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from balora.errors import InputError
from balora.safe_io import user_path
from balora.store.json_files import RunError, read_config, read_status
from balora.store.layout import (CONFIG, ENV, HEARTBEAT_S, MARKER, RUN_FILES, STATUS, STATUSES, TABLES, is_json_tmp,
                                 is_marked, is_part_file, is_run_dir, marker_text, part_name, table_parts, to_table)
from balora.store.reader import refuse_inside_run, refuse_live_writer


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


# ------------------------------------------------------------------ what --force may delete


def _split_entries(path: Path) -> tuple[list[Path], list[str]]:
    """(files balora wrote in the run folder `path`, names of everything else there, folders ending in "/").

    balora's: config/env/status.json and their temporary names, the marker, and part files inside the
    table folders. A symlink counts by its own name and is removed as a link, never followed.
    """
    ours: list[Path] = []
    foreign: list[str] = []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        is_dir = entry.is_dir(follow_symlinks=False)
        if (entry.name in RUN_FILES or entry.name == MARKER or is_json_tmp(entry.name)) and not is_dir:
            ours.append(Path(entry.path))
        elif entry.name in TABLES and is_dir:
            for part in sorted(os.scandir(entry.path), key=lambda e: e.name):
                if is_part_file(part.name) and not part.is_dir(follow_symlinks=False):
                    ours.append(Path(part.path))
                else:
                    foreign.append(f"{entry.name}/{part.name}" + ("/" if part.is_dir(follow_symlinks=False) else ""))
        else:
            foreign.append(entry.name + ("/" if is_dir else ""))
    return ours, foreign


def foreign_entries(path: str | Path) -> list[str]:
    """What a run folder holds that balora did not write (what `--force` leaves in place)."""
    return _split_entries(Path(path))[1]


def _looks_like_old_run(path: Path) -> bool:
    """A run written before the marker existed: its config and status must read as balora's."""
    try:
        config, status = read_config(path, missing_ok=False), read_status(path, missing_ok=False)
    except RunError:
        return False
    return isinstance(config.get("task"), str) and status.get("status") in STATUSES


def clear_run(path: str | Path, flag: str = "--out") -> list[str]:
    """Delete what an earlier balora run wrote in `path` (the --force of `balora compare`); everything else
    stays. Returns the names of what stayed. A folder neither marked by balora nor holding an older balora
    run (readable config.json and status.json) is refused with an InputError and left untouched."""
    path = Path(path)
    if not is_marked(path) and not (is_run_dir(path) and _looks_like_old_run(path)):
        raise InputError(f"{flag} {path}: not empty and not a balora run, so --force will not delete anything "
                         "in it; choose another path")
    refuse_live_writer(path, flag, "replacing")
    ours, foreign = _split_entries(path)
    marker = path / MARKER
    for p in ours:
        if p != marker:
            p.unlink(missing_ok=True)
    for table in TABLES:
        folder = path / table
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()
    marker.unlink(missing_ok=True)  # last: a cut-short clear still leaves the folder marked as balora's
    return foreign


# ------------------------------------------------------------------ the writer


# Parts of one size class merged into one while a run is live (RunWriter._roll), unless together they
# exceed MERGE_MAX_BYTES (a merge that large would stall training for seconds; the finish merges them).
# Measured with benchmarks/bench_live_load.py (see docs/BENCHMARKS.md).
MERGE_EVERY = 8
MERGE_MAX_BYTES = 16 * 2**20


class RunFolderTaken(InputError):
    """The run folder holds something already, or another writer claimed it first (balora.runner then
    moves a default folder name on to the next one)."""


def _claim(marker: Path, flag: str) -> None:
    """Write the marker only if no one has: two writers that both found the folder empty (two `balora
    compare` started in the same second pick the same default name) must not both write into it."""
    try:
        with open(marker, "x", encoding="utf-8") as f:
            f.write(marker_text(now_iso()))
    except FileExistsError:
        raise RunFolderTaken(f"{flag} {marker.parent}: another balora run started writing there just now; "
                             "choose another path") from None
    except OSError as e:  # a folder the user cannot write to
        raise InputError(f"{flag} {marker.parent}: cannot write the run there ({e.strerror or e}); "
                         "choose a folder you can write to") from e


class RunWriter:
    """Creates a run directory and appends to it. Use as a context manager:

        with RunWriter(out, config, env) as w:   # exit: completed; Ctrl-C/SIGTERM: interrupted; error: failed
            w.append("steps", rows)

    force: replace an earlier run at `path`, deleting only the files that run wrote (clear_run); `kept`
    lists what else was in the folder and stays there. A folder that is not a balora run is never touched.

    merge_every: while the run is live, every merge_every parts of a table of one size class are merged
    into one (_roll); 0: parts are only merged when the run finishes (what balora did before).
    """

    merge_every, merge_max_bytes = MERGE_EVERY, MERGE_MAX_BYTES

    def __init__(self, path: str | Path, config: dict, env: dict | None = None, *, force: bool = False,
                 flag: str = "--out"):
        self.path = user_path(path)  # as pandas does for the part files: never a folder named ~
        self.kept: list[str] = []
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderTaken(f"{flag} {self.path}: exists and is not a directory; choose another path")
        refuse_inside_run(self.path, flag)  # not RunFolderTaken: the next default name would be inside it too
        if self.path.is_dir() and any(self.path.iterdir()):
            if not force:  # offer --force only where it works: a balora run that no other process still writes
                if ours := is_marked(self.path) or (is_run_dir(self.path) and _looks_like_old_run(self.path)):
                    refuse_live_writer(self.path, flag, "replacing", RunFolderTaken)  # a default name moves on
                raise RunFolderTaken(f"{flag} {self.path}: directory exists and is not empty" + (
                    "; choose another path or pass --force (force=True in Python) to replace the balora run there"
                    if ours else " and is not a balora run; choose another path"))
            for table in TABLES:  # checked before anything is deleted: a refusal leaves the folder as it was
                folder = self.path / table
                if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                    raise InputError(f"{flag} {self.path}: {table} is not a folder balora made (a link or a "
                                     "file); move it away or choose another path")
            self.kept = clear_run(self.path, flag)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # under a file, a read-only folder: the user's path, not a bug
            raise InputError(f"{flag} {self.path}: cannot create the run folder ({e.strerror or e}); "
                             "choose a folder you can write to") from e
        _claim(self.path / MARKER, flag)
        for table in TABLES:
            (self.path / table).mkdir(exist_ok=True)
        self.config = dict(config)
        self._parts = {table: 0 for table in TABLES}
        self._roll_failed: dict[str, str] = {}
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
        # status.json first: a marked folder with a config.json and no status reads as a damaged run
        write_json_atomic(self.path / STATUS, self.status)
        write_json_atomic(self.path / ENV, env or {})
        write_json_atomic(self.path / CONFIG, self.config)

    @classmethod
    def reopen(cls, path: str | Path, keep_through: int, *, flag: str = "--out") -> "RunWriter":
        """The run balora wrote at `path`, to write on (a Trainer run resumed from a checkpoint): rows
        of its tables after step `keep_through` are dropped, as is its summary (the resumed training
        records them again); it is marked running again, its start time and config kept."""
        path = Path(path)
        if not (is_marked(path) and is_run_dir(path)):
            raise InputError(f"{flag} {path}: not a run balora wrote, so it cannot be resumed; choose another path")
        self = cls.__new__(cls)
        self.path, self.kept, self._last_beat = path, [], 0.0
        refuse_live_writer(path, flag, "resuming")
        self.config = read_config(path, missing_ok=False)
        self.status = {**read_status(path, missing_ok=False), "status": "running", "finished": None,
                       "message": None, "updated": now_iso(), "pid": os.getpid(), "host": socket.gethostname()}
        self._parts = {table: 0 for table in TABLES}
        self._roll_failed = {}
        for table in TABLES:
            (path / table).mkdir(exist_ok=True)
            self._rewrite(table, lambda df, table=table: df.iloc[0:0] if table == "summary"
                          else df[df["step"] <= keep_through] if "step" in df else df)
        write_json_atomic(path / STATUS, self.status)
        return self

    @property
    def finished(self) -> bool:
        return self.status["status"] != "running"

    def update_config(self, **extra: Any) -> None:
        self.config.update(extra)
        write_json_atomic(self.path / CONFIG, self.config)

    def append(self, table: str, rows: list[dict] | pd.DataFrame) -> Path | None:
        """Write rows as the next part file of `table` (temp name, then rename). No rows: no file.
        Returns the part written (a rolling merge may have folded it into a merged part already)."""
        df = to_table(table, rows)
        if df.empty:
            return None
        self._parts[table] += 1
        part = self._write_part(table, df, self._parts[table])
        self._roll(table)
        return part

    def _write_part(self, table: str, df: pd.DataFrame, first: int, last: int | None = None) -> Path:
        part = self.path / table / part_name(first, last)
        tmp = part.with_name(f".{part.name}.tmp")
        try:
            df.to_parquet(tmp, index=False)
        except BaseException:  # a full disk, Ctrl-C: no half-written temporary file left behind
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, part)
        return part

    def _roll(self, table: str) -> None:
        """Rolling merge while the run is live, so that a reload (the dashboard's, every refresh) reads a
        few parts instead of one per cell: the newest merge_every parts of `table`, when they are of one
        size class (_size_class), become one part of the next class. Each row is rewritten once per
        class (about log(parts) / log(merge_every) times over a run), never all of them at every append;
        a table holds at most merge_every - 1 parts per class below merge_max_bytes / merge_every bytes
        (larger ones are not merged until the run finishes). A merge that fails leaves its parts as
        they were (all loadable); the table is not merged again until the run finishes."""
        k = self.merge_every
        if k < 2 or table in self._roll_failed:
            return
        while True:
            live, _ = table_parts(self.path / table)
            tail = live[-k:]
            if len(tail) < k or len({_size_class(first, last, k) for first, last, _ in tail}) != 1:
                return
            if sum(p.stat().st_size for *_, p in tail) > self.merge_max_bytes:
                return  # parts this big are few and read fast; they wait for the finish
            try:
                self._merge(table, tail)
            except Exception as e:
                self._roll_failed[table] = f"{type(e).__name__}: {e}"
                return

    def heartbeat(self, progress: dict | None = None, *, force: bool = False) -> None:
        """Refresh `updated` (and progress) in status.json; at most every HEARTBEAT_S unless forced."""
        if progress:
            self.status["progress"].update(progress)
        t = time.monotonic()
        if force or t - self._last_beat >= HEARTBEAT_S:
            self._last_beat = t
            self.status["updated"] = now_iso()
            write_json_atomic(self.path / STATUS, self.status)

    def finish(self, status: str, message: str | None = None) -> None:
        """Mark the run finished, then merge each table's parts into one (best effort: a merge cut short
        leaves parts that load as they are, those its merged part covers skipped)."""
        if status not in STATUSES[1:]:
            raise ValueError(f"finish: status must be one of {STATUSES[1:]}, got {status!r}")
        # The status first: merging a long run's thousands of parts takes seconds, and a Ctrl-C then
        # (or a second one) left a run whose cells had all ended marked "running".
        self.status.update(status=status, message=message, finished=now_iso(), updated=now_iso())
        write_json_atomic(self.path / STATUS, self.status)
        try:
            self.compact()
        except Exception as e:  # the parts are still there and loadable; only tidiness is lost
            self.status["message"] = f"{message or ''} (parts not merged: {type(e).__name__}: {e})".strip()
            write_json_atomic(self.path / STATUS, self.status)

    def compact(self) -> None:
        """Replace each table's part files by one, so a finished run is a handful of files."""
        for table in TABLES:
            self._rewrite(table, min_parts=2)

    def _rewrite(self, table: str, keep: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
                 min_parts: int = 1) -> None:
        """Replace `table`'s part files (at least min_parts of them) by one part named after the range
        they cover, holding their rows, or those `keep` returns (none: no part at all). Parts a merged
        part covers (left by a merge cut short) are deleted, never read."""
        live, covered = table_parts(self.path / table)
        if live:
            self._parts[table] = max(self._parts[table], max(last for _, last, _ in live))
        if len(live) < min_parts:
            for *_, p in covered:
                p.unlink(missing_ok=True)
            return
        self._merge(table, live, keep)

    def _merge(self, table: str, parts: list[tuple[int, int, Path]],
               keep: Callable[[pd.DataFrame], pd.DataFrame] | None = None) -> None:
        """One part for `parts` (consecutive entries of table_parts), named after the range it covers.

        The order makes a merge safe to read at any moment and to cut short at any step: the merged part
        is written under a temporary name and renamed into place (a reader lists the old parts, or the
        merged one and the old ones it covers, which it skips), and only then are the old parts deleted
        (a reader that lost one lists again). A crash before the deletes leaves covered parts, skipped."""
        first, last = parts[0][0], max(p[1] for p in parts)
        _, covered = table_parts(self.path / table)
        gone = [*parts, *(c for c in covered if first <= c[0] and c[1] <= last)]
        for *_, p in gone:  # a crafted folder: a directory, FIFO or link named like a part is not ours to read or delete
            if not stat.S_ISREG(os.lstat(p).st_mode):
                raise InputError(f"{p}: named like a part file but not a regular file; balora wrote no such thing "
                                 "(remove it to let the run's parts be merged)")
        rows = pd.concat([pd.read_parquet(p) for *_, p in parts], ignore_index=True)
        if keep is not None:
            rows = keep(rows)
        merged = self._write_part(table, to_table(table, rows), first, last) if len(rows) else None
        for *_, p in gone:
            if p != merged:
                p.unlink(missing_ok=True)

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


def _size_class(first: int, last: int, k: int) -> int:
    """floor(log_k(number of parts covered)): 0 for a part of one append, 1 for a merge of k of them, ..."""
    size, level = last - first + 1, 0
    while size >= k:
        size //= k
        level += 1
    return level
