"""Argument types the benchmark scripts share (each script imports this file from beside it)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """A count (--reps, --repeat, --pairs, ...): 0 used to end each script in a traceback from an empty
    median or a division by zero, after the work before it; argparse now says so in one line."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
