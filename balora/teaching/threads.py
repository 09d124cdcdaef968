"""Torch on one thread for the dashboard's maths (the Learn page's tiny problems, Inspect's per-layer maths); divergence bound."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch


# Iterates beyond this size count as diverged; stopping there keeps the plots finite.
DIVERGED_ABS = 1e3

_threads_lock = threading.Lock()
_threads_depth = 0
_threads_saved = 1


@contextmanager
def one_thread():
    """Run torch on one thread inside the block, then restore the previous setting.

    The problems here are a few hundred numbers; extra threads only add synchronisation, and
    on a busy machine each OpenMP barrier can cost milliseconds (measured: 20x slower loops
    with 2 threads than with 1 on a loaded 2-core box). The counter makes nested and
    concurrent uses (several dashboard sessions) restore the setting only once, at the end.
    """
    global _threads_depth, _threads_saved
    with _threads_lock:
        if _threads_depth == 0:
            _threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_depth += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_depth -= 1
            if _threads_depth == 0:
                torch.set_num_threads(_threads_saved)
