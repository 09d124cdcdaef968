"""Figures for the Learn page: results of balora.teaching -> plotly Figure. Never calls st.*.

Every figure has a title and labelled axes; matrices use PEFT naming (A = lora_A, B = lora_B,
dW = B A), which the page states next to each figure.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from balora.dashboard.plots import ARM_COLORS

# One colour per role, the same on every figure of the page; the arms keep the colours they
# have on Compare (plots.ARM_COLORS: lora grey, the svd gauge red, the nearest gauge green).
COLORS = {
    "balanced": "#1f77b4",
    "unbalanced": "#d62728",
    "gd": "#1f77b4",
    "adam": "#ff7f0e",
    "gd+balancing": "#2ca02c",
    "lora": ARM_COLORS["lora"],
    "svd": ARM_COLORS["balora-svd"],
    "nearest": ARM_COLORS["balora"],
}
LABELS = {
    "gd": "gradient descent",
    "adam": "Adam",
    "gd+balancing": "gradient descent + balancing",
    "lora": "LoRA (no balancing)",
    "svd": "BaLoRA, svd gauge",
    "nearest": "BaLoRA, nearest gauge",
}
# Log-scale axes cannot show 0: an exact 0 (or less) is drawn at a floor, this or a decade below the smallest
# positive value of its figure, whichever is lower. Positive values are drawn as they are (float64 gradient
# descent reaches 1e-30: flattened at a fixed floor, a curve looked stalled there).
LOG_FLOOR = 1e-12


def _layout(fig: go.Figure, title: str, height: int = 420) -> go.Figure:
    fig.update_layout(title=title, height=height, margin=dict(l=60, r=20, t=60, b=50), legend=dict(orientation="h", y=-0.2))
    return fig


def _zero_floor(*arrays) -> float:
    """Where a figure of `arrays` draws its values <= 0 on a log axis: below every positive value it draws."""
    pos = [v[v > 0] for v in (np.asarray(a, dtype=float).ravel() for a in arrays)]
    smallest = min((float(p.min()) for p in pos if p.size), default=LOG_FLOOR)
    return min(LOG_FLOOR, smallest / 10)


def _floor(x, floor: float = LOG_FLOOR) -> np.ndarray:
    """Positive copy for log axes: values <= 0 at `floor`, the others as they are; nan (diverged or not
    reached) stays nan so lines break there."""
    x = np.asarray(x, dtype=float)
    return np.where(np.isnan(x), np.nan, np.where(x > 0, x, floor))


# --- 1. scalar case ----------------------------------------------------------------------


def scalar_landscape_figure(a, b, Z, paths: dict, y: float = 1.0) -> go.Figure:
    """Contours of f(a, b) = 1/2 (ab - y)^2, the valley ab = y and gradient-descent paths.

    a (n,), b (n,), Z (n, n) from teaching.scalar_loss_grid; paths: label -> ScalarPath.
    """
    fig = go.Figure()
    # log10 contours: the loss spans many decades and linear contours hide the valley floor.
    fig.add_trace(
        go.Contour(
            x=a,
            y=b,
            z=np.log10(Z + 1e-4),
            colorscale="Greys",
            reversescale=True,
            contours=dict(start=-3, end=2, size=0.25),
            colorbar=dict(title="log10(loss + 1e-4)"),
            hovertemplate="a=%{x:.2f}<br>b=%{y:.2f}<br>log10 f=%{z:.2f}<extra></extra>",
            name="loss",
            showscale=True,
        )
    )
    lim = float(np.max(np.abs(a)))
    for sign in (1, -1):
        va = sign * np.linspace(abs(y) / lim, lim, 200)
        fig.add_trace(
            go.Scatter(
                x=va, y=y / va, mode="lines", line=dict(color="#ff7f0e", width=2, dash="dot"), name="valley ab = y",
                showlegend=sign == 1,
            )
        )
    for label, path in paths.items():
        color = COLORS.get(label, None)
        fig.add_trace(
            go.Scatter(x=path.a, y=path.b, mode="lines+markers", marker=dict(size=4), line=dict(color=color), name=f"GD, {label} start")
        )
        fig.add_trace(
            go.Scatter(x=path.a[:1], y=path.b[:1], mode="markers", marker=dict(size=11, symbol="star", color=color), showlegend=False)
        )
    fig.update_xaxes(title="a (first factor)", range=[-lim, lim], constrain="domain")
    fig.update_yaxes(title="b (second factor)", range=[-lim, lim], scaleanchor="x", scaleratio=1, constrain="domain")
    return _layout(fig, "Loss landscape of f(a, b) = ½(ab − y)² with gradient-descent paths", height=520)


def scalar_loss_figure(paths: dict) -> go.Figure:
    """Loss per step of each gradient-descent path (log scale); a diverged path stops."""
    fig = go.Figure()
    floor = _zero_floor(*(path.loss for path in paths.values()))
    lows = [LOG_FLOOR]
    for label, path in paths.items():
        steps = np.arange(len(path.loss))
        name = f"{label} start" + (" (diverged)" if path.diverged else "")
        fig.add_trace(go.Scatter(x=steps, y=_floor(path.loss, floor), mode="lines", name=name, line=dict(color=COLORS.get(label))))
        lows.append(float(np.nanmin(_floor(path.loss, floor))))
    fig.update_xaxes(title="step")
    # Cap the top: a diverging run would otherwise squash every other curve to the bottom.
    fig.update_yaxes(title="loss f(a, b)", type="log", range=[np.log10(min(lows)) - 0.5, 3])
    return _layout(fig, "Loss per step")


def valley_curvature_figure(a, curvature, lr: float, paths: dict, y: float = 1.0, targets: dict | None = None) -> go.Figure:
    """Curvature a^2 + b^2 across the valley against a, the stability limit 2 / lr, and where each path ended.

    targets: optional label -> (a, b), the valley point gradient flow heads for from that start
    (teaching.valley_point_with_imbalance of the start's b^2 - a^2).
    """
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=a, y=curvature, mode="lines", name="curvature a² + b² on ab = y", line=dict(color="black")))
    fig.add_trace(
        go.Scatter(
            x=[a[0], a[-1]], y=[2 / lr, 2 / lr], mode="lines", line=dict(color="purple", dash="dash"),
            name=f"stability limit 2 / lr = {2 / lr:.2f}",
        )
    )
    for label, (ta, tb) in (targets or {}).items():
        fig.add_trace(
            go.Scatter(
                x=[ta], y=[ta * ta + tb * tb], mode="markers",
                marker=dict(size=13, color=COLORS.get(label), symbol="circle-open", line=dict(width=2)),
                name=f"{label} start heads for (b² − a² kept; gradient flow)",
            )
        )
    for label, path in paths.items():
        if path.diverged or not path.loss[-1] < 1e-6:  # not settled (e.g. a period-2 cycle): no point of the valley
            continue
        a_end = abs(path.a[-1])
        # Where the path ended, placed on the valley at its own |a| (exact if it converged).
        fig.add_trace(
            go.Scatter(
                x=[a_end], y=[a_end**2 + (y / a_end) ** 2], mode="markers",
                marker=dict(size=12, color=COLORS.get(label), symbol="x"), name=f"end of {label} path",
            )
        )
    fig.update_xaxes(title="a at a point of the valley (b = y / a)", type="log")
    fig.update_yaxes(title="curvature across the valley a² + b²", type="log")
    return _layout(fig, "Curvature across the valley vs 2 / lr")


# --- 2. conservation ---------------------------------------------------------------------


def imbalance_figure(paths: dict, relative: bool = False) -> go.Figure:
    """||B^T B - A A^T||_F (or the relative imbalance) per step; paths: optimizer -> FactorPath."""
    fig = go.Figure()
    for name, path in paths.items():
        values = path.rel_imbalance if relative else path.imbalance
        fig.add_trace(
            go.Scatter(x=np.arange(len(values)), y=values, mode="lines", name=LABELS.get(name, name), line=dict(color=COLORS.get(name)))
        )
    fig.update_xaxes(title="step")
    if relative:
        fig.update_yaxes(title="relative imbalance ‖BᵀB − AAᵀ‖ / (‖BᵀB‖ + ‖AAᵀ‖)", range=[0, 1.05])
        title = "Relative imbalance per step (scale-free, in [0, 1])"
    else:
        fig.update_yaxes(title="imbalance ‖BᵀB − AAᵀ‖_F", rangemode="tozero")
        title = "Imbalance D = BᵀB − AAᵀ per step"
    return _layout(fig, title)


def factor_loss_figure(paths: dict) -> go.Figure:
    """Loss 1/2 ||B A - Y||^2 per step (log scale); paths: optimizer -> FactorPath."""
    fig = go.Figure()
    floor = _zero_floor(*(path.loss for path in paths.values()))
    for name, path in paths.items():
        fig.add_trace(
            go.Scatter(
                x=np.arange(len(path.loss)), y=_floor(path.loss, floor), mode="lines", name=LABELS.get(name, name),
                line=dict(color=COLORS.get(name)),
            )
        )
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="loss ½‖BA − Y‖²_F", type="log")
    return _layout(fig, "Loss per step (8 × 8, rank-2 target)")


# --- 3. r = 2 invariance -----------------------------------------------------------------


def factors_heatmap_figure(ex) -> go.Figure:
    """Heatmaps of B T (out, 2), T^-1 A (2, in) and their product dW (out, in); ex: InvarianceExample."""
    fig = make_subplots(
        rows=1, cols=3, column_widths=[0.18, 0.38, 0.44], horizontal_spacing=0.11,
        subplot_titles=("B T  (lora_B, out × 2)", "T⁻¹ A  (lora_A, 2 × in)", "dW = B A  (out × in)"),
    )
    mats = (ex.B.numpy(), ex.A.numpy(), ex.dW.numpy())
    # One symmetric colour range per panel: the factors change with T, dW must not.
    for col, M in enumerate(mats, start=1):
        m = float(np.abs(M).max()) or 1.0
        fig.add_trace(
            go.Heatmap(
                z=M, zmin=-m, zmax=m, colorscale="RdBu", showscale=col == 3,
                hovertemplate="row %{y}, col %{x}: %{z:.3f}<extra></extra>",
            ),
            row=1, col=col,
        )
        fig.update_xaxes(title="column", row=1, col=col, dtick=1)
        fig.update_yaxes(title=dict(text="row", standoff=2), row=1, col=col, autorange="reversed", dtick=1)
    return _layout(fig, "The factors change with T; their product dW does not", height=380)


def hessian_spectrum_figure(eigenvalues, r: int = 2) -> go.Figure:
    """|eigenvalues| of the Hessian of 1/2 ||B A - Y||^2, sorted; the r^2 smallest are the gauge directions."""
    mags = np.sort(np.abs(np.asarray(eigenvalues, dtype=float)))
    gauge = np.arange(len(mags)) < r * r
    fig = go.Figure()
    for mask, name, color in ((gauge, f"{r * r} gauge directions (≈ 0, ignored)", "#bbbbbb"), (~gauge, "kept directions", "#1f77b4")):
        fig.add_trace(go.Bar(x=np.arange(len(mags))[mask], y=_floor(mags[mask], _zero_floor(mags)), name=name, marker_color=color))
    fig.update_xaxes(title="eigenvalue index (sorted by magnitude)")
    fig.update_yaxes(title="|eigenvalue| of the Hessian", type="log")
    return _layout(fig, "Hessian spectrum at (B T, T⁻¹ A)", height=380)


def condition_sweep_figure(log_scales, conds, rels, current_log_scale: float, current_cond: float, predicted=None) -> go.Figure:
    """Condition number (log scale, left) and relative imbalance (right) against ln c of T's scale.

    predicted: optional (k,) closed form (max(c, 1/c)^4 + 1) s1 / sr, exact when T is a pure scaling.
    """
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=log_scales, y=conds, mode="lines", name="Hessian condition number", line=dict(color="#1f77b4")), secondary_y=False)
    if predicted is not None:
        fig.add_trace(
            go.Scatter(
                x=log_scales, y=predicted, mode="markers", name="(max(c, 1/c)⁴ + 1) s₁/s₂ (pure scaling)",
                marker=dict(color="#1f77b4", symbol="circle-open", size=7),
            ),
            secondary_y=False,
        )
    fig.add_trace(go.Scatter(x=log_scales, y=rels, mode="lines", name="relative imbalance", line=dict(color="#d62728")), secondary_y=True)
    fig.add_trace(
        go.Scatter(x=[current_log_scale], y=[current_cond], mode="markers", marker=dict(size=12, color="black"), name="current T"),
        secondary_y=False,
    )
    fig.update_xaxes(title="ln c  (T's overall scale c)")
    fig.update_yaxes(title="condition number (gauge directions dropped)", type="log", secondary_y=False)
    fig.update_yaxes(title="relative imbalance", range=[0, 1.05], tickmode="linear", dtick=0.2, showgrid=False, secondary_y=True)
    return _layout(fig, "Conditioning vs the scale of T", height=420)


# --- 4. gauge and Adam -------------------------------------------------------------------


def _median_band(fig: go.Figure, values: np.ndarray, name: str, color: str, x0: int = 0) -> None:
    """Median over seeds as a line, min..max over seeds as a shaded band. values (G, T)."""
    x = np.arange(values.shape[1]) + x0
    lo, med, hi = (_floor(np.nanquantile(values, q, axis=0)) for q in (0.0, 0.5, 1.0))
    fig.add_trace(go.Scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([hi, lo[::-1]]), fill="toself", fillcolor=color,
                             opacity=0.15, line=dict(width=0), hoverinfo="skip", showlegend=False))
    fig.add_trace(go.Scatter(x=x, y=med, mode="lines", name=name, line=dict(color=color)))


def gauge_loss_figure(runs: dict, optimizer_label: str) -> go.Figure:
    """Excess loss over the best rank-r loss per step; runs: arm -> GaugeRun. Median and range over seeds."""
    fig = go.Figure()
    for arm, run in runs.items():
        _median_band(fig, run.excess_loss, LABELS.get(arm, arm), COLORS.get(arm, "#000000"))
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="excess loss over best rank-r (MSE)", type="log")
    return _layout(fig, f"{optimizer_label}: excess loss (median, range)")


def gauge_displacement_figure(runs: dict) -> go.Figure:
    """How far each projection moves (A, B) per step; only the balanced arms project."""
    fig = go.Figure()
    for arm, run in runs.items():
        if arm == "lora":
            continue
        _median_band(fig, run.displacement, LABELS.get(arm, arm), COLORS.get(arm, "#000000"), x0=1)
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="projection move ‖(A, B) after − (A, B) before‖_F", type="log")
    return _layout(fig, "How far each projection moves (A, B)")
