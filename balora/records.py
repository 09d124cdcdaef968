"""Run records as plain rows and pandas: what every writer and reader of the run store shares.

    layer report rows ----split_report----> layers rows + spectra rows      (runner, RunRecorder)
    a cell's losses and clocks --summary_row--> one summary row               (runner, RunRecorder)
    a group of summary rows --with_speedups--> speedup_steps / speedup_seconds over the lora cell
    summary table --best_cells / arm_summary--> each arm at its best cell    (CLI, dashboard, benchmarks)

No torch, no files, no Streamlit: rows are dicts, tables are DataFrames with the columns of
balora.store.TABLES. A diverged, failed or interrupted cell ranks below every finished one
(its metric counts as +inf), so a grid that diverges at large learning rates still has a best cell.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import pandas as pd

from balora.errors import InputError

KEY = ("arm", "seed", "lr", "alpha")
# layer report list columns -> the spectra table's `which`
SPECTRA = (("dW", "sigma"), ("A", "sigma_A"), ("B", "sigma_B"))
SPECTRA_LISTS = tuple(col for _, col in SPECTRA)
# The headline metric of a summary, first one with any value: excess loss over the best rank-r
# loss when the task knows it, else the eval loss, else the training loss.
METRICS = ("final_excess_loss", "final_eval_loss", "final_loss")
NaN = math.nan


# ------------------------------------------------------------------ per step


def due(step: int, every: int, last: int | None = None) -> bool:
    """Whether a periodic record (layers, spectra, eval) is taken at `step`: every `every` steps
    (0: never) and at the `last` step, so a run always ends with one."""
    return every > 0 and (step % every == 0 or step == last)


def split_report(key: dict, step: int, report: Sequence[dict], *, layers: bool = True,
                 spectra: bool = True) -> tuple[list[dict], list[dict]]:
    """Layer report rows (balora.report.pair_rows) -> (layers rows, spectra rows) for one cell at `step`.

    layers rows: the cell key, step and every report column but the sigma lists;
    spectra rows: one per singular value, (which, index, value), index 0 the largest.
    """
    layer_rows, spectra_rows = [], []
    for row in report:
        if layers:
            layer_rows.append({**key, "step": step, **{k: v for k, v in row.items() if k not in SPECTRA_LISTS}})
        if spectra:
            for which, col in SPECTRA:
                spectra_rows.extend({**key, "step": step, "module": row["module"], "adapter": row["adapter"],
                                     "which": which, "index": i, "value": float(v)}
                                    for i, v in enumerate(row[col]))
    return layer_rows, spectra_rows


def max_rel_imbalance(report: Sequence[dict]) -> float:
    """The largest rel_imbalance of the layers measured (NaN when none is). A layer without a value
    (non-finite factors) is skipped wherever it comes: Python's max kept a NaN met first, not one met later."""
    return max((v for v in (float(r["rel_imbalance"]) for r in report) if not math.isnan(v)), default=NaN)


# ------------------------------------------------------------------ per cell


def first_reached(series: Iterable[tuple[int, float, float]], target: float | None) -> tuple[float, float]:
    """(step, seconds) of the first (step, value, seconds) with value <= target; NaNs when never or no target."""
    if target is not None:
        for step, value, seconds in series:
            if value <= target:
                return float(step), float(seconds)
    return NaN, NaN


def summary_row(key: dict, status: str, reason: str | None = None, *, steps_done: int,
                losses: Sequence[float], best_loss: float | None = None, final_eval_loss: float = NaN,
                rel_imbalance_max: float = NaN, target: float | None = None, target_on: str = "loss",
                reached: tuple[float, float] = (NaN, NaN), total_seconds: float = NaN,
                balance_seconds: float = NaN, diag_seconds: float = NaN) -> dict:
    """One summary row. `losses`: the cell's training losses in order (non-finite ones are ignored for
    final/min); `reached`: (steps, seconds) to target from first_reached. Speed-ups are NaN until
    with_speedups fills them from the cell's group."""
    finite = [float(v) for v in losses if math.isfinite(v)]
    final = finite[-1] if finite else NaN
    return {
        **key, "status": status, "reason": reason, "steps_done": int(steps_done),
        "final_loss": final, "min_loss": min(finite) if finite else NaN,
        "best_loss": NaN if best_loss is None else float(best_loss),
        "final_excess_loss": final - best_loss if finite and best_loss is not None else NaN,
        "final_eval_loss": final_eval_loss, "final_rel_imbalance_max": rel_imbalance_max,
        "target_loss": NaN if target is None else float(target), "target_on": target_on,
        "steps_to_target": reached[0], "seconds_to_target": reached[1],
        "total_seconds": total_seconds, "balance_seconds": balance_seconds, "diag_seconds": diag_seconds,
        "speedup_steps": NaN, "speedup_seconds": NaN,
    }


