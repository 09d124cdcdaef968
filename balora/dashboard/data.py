"""Loaders and frame shaping for the dashboard pages.

Two kinds of functions live here:
- cached loaders (`st.cache_data`) over balora.list_runs / balora.load_run / balora.inspect /
  balora.balance_file, keyed by a cheap "version" of the files so a run still being written
  is re-read when it changes and never otherwise;
- pure pandas functions that select and aggregate what a figure draws (median across seeds,
  one cell per arm). They keep their output columns on empty input.
Nothing here recomputes a diagnostic: imbalance, spectra and conditioning come from the run
store or from balora.inspect as they are.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from balora.dashboard import settings

CELL = ["arm", "seed", "lr", "alpha"]
TABLES = ("steps", "layers", "spectra", "summary")

# Units of each task's loss, for axis titles (lm: token cross-entropy).
LOSS_UNITS = {"lm": "nats/token", "synthetic": "squared error"}


# ------------------------------------------------------------------------------ run loading


def _version(path: Path) -> tuple:
    """Changes whenever a writer renames a new part file or rewrites status.json."""
    parts: list = []
    try:
        parts.append(os.stat(path / "status.json").st_mtime_ns)
    except OSError:
        parts.append(None)
    for table in TABLES:
        try:
            with os.scandir(path / table) as it:
                names = sorted(e.name for e in it if e.name.endswith(".parquet"))
        except OSError:
            names = []
        parts.append((len(names), names[-1] if names else None))
    return tuple(parts)


def runs_version(root: Path, max_depth: int = 3) -> tuple:
    """Changes when a run appears, disappears or rewrites its status (balora.list_runs looks
    up to `max_depth` folders down, so this does too)."""
    out = []
    frontier = [(Path(root), 0)]
    while frontier:
        folder, depth = frontier.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            out.append((str(folder), "unreadable"))
            continue
        for e in entries:
            if e.name == "status.json":
                try:
                    out.append((str(folder), e.stat().st_mtime_ns))
                except OSError:
                    pass
            elif e.is_dir() and not e.name.startswith(".") and depth < max_depth:
                frontier.append((Path(e.path), depth + 1))
    return tuple(sorted(out, key=str))


@st.cache_data(show_spinner=False, max_entries=16)
def _list_runs(root: str, version: tuple) -> pd.DataFrame:
    from balora.store import list_runs as _list

    return _list(root)


def list_runs(root: Path) -> pd.DataFrame:
    """balora.list_runs(root), re-read only when the folder's runs change."""
    return _list_runs(str(root), runs_version(root))


@st.cache_data(show_spinner=False, max_entries=32)
def _load_run(path: str, version: tuple):
    from balora.store import load_run as _load

    return _load(path)


def load_run(path: str | Path):
    """balora.load_run(path), re-read only when its files change."""
    return _load_run(str(path), _version(Path(path)))


def run_labels(runs: pd.DataFrame, root: Path) -> list[str]:
    """How each run is named on the page: its folder under `root` ("grid", "sweeps/grid"), so
    two runs with the same folder name in different subfolders stay apart."""
    out = []
    for path in runs["path"].astype(str):
        try:
            out.append(Path(path).relative_to(root).as_posix())
        except ValueError:
            out.append(Path(path).name)
    return out


def status_labels(runs: pd.DataFrame) -> list[str]:
    """list_runs' status, with a "running" run whose writer is gone shown as stalled."""
    stale = runs["stale"] if "stale" in runs else pd.Series(False, index=runs.index)
    return ["stalled" if st_ == "running" and bool(s) else str(st_) for st_, s in zip(runs["status"].astype(str), stale)]


def default_run(runs: pd.DataFrame) -> str | None:
    """The run a page opens on: the largest completed run (most cells: grids, many seeds), so
    every section has something to show; else the largest run of any status."""
    if runs.empty:
        return None
    ranked = runs.assign(_done=runs["status"].astype(str) == "completed").sort_values(
        ["_done", "n_cells", "name"], ascending=[False, False, True], kind="stable"
    )
    return str(ranked["name"].iloc[0])


