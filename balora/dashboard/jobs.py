"""Launch jobs: one `balora compare` subprocess at a time, writing only under the runs folder.

Pure Python (no st.*): the Launch page asks the process-wide manager to start, poll and
cancel. The job's output is kept in memory (last lines) rather than in a log file, so the
only thing a job writes is its run directory; progress comes from that run's status.json.
"""

from __future__ import annotations

import atexit
import functools
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from balora.dashboard import settings

# The package (and the sample runs it ships) is never written to, whatever the runs folder says.
PACKAGE_DIR = Path(__file__).resolve().parents[1]
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class JobError(ValueError):
    """A launch the manager refuses, with a message for the user."""


@dataclass
class LaunchSpec:
    """What the Launch form asks for; everything else takes the task's defaults."""

    task: str = "synthetic"
    arms: list[str] = field(default_factory=lambda: ["lora", "balora"])
    seeds: int = 2
    steps: int = 200
    optimizer: str | None = None  # None: the task's default
    lrs: list[float] = field(default_factory=list)  # empty: the task's default
    alphas: list[float] = field(default_factory=list)  # empty: the task's default
    name: str = ""
    init_scale: float | None = None  # synthetic only: multiple of PEFT's A init (None: the task's 1)


@functools.lru_cache(maxsize=1)
def available_arms() -> dict[str, str]:
    """Arm name -> help, for the arms this environment can run. Once per process: asking an arm
    whether it can run may import PEFT (seconds), and the answer does not change."""
    from balora.arms import ARMS

    return {name: arm.help for name, arm in ARMS.items() if arm.unavailable() is None}


def validate(spec: LaunchSpec, runs_dir: Path) -> list[str]:
    """Every reason to refuse `spec` (empty when it may run). Bounds keep a job to minutes."""
    errors = []
    if Path(runs_dir).resolve().is_relative_to(PACKAGE_DIR):
        errors.append(f"the runs folder {runs_dir} is inside the installed balora package (its sample runs are "
                      "read-only): restart the dashboard with --runs DIR or $BALORA_RUNS set to a folder of yours")
    if spec.task not in settings.LAUNCH_TASKS:
        errors.append(f"task must be one of {', '.join(settings.LAUNCH_TASKS)}")
    if not spec.arms:
        errors.append("choose at least one arm")
    max_steps = settings.LAUNCH_MAX_STEPS.get(spec.task, 0)
    if not 1 <= spec.steps <= max_steps:
        errors.append(f"steps must be between 1 and {max_steps} for the {spec.task} task")
    if not 1 <= spec.seeds <= settings.LAUNCH_MAX_SEEDS:
        errors.append(f"seeds must be between 1 and {settings.LAUNCH_MAX_SEEDS}")
    for label, values in (("learning rates", spec.lrs), ("alphas", spec.alphas)):
        if len(values) > settings.LAUNCH_MAX_GRID:
            errors.append(f"at most {settings.LAUNCH_MAX_GRID} {label}")
        if any(not (v > 0 and math.isfinite(v)) for v in values):
            errors.append(f"{label} must be positive finite numbers")
        elif len(set(values)) != len(values):
            errors.append(f"{label}: a value is listed twice")
    if spec.init_scale is not None:
        if spec.task != "synthetic":
            errors.append("the initial scale of A is an option of the synthetic task only")
        elif not 0 < spec.init_scale <= settings.LAUNCH_MAX_INIT_SCALE:
            errors.append(f"initial scale of A must be above 0 and at most {settings.LAUNCH_MAX_INIT_SCALE:g}")
    errors += _budget_errors(spec)
    if not NAME_RE.match(spec.name or ""):
        errors.append("run name: letters, digits, '.', '_' or '-' only, starting with a letter or digit (at most 64)")
    elif (runs_dir / spec.name).exists():
        errors.append(f"a run named {spec.name!r} already exists in {runs_dir}")
    return errors


def _budget_errors(spec: LaunchSpec) -> list[str]:
    """The job's cells x steps against its task's budget: each field within its bound still multiplied
    to hours (5 arms x 4 seeds x 4 lrs x 4 alphas x 300 lm steps)."""
    budget = settings.LAUNCH_MAX_TRAIN_STEPS.get(spec.task)
    # An empty grid is the task's default: one value for the tasks Launch offers.
    cells = len(spec.arms) * spec.seeds * max(1, len(spec.lrs)) * max(1, len(spec.alphas))
    if budget is None or cells * spec.steps <= budget:
        return []
    return [f"{cells} cells x {spec.steps} steps = {cells * spec.steps:,} training steps; at most {budget:,} for the "
            f"{spec.task} task, so that a job takes minutes: fewer arms, seeds, learning rates, alphas or steps"]


def _num(v: float) -> str:
    """`v` as the job's command line gets it: short ("0.001", "10") when that is exactly `v`, else
    every digit (6 significant digits would run 1.2345678e-3 as 1.23457e-3, and merge two close values)."""
    short = f"{v:g}"
    return short if float(short) == v else repr(float(v))


def compare_args(spec: LaunchSpec, out: Path) -> list[str]:
    """The arguments after `balora` for `spec`: `compare --task ... --out OUT --quiet`."""
    args = ["compare", "--task", spec.task, "--arms", ",".join(spec.arms),
            "--seeds", str(spec.seeds), "--steps", str(spec.steps), "--out", str(out), "--quiet"]
    if spec.optimizer:
        args += ["--optimizer", spec.optimizer]
    if spec.lrs:
        args += ["--lr", ",".join(map(_num, spec.lrs))]
    if spec.alphas:
        args += ["--alpha", ",".join(map(_num, spec.alphas))]
    if spec.init_scale is not None:
        args += ["--set", f"init_scale={_num(spec.init_scale)}"]
    return args


