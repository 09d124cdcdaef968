"""Figures for the Compare and Inspect pages: DataFrame -> plotly Figure. Never calls st.*.

Every builder takes frames already shaped by `dashboard.data` (one row per point to draw),
returns a Figure with a title and labelled axes, and returns a titled figure that says
"no data" when the frame is empty, so a page never has to special-case an empty chart.
Matrices use PEFT naming: A = lora_A.weight (r, in), B = lora_B.weight (out, r), dW = s B A.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

# One colour per arm on every chart, matching the Learn page (lora grey, svd red, nearest green).
ARM_COLORS = {
    "lora": "#7f7f7f",
    "balora": "#2ca02c",
    "balora-nearest": "#2ca02c",
    "balora-svd": "#d62728",
    "loraplus": "#1f77b4",
}
PALETTE = qualitative.Plotly

# Axis titles; the unit of a loss is the task's (the page passes it in `loss_unit`).
X_LABELS = {"step": "optimizer step", "time_s": "wall-clock time (s)"}
METRIC_NAMES = {
    "loss": "training loss",
    "eval_loss": "evaluation loss",
    "excess_loss": "excess loss",
    "final_loss": "final training loss",
    "best_loss": "best training loss",
    "final_eval_loss": "final evaluation loss",
    "final_excess_loss": "final excess loss",
}
# Said once in a subtitle, so axis titles stay short.
METRIC_NOTES = {
    "excess_loss": "; excess = loss − the best loss any rank-r update can reach",
    "final_excess_loss": "; excess = loss − the best loss any rank-r update can reach",
}
REL_IMBALANCE = "relative imbalance ‖BᵀB − AAᵀ‖_F / (‖BᵀB‖_F + ‖AAᵀ‖_F)"
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


def arm_colors(labels) -> dict[str, str]:
    """Colour per series label. Labels are an arm or "run: arm"; known arms keep their colour
    unless two series share an arm (several runs selected), then each gets its own."""
    labels = list(dict.fromkeys(labels))
    arms = [str(lab).split(": ")[-1] for lab in labels]
    if len(set(arms)) == len(arms):
        out, spare = {}, iter(c for c in PALETTE if c not in ARM_COLORS.values())
        for lab, arm in zip(labels, arms):
            out[lab] = ARM_COLORS.get(arm) or next(spare, PALETTE[len(out) % len(PALETTE)])
        return out
    return {lab: PALETTE[i % len(PALETTE)] for i, lab in enumerate(labels)}


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


# ----------------------------------------------------------------------------------- Compare


def loss_curves(
    curves: pd.DataFrame,
    *,
    x: str = "step",
    metric: str = "loss",
    log_y: bool = True,
    by: str = "series",
    loss_unit: str = "",
    band: str = "min–max",
) -> go.Figure:
    """Median across seeds with a shaded spread, one colour per series.

    `curves` (from data.seed_curves): by, x, `median`, `lo`, `hi`, `n_seeds`.
    """
    name = METRIC_NAMES.get(metric, metric)
    y_title = f"{name} ({loss_unit})" if loss_unit else name
    x_title = X_LABELS.get(x, x)
    title = f"{_cap(name)} against {x_title.split(' (')[0]}"
    if curves.empty:
        return empty_figure(title, x_title, y_title, f"no {name} recorded for this selection")
    colors = arm_colors(curves[by])
    n = int(curves["n_seeds"].max())
    fig = go.Figure()
    for label, g in curves.groupby(by, sort=False):
        g = g.sort_values(x)
        c = colors[label]
        if n > 1:
            # Spread as one closed polygon: upper edge forward, lower edge back.
            fig.add_trace(
                go.Scatter(
                    x=np.concatenate([g[x].to_numpy(), g[x].to_numpy()[::-1]]),
                    y=np.concatenate([g["hi"].to_numpy(), g["lo"].to_numpy()[::-1]]),
                    fill="toself", fillcolor=_rgba(c, 0.18), line=dict(width=0),
                    hoverinfo="skip", showlegend=False, legendgroup=str(label), name=f"{label} spread",
                )
            )
        fig.add_trace(
            go.Scatter(x=g[x], y=g["median"], mode="lines", name=str(label), legendgroup=str(label), line=dict(color=c, width=2))
        )
    sub = f"median over {n} seed{'s' if n > 1 else ''}" + (f"; shaded: {band} across seeds" if n > 1 else "") + METRIC_NOTES.get(metric, "")
    fig.update_layout(title=_title(title, sub), xaxis_title=x_title, yaxis_title=y_title, legend_title_text="arm", height=420)
    fig.update_yaxes(type="log" if log_y else "linear")
    return fig


def final_loss_by_arm(cells: pd.DataFrame, *, value: str = "final_loss", by: str = "series", loss_unit: str = "", log_y: bool = False) -> go.Figure:
    """One dot per seed and a box per arm: makes a null result as visible as a win.

    `cells` (from data.summary_cells for the chosen cell): by, seed, `value`.
    """
    name = METRIC_NAMES.get(value, value)
    y_title = f"{name} ({loss_unit})" if loss_unit else name
    title = f"{_cap(name)} per arm"
    data = cells.dropna(subset=[value]) if value in cells else cells.iloc[0:0]
    if data.empty:
        return empty_figure(title, "arm", y_title, "no finished cells in this selection")
    colors = arm_colors(data[by])
    fig = go.Figure()
    for label, g in data.groupby(by, sort=False):
        fig.add_trace(
            go.Box(
                y=g[value], name=str(label), boxpoints="all", jitter=0.3, pointpos=0, marker_color=colors[label],
                text=[f"seed {s}" for s in g["seed"]], hovertemplate="%{text}: %{y:.4g}<extra>%{x}</extra>",
            )
        )
    fig.update_layout(title=_title(title, "each dot is one seed" + METRIC_NOTES.get(value, "")), xaxis_title="arm", yaxis_title=y_title, showlegend=False, height=380)
    fig.update_yaxes(type="log" if log_y else "linear")
    pos = data[value].to_numpy(dtype=float)
    pos = pos[np.isfinite(pos) & (pos > 0)]
    if log_y and pos.size and np.log10(pos.max() / pos.min()) > 2:
        fig.update_yaxes(dtick=1)  # one label per decade: 2x/5x labels crowd a short axis
    return fig


def _fmt_lr(v: float) -> str:
    return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")


def _fmt_alpha(v: float) -> str:
    return f"{v:g}"


def grid_heatmaps(grid: pd.DataFrame, *, value: str = "final_loss", by: str = "series", log_color: bool = True, loss_unit: str = "") -> go.Figure:
    """Per arm, `value` over learning rate x alpha, each arm's best cell starred (the paper's
    sensitivity figures). One colour scale for all arms so they compare by colour.

    `grid` (from data.grid_cells): by, lr, alpha, `value` (median over seeds; NaN when no seed
    ended finite), optional `status` (why a cell has no value, e.g. "diverged").
    """
    name = METRIC_NAMES.get(value, value)
    title = f"{_cap(name)} across learning rate × alpha"
    if grid.empty or grid[value].notna().sum() == 0:
        return empty_figure(title, "learning rate", "lora_alpha", "no grid cells finished yet")
    labels = list(dict.fromkeys(grid[by]))
    lrs = sorted(grid["lr"].unique())
    alphas = sorted(grid["alpha"].unique())
    xs, ys = [_fmt_lr(v) for v in lrs], [_fmt_alpha(v) for v in alphas]
    z_all = grid[value].to_numpy(dtype=float)
    finite = z_all[np.isfinite(z_all) & (z_all > 0 if log_color else True)]
    use_log = log_color and finite.size > 0 and (z_all[np.isfinite(z_all)] > 0).all()
    zmin, zmax = (np.log10(finite.min()), np.log10(finite.max())) if use_log else (finite.min(), finite.max())
    if zmin == zmax:
        zmax = zmin + 1e-12
    fig = make_subplots(rows=1, cols=len(labels), subplot_titles=[str(lab) for lab in labels], shared_yaxes=True, horizontal_spacing=0.04)
    unit = f" ({loss_unit})" if loss_unit else ""
    for col, label in enumerate(labels, start=1):
        sub = grid[grid[by] == label]
        z = np.full((len(alphas), len(lrs)), np.nan)
        # Cells absent from the frame have not finished (blank); present but NaN: say why.
        text = [["" for _ in lrs] for _ in alphas]
        for _, row in sub.iterrows():
            i, j = alphas.index(row["alpha"]), lrs.index(row["lr"])
            z[i, j] = row[value]
            text[i][j] = f"{row[value]:.3g}" if np.isfinite(row[value]) else str(row.get("status") or "no value")
        fig.add_trace(
            go.Heatmap(
                x=xs, y=ys, z=np.log10(np.where(z > 0, z, np.nan)) if use_log else z, zmin=zmin, zmax=zmax,
                colorscale="Viridis", reversescale=True, text=text, texttemplate="%{text}", textfont=dict(size=12), customdata=z,
                hovertemplate="lr %{x}, alpha %{y}: %{customdata:.4g}" + f"<extra>{label}</extra>",
                showscale=col == len(labels),
                colorbar=dict(title=dict(text=f"{name}{unit}", side="right"), **(_log_ticks(zmin, zmax) if use_log else {})),
            ),
            row=1, col=col,
        )
        if np.isfinite(z).any():
            # The best cell: a star in its label and a white frame (a marker would hide the number).
            i, j = np.unravel_index(np.nanargmin(z), z.shape)
            text[i][j] = f"<b>★ {text[i][j]}</b>"
            fig.data[-1].text = text
            fig.add_shape(type="rect", x0=j - 0.5, x1=j + 0.5, y0=i - 0.5, y1=i + 0.5, line=dict(color="white", width=4), row=1, col=col)
            fig.add_shape(type="rect", x0=j - 0.5, x1=j + 0.5, y0=i - 0.5, y1=i + 0.5, line=dict(color="black", width=1.5), row=1, col=col)
        fig.update_xaxes(title_text="learning rate", type="category", row=1, col=col)
    # Fixed ranges: the frames must not stretch a panel's axes beyond its cells.
    fig.update_xaxes(range=[-0.5, len(lrs) - 0.5])
    fig.update_yaxes(type="category", range=[-0.5, len(alphas) - 0.5])
    fig.update_yaxes(title_text="lora_alpha", row=1, col=1)
    sub = "median over seeds; ★ and frame: each arm's lowest" + ("; colour on a log scale" if use_log else "") + METRIC_NOTES.get(value, "")
    fig.update_layout(title=_title(title, sub), height=360 + 12 * len(alphas))
    return fig


def _log_ticks(lo: float, hi: float) -> dict:
    """Colour-bar ticks at powers of ten (and 2x, 5x when the range is short) for log10 data."""
    lo_i, hi_i = math.floor(lo), math.ceil(hi)
    mults = (1, 2, 5) if hi_i - lo_i <= 2 else (1,)
    vals = [math.log10(m) + k for k in range(lo_i, hi_i + 1) for m in mults]
    vals = [v for v in vals if lo - 1e-9 <= v <= hi + 1e-9] or [lo, hi]
    return {"tickvals": vals, "ticktext": [f"{10 ** v:.2g}" for v in vals]}


def speedup_bars(speed: pd.DataFrame, *, target: float, metric: str = "loss", by: str = "series", loss_unit: str = "", reference: str = "lora") -> go.Figure:
    """Steps and seconds each arm needs to reach `target`, median over seeds, bars annotated
    with the speed-up relative to `reference` (above 1 = faster than it).

    `speed` (from data.speedups): by, steps_median, steps_min, steps_max, seconds_median,
    seconds_min, seconds_max, reached, n_seeds, speedup_steps, speedup_seconds.
    """
    unit = f" {loss_unit}" if loss_unit else ""
    name = METRIC_NAMES.get(metric, metric)
    title = f"Time to reach {'an' if name[:1] in 'aeiou' else 'a'} {name} of {target:.4g}{unit}"
    if speed.empty:
        return empty_figure(title, "arm", "optimizer steps", "no curves for this selection")
    fig = make_subplots(rows=1, cols=2, subplot_titles=["optimizer steps needed", "wall-clock seconds needed"], horizontal_spacing=0.12)
    colors = arm_colors(speed[by])
    for col, key in enumerate(("steps", "seconds"), start=1):
        med = speed[f"{key}_median"].to_numpy(dtype=float)
        ratio = speed[f"speedup_{key}"].to_numpy(dtype=float)
        # The verdict goes under each bar's name (readable, never squeezed by the error bars).
        ticks = []
        for m, rt, reached, n, label in zip(med, ratio, speed["reached"], speed["n_seeds"], speed[by]):
            lines = [f"<b>{label}</b>"]
            if not np.isfinite(m):
                lines.append("not reached")
            else:
                if str(label).split(": ")[-1] != reference and np.isfinite(rt):
                    lines.append(f"×{rt:.2f} vs {reference}")
                if reached != n:
                    lines.append(f"{reached}/{n} seeds reached")
            ticks.append("<br>".join(lines))
        fig.add_trace(
            go.Bar(
                x=ticks, y=np.where(np.isfinite(med), med, 0.0),
                error_y=dict(
                    type="data", symmetric=False,
                    array=np.nan_to_num(speed[f"{key}_max"].to_numpy(dtype=float) - med),
                    arrayminus=np.nan_to_num(med - speed[f"{key}_min"].to_numpy(dtype=float)),
                ),
                marker_color=[colors[lab] for lab in speed[by]], showlegend=False,
                customdata=speed[by].astype(str), hovertemplate="%{customdata}: %{y:.4g}<extra></extra>",
            ),
            row=1, col=col,
        )
        fig.update_xaxes(title_text="arm", row=1, col=col)
    fig.update_yaxes(title_text="optimizer steps", row=1, col=1)
    fig.update_yaxes(title_text="seconds (wall clock)", row=1, col=2)
    sub = f"median over seeds (error bars: min–max); ×k = k times faster than {reference}, same seed and cell"
    fig.update_layout(title=_title(title, sub), height=460, margin=dict(t=110))
    return fig


def imbalance_heatmaps(heat: pd.DataFrame, *, value: str = "rel_imbalance", by: str = "series") -> go.Figure:
    """Layer x step per arm, colour = log10 of `value` (labels in real units), one shared scale.

    `heat` (from data.layer_steps): by, module, step, `value`.
    """
    label_txt = VALUE_LABELS.get(value, value)
    title = f"{_cap(label_txt.split(' (')[0])} of every layer during training"
    if heat.empty or heat[value].notna().sum() == 0:
        return empty_figure(title, "optimizer step", "layer", "no layer diagnostics recorded for this selection")
    labels = list(dict.fromkeys(heat[by]))
    modules = list(dict.fromkeys(heat.sort_values("module")["module"]))
    pos = heat[value].to_numpy(dtype=float)
    pos = pos[np.isfinite(pos) & (pos > 0)]
    # Exactly balanced layers (0) would be -inf on a log scale: floor them at the smallest positive value / 10.
    floor = pos.min() / 10 if pos.size else 1e-12
    zmin, zmax = np.log10(floor), np.log10(pos.max()) if pos.size else 0.0
    if zmin == zmax:
        zmin -= 1
    fig = make_subplots(rows=1, cols=len(labels), subplot_titles=[str(lab) for lab in labels], shared_yaxes=True, horizontal_spacing=0.03)
    for col, label in enumerate(labels, start=1):
        p = heat[heat[by] == label].pivot_table(index="module", columns="step", values=value, aggfunc="median").reindex(modules)
        z = p.to_numpy(dtype=float)
        fig.add_trace(
            go.Heatmap(
                x=p.columns.to_numpy(), y=modules, z=np.log10(np.clip(z, floor, None)), zmin=zmin, zmax=zmax, customdata=z,
                colorscale="Magma", showscale=col == len(labels),
                hovertemplate="%{y}<br>step %{x}: %{customdata:.3g}" + f"<extra>{label}</extra>",
                colorbar=dict(title=dict(text="log scale", side="right"), **_log_ticks(zmin, zmax)),
            ),
            row=1, col=col,
        )
        fig.update_xaxes(title_text="optimizer step", row=1, col=col)
    fig.update_yaxes(type="category")  # module names such as "0" must stay labels, not numbers
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_layout(title=_title(title, f"colour: {label_txt}, log scale; median over seeds"), height=max(360, 160 + 22 * len(modules)))
    return fig


def layer_lines(lines: pd.DataFrame, *, value: str = "rel_imbalance", by: str = "series", log_y: bool = True) -> go.Figure:
    """`value` against step for chosen layers: colour = arm, dash = layer.

    `lines` (from data.layer_steps filtered to the chosen modules): by, module, step, `value`.
    """
    y_title = VALUE_LABELS.get(value, value)
    title = f"{_cap(y_title.split(' (')[0])} of chosen layers"
    if lines.empty or lines[value].notna().sum() == 0:
        return empty_figure(title, "optimizer step", y_title, "no layer chosen: pick at least one")
    colors = arm_colors(lines[by])
    dashes = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
    modules = list(dict.fromkeys(lines["module"]))
    fig = go.Figure()
    for (label, module), g in lines.groupby([by, "module"], sort=False):
        g = g.sort_values("step")
        fig.add_trace(
            go.Scatter(
                x=g["step"], y=g[value], mode="lines", name=f"{label} · {module}", line=dict(color=colors[label], dash=dashes[modules.index(module) % len(dashes)]),
            )
        )
    fig.update_layout(title=_title(title, "median over seeds; colour = arm, dash = layer"), xaxis_title="optimizer step", yaxis_title=y_title, height=420, legend_title_text="arm · layer")
    fig.update_yaxes(type="log" if log_y else "linear")
    return fig


def singular_values(sv: pd.DataFrame, *, by: str = "series", title: str = "Singular values", log_y: bool = True, legend: str = "arm") -> go.Figure:
    """Singular values of dW, A and B side by side, index on x (1 = largest).

    `sv`: by, which ("dW"|"A"|"B"), index (0-based), value.
    """
    if sv.empty:
        return empty_figure(title, "index i (1 = largest)", SIGMA_LABEL, "no spectra recorded for this selection")
    whiches = [w for w in ("dW", "B", "A") if w in set(sv["which"])]
    fig = make_subplots(rows=1, cols=len(whiches), subplot_titles=[WHICH_TITLES[w] for w in whiches], horizontal_spacing=0.07)
    colors = arm_colors(sv[by])
    for col, w in enumerate(whiches, start=1):
        for label, g in sv[sv["which"] == w].groupby(by, sort=False):
            g = g.sort_values("index")
            fig.add_trace(
                go.Scatter(
                    x=g["index"] + 1, y=g["value"], mode="lines+markers", name=str(label), legendgroup=str(label),
                    showlegend=col == 1, line=dict(color=colors[label]),
                ),
                row=1, col=col,
            )
        fig.update_xaxes(title_text="index i (1 = largest)", dtick=1 if sv["index"].max() < 16 else None, row=1, col=col)
        fig.update_yaxes(type="log" if log_y else "linear", row=1, col=col)
    fig.update_yaxes(title_text=SIGMA_LABEL, row=1, col=1)
    fig.update_layout(title=_title(title, "balanced factors have equal spectra for A and B"), height=400, legend_title_text=legend)
    return fig


def spectrum_evolution(sv: pd.DataFrame, *, which: str = "dW", by: str = "series", log_y: bool = True) -> go.Figure:
    """σ_i of `which` against step, one panel per arm, colour = index i.

    `sv`: by, step, index, value (one `which`, one layer).
    """
    title = f"Singular values of {WHICH_TITLES.get(which, which)} during training"
    if sv.empty:
        return empty_figure(title, "optimizer step", SIGMA_LABEL, "no spectra recorded for this selection")
    labels = list(dict.fromkeys(sv[by]))
    fig = make_subplots(rows=1, cols=len(labels), subplot_titles=[str(lab) for lab in labels], shared_yaxes=True, horizontal_spacing=0.03)
    indices = sorted(sv["index"].unique())
    for col, label in enumerate(labels, start=1):
        g = sv[sv[by] == label]
        for i in indices:
            gi = g[g["index"] == i].sort_values("step")
            fig.add_trace(
                go.Scatter(
                    x=gi["step"], y=gi["value"], mode="lines", name=f"σ{i + 1}", legendgroup=f"σ{i + 1}", showlegend=col == 1,
                    line=dict(color=PALETTE[int(i) % len(PALETTE)]),
                ),
                row=1, col=col,
            )
        fig.update_xaxes(title_text="optimizer step", row=1, col=col)
    fig.update_yaxes(type="log" if log_y else "linear")
    fig.update_yaxes(title_text=SIGMA_LABEL, row=1, col=1)
    fig.update_layout(title=_title(title, "σ1 is the largest; median over seeds"), height=400, legend_title_text="index")
    return fig


def condition_lines(cond: pd.DataFrame, *, by: str = "series") -> go.Figure:
    """cond_dW, cond_B, cond_A against step (log y), one panel each, colour = arm.

    `cond` (from data.layer_steps with the three columns): by, step, cond_dW, cond_A, cond_B.
    """
    title = "Condition numbers during training"
    cols = [c for c in ("cond_dW", "cond_B", "cond_A") if c in cond]
    if cond.empty or not cols:
        return empty_figure(title, "optimizer step", "condition number σ₁/σ_r (ratio)", "no layer diagnostics recorded for this selection")
    fig = make_subplots(rows=1, cols=len(cols), subplot_titles=[f"cond({c.split('_')[1]})" for c in cols], horizontal_spacing=0.07)
    colors = arm_colors(cond[by])
    for j, c in enumerate(cols, start=1):
        for label, g in cond.groupby(by, sort=False):
            g = g.sort_values("step")
            # inf (rank-deficient) cannot be drawn on a log axis; it shows as a gap.
            y = g[c].replace([np.inf, -np.inf], np.nan)
            fig.add_trace(
                go.Scatter(x=g["step"], y=y, mode="lines", name=str(label), legendgroup=str(label), showlegend=j == 1, line=dict(color=colors[label])),
                row=1, col=j,
            )
        fig.update_xaxes(title_text="optimizer step", row=1, col=j)
        fig.update_yaxes(type="log", row=1, col=j)
    fig.update_yaxes(title_text="condition number σ₁/σ_r (ratio)", row=1, col=1)
    fig.update_layout(title=_title(title, "σ₁/σ_r; gaps = rank-deficient (infinite); median over seeds"), height=400, legend_title_text="arm")
    return fig


# ----------------------------------------------------------------------------------- Inspect


def layer_bars(report: pd.DataFrame, *, value: str = "rel_imbalance", log_x: bool = False) -> go.Figure:
    """One horizontal bar per layer (one checkpoint's layer report)."""
    x_title = VALUE_LABELS.get(value, value)
    title = f"{_cap(x_title.split(' (')[0])} by layer"
    data = report.dropna(subset=[value]) if value in report else report.iloc[0:0]
    if data.empty:
        return empty_figure(title, x_title, "layer", "no layers with finite values")
    label = data["module"].astype(str)
    if data["adapter"].nunique() > 1:
        label = label + " [" + data["adapter"].astype(str) + "]"
    vals = data[value].replace([np.inf, -np.inf], np.nan)
    fig = go.Figure(go.Bar(x=vals, y=label, orientation="h", marker_color="#1f77b4", hovertemplate="%{y}: %{x:.4g}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title="layer", height=max(320, 120 + 18 * len(data)), yaxis=dict(autorange="reversed", type="category"))
    fig.update_xaxes(type="log" if log_x else "linear")
    return fig


def conditioning_by_layer(report: pd.DataFrame) -> go.Figure:
    """cond_dW, cond_B, cond_A per layer (log x): large values mean slow, unstable training."""
    title = "Condition numbers by layer"
    x_title = "condition number σ₁/σ_r (ratio, log scale)"
    if report.empty:
        return empty_figure(title, x_title, "layer")
    label = report["module"].astype(str)
    if report["adapter"].nunique() > 1:
        label = label + " [" + report["adapter"].astype(str) + "]"
    fig = go.Figure()
    for c, color in (("cond_dW", "#1f77b4"), ("cond_B", "#ff7f0e"), ("cond_A", "#2ca02c")):
        fig.add_trace(go.Bar(x=report[c].replace([np.inf, -np.inf], np.nan), y=label, orientation="h", name=f"cond({c.split('_')[1]})", marker_color=color))
    fig.update_layout(
        title=_title(title, "missing bar = rank-deficient (infinite) or zero update"), xaxis_title=x_title, yaxis_title="layer",
        barmode="group", height=max(320, 120 + 30 * len(report)), yaxis=dict(autorange="reversed", type="category"), legend_title_text="matrix",
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
        name = module if data["adapter"].nunique() == 1 else f"{module} [{adapter}]"
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
    label = changes["module"].astype(str)
    if changes["adapter"].nunique() > 1:
        label = label + " [" + changes["adapter"].astype(str) + "]"
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