# ------------------------------------------------------------------------------ run status


@dataclass(frozen=True)
class RunState:
    """How a page should mark a run: `kind` is success | info | warning | error."""

    label: str  # "completed", "in progress", "stalled", "interrupted", "failed"
    kind: str
    text: str
    live: bool  # the page should refresh on its own


def _parse_time(value) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def run_state(status: str, info: dict, now: datetime | None = None) -> RunState:
    """Turn a run's status (balora.load_run's .status and .status_info) into what the page says.

    load_run marks a "running" run stale when its writer is gone or silent for too long: it is
    shown as "stalled", since its writer most likely died without recording it (kill -9, power cut).
    """
    info = info or {}
    now = now or datetime.now(timezone.utc)
    progress = info.get("progress") or {}
    done, total = progress.get("done"), progress.get("total")
    frac = f"{done}/{total} cells" if done is not None and total else ""
    message = info.get("message") or ""
    if status == "running":
        updated = _parse_time(info.get("updated"))
        age = (now - updated).total_seconds() if updated else None
        if info.get("stale"):
            why = info.get("stale_reason") or "no longer updated"
            return RunState("stalled", "warning", f"Marked running, but {why}: probably interrupted. {frac}".strip(), False)
        when = f", updated {age:.0f} s ago" if age is not None else ""
        return RunState("in progress", "info", f"Still being written ({frac or 'starting'}{when}); this page refreshes on its own.", True)
    if status == "interrupted":
        return RunState("interrupted", "warning", f"Interrupted before it finished ({frac or 'partial'}). {message}".strip(), False)
    if status == "failed":
        detail = f" ({frac})" if frac else ""
        return RunState("failed", "error", f"Failed: {message or 'no message recorded'}{detail}", False)
    if status == "completed":
        return RunState("completed", "success", f"Completed ({frac})." if frac else "Completed.", False)
    return RunState(status or "unknown", "warning", f"Unknown status {status!r}.", False)


def loss_unit(config: dict) -> str:
    return LOSS_UNITS.get(str((config or {}).get("task", "")), "")


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


def best_cells(summary: pd.DataFrame, steps: pd.DataFrame, *, by: str = "series") -> pd.DataFrame:
    """Per series, its best (lr, alpha) cell.

    Finished cells: balora.records.arm_summary's choice (lowest median over seeds of the run's
    headline metric, diverged seeds counting as +inf), run by run. A series with no finished
    cell yet (a run still being written) falls back to the lowest median latest training loss.
    Columns: by, lr, alpha, source ("summary" | "latest loss").
    """
    from balora.records import arm_summary

    cols = [by, "lr", "alpha", "source"]
    rows = []
    done = set()
    if not summary.empty:
        for run_name, g in summary.groupby("run", sort=False) if "run" in summary else [(None, summary)]:
            label_of = dict(zip(g["arm"].astype(str), g[by]))
            for _, r in arm_summary(g).iterrows():
                if pd.notna(r.get("best_lr")) and str(r["arm"]) in label_of:
                    rows.append({by: label_of[str(r["arm"])], "lr": r["best_lr"], "alpha": r["best_alpha"], "source": "summary"})
                    done.add(label_of[str(r["arm"])])
    if not steps.empty:
        for label, g in steps[~steps[by].isin(done)].groupby(by, sort=False):
            g = g.dropna(subset=["loss"])
            last = g.sort_values("step").groupby(["lr", "alpha", "seed"])["loss"].last()
            med = last[np.isfinite(last)].groupby(level=["lr", "alpha"]).median()
            if not med.empty:
                lr, alpha = med.idxmin()
                rows.append({by: label, "lr": lr, "alpha": alpha, "source": "latest loss"})
    return pd.DataFrame(rows, columns=cols)


def arm_summaries(summary: pd.DataFrame) -> pd.DataFrame:
    """balora.records.arm_summary of each run (one row per arm at its own best cell), with `run`."""
    from balora.records import arm_summary

    if summary.empty:
        return pd.DataFrame()
    groups = summary.groupby("run", sort=False) if "run" in summary else [("", summary)]
    parts = [arm_summary(g).assign(run=name) for name, g in groups]
    out = pd.concat(parts, ignore_index=True)
    return out[["run", *[c for c in out.columns if c != "run"]]]


