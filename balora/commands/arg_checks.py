"""Checks of command-line values the commands share (standard library and balora.errors only)."""

from __future__ import annotations

from balora.errors import InputError

# torch.set_num_threads takes a C int, and a value past it ended `--threads 99999999999` in
# "ValueError: Overflow when unpacking long" after the input was read. Past a few hundred a
# thread count is a typo, not a machine. balora.compare_config applies the same bound to the API.
MAX_THREADS = 1024


def check_threads(n: int) -> int:
    """--threads N for torch.set_num_threads: from 1 to MAX_THREADS, else an InputError in one line."""
    if not 1 <= n <= MAX_THREADS:
        raise InputError(f"--threads must be >= 1 and <= {MAX_THREADS}, got {n}")
    return n
