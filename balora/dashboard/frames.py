"""Frame shaping for the Compare page: pure pandas, no Streamlit, no files.

Each function selects and aggregates what one figure or table draws (median across seeds,
one cell per arm) from run tables already loaded by `loaders`; the ranking and speed-up
rules are balora.records', shared with the CLI and the runner. Every function keeps its
output columns on empty input, so a page never special-cases an empty selection.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from balora import records

CELL = ["arm", "seed", "lr", "alpha"]
CURVE_COLUMNS = ["median", "lo", "hi", "n_seeds"]
BANDS = {"min–max": (0.0, 1.0), "interquartile": (0.25, 0.75)}
# Units of each task's loss, for axis titles (lm: token cross-entropy).
LOSS_UNITS = {"lm": "nats/token", "synthetic": "squared error"}
# Metric choices, best first: excess loss where the task knows its floor (each seed has its
# own, so every seed can reach the same target), as balora.records ranks arms.
LOSS_METRICS = ("excess_loss", "eval_loss", "loss")
# min_loss, not best_loss: the summary's best_loss is the task's floor (the best rank-r loss), one value
# for every cell of a seed, where the Grid view shows what each cell's training reached.
GRID_VALUES = ("final_excess_loss", "final_eval_loss", "final_loss", "min_loss")
# What a table cell without a value shows (st.dataframe(..., placeholder=NA_TEXT)), never "None".
NA_TEXT = "—"
SEED_COLUMNS = ("series", "seed", "lr", "alpha", "status", "final_loss", "best_loss", "final_eval_loss",
                "final_excess_loss", "steps_to_target", "seconds_to_target", "speedup_steps", "speedup_seconds", "reason")


def loss_unit(configs: list[dict]) -> str:
    """The loss unit shared by every run shown ("" when they are of different tasks)."""
    tasks = {str((c or {}).get("task", "")) for c in configs}
    return LOSS_UNITS.get(tasks.pop(), "") if len(tasks) == 1 else ""


# ------------------------------------------------------------------------------ selection


def combine(frames: dict[str, pd.DataFrame], *, multi: bool | None = None) -> pd.DataFrame:
    """Concatenate one table of several runs, adding `run` and `series` (the arm, or
    "run: arm" when more than one run is shown)."""
    multi = len(frames) > 1 if multi is None else multi
    parts = []
    for name, df in frames.items():
        df = df.copy()
        df.insert(0, "run", name)
        df.insert(1, "series", (name + ": " + df["arm"].astype(str)) if multi else df["arm"].astype(str))
        parts.append(df)
    if not parts:
        return pd.DataFrame(columns=["run", "series", *CELL])
    non_empty = [p for p in parts if not p.empty]
    return pd.concat(non_empty, ignore_index=True) if non_empty else parts[0]


def arms_and_seeds(*tables: pd.DataFrame) -> tuple[list[str], list[int]]:
    """Every arm (in the runs' order) and every seed (sorted) found in `tables`."""
    arms = list(dict.fromkeys(a for t in tables for a in t["arm"].astype(str)))
    seeds = sorted({int(s) for t in tables for s in t["seed"].dropna()})
    return arms, seeds


def filter_arms_seeds(df: pd.DataFrame, arms: list[str] | None, seeds: list[int] | None) -> pd.DataFrame:
    mask = pd.Series(True, index=df.index)
    if arms is not None:
        mask &= df["arm"].astype(str).isin(arms)
    if seeds is not None:
        mask &= df["seed"].isin(seeds)
    return df[mask]


def grid_shape(summary: pd.DataFrame, steps: pd.DataFrame) -> tuple[list[float], list[float]]:
    """The learning rates and alphas a run swept (from whichever table has rows)."""
    src = summary if not summary.empty else steps
    if src.empty:
        return [], []
    return sorted(src["lr"].dropna().unique().tolist()), sorted(src["alpha"].dropna().unique().tolist())


def best_cells(summary: pd.DataFrame, steps: pd.DataFrame, *, by: str = "series", select: str = "arm") -> pd.DataFrame:
    """Per series, its best (lr, alpha) cell; with select="seed", per series and seed (the paper's protocol).

    Finished cells: balora.records.best_cells's choice (select "arm": lowest median over seeds of the
    run's headline metric, diverged seeds counting as +inf; "seed": each seed's lowest), run by run.
    A series with no finished cell yet (a run still being written) falls back to the lowest (median)
    latest training loss. Columns: by, lr, alpha, source ("summary" | "latest loss"), and seed when
    select="seed".
    """
    cols = [by, "lr", "alpha", "source"] + (["seed"] if select == "seed" else [])
    rows = []
    done = set()
    if not summary.empty:
        for _, g in summary.groupby("run", sort=False) if "run" in summary else [(None, summary)]:
            label_of = dict(zip(g["arm"].astype(str), g[by]))
            picked = records.best_cells(g, select=select)
            if select == "arm":
                picked = picked.drop_duplicates("arm")
            for _, r in picked.iterrows():
                if str(r["arm"]) in label_of:
                    row = {by: label_of[str(r["arm"])], "lr": r["lr"], "alpha": r["alpha"], "source": "summary"}
                    rows.append({**row, "seed": r["seed"]} if select == "seed" else row)
                    done.add(label_of[str(r["arm"])])
    if not steps.empty:
        for label, g in steps[~steps[by].isin(done)].groupby(by, sort=False):
            g = g.dropna(subset=["loss"])
            last = g.sort_values("step").groupby(["lr", "alpha", "seed"])["loss"].last()
            last = last[np.isfinite(last)]
            if select == "seed":
                for seed, per_seed in last.groupby(level="seed"):
                    lr, alpha, _ = per_seed.idxmin()
                    rows.append({by: label, "lr": lr, "alpha": alpha, "source": "latest loss", "seed": seed})
                continue
            med = last.groupby(level=["lr", "alpha"]).median()
            if not med.empty:
                lr, alpha = med.idxmin()
                rows.append({by: label, "lr": lr, "alpha": alpha, "source": "latest loss"})
    return pd.DataFrame(rows, columns=cols)


def arm_summaries(summary: pd.DataFrame, select: str = "arm") -> pd.DataFrame:
    """balora.records.arm_summary of each run (one row per arm at its own best cell(s), by `select`), with `run`."""
    if summary.empty:
        return pd.DataFrame(columns=["run", *records.ARM_SUMMARY_COLUMNS])
    parts = [records.arm_summary(g, select=select).assign(run=run) for run, g in summary.groupby("run", sort=False)]
    out = pd.concat(parts, ignore_index=True)
    return out[["run"] + [c for c in out.columns if c != "run"]]


def select_cells(df: pd.DataFrame, cells: pd.DataFrame, *, by: str = "series") -> pd.DataFrame:
    """Rows of `df` whose (series, lr, alpha), and seed when `cells` has one (per-seed best cells), is one of `cells`."""
    if df.empty or cells.empty:
        return df.iloc[0:0]
    on = [by, "lr", "alpha"] + (["seed"] if "seed" in cells and "seed" in df else [])
    return df.merge(cells[on], on=on, how="inner")


def select_cell(df: pd.DataFrame, lr: float, alpha: float) -> pd.DataFrame:
    return df[np.isclose(df["lr"], lr) & np.isclose(df["alpha"], alpha)]


# ------------------------------------------------------------------------------ what a view offers


def recorded(df: pd.DataFrame, candidates) -> list[str]:
    """The `candidates` (in their order) that `df` has at least one value of."""
    return [c for c in candidates if c in df and df[c].notna().any()]


def runs_without(df: pd.DataFrame, column: str, runs: list[str]) -> list[str]:
    """The `runs` with no value of `column` in `df` (e.g. an lm run next to a synthetic one, with
    excess loss chosen): a figure of that column draws nothing of them."""
    has = set(df.loc[df[column].notna(), "run"].astype(str)) if column in df and "run" in df else set()
    return [r for r in runs if r not in has]


def why_unrecorded(column: str, absent_tasks: list, drawn_tasks: list) -> str:
    """Why runs of `absent_tasks` lack `column` while runs of `drawn_tasks` have it (the page's "Not
    drawn" note): another task, or, in a run of a drawn task, no evaluation (no eval set, --eval-every 0)."""
    drawn = set(drawn_tasks)
    other = [t not in drawn for t in absent_tasks]
    unrecorded = "no evaluation, or it diverged first" if "eval" in column else "not recorded"
    return "another task" if all(other) else unrecorded if not any(other) else f"another task, or {unrecorded}"


def speed_metrics(steps: pd.DataFrame, summary: pd.DataFrame) -> list[str]:
    """Metrics a target can be set on, default first: excess loss when the task records it
    (each seed has its own floor, so every seed can reach the same target), else the metric
    the run's own target is on."""
    target_on = summary["target_on"].dropna() if "target_on" in summary else pd.Series(dtype=str)
    own = str(target_on.iloc[0]) if len(target_on) else "loss"
    return recorded(steps, dict.fromkeys(("excess_loss", own, "loss", "eval_loss")))


def default_target(steps: pd.DataFrame, summary: pd.DataFrame, metric: str, *, reference: str = "lora") -> float | None:
    """The target a Speed-up view opens on: the run's own target when it is on `metric`, else
    the level every seed of the reference arm reaches (its worst best value), so the ratios
    are defined for every seed. None when `metric` has no finite value."""
    rng = metric_range(steps, metric)
    if rng is None:
        return None
    own = summary.loc[summary["target_on"].astype(str) == metric, "target_loss"].dropna() if {"target_on", "target_loss"} <= set(summary) else []
    if len(own):
        value = float(own.median())
    else:
        data = steps[np.isfinite(steps[metric].astype(float))]
        ref = data[data["arm"].astype(str) == reference]
        data = ref if not ref.empty else data
        value = float(data.groupby(["series", "seed"] if "series" in data else ["arm", "seed"])[metric].min().max())
    return min(max(value, rng[0]), rng[1])


def headline_metric(summary: pd.DataFrame) -> str:
    """The metric arms are ranked by (balora.records.headline_metric): excess loss when recorded."""
    return records.headline_metric(summary)


def ranking_metrics(summary: pd.DataFrame) -> list[str]:
    """The metric each run's best cells are ranked by (best_cells goes run by run), each once in run order:
    the final excess loss of a synthetic run, the final eval loss of an lm run, not always the final loss."""
    if summary.empty:
        return []
    groups = summary.groupby("run", sort=False) if "run" in summary else [(None, summary)]
    return list(dict.fromkeys(records.headline_metric(g) for _, g in groups))


def tidy(table: pd.DataFrame) -> pd.DataFrame:
    """A table as a page shows it: columns without any value left out (the page shows NA_TEXT,
    not "None", where one row has no value: st.dataframe's placeholder)."""
    return table[[c for c in table.columns if table[c].notna().any() or c in ("series", "arm", "run")]]


def seed_rows(summary: pd.DataFrame) -> pd.DataFrame:
    """The per-seed summary rows as the Loss view lists them (columns with values only)."""
    cols = [c for c in SEED_COLUMNS if c in summary and (c in ("series", "seed") or summary[c].notna().any())]
    return summary[cols]


# ------------------------------------------------------------------------------ shaping for figures


# At most this many steps per curve or heatmap row: a chart is about 1,000 pixels wide, and more
# points than pixels only cost serialising, sending and drawing them (long runs log every step).
MAX_PLOT_STEPS = 1000


def thin_steps(df: pd.DataFrame, max_steps: int = MAX_PLOT_STEPS) -> pd.DataFrame:
    """Rows at no more than `max_steps` distinct values of `step`, evenly spaced over the recorded
    steps, the first and last always kept; every row at a kept step is kept as it is."""
    if df.empty or "step" not in df:
        return df
    steps = np.sort(df["step"].unique())
    if len(steps) <= max_steps:
        return df
    keep = steps[np.unique(np.linspace(0, len(steps) - 1, max_steps).round().astype(int))]
    return df[df["step"].isin(keep)]


def seed_curves(steps: pd.DataFrame, *, x: str = "step", metric: str = "loss", by: str = "series", band: str = "min–max",
                summary: pd.DataFrame | None = None) -> pd.DataFrame:
    """Median and spread of `metric` across seeds at each step, per series.

    Seeds share steps, not times: with x = "time_s" the curve is drawn at the median
    wall-clock time of each step. A seed whose cell `summary` marks diverged counts as +inf in
    the median after its last row (as balora.records ranks it), so a curve ends where most of its
    seeds diverged instead of going on as the median of the few left; the spread is of finite values.
    """
    cols = [by, x, *CURVE_COLUMNS]
    if steps.empty or metric not in steps:
        return pd.DataFrame(columns=cols)
    data = steps.dropna(subset=[metric])
    data = data[np.isfinite(data[metric].astype(float))]
    if data.empty:
        return pd.DataFrame(columns=cols)
    q_lo, q_hi = BANDS[band]
    g = data.groupby([by, "step"], sort=False)
    gone = _diverged_rows(steps, summary, metric, by)
    if len(gone):  # from its last row on (a non-finite loss there is no finite row): not twice at one step
        have = data[[by, "lr", "alpha", "seed", "step"]].drop_duplicates()
        gone = gone.merge(have, how="left", indicator=True).query("_merge == 'left_only'").drop(columns="_merge")
    whole = pd.concat([data, gone]).groupby([by, "step"], sort=False) if len(gone) else g
    out = pd.DataFrame(
        {
            "median": whole[metric].median(),
            "lo": g[metric].quantile(q_lo),
            "hi": g[metric].quantile(q_hi),
            "n_seeds": whole["seed"].nunique(),
        }
    )
    if x == "time_s":
        out["time_s"] = g["time_s"].median()
    out = thin_steps(out[np.isfinite(out["median"])].reset_index())
    # Sorted by x only (stable): series keep the run's arm order, so lora stays first in legends.
    return out[cols].sort_values([x], kind="stable").reset_index(drop=True)


def _diverged_rows(steps: pd.DataFrame, summary: pd.DataFrame | None, metric: str, by: str) -> pd.DataFrame:
    """+inf rows of `metric` for each seed `summary` marks diverged, at the steps of its cell from its
    last row on (a diverged cell writes its non-finite loss, then stops writing rows)."""
    if summary is None or summary.empty or "status" not in summary:
        return steps.iloc[0:0]
    cell = [by, "lr", "alpha"]
    bad = summary.loc[summary["status"].astype(str) == "diverged", [*cell, "seed"]].drop_duplicates()
    last = steps.merge(bad, on=[*cell, "seed"]).groupby([*cell, "seed"], as_index=False)["step"].max()
    # Joins, not a scan of every row per diverged seed: that took seconds on every rerun of the page
    # for a run of many seeds (7 s for 250 diverged seeds of 375k rows).
    later = last.rename(columns={"step": "end"}).merge(steps[[*cell, "step"]].drop_duplicates(), on=cell)
    later = later[later["step"] >= later["end"]]
    return later.assign(**{metric: np.inf})[[*cell, "seed", "step", metric]].reset_index(drop=True)


def metric_range(steps: pd.DataFrame, metric: str = "loss") -> tuple[float, float] | None:
    """Smallest and largest finite value of `metric` (for the target-loss picker)."""
    if steps.empty or metric not in steps:
        return None
    v = steps[metric].to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    return (float(v.min()), float(v.max())) if v.size else None


def grid_cells(summary: pd.DataFrame, *, value: str = "final_loss", by: str = "series") -> pd.DataFrame:
    """Median of `value` across seeds per (series, lr, alpha). A cell where no seed ended with
    a finite value is NaN and its `status` says why (e.g. "diverged"), for the heatmap."""
    cols = [by, "lr", "alpha", value, "n_seeds", "status"]
    if summary.empty or value not in summary:
        return pd.DataFrame(columns=cols)
    data = summary.copy()
    # A diverged cell keeps its last finite loss (1e28 or so): it counts as +inf, as balora.records
    # ranks it, so the heatmap says "diverged" rather than colouring that number.
    data[value] = records.cell_values(data, value) if "status" in data else data[value].astype(float)
    g = data.groupby([by, "lr", "alpha"], sort=False)
    out = pd.DataFrame({value: g[value].median(), "n_seeds": g["seed"].nunique()})
    out[value] = out[value].where(np.isfinite(out[value]))
    statuses = data["status"].astype(str) if "status" in data else pd.Series("", index=data.index)
    out["status"] = statuses.groupby([data[by], data["lr"], data["alpha"]], sort=False).agg(lambda s: "/".join(sorted(set(s) - {"completed"})) or "completed")
    return out.reset_index()[cols]


def speedups(steps: pd.DataFrame, target: float, *, metric: str = "loss", by: str = "series", reference: str = "lora",
             tasks: dict | None = None) -> pd.DataFrame:
    """Steps and seconds each series needs to first reach `metric <= target`, median over
    seeds, and its speed-up over the `reference` arm of the same run and seed
    (balora.records.target_speedups, grouped by the page's series). When `steps` holds one
    cell per series and seed (the page's chosen cells, e.g. each arm at its own best), the
    reference is taken at its own cell, as arm_summary does; across a whole grid, cell by cell.
    tasks: run -> task (config.json): a run without the reference arm borrows it only from a run of
    its own task (steps to another task's loss are no yardstick)."""
    if tasks is not None and "run" in steps:
        steps = steps.assign(task=steps["run"].map(lambda r: str(tasks.get(r))))
    one_cell = steps.empty or not steps.groupby([by, "seed"])[["lr", "alpha"]].nunique().gt(1).any(axis=None)
    return records.target_speedups(steps, target, metric=metric, by=by, reference=reference, same_cell=not one_cell)


def layer_names(layers: pd.DataFrame) -> list[str]:
    return sorted(layers["module"].astype(str).unique().tolist()) if not layers.empty else []


def layer_steps(layers: pd.DataFrame, values: list[str], *, by: str = "series", modules: list[str] | None = None) -> pd.DataFrame:
    """Median across seeds of `values` per (series, module, step), optionally for chosen modules."""
    cols = [by, "module", "step", *values]
    if layers.empty:
        return pd.DataFrame(columns=cols)
    data = layers if modules is None else layers[layers["module"].astype(str).isin(modules)]
    data = data.assign(module=data["module"].astype(str))
    out = data.groupby([by, "module", "step"], sort=False)[values].median().reset_index()
    # Series keep the order they come in (lora first, as the run lists its arms).
    return thin_steps(out[cols].sort_values(["module", "step"], kind="stable")).reset_index(drop=True)


def median_over_layers(layers: pd.DataFrame, values: list[str], *, by: str = "series") -> pd.DataFrame:
    """Median across layers and seeds of `values` per (series, step): a whole-model summary. An infinite
    value (cond of a rank-deficient product) counts as the largest, not as missing: dropped, a model of
    mostly rank-deficient layers would show the median of its few well-conditioned ones."""
    cols = [by, "step", *values]
    if layers.empty:
        return pd.DataFrame(columns=cols)
    data = layers[[by, "step", *values]]
    return thin_steps(data.groupby([by, "step"], sort=False)[values].median().reset_index()[cols])


def spectra_steps(spectra: pd.DataFrame, module: str) -> list[int]:
    if spectra.empty:
        return []
    return sorted(spectra.loc[spectra["module"].astype(str) == module, "step"].unique().tolist())


def spectra_at(spectra: pd.DataFrame, module: str, step: int, *, by: str = "series") -> pd.DataFrame:
    """Median across seeds of each singular value of dW, A, B of `module` at `step`."""
    cols = [by, "which", "index", "value"]
    if spectra.empty:
        return pd.DataFrame(columns=cols)
    data = spectra[(spectra["module"].astype(str) == module) & (spectra["step"] == step)]
    return data.groupby([by, "which", "index"], sort=False)["value"].median().reset_index()[cols]


def spectra_over_steps(spectra: pd.DataFrame, module: str, which: str, *, by: str = "series") -> pd.DataFrame:
    """Median across seeds of σ_i of `which` for `module`, per (series, step, index)."""
    cols = [by, "step", "index", "value"]
    if spectra.empty:
        return pd.DataFrame(columns=cols)
    data = spectra[(spectra["module"].astype(str) == module) & (spectra["which"] == which)]
    return thin_steps(data.groupby([by, "step", "index"], sort=False)["value"].median().reset_index()[cols])