def select_cells(df: pd.DataFrame, cells: pd.DataFrame, *, by: str = "series") -> pd.DataFrame:
    """Rows of `df` whose (series, lr, alpha) is one of `cells`."""
    if df.empty or cells.empty:
        return df.iloc[0:0]
    return df.merge(cells[[by, "lr", "alpha"]], on=[by, "lr", "alpha"], how="inner")


def select_cell(df: pd.DataFrame, lr: float, alpha: float) -> pd.DataFrame:
    return df[np.isclose(df["lr"], lr) & np.isclose(df["alpha"], alpha)]


# ------------------------------------------------------------------------------ shaping for figures

CURVE_COLUMNS = ["median", "lo", "hi", "n_seeds"]
BANDS = {"min–max": (0.0, 1.0), "interquartile": (0.25, 0.75)}


def seed_curves(steps: pd.DataFrame, *, x: str = "step", metric: str = "loss", by: str = "series", band: str = "min–max") -> pd.DataFrame:
    """Median and spread of `metric` across seeds at each step, per series.

    Seeds share steps, not times: with x = "time_s" the curve is drawn at the median
    wall-clock time of each step.
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
    out = pd.DataFrame(
        {
            "median": g[metric].median(),
            "lo": g[metric].quantile(q_lo),
            "hi": g[metric].quantile(q_hi),
            "n_seeds": g["seed"].nunique(),
        }
    )
    if x == "time_s":
        out["time_s"] = g["time_s"].median()
    out = out.reset_index()
    # Sorted by x only (stable): series keep the run's arm order, so lora stays first in legends.
    return out[cols].sort_values([x], kind="stable").reset_index(drop=True)


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
    data[value] = data[value].astype(float).where(np.isfinite(data[value].astype(float)))
    g = data.groupby([by, "lr", "alpha"], sort=False)
    out = pd.DataFrame({value: g[value].median(), "n_seeds": g["seed"].nunique()})
    statuses = data["status"].astype(str) if "status" in data else pd.Series("", index=data.index)
    out["status"] = statuses.groupby([data[by], data["lr"], data["alpha"]], sort=False).agg(lambda s: "/".join(sorted(set(s) - {"completed"})) or "completed")
    return out.reset_index()[cols]


def speedups(steps: pd.DataFrame, target: float, *, metric: str = "loss", by: str = "series", reference: str = "lora") -> pd.DataFrame:
    """Steps and seconds each series needs to first reach `metric <= target`, median over
    seeds, and its speed-up over the `reference` arm of the same run, seed, lr and alpha.

    The run summary holds the same numbers for the run's own target loss; this lets the
    user pick the target. Speed-up = reference steps / arm steps (> 1: faster).
    """
    cols = [by, "steps_median", "steps_min", "steps_max", "seconds_median", "seconds_min", "seconds_max", "reached", "n_seeds", "speedup_steps", "speedup_seconds"]
    if steps.empty or metric not in steps:
        return pd.DataFrame(columns=cols)
    keys = ["run", by, "arm", "seed", "lr", "alpha"] if "run" in steps else [by, "arm", "seed", "lr", "alpha"]
    data = steps.dropna(subset=[metric]).sort_values("step")
    hits = data[data[metric] <= target].groupby(keys, sort=False).first()[["step", "time_s"]]
    cells = data.groupby(keys, sort=False).size().rename("n").to_frame().join(hits)
    cells = cells.reset_index()
    pair = [k for k in keys if k not in (by, "arm")]
    ref = cells[cells["arm"].astype(str) == reference][pair + ["step", "time_s"]].rename(columns={"step": "ref_step", "time_s": "ref_time"})
    cells = cells.merge(ref, on=pair, how="left")
    cells["speedup_steps"] = cells["ref_step"] / cells["step"]
    cells["speedup_seconds"] = cells["ref_time"] / cells["time_s"]
    rows = []
    order = list(dict.fromkeys(steps[by]))  # the run's arm order, not the order targets were hit
    for label, g in sorted(cells.groupby(by, sort=False), key=lambda kv: order.index(kv[0])):
        rows.append(
            {
                by: label,
                "steps_median": g["step"].median(),
                "steps_min": g["step"].min(),
                "steps_max": g["step"].max(),
                "seconds_median": g["time_s"].median(),
                "seconds_min": g["time_s"].min(),
                "seconds_max": g["time_s"].max(),
                "reached": int(g["step"].notna().sum()),
                "n_seeds": int(len(g)),
                "speedup_steps": g["speedup_steps"].median(),
                "speedup_seconds": g["speedup_seconds"].median(),
            }
        )
    return pd.DataFrame(rows, columns=cols)


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
    return out[cols].sort_values(["module", "step"], kind="stable").reset_index(drop=True)


def median_over_layers(layers: pd.DataFrame, values: list[str], *, by: str = "series") -> pd.DataFrame:
    """Median across layers and seeds of `values` per (series, step): a whole-model summary."""
    cols = [by, "step", *values]
    if layers.empty:
        return pd.DataFrame(columns=cols)
    data = layers[[by, "step", *values]].replace([np.inf, -np.inf], np.nan)
    return data.groupby([by, "step"], sort=False)[values].median().reset_index()[cols]


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
    return data.groupby([by, "step", "index"], sort=False)["value"].median().reset_index()[cols]


# ------------------------------------------------------------------------------ inspect


def path_version(path: Path) -> tuple:
    """Changes when the file, or any file in the folder, changes (bounded walk)."""
    try:
        if path.is_file():
            s = path.stat()
            return (s.st_size, s.st_mtime_ns)
        out = []
        for i, (dirpath, _, files) in enumerate(os.walk(path)):
            if i > 2000:  # a huge folder is not an adapter: stop walking, inspect will say so
                break
            for f in files:
                s = os.stat(os.path.join(dirpath, f))
                out.append((dirpath, f, s.st_size, s.st_mtime_ns))
        return tuple(sorted(out))
    except OSError:
        return ("missing",)


@st.cache_data(show_spinner=False, max_entries=16)
def _inspect(path: str, version: tuple) -> pd.DataFrame:
    import balora

    return balora.inspect(path)


def inspect(path: str | Path) -> pd.DataFrame:
    """balora.inspect(path), re-read only when the files change. Raises what inspect raises."""
    return _inspect(str(path), path_version(Path(path)))


class UploadError(ValueError):
    """An uploaded file the Inspect page refuses, with a message for the user."""


UPLOAD_TYPES = ["safetensors", "zip"]


def save_upload(name: str, data: bytes, dest: Path, *, max_unzipped_mb: float = settings.MAX_UNZIPPED_MB) -> Path:
    """Write an uploaded adapter under `dest` (a temporary folder) and return what to inspect.

    A .safetensors file is written as is (kohya or bare LoRA weights); a .zip is unpacked
    (a zipped PEFT adapter folder or Trainer output) after checking that no member escapes
    `dest` and that it does not expand beyond `max_unzipped_mb`.
    """
    base = Path(name).name  # never trust a client-side path
    suffix = Path(base).suffix.lower()
    if suffix == ".safetensors":
        out = dest / base
        out.write_bytes(data)
        return out
    if suffix != ".zip":
        raise UploadError(f"{base}: upload a .safetensors file or a .zip of an adapter folder (got {suffix or 'no extension'}).")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise UploadError(f"{base}: not a valid zip archive.") from None
    with zf:
        members = zf.infolist()
        total = sum(m.file_size for m in members)
        if total > max_unzipped_mb * 2**20:
            raise UploadError(f"{base}: expands to {total / 2**20:.0f} MB, more than the {max_unzipped_mb:.0f} MB allowed.")
        root = (dest / Path(base).stem).resolve()
        for m in members:
            target = (root / m.filename).resolve()
            if not target.is_relative_to(root):
                raise UploadError(f"{base}: member {m.filename!r} points outside the archive; refusing to unpack it.")
        zf.extractall(root)
    # A zip of one folder unpacks to root/<folder>: inspect that folder.
    entries = [p for p in root.iterdir() if not p.name.startswith(("__MACOSX", "."))]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else root


def checkpoints(df: pd.DataFrame) -> pd.DataFrame:
    """One row per checkpoint of an inspect frame (checkpoint, step, layers), by step."""
    cols = ["checkpoint", "step", "layers"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    g = df.groupby("checkpoint", sort=False, dropna=False)
    out = pd.DataFrame({"step": g["step"].first(), "layers": g.size()}).reset_index()
    return out.sort_values("step", na_position="first", kind="stable").reset_index(drop=True)[cols]


def report_spectra(report: pd.DataFrame, module: str, *, by: str = "checkpoint") -> pd.DataFrame:
    """The sigma / sigma_A / sigma_B lists of one layer as long rows (by, which, index, value)."""
    cols = [by, "which", "index", "value"]
    rows = []
    for _, r in report[report["module"].astype(str) == module].iterrows():
        label = f"{r[by]}" if by in r else module
        if "adapter" in r and report["adapter"].nunique() > 1:
            label = f"{label} [{r['adapter']}]"
        for which, col in (("dW", "sigma"), ("A", "sigma_A"), ("B", "sigma_B")):
            values = r[col] if isinstance(r[col], (list, tuple, np.ndarray)) else []
            rows += [{by: label, "which": which, "index": i, "value": float(v)} for i, v in enumerate(values)]
    return pd.DataFrame(rows, columns=cols)


def report_table(df: pd.DataFrame) -> pd.DataFrame:
    """The per-layer table as shown and downloaded: lists of singular values as text."""
    out = df.copy()
    for c in ("sigma", "sigma_A", "sigma_B"):
        if c in out:
            out[c] = out[c].map(lambda v: " ".join(f"{x:.4g}" for x in v) if isinstance(v, (list, tuple, np.ndarray)) else "")
    return out


def balance_source(inspected: pd.DataFrame, root: Path, checkpoint: str | None) -> Path:
    """What to balance: the inspected path, or one checkpoint-N of a Trainer output folder
    (balora.balance_file balances one checkpoint at a time)."""
    if checkpoint and checkpoint.startswith("checkpoint-") and (root / checkpoint).is_dir():
        return root / checkpoint
    return root


@dataclass
class Balanced:
    """A balanced copy of an adapter, ready to download, and balora's summary of it."""

    data: bytes
    file_name: str
    mime: str
    summary: object  # balora.inspect.FileBalanceSummary: .changes has dW_rel_change per layer


