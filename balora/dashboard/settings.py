"""Where the dashboard reads runs from, and the limits it enforces.

The runs folder is the one `balora compare` writes to (balora.runs_folder: `./runs` or
$BALORA_RUNS, or `-- --runs DIR` here). It is the only place the dashboard ever writes
(Launch puts new runs there); the bundled sample runs are listed beside it, read-only.
Everything else it produces (balanced adapters) is built in a temporary folder and offered
as a download.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from balora import runs_folder as _runs_folder
from balora.safe_io import user_path

# balora/dashboard/settings.py -> the checkout's root, when running from one (.streamlit/ lives there).
REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_VAR = _runs_folder.ENV_VAR
DEFAULT_RUNS = _runs_folder.DEFAULT  # relative to the current folder
# The bundled examples (package data): listed next to the user's runs, never written to.
SAMPLE_RUNS = _runs_folder.SAMPLE_RUNS

# Streamlit's own upload cap is server.maxUploadSize in .streamlit/config.toml; this one is
# applied per widget so an uploaded adapter stays small enough to inspect within seconds.
MAX_UPLOAD_MB = 100
# Zip uploads are unpacked to disk: cap what they may expand to (zip bombs).
MAX_UNZIPPED_MB = 400

# Launch bounds: a dashboard job must finish in minutes on a laptop CPU.
LAUNCH_TASKS = ("synthetic", "lm")
LAUNCH_MAX_STEPS = {"synthetic": 1000, "lm": 300}
LAUNCH_MAX_SEEDS = 4
LAUNCH_MAX_GRID = 4  # learning rates (and alphas) per launched grid
LAUNCH_MAX_INIT_SCALE = 100.0  # synthetic task: multiple of PEFT's A init
# The bounds above are per field; their product is what takes time. Cells x steps per job: a synthetic
# step takes about 1 ms (320,000: ~5 min), an lm step 0.1-0.3 s on a laptop CPU (3,000: 5-14 min).
LAUNCH_MAX_TRAIN_STEPS = {"synthetic": 320_000, "lm": 3_000}

# How often a page showing a run in progress re-reads it.
REFRESH_S = 5


def parse_runs_arg(argv: list[str]) -> str | None:
    """The value of `--runs DIR` (or `--runs=DIR`) in argv, ignoring every other argument.

    Streamlit passes what follows `--` in `streamlit run dashboard/app.py -- --runs DIR` as
    the script's sys.argv[1:]; under pytest sys.argv holds pytest's own flags, hence the
    tolerant parse.
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--runs", default=None)
    try:
        args, _ = parser.parse_known_args(argv)
    except SystemExit:  # `--runs` with no value: behave as if it was not given
        return None
    return args.runs


def runs_dir(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Path:
    """The user's runs folder: `-- --runs DIR`, else $BALORA_RUNS, else ./runs (the folder
    `balora compare` writes to by default). It may not exist until the first run is written.

    Relative paths are taken from the current directory, like any command-line path.
    """
    import sys

    argv = sys.argv[1:] if argv is None else argv
    value = parse_runs_arg(argv)
    if value:
        return user_path(value).resolve()
    return _runs_folder.runs_folder(os.environ if environ is None else environ)


def compare_command(runs: Path, environ: dict[str, str] | None = None) -> str:
    """A `balora compare` command whose run lands in `runs`: no --out when `runs` is where it writes
    by default ($BALORA_RUNS or ./runs), else --out into `runs` (the dashboard started with --runs DIR)."""
    import shlex

    if Path(runs) == _runs_folder.runs_folder(os.environ if environ is None else environ):
        return "balora compare --task synthetic"
    return shlex.join(["balora", "compare", "--task", "synthetic", "--out", str(Path(runs) / "synthetic-1")])


def sample_runs_dir() -> Path | None:
    """The bundled sample runs, or None when this install has none (they are package data)."""
    return SAMPLE_RUNS if SAMPLE_RUNS.is_dir() else None
