"""What every dashboard figure shares: the one arm colour map, axis vocabulary, empty figures.

Figure builders live next to their page (compare_plots, inspect_plots, learn_plots); each takes
frames already shaped (one row per point to draw), returns a Figure with a title and labelled
axes, and returns a titled figure that says "no data" when the frame is empty, so a page never
has to special-case an empty chart. Never calls st.*.
Matrices use PEFT naming: A = lora_A.weight (r, in), B = lora_B.weight (out, r), dW = s B A.
"""

from __future__ import annotations

import math
import zlib

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from balora.dashboard.md import plot_label

# One colour per arm, on every view, every run and the Learn page (lora grey, svd red, nearest
# green). Two runs of one arm share its colour and differ by line dash (run_dashes).
ARM_COLORS = {
    "lora": "#7f7f7f",
    "balora": "#2ca02c",
    "balora-nearest": "#2ca02c",
    "balora-svd": "#d62728",
    "loraplus": "#1f77b4",
    "riemannian": "#9467bd",
}
PALETTE = qualitative.Plotly
# Arms not listed above take one of these, chosen by their name (never by their position on a page).
SPARE_COLORS = [c for c in PALETTE if c.lower() not in {v.lower() for v in ARM_COLORS.values()}]
DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]

# Axis titles; the unit of a loss is the task's (the page passes it in `loss_unit`).
X_LABELS = {"step": "optimizer step", "time_s": "wall-clock time (s)"}
METRIC_NAMES = {
    "loss": "training loss",
    "eval_loss": "evaluation loss",
    "excess_loss": "excess loss",
    "final_loss": "final training loss",
    "min_loss": "lowest training loss",
    "best_loss": "best loss of any rank-r update",
    "final_eval_loss": "final evaluation loss",
    "final_excess_loss": "final excess loss",
}
# Said once in a subtitle, so axis titles stay short.
METRIC_NOTES = {
    "excess_loss": "; excess = loss − the best loss any rank-r update can reach",
    "final_excess_loss": "; excess = loss − the best loss any rank-r update can reach",
}
VALUE_LABELS = {
    "rel_imbalance": "relative imbalance (0 = balanced, 1 = worst)",
    "imbalance": "imbalance ‖BᵀB − AAᵀ‖_F (weight units²)",
    "cond_dW": "condition number of dW, σ₁/σ_r (ratio)",
    "cond_A": "condition number of A, σ₁/σ_r (ratio)",
    "cond_B": "condition number of B, σ₁/σ_r (ratio)",
    "eff_rank": "effective rank of dW (directions)",
    "sigma_max": "largest singular value of dW (weight units)",
    "norm_A": "‖A‖_F (weight units)",
    "norm_B": "‖B‖_F (weight units)",
}
WHICH_TITLES = {"dW": "dW = s·B·A", "A": "A = lora_A (r × in)", "B": "B = lora_B (out × r)"}
SIGMA_LABEL = "singular value (weight units)"


def series_arm(label) -> str:
    """The arm of a series label: "arm", or "run: arm" when several runs are shown."""
    return str(label).rsplit(": ", 1)[-1]


def series_run(label) -> str:
    """The run of a series label ("" when one run is shown)."""
    text = str(label)
    return text.rsplit(": ", 1)[0] if ": " in text else ""


def arm_color(arm: str) -> str:
    """The colour of `arm`: its fixed one, else a spare colour picked from its name (stable
    across pages, runs and sessions)."""
    return ARM_COLORS.get(arm) or SPARE_COLORS[zlib.crc32(arm.encode()) % len(SPARE_COLORS)]


def arm_colors(labels) -> dict[str, str]:
    """Colour per series label (an arm or "run: arm"): the colour of its arm, always."""
    return {lab: arm_color(series_arm(lab)) for lab in dict.fromkeys(labels)}


def run_dashes(labels) -> dict[str, str]:
    """Line dash per series label: one per run, in the order runs first appear ("solid" for all
    when one run is shown), so two runs of one arm stay apart with the arm's colour."""
    runs = list(dict.fromkeys(series_run(lab) for lab in labels))
    return {lab: DASHES[runs.index(series_run(lab)) % len(DASHES)] for lab in dict.fromkeys(labels)}


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def empty_figure(title: str, x_title: str, y_title: str, message: str = "no data to show") -> go.Figure:
    """A titled, labelled figure that says why it is empty."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font=dict(size=14))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, height=320)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    return fig


def _cap(text: str) -> str:
    """Upper-case the first letter only (str.capitalize would turn "dW" into "dw")."""
    return text[:1].upper() + text[1:]


def _title(text: str, subtitle: str | None = None) -> dict:
    return {"text": text, "subtitle": {"text": subtitle}} if subtitle else {"text": text}


def _off_log(values: pd.DataFrame, log_y: bool) -> str:
    """A subtitle clause for values a log axis cannot draw (an excess loss a rounding below 0, the singular
    values of a zero B), else "": a figure never leaves them out without a word."""
    v = values.to_numpy(dtype=float)
    n = int((v <= 0).sum()) if log_y else 0
    return f"; {n} value{'s' if n > 1 else ''} <= 0 left off the log scale (turn log off to see them)" if n else ""


def _log_ticks(lo: float, hi: float) -> dict:
    """Colour-bar ticks at powers of ten (and 2x, 5x when the range is short) for log10 data."""
    lo_i, hi_i = math.floor(lo), math.ceil(hi)
    mults = (1, 2, 5) if hi_i - lo_i <= 2 else (1,)
    vals = [math.log10(m) + k for k in range(lo_i, hi_i + 1) for m in mults]
    vals = [v for v in vals if lo - 1e-9 <= v <= hi + 1e-9] or [lo, hi]
    return {"tickvals": vals, "ticktext": [f"{10 ** v:.2g}" for v in vals]}


def singular_values(sv: pd.DataFrame, *, by: str = "series", title: str = "Singular values", log_y: bool = True, legend: str = "arm") -> go.Figure:
    """Singular values of dW, A and B side by side, index on x (1 = largest).

    `sv`: by, which ("dW"|"A"|"B"), index (0-based), value.
    """
    if sv.empty:
        return empty_figure(title, "index i (1 = largest)", SIGMA_LABEL, "no spectra recorded for this selection")
    whiches = [w for w in ("dW", "B", "A") if w in set(sv["which"])]
    fig = make_subplots(rows=1, cols=len(whiches), subplot_titles=[WHICH_TITLES[w] for w in whiches], horizontal_spacing=0.07)
    colors, dashes = arm_colors(sv[by]), run_dashes(sv[by])
    for col, w in enumerate(whiches, start=1):
        for label, g in sv[sv["which"] == w].groupby(by, sort=False):
            g = g.sort_values("index")
            fig.add_trace(
                go.Scatter(
                    x=g["index"] + 1, y=g["value"], mode="lines+markers", name=plot_label(label), legendgroup=str(label),
                    showlegend=col == 1, line=dict(color=colors[label], dash=dashes[label]),
                ),
                row=1, col=col,
            )
        fig.update_xaxes(title_text="index i (1 = largest)", dtick=1 if sv["index"].max() < 16 else None, row=1, col=col)
        fig.update_yaxes(type="log" if log_y else "linear", row=1, col=col)
    fig.update_yaxes(title_text=SIGMA_LABEL, row=1, col=1)
    # PEFT's init (B = 0) and step 0 of a run: every singular value of B and dW is 0, their panels blank on a log axis.
    sub = "balanced factors have equal spectra for A and B" + _off_log(sv[["value"]], log_y)
    fig.update_layout(title=_title(title, sub), height=400, legend_title_text=legend)
    return fig
