"""Frame shaping for the Inspect page: balora.inspect's per-layer report as tables and figure rows.

Pure pandas. The table puts the numbers a reader compares first (module, r, scaling, norms,
imbalance, conditioning); where each layer was read from is listed apart ("Files read").
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from balora.records import SPECTRA, SPECTRA_LISTS  # (which, list column): dW/sigma, A/sigma_A, B/sigma_B

# The per-layer table's leading columns, in this order; the others follow as the report has them.
TABLE_FIRST = ["module", "r", "scaling", "norm_A", "norm_B", "rel_imbalance", "imbalance", "cond_dW", "cond_A",
               "cond_B", "eff_rank", "sigma_max"]
# Where a layer was read from: shown in the "Files read" panel only (an upload's path is a server detail).
PATH_COLUMNS = ("source",)
TOP_N = (10, 20, 50)
MEASURED = ("ok", "partial")  # balora.report statuses whose numbers are drawn


def checkpoints(df: pd.DataFrame) -> pd.DataFrame:
    """One row per checkpoint of an inspect frame (checkpoint, step, layers), by step."""
    cols = ["checkpoint", "step", "layers"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    g = df.groupby("checkpoint", sort=False, dropna=False)
    out = pd.DataFrame({"step": g["step"].first(), "layers": g.size()}).reset_index()
    return out.sort_values("step", na_position="first", kind="stable").reset_index(drop=True)[cols]


def report_table(df: pd.DataFrame) -> pd.DataFrame:
    """The per-layer table as shown and downloaded: numbers first, no file paths, lists of
    singular values as text, columns that say nothing here (one adapter, no checkpoints) left out."""
    out = df.drop(columns=[c for c in PATH_COLUMNS if c in df])
    for c in SPECTRA_LISTS:
        if c in out:
            out[c] = out[c].map(lambda v: " ".join(f"{x:.4g}" for x in v) if isinstance(v, (list, tuple, np.ndarray)) else "")
    for c, unused in (("adapter", lambda s: s.nunique() <= 1), ("checkpoint", lambda s: (s.astype(str) == "").all()),
                      ("step", lambda s: s.isna().all())):
        if c in out and unused(out[c]):
            out = out.drop(columns=c)
    first = [c for c in TABLE_FIRST if c in out]
    return out[first + [c for c in out.columns if c not in first]]


def measured(report: pd.DataFrame) -> pd.DataFrame:
    """The layers whose diagnostics were computed: status "ok", or "partial" (some value beyond
    float64 is NaN and `note` says which; the others are drawn)."""
    return report[report["status"].isin(MEASURED)] if "status" in report else report


def summary_numbers(report: pd.DataFrame) -> dict[str, float | None]:
    """The headline numbers of one checkpoint's report (None when no layer could be measured)."""
    ok = measured(report)
    # No value (e.g. cond(dW) of PEFT's init, dW = 0, is undefined in every layer): None, shown "n/a", never "nan".
    med = lambda c: float(ok[c].median()) if len(ok) and c in ok and ok[c].notna().any() else None  # noqa: E731
    return {"layers": len(report), "measured": len(ok), "median_rel_imbalance": med("rel_imbalance"),
            "worst_rel_imbalance": float(ok["rel_imbalance"].max()) if len(ok) else None, "median_cond_dW": med("cond_dW")}


def skipped_layers(report: pd.DataFrame, limit: int = 5) -> list[str]:
    """"module: why" for the first `limit` layers that could not be measured."""
    bad = report[~report["status"].isin(MEASURED)] if "status" in report else report.iloc[0:0]
    return [f"{m}: {s}" for m, s in zip(bad["module"].head(limit), bad["status"].head(limit))]


def layer_notes(report: pd.DataFrame, limit: int = 5) -> list[str]:
    """"module: note" for the first `limit` measured layers with a note (e.g. a value beyond float64)."""
    if "note" not in report:
        return []
    noted = measured(report)
    noted = noted[noted["note"].fillna("").astype(str) != ""]
    return [f"{m}: {n}" for m, n in zip(noted["module"].head(limit), noted["note"].head(limit))]


def worst_layers(report: pd.DataFrame, value: str, top: int | None) -> pd.DataFrame:
    """The `top` layers with the largest finite `value`, largest first (all layers, in their
    order, when `top` is None)."""
    if top is None or value not in report:
        return report
    v = report[value].astype(float).replace([np.inf, -np.inf], np.nan)
    return report.assign(_v=v).sort_values("_v", ascending=False, na_position="last", kind="stable").head(top).drop(columns="_v")


def report_spectra(report: pd.DataFrame, module: str, *, by: str = "checkpoint") -> pd.DataFrame:
    """The sigma / sigma_A / sigma_B lists of one layer as long rows (by, which, index, value)."""
    cols = [by, "which", "index", "value"]
    rows = []
    for _, r in report[report["module"].astype(str) == module].iterrows():
        label = f"{r[by]}" if by in r else module
        if "adapter" in r and report["adapter"].nunique() > 1:
            label = f"{label} [{r['adapter']}]"
        for which, col in SPECTRA:
            values = r[col] if isinstance(r[col], (list, tuple, np.ndarray)) else []
            rows += [{by: label, "which": which, "index": i, "value": float(v)} for i, v in enumerate(values)]
    return pd.DataFrame(rows, columns=cols)


def source_notes(sources: list[dict]) -> list[str]:
    """Every note balora.inspect attached to a file it read (e.g. scaling unknown for bare
    weights), once each, in reading order."""
    return list(dict.fromkeys(str(n) for s in sources for n in (s.get("notes") or [])))


def unchanged_reasons(skipped: dict[str, str], clean=str) -> str:
    """Why pairs were left unchanged, one clause per reason with its count (most common first), e.g.
    "4 x PEFT's zero init (B = 0): ...; 2 x rank-deficient product (...)". `clean` redacts each reason."""
    counts: dict[str, int] = {}
    for why in skipped.values():
        counts[clean(why)] = counts.get(clean(why), 0) + 1
    return "; ".join(f"{n} x {why}" for why, n in sorted(counts.items(), key=lambda kv: -kv[1]))
