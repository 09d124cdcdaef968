"""Reading runs: load_run (one run, tolerant of partial and crashed runs) and list_runs (many, cheap)."""

from __future__ import annotations

import datetime as _dt
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from balora.errors import InputError
from balora.safe_io import is_inside, regular_file_size, user_path
from balora.store.json_files import RunError, read_config, read_env, read_status
from balora.store.layout import (CONFIG, STALE_AFTER_S, STATUS, TABLES, UNIQUE, is_marked, is_run_dir, part_gaps,
                                 table_parts, to_table)


@dataclass
class Run:
    """A loaded run. Tables keep their columns when empty; `warnings` lists what could not be read."""

    path: Path
    config: dict
    env: dict
    status: str  # running | completed | failed | interrupted (or "unknown" if status.json is missing)
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


def _read_parts(run: Path, table: str, warnings: list[str]) -> list[pd.DataFrame]:
    """The table's part files, read, skipping parts that a merged part covers (layout.table_parts).

    The writer merges parts while the run is live (and all of them when it finishes): a part gone since
    the listing was merged into a new one, so the folder is listed again and only the parts not read yet
    are read (the merged part holds the rows of those that vanished). A listing with a gap in the part
    numbers may have raced a merge (the merged part written during the listing, its parts deleted before
    it reached them): listed again too."""
    read: dict[Path, pd.DataFrame] = {}
    problems: dict[Path, str] = {}
    for _ in range(5):
        live, _covered = table_parts(run / table)
        vanished = False
        for *_range, part in live:
            if part in read or part in problems:
                continue
            try:
                regular_file_size(part, "part file")  # a FIFO would block the reader, a device never end
                if not is_inside(part, run):  # another run's rows, or any parquet file this user can read
                    raise InputError("a symbolic link out of the run folder, not followed (copy the real "
                                     "file in if you trust it)")
                read[part] = pd.read_parquet(part)
            except Exception as e:  # truncated or corrupted: skip it, say so, never crash
                if not os.path.lexists(part):
                    vanished = True
                else:
                    problems[part] = f"{table}/{part.name}: unreadable, skipped ({type(e).__name__}: {e})"
        if not vanished and not part_gaps(live):
            break
    for *_range, p in live:
        if p in problems:
            warnings.append(problems[p])
        elif p not in read:  # the writer merged parts under this reader at every listing
            warnings.append(f"{table}/{p.name}: merged away while it was read, its rows not read; load again")
    gaps = [f"{first}" if first == last else f"{first}-{last}" for first, last in part_gaps(live)]
    if gaps:  # still there after listing again: not a merge under way; say so, or rows go missing unseen
        more = f" and {len(gaps) - 3} more gap(s)" if len(gaps) > 3 else ""
        warnings.append(f"{table}: part(s) {', '.join(gaps[:3])}{more} missing (removed, or a write that failed); "
                        "their rows are not in this run")
    return [read[p] for *_range, p in live if p in read]


def _read_table(run: Path, table: str, warnings: list[str]) -> pd.DataFrame:
    frames = _read_parts(run, table, warnings)
    columns = TABLES[table]
    if not frames:
        return to_table(table, [])
    df = pd.concat(frames, ignore_index=True)
    extra = [c for c in df.columns if c not in columns]
    try:
        df = pd.concat([to_table(table, df), df[extra]], axis=1)
    except (ValueError, TypeError, OverflowError) as e:
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
        except (PermissionError, OverflowError, ValueError):  # alive, owned by someone else / not a real pid
            pass
    try:
        updated = _dt.datetime.fromisoformat(status["updated"])
        if updated.tzinfo is None:
            updated = updated.replace(tzinfo=_dt.timezone.utc)
    except (KeyError, TypeError, ValueError):
        return True, "no valid 'updated' time in status.json"
    age = (_dt.datetime.now(_dt.timezone.utc) - updated).total_seconds()
    if age > stale_after_s:
        return True, f"not updated for {age / 60:.0f} min"
    return False, None


def writer_elsewhere(status: dict) -> int | None:
    """The pid of another live process on this machine that is still writing the run (status.json running,
    its pid alive, not stale); None when there is none, or none this machine can tell of (another host)."""
    pid = status.get("pid")
    if (status.get("status") != "running" or status.get("host") != socket.gethostname()
            or not isinstance(pid, int) or pid == os.getpid()):
        return None
    return None if _stale(status, STALE_AFTER_S)[0] else pid


def refuse_live_writer(path: Path, flag: str, doing: str, error: type[InputError] = InputError) -> None:
    """`error` if another live process still writes the run at `path`: a second writer (a resumed training,
    a --force over it) numbers its parts from the same count, and each replaces and merges away the other's."""
    try:
        pid = writer_elsewhere(read_status(path))
    except RunError:  # a damaged status.json: no writer can be told of
        return
    if pid is not None:
        raise error(f"{flag} {path}: process {pid} on this machine is still writing this run; stop it or "
                         f"let it finish before {doing} it, or choose another path")


