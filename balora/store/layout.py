"""The run directory's layout: file names, tables and their columns, the marker, a change token.

Every other module (writer, reader, the dashboard's loaders, Launch jobs, `compare --force`) asks
here instead of spelling file names itself.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd

from balora.columns import REPORT_COLUMNS

CONFIG, ENV, STATUS = "config.json", "env.json", "status.json"
# Written first into every run folder balora creates: says the folder is balora's and lists what balora
# puts there, so `--force` deletes those names only (another tool's files in the folder stay).
MARKER = ".balora-run"
MARKER_FORMAT = 1

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

# What balora writes into a run folder: these files, and in each table folder part files (and their
# temporary names while being written). Nothing else in a run folder is balora's.
RUN_FILES = (CONFIG, ENV, STATUS)
PART_GLOB = "part-*.parquet"
# ASCII digits only (\d also takes other scripts' digits, which int() reads); fullmatch (a "$" also
# matches before a trailing newline).
_RANGE_RE = re.compile(r"part-([0-9]+)(?:-([0-9]+))?\.parquet")
_JSON_TMP_RE = re.compile(r"^\.(config|env|status)\.json\.\d+\.tmp$")


def part_name(first: int, last: int | None = None) -> str:
    """Part `first` of a table: the rows of one append. A merged part names the range of part numbers whose
    rows it holds, `part-FIRST-LAST.parquet`: it replaces them, so a reader that still lists them skips them."""
    if last is None or last == first:
        return f"part-{first:05d}.parquet"
    return f"part-{first:05d}-{last:05d}.parquet"


def part_range(name: str) -> tuple[int, int] | None:
    """(first, last) part number a part file's name covers; None for any other name."""
    m = _RANGE_RE.fullmatch(name)
    if m is None:
        return None
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) else first
    # Only the names part_name writes: `part-1.parquet` beside `part-00001.parquet` would be the same part
    # (one of them skipped as covered), and --force leaves such a file as another tool's, so a new run
    # written there must neither read it as its own rows nor merge it away.
    return (first, last) if first <= last and part_name(first, last) == name else None


def table_parts(folder: Path) -> tuple[list[tuple[int, int, Path]], list[tuple[int, int, Path]]]:
    """(the parts to read, the parts a merged part covers), each (first, last, path), ordered by number.

    A merge writes its part (atomically) before it deletes the parts it replaces: a listing taken in
    between holds both, and the covered ones are skipped, so every row is read once. Runs written before
    merged parts named their range (one plain `part-N` after a finished run's merge) read as before."""
    try:
        with os.scandir(folder) as it:
            found = [(*r, Path(e.path)) for e in it if (r := part_range(e.name)) is not None]
    except OSError:  # no table folder (yet), or an unreadable one
        return [], []
    found.sort(key=lambda p: (p[0], -p[1]))  # a covering part comes before the parts inside its range
    live: list[tuple[int, int, Path]] = []
    covered: list[tuple[int, int, Path]] = []
    for p in found:
        (covered if live and p[1] <= live[-1][1] else live).append(p)
    return live, covered


def part_gaps(live: list[tuple[int, int, Path]]) -> list[tuple[int, int]]:
    """(first, last) of each run of part numbers missing between the listed parts (balora numbers the
    parts of a table one after the other; a gap means the listing raced a merge, or a part was removed)."""
    return [(a[1] + 1, b[0] - 1) for a, b in zip(live, live[1:]) if b[0] > a[1] + 1]


def is_part_file(name: str) -> bool:
    """A table part balora writes (or its temporary name while it is written): the names table_parts reads."""
    if name.startswith(".") and name.endswith(".tmp"):
        name = name[1:-4]
    return part_range(name) is not None


def is_json_tmp(name: str) -> bool:
    """The temporary name write_json_atomic gives config/env/status.json before renaming it."""
    return bool(_JSON_TMP_RE.match(name))


def to_table(table: str, rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
    """Rows -> a frame with exactly the table's columns, in order, with their dtypes (also when empty)."""
    columns = TABLES[table]
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    df = df.reindex(columns=list(columns))
    return df.astype(columns)


def is_run_dir(path: Path) -> bool:
    """A folder that holds a run: a config.json and a status.json entry (whatever they turn out to hold:
    the reader says when one is damaged, a FIFO or a link to a device), or a config.json in a folder
    balora marked as a run (its status.json lost: listed as damaged, not silently left out)."""
    return os.path.lexists(path / CONFIG) and (os.path.lexists(path / STATUS) or is_marked(path))


def is_marked(path: Path) -> bool:
    """Whether balora created this folder as a run (the marker is a regular file, not a link)."""
    try:
        return (Path(path) / MARKER).is_file() and not (Path(path) / MARKER).is_symlink()
    except OSError:
        return False


def marker_text(created: str) -> str:
    """The marker's content: what balora writes in the folder, for a person who finds it."""
    return json.dumps({"balora_run": MARKER_FORMAT, "created": created, "files": [*RUN_FILES, MARKER],
                       "tables": {t: PART_GLOB for t in TABLES}}, indent=2) + "\n"


def _stat_token(path: Path) -> tuple | None:
    try:
        s = os.stat(path)  # a stat never blocks, also on a FIFO
    except OSError:
        return None
    return (s.st_mtime_ns, s.st_size, s.st_ino)


def run_version(path: str | Path) -> tuple:
    """A cheap token that changes whenever the run's files change (for caches): status.json and config.json
    (mtime, size, inode: a rewrite renames a new file into place) and each table folder's part files."""
    path = Path(path)
    token: list = [_stat_token(path / STATUS), _stat_token(path / CONFIG)]
    for table in TABLES:
        try:
            with os.scandir(path / table) as it:
                names = sorted(e.name for e in it if e.name.startswith("part-") and e.name.endswith(".parquet"))
        except OSError:
            names = []
        token.append((len(names), names[-1] if names else None, _stat_token(path / table)))
    return tuple(token)
