"""Cached loaders over the run store and balora.inspect, and how a page names and marks a run.

Each loader is `st.cache_data` keyed by a cheap "version" of the files (balora.store.run_version
for a run, file stats for a folder), so a run still being written is re-read when it changes and never
otherwise. Nothing here recomputes a diagnostic: imbalance, spectra and conditioning come
from the run store or from balora.inspect as they are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import streamlit as st

from balora import store  # looked up at call time: list_runs, load_run
from balora.store import run_version  # the store's change token for one run (its files' stats)

# A folder with more entries than this is not an adapter: stop walking it, inspect will say so.
MAX_WALK = 2000


# ------------------------------------------------------------------------------ run loading


def runs_version(root: Path, max_depth: int = 3) -> tuple:
    """Changes when a run appears, disappears or rewrites its config or status (balora.list_runs
    looks up to `max_depth` folders down, so this does too). Symlinked folders are not followed."""
    out = []
    frontier = [(Path(root), 0)]
    while frontier:
        folder, depth = frontier.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            out.append((str(folder), "unreadable"))
            continue
        for e in entries:
            if e.name in ("status.json", "config.json"):
                try:
                    out.append((str(folder), e.name, e.stat(follow_symlinks=False).st_mtime_ns))
                except OSError:
                    pass
            elif depth < max_depth and not e.name.startswith(".") and e.is_dir(follow_symlinks=depth == 0):
                frontier.append((Path(e.path), depth + 1))
    return tuple(sorted(out, key=str))


@st.cache_data(show_spinner=False, max_entries=16)
def _list_runs(root: str, version: tuple) -> pd.DataFrame:
    return store.list_runs(root)


def list_runs(root: Path) -> pd.DataFrame:
    """balora.list_runs(root), re-read only when the folder's runs change."""
    return _list_runs(str(root), runs_version(root))


@st.cache_data(show_spinner=False, max_entries=32)
def _load_run(path: str, version: tuple):
    return store.load_run(path)


_LOADED: dict[str, tuple] = {}  # run path -> the version load_run last served


def load_run(path: str | Path, read: dict | None = None):
    """balora.load_run(path), re-read only when its files change. Only the latest version of a run is
    kept: a run being written is a new version at every part file, and the cache kept the last 32 whole
    copies of it (hundreds of MB while watching a long sweep).

    read: the page's own dict, given path -> the version of the files this call served (taken before it read
    them). A page watching a live run compares with it: one taken after the read missed a run that finished
    meanwhile, and _LOADED is the whole server's, so another browser tab's newer load stood in for this one's."""
    path, version = str(path), run_version(path)
    old = _LOADED.get(path)
    if old is not None and old != version:
        _load_run.clear(path, old)
    _LOADED[path] = version
    if read is not None:
        read[path] = version
    return _load_run(path, version)


def status_labels(runs: pd.DataFrame) -> list[str]:
    """list_runs' status, with a "running" run whose writer is gone shown as stalled."""
    stale = runs["stale"] if "stale" in runs else pd.Series(False, index=runs.index)
    return ["stalled" if s_ == "running" and bool(s) else str(s_) for s_, s in zip(runs["status"].astype(str), stale)]


def damaged_runs(runs: pd.DataFrame) -> dict[str, str]:
    """{label: why} for the runs balora.list_runs lists as damaged (a config or status file it
    cannot read, said in its `reason` column); the page lists them with the reason and loads the others."""
    if runs.empty or "status" not in runs:
        return {}
    bad = runs[runs["status"].astype(str) == "damaged"]
    return {str(n): str(r) if pd.notna(r) else "unreadable" for n, r in zip(bad["label"], bad["reason"])}


# ------------------------------------------------------------------------------ run status


@dataclass(frozen=True)
class RunState:
    """How a page should mark a run: `kind` is success | info | warning | error."""

    label: str  # "completed", "in progress", "stalled", "interrupted", "failed"
    kind: str
    text: str
    live: bool  # the page should refresh on its own


def _parse_time(value) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _progress_text(info: dict) -> str:
    progress = info.get("progress") if isinstance(info.get("progress"), dict) else {}
    done, total = progress.get("done"), progress.get("total")
    return f"{done}/{total} cells" if done is not None and total else ""


def run_state(status: str, info: dict, now: datetime | None = None) -> RunState:
    """Turn a run's status (balora.load_run's .status and .status_info) into what the page says.

    load_run marks a "running" run stale when its writer is gone or silent for too long: it is
    shown as "stalled", since its writer most likely died without recording it (kill -9, power cut).
    """
    info = info or {}
    now = now or datetime.now(timezone.utc)
    frac = _progress_text(info)
    message = str(info.get("message") or "")
    if status == "running":
        updated = _parse_time(info.get("updated"))
        age = (now - updated).total_seconds() if updated else None
        if info.get("stale"):
            why = info.get("stale_reason") or "no longer updated"
            return RunState("stalled", "warning", f"Marked running, but {why}: probably interrupted. {frac}".strip(), False)
        when = f", updated {age:.0f} s ago" if age is not None else ""
        return RunState("in progress", "info", f"Still being written ({frac or 'starting'}{when}); this page refreshes on its own.", True)
    if status == "interrupted":
        return RunState("interrupted", "warning", f"Interrupted before it finished ({frac or 'partial'}). {message}".strip(), False)
    if status == "failed":
        detail = f" ({frac})" if frac else ""
        return RunState("failed", "error", f"Failed: {message or 'no message recorded'}{detail}", False)
    if status == "completed":
        return RunState("completed", "success", f"Completed ({frac})." if frac else "Completed.", False)
    return RunState(status or "unknown", "warning", f"Unknown status {status!r}.", False)


# ------------------------------------------------------------------------------ inspect


def path_version(path: Path) -> tuple:
    """Changes when the file, or any file in the folder, changes (bounded walk, links not followed)."""
    try:
        if path.is_file():
            s = path.stat()
            return (s.st_size, s.st_mtime_ns)
        out = []
        for i, (dirpath, _, files) in enumerate(os.walk(path)):
            if i > MAX_WALK:
                break
            for f in files:
                s = os.stat(os.path.join(dirpath, f), follow_symlinks=False)
                out.append((dirpath, f, s.st_size, s.st_mtime_ns))
        return tuple(sorted(out))
    except OSError:
        return ("missing",)


@st.cache_data(show_spinner=False, max_entries=16)
def _inspect(path: str, version: tuple) -> pd.DataFrame:
    import balora
    from balora.teaching.threads import one_thread

    # One torch thread, as `balora inspect` uses: on a busy machine two wait on each other (a Llama-3-8B
    # r=16 adapter: 17-18 s to show with torch's default two threads on 2 shared cores, 3.9 s with one).
    with one_thread():
        return balora.inspect(path)


@st.cache_data(show_spinner=False, max_entries=16, ttl=600)
def hub_snapshot(hub_id: str) -> Path:
    """The Hub cache snapshot holding `hub_id`'s adapter files, or the folder or file it names in the repository
    (fetched once per 10 minutes at most)."""
    from balora.inspection import local_path

    return local_path(hub_id)


def inspect(path: str | Path) -> pd.DataFrame:
    """balora.inspect(path), re-read only when the files change. Raises what inspect raises."""
    return _inspect(str(path), path_version(Path(path)))