def refuse_inside_run(path: Path, flag: str) -> None:
    """InputError if a folder above `path` holds a run: list_runs (the dashboard's listing) stops at a run
    folder and never looks inside it, so a run written there could not be found."""
    from balora.runs_folder import runs_folder

    given, path = path, Path(path).resolve()  # run/../x is beside the run, not inside it
    try:
        runs = runs_folder()
    except InputError:  # a $BALORA_RUNS of ~nouser: said where it is used, not here
        runs = None
    # What `balora dashboard` lists from: the runs folder when `path` is in it, else `path`'s parent (the
    # --runs that compare prints). A run-like folder from there down hides the run. Above the runs folder
    # nothing is listed, so ./runs in a folder that looks like a run is fine. Above another root only a
    # folder balora marked as a run counts: a project folder that merely holds a config.json and a
    # status.json is not refused, but a path under a balora run's own folders (run/steps/x) is.
    in_runs = runs is not None and runs in path.parents
    scope = [p for p in path.parents if p == runs or runs in p.parents] if in_runs else [path.parent]
    outer = next((p for p in path.parents if is_run_dir(p) and (p in scope or (not in_runs and is_marked(p)))),
                 None)
    if outer is not None:
        raise InputError(f"{flag} {given}: inside the balora run {outer}, where the dashboard would never list it; "
                         "choose a path outside that run")


def load_run(path: str | Path, *, stale_after_s: float = STALE_AFTER_S) -> Run:
    """Read a run directory (complete, partial, or from a crashed writer) into a Run.

    Unreadable part files are skipped and listed in `warnings`; a status.json or config.json that cannot
    be used (not a regular file, not a JSON object, fields of the wrong type) raises RunError (an
    InputError) naming the file.
    """
    run = user_path(path)  # as pandas does for the part files
    if not run.is_dir():
        raise InputError(f"{run}: no such run directory; pass a folder written by `balora compare` or RunRecorder")
    if not os.path.lexists(run / CONFIG) and not os.path.lexists(run / STATUS):
        raise InputError(f"{run}: not a balora run (no config.json or status.json); pass a folder written by "
                         "`balora compare` or RunRecorder")
    warnings: list[str] = []
    config, status = read_config(run), read_status(run)
    warnings += [f"{name}: missing" for name, data in ((CONFIG, config), (STATUS, status))
                 if not data and not os.path.lexists(run / name)]
    env = read_env(run, warnings)
    stale, why = _stale(status, stale_after_s)
    info = {**status, "stale": stale, "stale_reason": why}
    tables = {t: _read_table(run, t, warnings) for t in TABLES}
    return Run(run, config, env, status.get("status", "unknown"), info, warnings=warnings, **tables)


LIST_COLUMNS = {"path": "string", "name": "string", "task": "string", "status": "string", "stale": "bool",
                "started": "string", "finished": "string", "arms": "string", "seeds": "string",
                "n_cells": "int64", "done": "int64", "reason": "string"}


def _list_row(run: Path) -> dict:
    """One list_runs row; a damaged run gets status "damaged" and the problem in `reason`."""
    row = {"path": str(run), "name": run.name, "stale": False, "n_cells": 0, "done": 0}
    try:  # a listed run has a status.json, unless it is a marked run that lost it: damaged
        config, status = read_config(run), read_status(run, missing_ok=False)
    except RunError as e:
        return {**row, "status": "damaged", "reason": str(e)}
    progress = status.get("progress") or {}
    return {**row,
            "task": config.get("task"), "status": status.get("status", "unknown"),
            "stale": _stale(status, STALE_AFTER_S)[0], "started": status.get("started"),
            "finished": status.get("finished"), "arms": ",".join(config.get("arms") or []),
            "seeds": ",".join(map(str, config.get("seeds") or [])),
            "n_cells": int(config.get("n_cells") or progress.get("total") or 0),
            "done": int(progress.get("done") or 0), "reason": None}


def list_runs(root: str | Path, max_depth: int = 3) -> pd.DataFrame:
    """One row per run directory at or below `root` (config and status only: cheap). Columns: path, name,
    task, status, stale, started, finished, arms, seeds, n_cells, done, reason. A damaged run (see
    load_run) is listed with status "damaged" and why in `reason`; the other runs are listed as usual."""
    root = user_path(root)  # as load_run: "~/runs" from a notebook, where no shell expanded it
    if not root.is_dir():
        raise InputError(f"{root}: no such directory; pass the folder that holds your runs")
    rows = [_list_row(run) for run in _find_runs(root, max_depth)]
    return pd.DataFrame(rows, columns=list(LIST_COLUMNS)).astype(LIST_COLUMNS)


def _find_runs(root: Path, max_depth: int) -> list[Path]:
    if is_run_dir(root):
        return [root]
    if max_depth == 0:
        return []
    found: list[Path] = []
    try:
        children = sorted(p for p in root.iterdir() if not p.name.startswith(".") and p.is_dir())
    except OSError:  # unreadable folder: nothing to list there
        return []
    for child in children:
        found.extend(_find_runs(child, max_depth - 1))
    return found
