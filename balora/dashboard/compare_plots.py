"""Figures for the Compare page: frames shaped by `frames` -> plotly Figure. Never calls st.*.

Each builder takes one row per point to draw, returns a Figure with a title and labelled axes,
and a titled figure that says "no data" when the frame is empty. Colours come from
`plots.arm_colors` (one colour per arm, on every view and every run).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from balora.dashboard.md import plot_label  # run, arm and layer names come from run folders: text, never tags
from balora.dashboard.plots import (
    METRIC_NAMES, METRIC_NOTES, PALETTE, SIGMA_LABEL, VALUE_LABELS, WHICH_TITLES, X_LABELS, _cap, _log_ticks, _off_log,
    _rgba, _title, arm_colors, empty_figure, run_dashes,
)

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

    `curves` (from frames.seed_curves): by, x, `median`, `lo`, `hi`, `n_seeds`.
    """
    name = METRIC_NAMES.get(metric, metric)
    y_title = f"{name} ({loss_unit})" if loss_unit else name
    x_title = X_LABELS.get(x, x)
    title = f"{_cap(name)} against {x_title.split(' (')[0]}"
    if curves.empty:
        return empty_figure(title, x_title, y_title, f"no {name} recorded for this selection")
    colors, dashes = arm_colors(curves[by]), run_dashes(curves[by])
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
                    hoverinfo="skip", showlegend=False, legendgroup=str(label), name=plot_label(f"{label} spread"),
                )
            )
        fig.add_trace(
            go.Scatter(x=g[x], y=g["median"], mode="lines", name=plot_label(label), legendgroup=str(label), line=dict(color=c, width=2, dash=dashes[label]))
        )
    sub = f"median over {n} seed{'s' if n > 1 else ''}" + (f"; shaded: {band} across seeds" if n > 1 else "") + METRIC_NOTES.get(metric, "")
    sub += _off_log(curves[["median"]], log_y)
    fig.update_layout(title=_title(title, sub), xaxis_title=x_title, yaxis_title=y_title, legend_title_text="arm", height=420)
    fig.update_yaxes(type="log" if log_y else "linear")
    return fig


def final_loss_by_arm(cells: pd.DataFrame, *, value: str = "final_loss", by: str = "series", loss_unit: str = "", log_y: bool = False) -> go.Figure:
    """One dot per seed and a box per arm: makes a null result as visible as a win.

    `cells` (summary rows of the chosen cells: frames.select_cells): by, seed, `value`.
    """
    name = METRIC_NAMES.get(value, value)
    y_title = f"{name} ({loss_unit})" if loss_unit else name
    title = f"{_cap(name)} per arm"
    data = cells.dropna(subset=[value]) if value in cells else cells.iloc[0:0]
    # A cell that did not complete (diverged, interrupted) holds its last finite value, not a final one.
    unfinished = data["status"].astype(str) != "completed" if "status" in data else pd.Series(False, index=data.index)
    left_out = ", ".join(f"{n} seed{'s' if n > 1 else ''} that {st} left out"
                         for st, n in data.loc[unfinished, "status"].value_counts().items()) if unfinished.any() else ""
    data = data[~unfinished]
    if data.empty:
        return empty_figure(title, "arm", y_title, "no finished cells in this selection" + (f" ({left_out})" if left_out else ""))
    colors = arm_colors(data[by])
    fig = go.Figure()
    for label, g in data.groupby(by, sort=False):
        fig.add_trace(
            go.Box(
                y=g[value], name=plot_label(label), boxpoints="all", jitter=0.3, pointpos=0, marker_color=colors[label],
                text=[f"seed {s}" for s in g["seed"]], hovertemplate="%{text}: %{y:.4g}<extra>%{x}</extra>",
            )
        )
    sub = "each dot is one seed" + METRIC_NOTES.get(value, "") + (f"; {left_out}" if left_out else "") + _off_log(data[[value]], log_y)
    fig.update_layout(title=_title(title, sub), xaxis_title="arm", yaxis_title=y_title, showlegend=False, height=380)
    fig.update_yaxes(type="log" if log_y else "linear")
    pos = data[value].to_numpy(dtype=float)
    pos = pos[np.isfinite(pos) & (pos > 0)]
    if log_y and pos.size and np.log10(pos.max() / pos.min()) > 2:
        fig.update_yaxes(dtick=1)  # one label per decade: 2x/5x labels crowd a short axis
    return fig


def _gap(panels: int, gap: float) -> float:
    """`gap` between side-by-side panels (one per run and arm), narrowed so the gaps take at most a third of the
    width: plotly refuses a gap over 1 / (panels - 1), and ~10 runs of 3 arms raised in the Grid, Imbalance and Spectra views."""
    return min(gap, 1 / (3 * max(panels - 1, 1)))


