"""How long `load_run` takes on a live run (what the dashboard does at every refresh), with parts merged
only at the end (merge_every=0, what RunWriter did before rolling merges) and with rolling merges.

    python benchmarks/bench_live_load.py                  # 1200 cells (the README's figure), default k
    python benchmarks/bench_live_load.py --quick          # 120 cells
    python benchmarks/bench_live_load.py --cells 600 --k 0,4,8,16,32,8/1000,finished

Each cell is a copy of one cell of the `lm-toy` sample run (200 steps rows, 132 layers rows, 3168
spectra rows: 3500 rows, the `lm` task's shape) under its own (seed, lr) key, its losses and
singular values scaled by a factor of its own (so parts compress as distinct data does); cells come in pairs (the
sample's two arms) and each pair appends its two summary rows, as `balora compare` does. For each k
the same cells are written by RunWriter (one part per table and cell, as the runner flushes at the end
of a short cell) into a run left "running" ('finished': then finished, its parts merged into one), then load_run is timed in rounds, every layout once per
round in rotating order (median and range over rounds). The loaded tables are checked equal across
layouts before any time is printed. Also printed: the writing time (appends plus merges), the part
files per table, the longest single append (one that merged: the training loop waits for it), the
rows the merges rewrote (as a multiple of the rows written), and the load average (a busy shared machine inflates
every time; compare within one run of this script).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd

from balora.store import RunWriter, TABLES, load_run
from balora.store.writer import MERGE_EVERY, MERGE_MAX_BYTES

SAMPLE = Path(__file__).resolve().parents[1] / "balora" / "sample_runs" / "lm-toy"


def sample_cells() -> dict[str, pd.DataFrame]:
    run = load_run(SAMPLE)
    return {t: getattr(run, t) for t in TABLES}


def write_run(path: Path, sample: dict[str, pd.DataFrame], cells: int, layout: str) -> tuple[float, float, int]:
    """(seconds spent in RunWriter.append, the longest append (one that merged), rows rewritten by merges)."""
    w = RunWriter(path, {"task": "lm", "arms": ["lora", "balora"], "seeds": [0], "n_cells": cells}, {})
    k, _, mib = layout.partition("/")
    w.merge_every = 0 if k == "finished" else int(k)
    if mib:
        w.merge_max_bytes = float(mib) * 2**20
    rewritten, write_part = [0], w._write_part

    def counting(table, df, first, last=None):
        if last not in (None, first):
            rewritten[0] += len(df)
        return write_part(table, df, first, last)

    w._write_part = counting
    arms = list(sample["summary"]["arm"])
    took: list[float] = []
    for pair in range(cells // 2):
        key = {"seed": pair // 100, "lr": 1e-4 * (1 + pair % 100)}
        appends = [(t, sample[t][sample[t]["arm"] == arm]) for arm in arms for t in ("steps", "layers", "spectra")]
        for table, rows in [*appends, ("summary", sample["summary"])]:
            rows = rows.assign(**key)
            for col in ("loss", "value", "rel_imbalance"):  # each cell its own values: files compress as real ones
                if col in rows:
                    rows[col] = rows[col] * (1 + 1e-3 * pair)
            t0 = time.perf_counter()
            w.append(table, rows)
            took.append(time.perf_counter() - t0)
    if k == "finished":
        w.finish("completed")  # one part per table: what the run reads as once it ends
    return sum(took), max(took), rewritten[0]


def canonical(df: pd.DataFrame, table: str) -> pd.DataFrame:
    keys = [c for c in ("arm", "seed", "lr", "alpha", "step", "module", "adapter", "which", "index") if c in df]
    return df.sort_values(keys, ignore_index=True)


def _layout_ok(k: str) -> bool:
    """'finished', a merge_every (K >= 0) or K/MIB."""
    if k == "finished":
        return True
    every, slash, mib = k.partition("/")
    try:
        return int(every) >= 0 and (not slash or float(mib) > 0)
    except ValueError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1200)
    parser.add_argument("--quick", action="store_true", help="120 cells, 3 rounds")
    parser.add_argument("--k", default=f"0,{MERGE_EVERY},finished",
                        help="layouts, comma-separated: a merge_every (0: no rolling merges), K/MIB (merge_every K, "
                             f"merge_max_bytes MIB MiB; default {MERGE_MAX_BYTES / 2**20:g}), 'finished' (merged into one)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cells, rounds = (120, 3) if args.quick else (args.cells, args.rounds)
    ks = args.k.split(",")
    # cells come in pairs (the sample's two arms): an odd --cells wrote one cell fewer than it printed
    if cells < 2 or cells % 2 or rounds < 1:
        parser.error(f"--cells {cells} --rounds {rounds}: give an even number of cells (at least 2) and 1+ rounds")
    if not all(_layout_ok(k) for k in ks):
        parser.error(f"--k {args.k}: expected layouts like 0,8,8/1000,finished")
    sample = sample_cells()
    with tempfile.TemporaryDirectory() as tmp:
        paths, facts = {}, {}
        for k in ks:
            paths[k] = Path(tmp) / f"layout{len(paths)}"
            facts[k] = write_run(paths[k], sample, cells, k)
        first = load_run(paths[ks[0]])
        for k in ks[1:]:  # the same rows whatever the layout
            run = load_run(paths[k])
            assert not run.warnings, run.warnings
            for t in TABLES:
                pd.testing.assert_frame_equal(canonical(getattr(run, t), t), canonical(getattr(first, t), t))
        times: dict[str, list[float]] = {k: [] for k in ks}
        for r in range(rounds):
            for k in ks[r % len(ks):] + ks[:r % len(ks)]:
                t0 = time.perf_counter()
                load_run(paths[k])
                times[k].append(time.perf_counter() - t0)
        rows = sum(len(getattr(first, t)) for t in TABLES)
        print(f"{cells} cells, {rows:,} rows; {rounds} rounds; load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} CPUs")
        print(f"{'merge_every':>11} {'part files':>10} {'per table (max)':>15} {'write s':>8} {'longest':>8} {'rewritten':>10} "
              f"{'load_run s (median, min-max)':>30}")
        for k in ks:
            counts = [len(list((paths[k] / t).glob("part-*.parquet"))) for t in TABLES]
            med = statistics.median(times[k])
            print(f"{k:>11} {sum(counts):>10} {max(counts):>15} {facts[k][0]:>8.1f} {facts[k][1]:>8.2f} {facts[k][2] / rows:>9.2f}x "
                  f"{med:>12.2f} ({min(times[k]):.2f}-{max(times[k]):.2f})")


if __name__ == "__main__":
    main()
