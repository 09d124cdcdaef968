"""Reading a run's status.json, config.json and env.json: safe reads, then a check of what they hold.

balora writes these files as strict JSON objects (no NaN, numbers that fit an int64), so anything else
(null, a list, a string where a list belongs, 1e999, NaN, a 400-digit integer, a FIFO or a link to
/dev/zero named status.json) is a damaged or foreign run: one RunError naming the file, never a raw
AttributeError/TypeError/OverflowError later, and never a read that hangs or fills the memory.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from balora.errors import InputError
from balora.safe_io import CONFIG_MAX_BYTES, is_inside, read_json_capped
from balora.store.layout import CONFIG, ENV, STATUS, STATUSES

INT_LIMIT = 2**63  # the store's integer columns are int64

_OPT_STR = (str, type(None))


class RunError(InputError):
    """A run folder whose status.json or config.json cannot be used: the message names the file."""

    def __init__(self, path: Path, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}; the run folder is damaged or was not written by balora "
                         "(move it out of the runs folder)")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(type(value), repr(value))


def _check_numbers(path: Path, data: Any) -> None:
    """No NaN/Infinity and no integer beyond int64 anywhere (iterative: depth is bounded by the reader)."""
    stack = [("", data)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, dict):
            stack.extend((f"{where}.{k}" if where else str(k), x) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", x) for i, x in enumerate(v))
        elif isinstance(v, float) and not math.isfinite(v):
            raise RunError(path, f"{where or 'the value'} is {v} (balora writes only finite numbers)")
        elif isinstance(v, int) and not isinstance(v, bool) and not -INT_LIMIT < v < INT_LIMIT:
            raise RunError(path, f"{where or 'the value'} is an integer of {len(str(abs(v)))} digits, "
                                 "too large for a run")


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_object(path: Path, what: str) -> dict:
    if os.path.islink(path) and os.path.exists(path) and not is_inside(path, path.parent):
        # as for part files and adapter folders: another run's config, or any JSON this user can read
        raise RunError(path, "is a symbolic link out of the run folder, not followed")
    try:
        data = read_json_capped(path, CONFIG_MAX_BYTES, what)
    except InputError as e:  # a FIFO, a device, too big, not UTF-8, not JSON: same error type for the caller
        raise RunError(path, str(e).rstrip(".").replace(f"{what} {path}", what)) from None  # the path once
    if not isinstance(data, dict):
        raise RunError(path, f"holds {_kind(data)} instead of a JSON object")
    _check_numbers(path, data)
    return data


# key -> (check, what it must be); a key may be absent (older runs, stand-ins written by hand)
_STATUS_FIELDS = {
    "status": (lambda v: v in STATUSES, f"one of {', '.join(STATUSES)}"),
    "started": (lambda v: isinstance(v, _OPT_STR), "a time string or null"),
    "updated": (lambda v: isinstance(v, _OPT_STR), "a time string or null"),
    "finished": (lambda v: isinstance(v, _OPT_STR), "a time string or null"),
    "message": (lambda v: isinstance(v, _OPT_STR), "a string or null"),
    "host": (lambda v: isinstance(v, _OPT_STR), "a string or null"),
    "pid": (lambda v: v is None or _is_count(v), "a process id or null"),
    "progress": (lambda v: v is None or isinstance(v, dict), "an object"),
}
_PROGRESS_FIELDS = ("done", "total", "steps_done", "steps_total")

_CONFIG_FIELDS = {
    "task": (lambda v: isinstance(v, str), "a string"),
    "arms": (lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v), "a list of arm names"),
    "seeds": (lambda v: isinstance(v, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in v),
              "a list of integers"),
    "lrs": (lambda v: isinstance(v, list) and all(_is_number(x) for x in v), "a list of numbers"),
    "alphas": (lambda v: isinstance(v, list) and all(_is_number(x) for x in v), "a list of numbers"),
    "steps": (lambda v: v is None or _is_count(v), "a non-negative integer or null"),
    "n_cells": (lambda v: v is None or _is_count(v), "a non-negative integer or null"),
    "command": (lambda v: isinstance(v, _OPT_STR), "a string or null"),
}


def _check_fields(path: Path, data: dict, fields: dict) -> None:
    for key, (ok, expected) in fields.items():
        if key in data and not ok(data[key]):
            shown = repr(data[key]) if isinstance(data[key], (int, float, str)) else _kind(data[key])
            raise RunError(path, f"'{key}' is {shown[:80]}, expected {expected}")


def read_status(run: str | Path, *, missing_ok: bool = True) -> dict:
    """The run's status.json, checked: {} when it does not exist (yet) and missing_ok; RunError when it is
    damaged (not a regular file, too big, not a JSON object, a field of the wrong type)."""
    path = Path(run) / STATUS
    if missing_ok and not _exists(path):
        return {}
    data = _read_object(path, "run status file")
    _check_fields(path, data, _STATUS_FIELDS)
    for key, value in (data.get("progress") or {}).items():
        if key in _PROGRESS_FIELDS and not (value is None or _is_count(value)):
            raise RunError(path, f"'progress.{key}' is {_kind(value) if not _is_number(value) else value}, "
                                 "expected a non-negative integer")
    return data


def read_config(run: str | Path, *, missing_ok: bool = True) -> dict:
    """The run's config.json, checked like read_status ({} when missing and missing_ok)."""
    path = Path(run) / CONFIG
    if missing_ok and not _exists(path):
        return {}
    data = _read_object(path, "run config file")
    _check_fields(path, data, _CONFIG_FIELDS)
    return data


def read_env(run: str | Path, warnings: list[str]) -> dict:
    """env.json is informational: any problem is a warning and an empty dict, never an error."""
    path = Path(run) / ENV
    if not _exists(path):
        warnings.append(f"{ENV}: missing")
        return {}
    try:
        return _read_object(path, "run environment file")
    except RunError as e:
        warnings.append(f"{ENV}: unreadable ({e.problem})")
        return {}


def _exists(path: Path) -> bool:
    # lexists: a dangling symlink named status.json is damage to report, not a file still to come
    return os.path.lexists(path)