def _ratio(ref, mine) -> float:
    ok = all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in (ref, mine))
    return ref / mine if ok else NaN


def with_speedups(rows: list[dict], reference: str = "lora") -> list[dict]:
    """speedup_steps / speedup_seconds = the reference arm's steps/seconds to target divided by the cell's.

    `rows`: the summary rows of one (seed, lr, alpha) group, one per arm; filled in place and returned.
    NaN when either cell did not reach the target or the group has no reference arm.
    """
    ref = next((r for r in rows if r["arm"] == reference), None)
    for r in rows:
        for what in ("steps", "seconds"):
            theirs = ref.get(f"{what}_to_target", NaN) if ref else NaN
            r[f"speedup_{what}"] = _ratio(theirs, r.get(f"{what}_to_target", NaN))
    return rows


# ------------------------------------------------------------------ a summary table


def headline_metric(summary: pd.DataFrame) -> str:
    """The metric cells are ranked by: the first of METRICS with any value (final_loss when none has)."""
    return next((m for m in METRICS if m in summary and summary[m].notna().any()), "final_loss")


def cell_values(summary: pd.DataFrame, metric: str) -> pd.Series:
    """`metric` per summary row, +inf for a cell that did not complete (diverged, failed, skipped...)."""
    return summary[metric].where(summary["status"] == "completed", math.inf).astype(float)


def _best_per_arm(s: pd.DataFrame) -> pd.DataFrame:
    """Each arm's one (lr, alpha) cell with the smallest median value over seeds: all its seeds' rows."""
    picked = []
    for _, g in s.groupby("arm", sort=False):
        if (g["status"] == "skipped").all():
            continue
        # A completed cell without the metric (a Trainer run that logged no loss) ranks last, as in
        # _best_per_seed: an arm of such cells only made idxmin raise "Encountered all NA values".
        lr, alpha = g["value"].fillna(math.inf).groupby([g["lr"], g["alpha"]]).median().idxmin()
        picked.append(g[(g["lr"] == lr) & (g["alpha"] == alpha)])
    return pd.concat(picked) if picked else s.iloc[0:0]


def _best_per_seed(s: pd.DataFrame) -> pd.DataFrame:
    """Each (arm, seed)'s own (lr, alpha) with the smallest value: the paper's protocol (a trajectory
    keeps its best learning rate). Ties go to the first row in the table's order; a seed whose every
    cell diverged keeps one of them (value +inf), so it still counts, as the worst, in medians."""
    ran = s[s.groupby("arm", sort=False)["status"].transform(lambda st: (st != "skipped").any())]
    if ran.empty:
        return s.iloc[0:0]
    ranked = ran["value"].fillna(math.inf)  # a completed cell without the metric ranks last too
    return ran.loc[ranked.groupby([ran["arm"], ran["seed"]], sort=False).idxmin()]


# select -> rows of the summary (with "value") at the chosen cells, one per (arm, seed)
SELECTIONS = {"arm": _best_per_arm, "seed": _best_per_seed}


def best_cells(summary: pd.DataFrame, metric: str | None = None, *, select: str = "arm") -> pd.DataFrame:
    """The summary rows at each arm's best cell, one per (arm, seed), with a `value` column (the metric,
    +inf when the cell did not complete). Arms whose every cell was skipped have no row.

    select "arm": one (lr, alpha) per arm, the lowest median over seeds (the learning rate a user would
    pick for that arm); "seed": each seed of each arm at its own best (lr, alpha), the paper's protocol.
    metric None: headline_metric(summary).
    """
    if select not in SELECTIONS:
        raise InputError(f"best cell selection {select!r}: choose one of {', '.join(SELECTIONS)}")
    metric = metric or headline_metric(summary)
    if summary.empty:
        return summary.assign(value=pd.Series(dtype=float))
    s = summary.assign(value=cell_values(summary, metric))
    return SELECTIONS[select](s)


ARM_SUMMARY_COLUMNS = ["arm", "cells", "completed", "diverged", "best_lr", "best_alpha", "metric", "best", "worst",
                       "within_2x", "within_5pct", "steps_to_target", "reached", "speedup_vs_lora"]