def _fmt_lr(v: float, digits: int = 1) -> str:
    return f"{v:.{digits - 1}e}".replace("e-0", "e-").replace("e+0", "e")


def _fmt_alpha(v: float, digits: int = 6) -> str:
    return f"{v:.{max(digits, 6)}g}"


def _distinct_labels(values: list[float], fmt) -> list[str]:
    """`fmt(v, digits)` of each value with the fewest digits that keep every label apart: the heatmap's
    axes are categories, so two values with one label (0.025 and 0.03 as "3e-2") would share a column."""
    for digits in range(1, 18):
        labels = [fmt(v, digits) for v in values]
        if len(set(labels)) == len(labels):
            return labels
    return [repr(float(v)) for v in values]


def grid_heatmaps(grid: pd.DataFrame, *, value: str = "final_loss", by: str = "series", log_color: bool = True, loss_unit: str = "") -> go.Figure:
    """Per arm, `value` over learning rate x alpha, each arm's best cell starred (the paper's
    sensitivity figures). One colour scale for all arms so they compare by colour.

    `grid` (from frames.grid_cells): by, lr, alpha, `value` (median over seeds; NaN when no seed
    ended finite), optional `status` (why a cell has no value, e.g. "diverged").
    """
    name = METRIC_NAMES.get(value, value)
    title = f"{_cap(name)} across learning rate × alpha"
    if grid.empty or not np.isfinite(grid[value].to_numpy(dtype=float)).any():
        return empty_figure(title, "learning rate", "lora_alpha", "no grid cells finished yet")
    labels = list(dict.fromkeys(grid[by]))
    lrs = sorted(grid["lr"].unique())
    alphas = sorted(grid["alpha"].unique())
    xs, ys = _distinct_labels(lrs, _fmt_lr), _distinct_labels(alphas, _fmt_alpha)
    z_all = grid[value].to_numpy(dtype=float)
    # The colour range holds every finite cell: log only when all are > 0 (an excess loss at the optimum is 0 or a
    # rounding below), else linear over all of them (over the positive ones alone, the others raised or looked best).
    finite = z_all[np.isfinite(z_all)]
    use_log = log_color and bool((finite > 0).all())
    zmin, zmax = (np.log10(finite.min()), np.log10(finite.max())) if use_log else (finite.min(), finite.max())
    if zmin == zmax:
        zmax = zmin + 1e-12
    fig = make_subplots(rows=1, cols=len(labels), subplot_titles=[plot_label(lab) for lab in labels], shared_yaxes=True, horizontal_spacing=_gap(len(labels), 0.04))
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
                hovertemplate="lr %{x}, alpha %{y}: %{customdata:.4g}" + f"<extra>{plot_label(label)}</extra>",
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
    scale = "; colour on a log scale" if use_log else "; colour linear: values <= 0 have no log" if log_color else ""
    sub = "median over seeds; ★ and frame: each arm's lowest" + scale + METRIC_NOTES.get(value, "")
    fig.update_layout(title=_title(title, sub), height=360 + 12 * len(alphas))
    return fig