@st.cache_data(show_spinner=False, max_entries=4)
def _balance(src: str, version: tuple, method: str) -> Balanced:
    import balora

    # Built in a temporary folder that is deleted before returning: the dashboard writes
    # nothing outside the runs folder; the result only leaves as a download.
    with tempfile.TemporaryDirectory(prefix="balora-balance-") as tmp:
        srcp = Path(src)
        dst = Path(tmp) / (f"{srcp.stem}-balanced{srcp.suffix}" if srcp.is_file() else f"{srcp.name}-balanced")
        summary = balora.balance_file(srcp, dst, method=method)
        if dst.is_file():
            return Balanced(dst.read_bytes(), dst.name, "application/octet-stream", summary)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(dst.rglob("*")):
                if p.is_file():
                    zf.write(p, Path(dst.name) / p.relative_to(dst))
        return Balanced(buf.getvalue(), f"{dst.name}.zip", "application/zip", summary)


def balance(src: str | Path, method: str) -> Balanced:
    """A balanced copy of the adapter at `src` (balora.balance_file), as download bytes."""
    return _balance(str(src), path_version(Path(src)), method)


def remove_tree(path: Path) -> None:
    """Delete a temporary folder the dashboard made (uploads); never anything else."""
    if Path(path).name.startswith(("balora-upload-", "balora-balance-")):
        shutil.rmtree(path, ignore_errors=True)