def _summary_table(summary, who: str) -> pd.DataFrame:
    """A run's summary table: the DataFrame given, or a Run's (balora.load_run) `.summary`."""
    if not isinstance(summary, pd.DataFrame) and isinstance(getattr(summary, "summary", None), pd.DataFrame):
        summary = summary.summary
    if not isinstance(summary, pd.DataFrame):
        raise TypeError(f"{who}: expects a run's summary table (balora.load_run(path).summary, or the Run itself); "
                        f"got {type(summary).__name__}")
    missing = [c for c in (*KEY, "status") if c not in summary]
    if missing and len(summary.columns):  # a table with no columns at all is an empty summary
        raise InputError(f"{who}: the table has no {', '.join(missing)} column(s), so it is not a run's summary "
                         "(balora.load_run(path).summary); a layer report (layer_report, inspect) has a row per "
                         "LoRA layer, not per training cell")
    return summary


def arm_summary(summary: pd.DataFrame, *, select: str | None = None, reference: str = "lora") -> pd.DataFrame:
    """One row per arm, each at its own best (lr, alpha) cell (best_cells), plus how flat its grid is.

    summary: a run's summary table, or the Run (load_run) itself. select: the best-cell rule (SELECTIONS);
    None: the Run's own (`--select` when it was recorded, as `balora compare` prints it), else "arm".

    metric: headline_metric; a grid cell's value is the median over seeds, diverged seeds counting as
    +inf. Columns: arm, cells, completed, diverged, best_lr, best_alpha, metric, best (median over seeds
    of the value at the best cell(s)), worst (median at the worst grid cell), within_2x / within_5pct
    (fraction of grid cells whose median is within 2x / 5% of the best: 2x suits excess losses, which go
    to 0, 5% raw losses, which have a floor), steps_to_target (median at the best cell(s), a seed that
    had a target and never reached it counting as +inf), reached (how many of those seeds reached it),
    speedup_vs_lora (median over seeds of reference-at-its-best / arm-at-its-best steps to target: 0
    where only the reference reached it, inf where only the arm did, left out where neither did).
    """
    if select is None:
        config = getattr(summary, "config", None)
        select = config.get("select", "arm") if isinstance(config, dict) and not isinstance(summary, pd.DataFrame) else "arm"
    summary = _summary_table(summary, "arm_summary")
    if summary.empty:
        return pd.DataFrame(columns=ARM_SUMMARY_COLUMNS)
    metric = headline_metric(summary)
    best = {arm: g.set_index("seed") for arm, g in best_cells(summary, metric, select=select).groupby("arm")}
    values = summary.assign(value=cell_values(summary, metric))
    rows = []
    for arm, g in values.groupby("arm", sort=False):
        if arm not in best:
            rows.append({"arm": arm, "cells": len(g), "completed": 0, "diverged": 0, "metric": metric})
            continue
        grid = g.groupby(["lr", "alpha"])["value"].median()
        b = best[arm]
        top = float(b["value"].median())
        finite_top = top if math.isfinite(top) and top > 0 else NaN
        ref = best.get(reference)
        steps = _steps_or_never(b)
        rows.append({
            "arm": arm, "cells": len(g), "completed": int((g["status"] == "completed").sum()),
            "diverged": int((g["status"] == "diverged").sum()),
            "best_lr": float(b["lr"].median()), "best_alpha": float(b["alpha"].median()),
            "metric": metric, "best": top, "worst": float(grid.max()),
            "within_2x": float((grid <= 2 * finite_top).mean()) if finite_top == finite_top else NaN,
            "within_5pct": float((grid <= 1.05 * finite_top).mean()) if finite_top == finite_top else NaN,
            "steps_to_target": float(steps.median()),
            "reached": int((steps < math.inf).sum()) if _has_target(b).any() else NaN,
            "speedup_vs_lora": float((_steps_or_never(ref) / steps).median()) if ref is not None else NaN,
        })
    return pd.DataFrame(rows, columns=ARM_SUMMARY_COLUMNS)


def _has_target(cells: pd.DataFrame) -> pd.Series:
    return cells["target_loss"].notna() if "target_loss" in cells else pd.Series(False, index=cells.index)


def _steps_or_never(cells: pd.DataFrame) -> pd.Series:
    """steps_to_target per seed, +inf where the cell had a target and never reached it (a median that
    skipped those seeds would report the lucky ones only)."""
    steps = cells["steps_to_target"].astype(float)
    return steps.mask(steps.isna() & _has_target(cells), math.inf)


