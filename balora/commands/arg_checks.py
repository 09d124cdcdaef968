"""Checks of command-line values the commands share (standard library and balora.errors only)."""

from __future__ import annotations

import os

from balora.errors import InputError

# torch.set_num_threads takes a C int, and a value past it ended `--threads 99999999999` in
# "ValueError: Overflow when unpacking long" after the input was read. Past a few hundred a
# thread count is a typo, not a machine, unless the machine has more CPUs than that (large SMP
# servers: `--threads $(nproc)`). balora.compare_config applies the same bound to the API.
MAX_THREADS = 1024


def max_threads() -> int:
    """The most --threads taken: MAX_THREADS, or this machine's CPU count where it is larger."""
    return max(MAX_THREADS, os.cpu_count() or 1)


def check_threads(n: int) -> int:
    """--threads N for torch.set_num_threads: from 1 to max_threads(), else an InputError in one line."""
    if not 1 <= n <= max_threads():
        raise InputError(f"--threads must be >= 1 and <= {max_threads()}, got {n}")
    return n