def speedup_bars(speed: pd.DataFrame, *, target: float, metric: str = "loss", by: str = "series", loss_unit: str = "", reference: str = "lora") -> go.Figure:
    """Steps and seconds each arm needs to reach `target`, median over seeds, bars annotated
    with the speed-up relative to `reference` (above 1 = faster than it).

    `speed` (from frames.speedups): by, steps_median, steps_min, steps_max, seconds_median,
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
            lines = [f"<b>{plot_label(label)}</b>"]
            if not np.isfinite(m):  # the median seed never got there
                lines.append("not reached" if reached == 0 else f"median seed: not reached ({reached}/{n} seeds did)")
            else:
                if str(label).split(": ")[-1] != reference and np.isfinite(rt):
                    lines.append(f"×{rt:.2f} vs {reference}")
                if reached != n:
                    lines.append(f"{reached}/{n} seeds reached")
            ticks.append("<br>".join(lines))
        fig.add_trace(
            go.Bar(
                x=ticks, y=np.where(np.isfinite(med), med, 0.0),
                error_y=dict(  # none on a bar whose median is never: there is no bar
                    type="data", symmetric=False,
                    array=np.where(np.isfinite(med), np.nan_to_num(speed[f"{key}_max"].to_numpy(dtype=float) - med), 0.0),
                    arrayminus=np.where(np.isfinite(med), np.nan_to_num(med - speed[f"{key}_min"].to_numpy(dtype=float)), 0.0),
                ),
                marker_color=[colors[lab] for lab in speed[by]], showlegend=False,
                customdata=speed[by].map(plot_label), hovertemplate="%{customdata}: %{y:.4g}<extra></extra>",
            ),
            row=1, col=col,
        )
        fig.update_xaxes(title_text="arm", row=1, col=col)
    fig.update_yaxes(title_text="optimizer steps", row=1, col=1)
    fig.update_yaxes(title_text="seconds (wall clock)", row=1, col=2)
    sub = f"median over seeds (error bars: min–max); ×k = k times faster than {reference} in the same seed, each in the cell shown"
    fig.update_layout(title=_title(title, sub), height=460, margin=dict(t=110))
    return fig


def imbalance_heatmaps(heat: pd.DataFrame, *, value: str = "rel_imbalance", by: str = "series") -> go.Figure:
    """Layer x step per arm, colour = log10 of `value` (labels in real units), one shared scale.

    `heat` (from frames.layer_steps): by, module, step, `value`.
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
    fig = make_subplots(rows=1, cols=len(labels), subplot_titles=[plot_label(lab) for lab in labels], shared_yaxes=True, horizontal_spacing=_gap(len(labels), 0.03))
    for col, label in enumerate(labels, start=1):
        p = heat[heat[by] == label].pivot_table(index="module", columns="step", values=value, aggfunc="median").reindex(modules)
        z = p.to_numpy(dtype=float)
        fig.add_trace(
            go.Heatmap(
                x=p.columns.to_numpy(), y=[plot_label(m) for m in modules], z=np.log10(np.clip(z, floor, None)), zmin=zmin, zmax=zmax, customdata=z,
                colorscale="Magma", showscale=col == len(labels),
                hovertemplate="%{y}<br>step %{x}: %{customdata:.3g}" + f"<extra>{plot_label(label)}</extra>",
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

    `lines` (from frames.layer_steps filtered to the chosen modules): by, module, step, `value`.
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
                x=g["step"], y=g[value], mode="lines", name=plot_label(f"{label} · {module}"), line=dict(color=colors[label], dash=dashes[modules.index(module) % len(dashes)]),
            )
        )
    fig.update_layout(title=_title(title, "median over seeds; colour = arm, dash = layer"), xaxis_title="optimizer step", yaxis_title=y_title, height=420, legend_title_text="arm · layer")
    fig.update_yaxes(type="log" if log_y else "linear")
    return fig


def spectrum_evolution(sv: pd.DataFrame, *, which: str = "dW", by: str = "series", log_y: bool = True) -> go.Figure:
    """σ_i of `which` against step, one panel per arm, colour = index i.

    `sv`: by, step, index, value (one `which`, one layer).
    """
    title = f"Singular values of {WHICH_TITLES.get(which, which)} during training"
    if sv.empty:
        return empty_figure(title, "optimizer step", SIGMA_LABEL, "no spectra recorded for this selection")
    labels = list(dict.fromkeys(sv[by]))
    fig = make_subplots(rows=1, cols=len(labels), subplot_titles=[plot_label(lab) for lab in labels], shared_yaxes=True, horizontal_spacing=_gap(len(labels), 0.03))
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
    sub = "σ1 is the largest; median over seeds" + _off_log(sv[["value"]], log_y)  # a zero B (PEFT's init, step 0)
    fig.update_layout(title=_title(title, sub), height=400, legend_title_text="index")
    return fig


def condition_lines(cond: pd.DataFrame, *, by: str = "series") -> go.Figure:
    """cond_dW, cond_B, cond_A against step (log y), one panel each, colour = arm.

    `cond` (from frames.layer_steps or frames.median_over_layers with the three columns): by, step, cond_dW, cond_A, cond_B.
    """
    title = "Condition numbers during training"
    cols = [c for c in ("cond_dW", "cond_B", "cond_A") if c in cond]
    if cond.empty or not cols:
        return empty_figure(title, "optimizer step", "condition number σ₁/σ_r (ratio)", "no layer diagnostics recorded for this selection")
    fig = make_subplots(rows=1, cols=len(cols), subplot_titles=[f"cond({c.split('_')[1]})" for c in cols], horizontal_spacing=0.07)
    colors, dashes = arm_colors(cond[by]), run_dashes(cond[by])
    for j, c in enumerate(cols, start=1):
        for label, g in cond.groupby(by, sort=False):
            g = g.sort_values("step")
            # inf (rank-deficient) cannot be drawn on a log axis; it shows as a gap.
            y = g[c].replace([np.inf, -np.inf], np.nan)
            fig.add_trace(
                go.Scatter(x=g["step"], y=y, mode="lines", name=plot_label(label), legendgroup=str(label), showlegend=j == 1,
                           line=dict(color=colors[label], dash=dashes[label])),
                row=1, col=j,
            )
        fig.update_xaxes(title_text="optimizer step", row=1, col=j)
        fig.update_yaxes(type="log", row=1, col=j)
    fig.update_yaxes(title_text="condition number σ₁/σ_r (ratio)", row=1, col=1)
    fig.update_layout(title=_title(title, "σ₁/σ_r; gaps = rank-deficient (infinite); median over seeds"), height=400, legend_title_text="arm")
    return fig
