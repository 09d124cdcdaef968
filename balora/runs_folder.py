"""Where runs live: one folder shared by `balora compare`, the dashboard and its Launch page.

The user's runs go to `./runs` (relative to the current folder) or `$BALORA_RUNS`; the folder
is created by whatever writes the first run into it. The sample runs that ship with the
package (`balora/sample_runs/`) are read-only examples: the dashboard lists them next to the
user's runs, and nothing ever writes into them.

Standard library only: the CLI imports this before it knows whether it needs torch.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

from balora.safe_io import user_path

ENV_VAR = "BALORA_RUNS"
DEFAULT = "runs"  # relative to the current folder, like any command-line path
# Shipped as package data (pyproject's package-data), so a non-editable install has them too.
SAMPLE_RUNS = Path(__file__).resolve().parent / "sample_runs"


def runs_folder(environ: dict[str, str] | None = None) -> Path:
    """The user's runs folder: $BALORA_RUNS, else ./runs (absolute; it may not exist yet)."""
    environ = os.environ if environ is None else environ
    value = environ.get(ENV_VAR) or DEFAULT
    return user_path(value).resolve()


def new_run_dir(task: str, environ: dict[str, str] | None = None) -> str:
    """Default folder of a new `balora compare` run: <runs folder>/<task>-<YYYYmmdd-HHMMSS>.

    Relative to the current folder when the runs folder is the default `./runs`, so the
    config and messages show the short path the user typed nothing for.
    """
    name = f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    environ = os.environ if environ is None else environ
    if not environ.get(ENV_VAR):
        return f"{DEFAULT}/{name}"
    return str(runs_folder(environ) / name)


def is_sample(path: str | Path) -> bool:
    """True for the bundled sample runs folder and anything inside it (read-only)."""
    return Path(path).resolve().is_relative_to(SAMPLE_RUNS)


def dashboard_command(run_dir: str | Path, environ: dict[str, str] | None = None) -> str:
    """The shell command that opens the dashboard with `run_dir` listed: `balora dashboard`
    alone when the run is in the runs folder, else with `--runs` naming the run's parent."""
    parent = Path(run_dir).resolve().parent
    args = ["balora", "dashboard"]
    if parent != runs_folder(environ):
        args += ["--runs", str(parent)]
    return shlex.join(args)


def dashboard_url(run_dir: str | Path, port: int = 8501) -> str:
    """Where `dashboard_command` serves the run, opened on it (Compare's ?run=NAME)."""
    from urllib.parse import quote

    return f"http://127.0.0.1:{port}/?run={quote(Path(run_dir).resolve().name)}"
