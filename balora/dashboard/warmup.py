"""Import the heavy libraries and compute Learn's default figures in the background, once the
dashboard has drawn its first page.

Compare needs pandas and plotly only; Launch (the arm registry), Inspect and Learn import
torch, which takes one to several seconds on a laptop CPU, and Learn's defaults train a few
toy problems. Doing that in a daemon thread after the server's first page means a user's first
click to those pages rarely waits for it. Once per server process; a failure is left to the
page that needs the module (it imports or computes it again and shows the error there).
A process that exits meanwhile waits for it (at most EXIT_WAIT_S): a thread still inside torch
when the interpreter shuts down aborts the process (C++ terminate, exit status 134).
"""

from __future__ import annotations

import atexit
import importlib
import threading

# The modules the Inspect and Learn pages import first (Launch's arms: jobs.available_arms).
MODULES = ("balora.teaching", "balora.inspection")
# Imported whole before the thread starts: plotly's JSON encoder takes PIL.Image from sys.modules
# without importing it, so a chart drawn while the thread is half-way through importing PIL (torch
# pulls it in) failed with "partially initialized module 'PIL.Image' has no attribute 'Image'".
BEFORE_THREAD = ("PIL.Image",)
EXIT_WAIT_S = 60.0

_started = threading.Event()


def start(modules: tuple[str, ...] = MODULES) -> threading.Thread | None:
    """Start importing `modules` in a daemon thread, the first time only; returns the thread."""
    if _started.is_set():
        return None
    _started.set()
    for name in BEFORE_THREAD:
        try:
            importlib.import_module(name)
        except ImportError:  # not installed: plotly finds nothing in sys.modules either
            pass

    def run() -> None:
        try:
            for name in modules:
                importlib.import_module(name)
            from balora.dashboard import jobs, learn_data

            jobs.available_arms()  # Launch's arm list (may import PEFT)
            learn_data.warm()
        except Exception:  # noqa: BLE001 - the page that needs it reports the error
            return

    thread = threading.Thread(target=run, name="balora-warmup", daemon=True)
    thread.start()
    atexit.register(thread.join, EXIT_WAIT_S)
    return thread