def _recording(steps: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The rows of the runs that record `metric` at all, every cell of them kept: a cell that stopped
    before its first value (diverged before its first eval) never reached a target and must count as
    never, not drop out of the medians. A run without the metric (no eval set) has no cells for it."""
    recorded = steps[metric].notna()
    if "run" in steps:
        return steps[recorded.groupby(steps["run"], sort=False).transform("any")]
    return steps if recorded.any() else steps.iloc[0:0]


def _with_reference(cells: pd.DataFrame, ref: pd.DataFrame, pair: list[str]) -> pd.DataFrame:
    """`cells` with their reference cell's ref_step, ref_time, ref_n, matched on `pair`. A run without the
    reference arm (RunRecorder writes one arm per run) takes it from the one other run that has it for the
    same seed (and cell), and task when `pair` has one; none where two runs have it (which one is meant
    is unclear)."""
    if "run" not in pair:
        return cells.merge(ref, on=pair, how="left")
    alone = ~cells["run"].isin(set(ref["run"]))
    across = [k for k in pair if k != "run"]
    other = ref.drop(columns="run").drop_duplicates(across, keep=False)
    return pd.concat([cells[~alone].merge(ref, on=pair, how="left"), cells[alone].merge(other, on=across, how="left")],
                     ignore_index=True)


def target_speedups(steps: pd.DataFrame, target: float, *, metric: str = "loss", by: str = "arm",
                    reference: str = "lora", same_cell: bool = True) -> pd.DataFrame:
    """Steps and seconds each `by` group needs to first reach `metric <= target` (median, min, max over
    its cells) and its speed-up over the `reference` arm's cell of the same run (for a run without that
    arm: of the one run that has it, of the same `task` when `steps` has that column), seed, lr and
    alpha (same_cell=False: of the same run and seed, for `steps` holding one cell per arm and seed,
    each arm at its own best cell, as arm_summary's speedup_vs_lora compares them).

    The run summary holds the same numbers for the run's own target loss; this recomputes them from the
    steps table for any target. Speed-up = reference steps / arm steps (> 1: faster). As in arm_summary,
    a cell that never reached the target counts as +inf in the medians (steps_min / steps_max span the
    cells that reached it; `reached` of `n_seeds` says how many did).
    """
    cols = [by, "steps_median", "steps_min", "steps_max", "seconds_median", "seconds_min", "seconds_max",
            "reached", "n_seeds", "speedup_steps", "speedup_seconds"]
    if steps.empty or metric not in steps:
        return pd.DataFrame(columns=cols)
    # task: a key of the pairing, so a run borrows a reference only from a run of its own task
    keys = list(dict.fromkeys([*(["run"] if "run" in steps else []), *(["task"] if "task" in steps else []), by, *KEY]))
    data = _recording(steps.sort_values("step", kind="stable"), metric)
    if data.empty:
        return pd.DataFrame(columns=cols)
    hits = data[data[metric] <= target].groupby(keys, sort=False).first()[["step", "time_s"]]
    cells = data.groupby(keys, sort=False).size().rename("n").to_frame().join(hits).reset_index()
    pair = [k for k in keys if k not in (by, "arm") and (same_cell or k not in ("lr", "alpha"))]
    ref = cells[cells["arm"].astype(str) == reference][pair + ["step", "time_s", "n"]]
    cells = _with_reference(cells, ref.rename(columns={"step": "ref_step", "time_s": "ref_time", "n": "ref_n"}), pair)
    has_ref = cells["ref_n"].notna()  # a reference cell to compare with (it may never have reached the target)
    cells["step_never"], cells["time_never"] = cells["step"].fillna(math.inf), cells["time_s"].fillna(math.inf)
    cells["speedup_steps"] = (cells["ref_step"].fillna(math.inf) / cells["step_never"]).where(has_ref)
    cells["speedup_seconds"] = (cells["ref_time"].fillna(math.inf) / cells["time_never"]).where(has_ref)
    order = list(dict.fromkeys(steps[by]))  # the run's arm order, not the order targets were hit
    rows = []
    for label, g in sorted(cells.groupby(by, sort=False), key=lambda kv: order.index(kv[0])):
        rows.append({by: label, "steps_median": g["step_never"].median(), "steps_min": g["step"].min(),
                     "steps_max": g["step"].max(), "seconds_median": g["time_never"].median(),
                     "seconds_min": g["time_s"].min(), "seconds_max": g["time_s"].max(),
                     "reached": int(g["step"].notna().sum()), "n_seeds": int(len(g)),
                     "speedup_steps": g["speedup_steps"].median(),
                     "speedup_seconds": g["speedup_seconds"].median()})
    return pd.DataFrame(rows, columns=cols)
