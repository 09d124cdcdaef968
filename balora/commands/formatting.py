"""Number and name formatting shared by the commands' tables (standard library and balora.safe_io only)."""

from __future__ import annotations

import math
import re

from balora.safe_io import printable

_INDEX = re.compile(r"^\d+$")


def num(x, unknown: str = "-", digits: int = 3) -> str:
    """A table cell for a number: `digits` significant digits; `unknown` for None, NaN and
    pandas.NA; "inf"/"-inf"; text is shown as it is."""
    if isinstance(x, str):
        return x
    try:
        f = float(x)
    except (TypeError, ValueError):  # None, pandas.NA
        return unknown
    if math.isnan(f):
        return unknown
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    return f"{f:.{digits}g}"


def short_module_names(names: list[str]) -> dict[str, str]:
    """Readable, still unique names for a table: `model.layers.3.self_attn.q_proj` -> `layers.3.q_proj`.

    Each name takes the shortest of these that no other name shares: the last numbered block
    and the last segment (`layers.3.q_proj`); everything from that block on
    (`layers.3.self_attn.q_proj`); the full name.
    """
    unique = list(dict.fromkeys(names))

    def choices(name: str) -> list[str]:
        p = name.split(".")
        idx = [i for i, seg in enumerate(p[:-1]) if _INDEX.match(seg) and i >= 1]
        if not idx:
            return [p[-1], name]
        i = idx[-1]
        return [".".join(p[i - 1:i + 1] + p[-1:]), ".".join(p[i - 1:]), name]

    options = {n: choices(n) for n in unique}
    level = {n: 0 for n in unique}
    while True:
        short = {n: options[n][level[n]] for n in unique}
        counts: dict[str, int] = {}
        for v in short.values():
            counts[v] = counts.get(v, 0) + 1
        clashing = [n for n in unique if counts[short[n]] > 1 and level[n] < len(options[n]) - 1]
        if not clashing:
            return short
        for n in clashing:
            level[n] += 1


def printable_frame(df):
    """A copy of a report frame whose text cells, and `attrs["sources"]` (paths, notes, metadata),
    show control characters escaped: module names and metadata come from the file's author, and
    an ESC in them must not reach the terminal as a command."""
    out = df.copy()
    for c in out.columns:
        if str(out[c].dtype) in ("object", "string"):
            out[c] = out[c].map(lambda v: printable(v) if isinstance(v, str) else v)
    out.attrs = {**df.attrs, "sources": [_printable_value(s) for s in df.attrs.get("sources", [])]}
    return out


def _printable_value(value):
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(k): _printable_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable_value(v) for v in value]
    return value


def pipe_console(**kwargs):
    """A rich Console whose closed pipe (`balora inspect ... | head -1`) reaches balora.cli as
    BrokenPipeError, which stops quietly with 141 as --format json/csv do: rich's own handler exits
    with 1, the code kept for bugs."""
    from rich.console import Console

    class PipeConsole(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError

    return PipeConsole(**kwargs)
