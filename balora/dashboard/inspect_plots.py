"""Figures for the Inspect page: balora.inspect's per-layer report -> plotly Figure. Never calls st.*.

`report` frames are one checkpoint's layers (report_frames shapes them); every layer gets a
labelled bar, so the page passes at most the top-N layers the user asked for.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from balora.dashboard.md import plot_label
from balora.dashboard.plots import VALUE_LABELS, _cap, _title, empty_figure

def _layer_labels(report: pd.DataFrame) -> pd.Series:
    """Module names, with the adapter when the report has several."""
    label = report["module"].astype(str)
    if "adapter" in report and report["adapter"].nunique() > 1:
        label = label + " [" + report["adapter"].astype(str) + "]"
    return label.map(plot_label)  # names come from the file: shown as text, never as Plotly's tags


def _every_label(labels: pd.Series, row_px: int) -> dict:
    """A layer axis that names every bar (plotly would skip labels on a crowded axis), in the
    frame's order, tall enough for each row."""
    ticks = list(dict.fromkeys(labels))
    return {"yaxis": dict(autorange="reversed", type="category", tickmode="array", tickvals=ticks, ticktext=ticks),
            "height": max(320, 140 + row_px * len(ticks))}


def layer_bars(report: pd.DataFrame, *, value: str = "rel_imbalance", log_x: bool = False, subtitle: str | None = None) -> go.Figure:
    """One labelled horizontal bar per layer of `report`, in its order (one checkpoint's layer
    report, or the top-N worst layers that report_frames.worst_layers picked)."""
    x_title = VALUE_LABELS.get(value, value)
    title = f"{_cap(x_title.split(' (')[0])} by layer"
    data = report.dropna(subset=[value]) if value in report else report.iloc[0:0]
    if data.empty:
        return empty_figure(title, x_title, "layer", "no layers with finite values")
    label = _layer_labels(data)
    vals = data[value].replace([np.inf, -np.inf], np.nan)
    fig = go.Figure(go.Bar(x=vals, y=label, orientation="h", marker_color="#1f77b4", hovertemplate="%{y}: %{x:.4g}<extra></extra>"))
    fig.update_layout(title=_title(title, subtitle), xaxis_title=x_title, yaxis_title="layer", **_every_label(label, 20))
    fig.update_xaxes(type="log" if log_x else "linear")
    return fig


def conditioning_by_layer(report: pd.DataFrame, *, subtitle: str | None = None) -> go.Figure:
    """cond_dW, cond_B, cond_A per layer of `report`, in its order (log x): large values mean
    slow, unstable training."""
    title = "Condition numbers by layer"
    x_title = "condition number σ₁/σ_r (ratio, log scale)"
    if report.empty:
        return empty_figure(title, x_title, "layer")
    label = _layer_labels(report)
    fig = go.Figure()
    for c, color in (("cond_dW", "#1f77b4"), ("cond_B", "#ff7f0e"), ("cond_A", "#2ca02c")):
        fig.add_trace(go.Bar(x=report[c].replace([np.inf, -np.inf], np.nan), y=label, orientation="h", name=f"cond({c.split('_')[1]})", marker_color=color))
    fig.update_layout(
        title=_title(title, "; ".join(filter(None, [subtitle, "missing bar = rank-deficient (infinite) or zero update"]))),
        xaxis_title=x_title, yaxis_title="layer", barmode="group", legend_title_text="matrix", **_every_label(label, 30),
    )
    fig.update_xaxes(type="log")
    return fig


def across_checkpoints(df: pd.DataFrame, *, value: str = "rel_imbalance", log_y: bool = False) -> go.Figure:
    """`value` against checkpoint step, one line per layer (Trainer output folders).

    `df`: the inspect frame (step, module, adapter, `value`), several checkpoints.
    """
    y_title = VALUE_LABELS.get(value, value)
    title = f"{_cap(y_title.split(' (')[0])} across checkpoints"
    data = df.dropna(subset=["step"]) if "step" in df else df.iloc[0:0]
    if data.empty:
        return empty_figure(title, "training step of the checkpoint", y_title, "no numbered checkpoints")
    fig = go.Figure()
    for (module, adapter), g in data.groupby(["module", "adapter"], sort=True):
        g = g.sort_values("step")
        name = plot_label(module if data["adapter"].nunique() == 1 else f"{module} [{adapter}]")
        fig.add_trace(go.Scatter(x=g["step"], y=g[value].replace([np.inf, -np.inf], np.nan), mode="lines+markers", name=name))
    fig.update_layout(title=title, xaxis_title="training step of the checkpoint", yaxis_title=y_title, height=420, legend_title_text="layer")
    fig.update_yaxes(type="log" if log_y else "linear")
    return fig


def balance_check(changes: pd.DataFrame, *, tolerance: float = 1e-5) -> go.Figure:
    """Per layer: relative imbalance before and after balancing, and the relative change of
    dW measured on the written file (balora.balance_file's `changes` table).

    `changes`: module, adapter, action, rel_imbalance_before, rel_imbalance_after, dW_rel_change.
    """
    title = "Balancing: imbalance removed, dW unchanged"
    if changes.empty:
        return empty_figure(title, VALUE_LABELS["rel_imbalance"], "layer", "no layers were balanced")
    label = _layer_labels(changes)
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.05,
                        subplot_titles=["relative imbalance", "relative change of dW, ‖ΔdW‖_F / ‖dW‖_F"])
    fig.add_trace(go.Bar(x=changes["rel_imbalance_before"], y=label, orientation="h", name="before", marker_color="#d62728"), row=1, col=1)
    fig.add_trace(go.Bar(x=changes["rel_imbalance_after"], y=label, orientation="h", name="after", marker_color="#2ca02c"), row=1, col=1)
    # Unchanged layers have an exact 0, which a log axis cannot show: draw them at the axis floor.
    change = changes["dW_rel_change"].astype(float)
    pos = change[change > 0]
    floor = float(pos.min()) / 10 if len(pos) else 1e-12
    fig.add_trace(
        go.Scatter(x=change.clip(lower=floor), y=label, mode="markers", name="dW change (float32 rounding)",
                   marker=dict(color="#1f77b4", size=9), customdata=change, hovertemplate="%{y}: %{customdata:.2e}<extra></extra>"),
        row=1, col=2,
    )
    fig.add_vline(x=tolerance, line_dash="dash", line_color="grey", row=1, col=2,
                  annotation_text=f"tolerance {tolerance:g}", annotation_position="top left")
    # Log scale: "after" (~1e-7, float32 rounding) must be visible next to "before" (~1).
    fig.update_xaxes(title_text="relative imbalance (ratio, log scale)", type="log", row=1, col=1)
    fig.update_xaxes(title_text="relative change of dW (ratio, log scale)", type="log", row=1, col=2)
    fig.update_yaxes(title_text="layer", autorange="reversed", type="category", row=1, col=1)
    fig.update_layout(title=_title(title, "checked by re-reading the written file"), barmode="group",
                      height=max(360, 160 + 34 * len(changes)))
    return fig
