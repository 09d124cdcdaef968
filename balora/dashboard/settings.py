"""Where the dashboard reads runs from, and the limits it enforces.

The runs folder is the only place the dashboard ever writes (Launch puts new runs there);
everything else it produces (balanced adapters) is built in a temporary folder and offered
as a download.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# balora/dashboard/settings.py -> the checkout's root (sample_runs/ lives there).
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RUNS = REPO_ROOT / "sample_runs"
ENV_VAR = "BALORA_RUNS"

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
    """The runs folder: `-- --runs DIR`, else $BALORA_RUNS, else <repo>/sample_runs.

    Relative paths are taken from the current directory, like any command-line path.
    """
    import sys

    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    value = parse_runs_arg(argv) or environ.get(ENV_VAR) or None
    path = Path(value).expanduser() if value else DEFAULT_RUNS
    return path.resolve()