def build_command(spec: LaunchSpec, out: Path) -> list[str]:
    """What the job executes: this interpreter's balora (no PATH lookup), writing the run to `out`."""
    return [sys.executable, "-m", "balora.cli", *compare_args(spec, out)]


def display_command(spec: LaunchSpec, out: Path) -> str:
    """The same job as a command a user can paste into a shell, exactly as shown."""
    return shlex.join(["balora", *compare_args(spec, out)])


def job_env(runs_dir: Path) -> dict[str, str]:
    """The job's environment: the lm task caches its pretrained toy model in $BALORA_CACHE
    (default ~/.cache/balora); unless the user chose a cache, keep it under the runs folder,
    the only place a dashboard job writes."""
    env = dict(os.environ)
    env.setdefault("BALORA_CACHE", str(Path(runs_dir) / ".cache"))
    return env


def read_status(run_dir: Path) -> dict:
    """The run's status.json (balora.store.read_status), or {} while it does not exist yet or cannot be used."""
    from balora.errors import InputError
    from balora.store import read_status as _read

    try:
        return _read(run_dir)
    except (InputError, OSError):
        return {}


@dataclass
class Job:
    spec: LaunchSpec
    run_dir: Path
    command: list[str]
    proc: subprocess.Popen
    started: float
    shown: str = ""  # the command as the page shows it (display_command)
    output: deque = field(default_factory=lambda: deque(maxlen=200))
    cancelled: bool = False

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def progress(self) -> tuple[int, int] | None:
        p = read_status(self.run_dir).get("progress") or {}
        if p.get("total"):
            return int(p.get("done", 0)), int(p["total"])
        return None

    def state(self) -> str:
        """starting | running | completed | cancelled | failed."""
        rc = self.returncode
        if rc is None:
            return "running" if read_status(self.run_dir) else "starting"
        if self.cancelled:
            return "cancelled"
        return "completed" if rc == 0 else "failed"

    def tail(self, n: int = 20) -> str:
        return "\n".join(list(self.output)[-n:])


class JobManager:
    """Runs at most one job; remembers the last one so the page can show how it ended."""

    def __init__(self, runs_dir: Path):
        self.runs_dir = Path(runs_dir).resolve()
        self.job: Job | None = None
        self._lock = threading.Lock()

    def start(self, spec: LaunchSpec) -> Job:
        with self._lock:
            busy = any_running()
            if busy is not None:
                raise JobError(f"a job is already running ({busy.spec.name}); wait for it or cancel it")
            errors = validate(spec, self.runs_dir)
            if errors:
                raise JobError("; ".join(errors))
            run_dir = (self.runs_dir / spec.name).resolve()
            if not run_dir.is_relative_to(self.runs_dir):  # NAME_RE already forbids this; belt and braces
                raise JobError(f"run name {spec.name!r} leaves the runs folder")
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            cmd = build_command(spec, run_dir)
            proc = subprocess.Popen(
                cmd, cwd=self.runs_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                text=True, bufsize=1, env=job_env(self.runs_dir),
            )
            job = Job(spec, run_dir, cmd, proc, time.time(), shown=display_command(spec, run_dir))
            threading.Thread(target=_pump, args=(proc, job.output), daemon=True).start()
            self.job = job
            return job

    def cancel(self) -> None:
        """Stop the running job with SIGTERM, so the runner records the run as interrupted."""
        with self._lock:
            if self.job is not None and self.job.running:
                self.job.cancelled = True
                self.job.proc.terminate()

    def wait(self, timeout: float) -> int | None:
        """Block until the current job ends (tests); returns its exit code or None on timeout."""
        if self.job is None:
            return None
        try:
            return self.job.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


def how_it_ended(returncode: int | None) -> str:
    """A job's end in words for the page: a negative code is the signal that killed it ("exit code -9"
    told a workshop nothing; the kernel's OOM killer sends SIGKILL)."""
    if returncode is None or returncode >= 0:
        return f"exit code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed by {name}" + (": out of memory (the kernel's OOM killer), or by hand" if name == "SIGKILL" else "")


def _pump(proc: subprocess.Popen, sink: deque) -> None:
    # Drain the pipe continuously: a child blocked on a full pipe would stall the job.
    assert proc.stdout is not None
    for line in proc.stdout:
        sink.append(line.rstrip("\n"))
    proc.stdout.close()
    # Reap the child as soon as it ends, whether or not a page is open to poll it: a killed job left
    # as a zombie still answers os.kill(pid, 0), so its run would read "running" instead of stale.
    proc.wait()


_MANAGERS: dict[Path, JobManager] = {}
_MANAGERS_LOCK = threading.Lock()


def get_manager(runs_dir: Path) -> JobManager:
    """The process-wide manager for `runs_dir`: every browser session sees the same job."""
    key = Path(runs_dir).resolve()
    with _MANAGERS_LOCK:
        if key not in _MANAGERS:
            _MANAGERS[key] = JobManager(key)
        return _MANAGERS[key]


@atexit.register
def _stop_jobs_on_exit() -> None:
    # The dashboard is stopping (streamlit exits cleanly on SIGTERM): interrupt its job as Ctrl-C in its terminal
    # does, rather than leave it running where no page can see or cancel it, beside a restarted dashboard's job.
    with _MANAGERS_LOCK:
        managers = list(_MANAGERS.values())
    for m in managers:
        m.cancel()
        m.wait(10)  # the run records itself as interrupted in well under that


def any_running() -> Job | None:
    """The job running in this process, whatever its runs folder: one job at a time overall."""
    with _MANAGERS_LOCK:
        for m in _MANAGERS.values():
            if m.job is not None and m.job.running:
                return m.job
    return None
