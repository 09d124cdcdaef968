"""`balora dashboard`: start the Streamlit dashboard (the same as `streamlit run dashboard/app.py`).

Binds to 127.0.0.1 unless --host says otherwise: the dashboard reads adapter files from this
machine's disk and launches training jobs, so exposing it is a deliberate choice.
"""

from __future__ import annotations

import errno
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from balora.cli import COMMANDS
from balora.errors import InputError
from balora.safe_io import user_path


def app_path() -> Path:
    """The packaged app's main script (balora/dashboard/app.py): works from any install."""
    from balora.dashboard import app

    return Path(app.__file__).resolve()


def add_parser(sub):
    p = sub.add_parser(
        "dashboard", help=COMMANDS["dashboard"][1],
        description="Serve the Streamlit dashboard (Compare, Inspect, Launch, Learn) over your runs folder and the "
        "bundled sample runs, at http://HOST:PORT (this machine only by default).")
    p.add_argument("--runs", default=None, help="your runs folder, listed with the bundled samples and the only place Launch writes (default: $BALORA_RUNS, else ./runs, where `balora compare` writes)")
    p.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--print-command", action="store_true", help="print the streamlit command instead of running it")
    p.set_defaults(run=run)


def build_command(args) -> list[str]:
    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port}: choose a port between 1 and 65535")
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(app_path()),
        "--server.address", args.host,
        "--server.port", str(args.port),
        "--server.headless", "true",
        # The project's .streamlit/config.toml is only read from the current folder (never from an
        # installed package): repeat all of it so `balora dashboard` behaves the same from anywhere.
        # The light theme matters: the Learn page draws black curves that a dark theme would hide.
        "--server.maxUploadSize", "100",
        "--server.runOnSave", "false",
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "minimal",
        "--theme.base", "light",
        # No reloads: streamlit watches the folder of its main script, here balora/dashboard/ itself. A saved
        # change there (an editable install, a `git pull`) made the next rerun import balora.dashboard.jobs
        # afresh: its registry empty, Launch lost the running job and started a second one beside it.
        # (`streamlit run dashboard/app.py` keeps streamlit's default: its folder, dashboard/, holds no balora module.)
        "--server.fileWatcherType", "none",
    ]
    if args.runs is not None:
        if not args.runs.strip():  # `--runs "$RUNS"` with RUNS unset: it resolved to the current folder
            raise InputError("--runs is empty: name a folder, or leave --runs out for $BALORA_RUNS or ./runs")
        runs = user_path(args.runs).resolve()
        if runs.exists() and not runs.is_dir():
            raise InputError(f"--runs {args.runs}: not a folder")
        cmd += ["--", "--runs", str(runs)]
    return cmd


def check_bindable(host: str, port: int) -> None:
    """Refuse in one line an address or port the server could not listen on. Streamlit found out only
    after the "serving on" line: a bare "Port N is not available" (exit 1), or a traceback for an
    address of another machine or a name that does not resolve. Bound the way streamlit binds."""
    if host.startswith("unix://"):
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        if os.name != "nt":  # as streamlit: a port left in TIME_WAIT by a stopped dashboard is free
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except socket.gaierror:
            raise InputError(f"--host {host}: not an address, nor a name this machine resolves "
                             "(127.0.0.1: this machine only; 0.0.0.0: every interface)") from None
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                raise InputError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}): another program "
                                 "(another dashboard?) holds it or it is reserved; choose another --port") from None
            raise InputError(f"--host {host}: cannot listen on it ({e.strerror}): not an address of this machine "
                             "(127.0.0.1: this machine only; 0.0.0.0: every interface)") from None


def url(host: str, port: int) -> str:
    """Where a browser finds the server: an IPv6 address goes in brackets (http://::1:8501 opens nothing)."""
    if host.startswith("unix://"):
        return f"the Unix socket {host.removeprefix('unix://')}"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(args) -> int:
    cmd = build_command(args)
    if args.print_command:
        print(shlex.join(cmd))  # quoted: a runs folder with a space must come back as one argument
        return 0
    check_bindable(args.host, args.port)
    print(f"balora dashboard: serving on {url(args.host, args.port)} (Ctrl+C to stop)", file=sys.stderr)
    if os.name == "posix":  # become the server: a SIGTERM to this process (a service manager, CI) stops it,
        sys.stdout.flush()  # where a child started by subprocess.call kept serving after its parent was killed
        sys.stderr.flush()
        os.execv(cmd[0], cmd)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130
