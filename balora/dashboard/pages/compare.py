"""Compare: training curves, grids, speed-ups, imbalance and spectra of recorded runs. Layout only."""

from __future__ import annotations

import json

import streamlit as st

from balora.dashboard import data, plots, run_index, settings

RUNS_DIR = settings.runs_dir()
SAMPLES_DIR = settings.sample_runs_dir()
SECTIONS = ["Loss", "Grid", "Speed-up", "Imbalance", "Spectra"]
KIND = {"success": st.success, "info": st.info, "warning": st.warning, "error": st.error}

st.title("Compare runs")

try:
    # The user's runs (may not exist yet: the first `balora compare` or Launch creates it) and
    # the bundled samples, read-only, listed as samples/NAME.
    own = data.list_runs(RUNS_DIR) if RUNS_DIR.is_dir() else None
    samples = data.list_runs(SAMPLES_DIR) if SAMPLES_DIR is not None else None
except Exception as e:  # an unreadable runs folder is a message, not a traceback
    st.error(f"Could not list the runs in {RUNS_DIR}: {e}")
    st.stop()
if own is None or own.empty:
    st.info(
        (f"No runs in `{RUNS_DIR}` yet." if own is not None else f"No runs folder at `{RUNS_DIR}` yet.")
        + " Make a run with `balora compare --task synthetic` from the folder the dashboard was started in, or on "
        "the **Launch** page: it is listed here without any flag."
        + (" Meanwhile, the bundled sample runs (samples/..., read-only) are listed below."
           if samples is not None and len(samples) else "")
    )
runs_df = run_index.index(own, RUNS_DIR, samples, SAMPLES_DIR)
if runs_df.empty:
    st.stop()

names = list(runs_df["label"])
paths = dict(zip(names, runs_df["path"].astype(str)))
status_of = dict(zip(names, data.status_labels(runs_df)))
sample_of = dict(zip(names, runs_df["sample"]))

# A run just launched from the Launch page, or named in the URL (?run=NAME, a shareable
# link; applied once per session so it does not undo later choices), opens here selected.
focus = st.session_state.pop("compare_focus", None)
url_run = st.query_params.get("run")
if focus is None and url_run and st.session_state.get("compare_url_run") != url_run:
    st.session_state["compare_url_run"] = focus = url_run
if focus in names:
    st.session_state["compare_runs"] = [focus]
elif focus:
    st.warning(f"No run named `{focus}` in `{RUNS_DIR}`.")
first = [run_index.default_label(runs_df)]
if "compare_runs" not in st.session_state:
    st.session_state["compare_runs"] = first
else:
    st.session_state["compare_runs"] = [n for n in st.session_state["compare_runs"] if n in names]

selected = st.multiselect(
    "Runs", names, key="compare_runs", persist_state="session",
    format_func=lambda n: f"{n} ({'sample, read-only, ' if sample_of.get(n) else ''}{status_of.get(n, '?')})",
    help=f"your runs in {RUNS_DIR}" + (f", then the bundled samples (samples/..., read-only) from {SAMPLES_DIR}"
                                       if SAMPLES_DIR is not None else ""),
)
if not selected:
    st.info("Choose at least one run.")
    st.stop()

runs = {}
for name in selected:
    try:
        runs[name] = data.load_run(paths[name])
    except Exception as e:
        st.error(f"Could not read run `{name}` ({paths[name]}): {e}")
if not runs:
    st.stop()

live = []
for name, run in runs.items():
    state = data.run_state(run.status, run.status_info)
    KIND[state.kind](f"**{name}** — {state.label}. {state.text}")
    if state.live:
        live.append(run.path)
    for w in getattr(run, "warnings", None) or []:
        st.warning(f"{name}: {w}")

with st.expander("Configuration and command of the selected runs"):
    for name, run in runs.items():
        st.markdown(f"**{name}**")
        if run.config.get("command"):
            st.code(run.config["command"], language="bash")
        st.json(json.dumps(run.config, default=str), expanded=False)

if live:
    # Re-run the page whenever a run being written adds a part file or rewrites its status.
    versions = [data._version(p) for p in live]

    @st.fragment(run_every=settings.REFRESH_S)
    def _watch():
        if [data._version(p) for p in live] != versions:
            st.rerun()

    _watch()

steps = data.combine({n: r.steps for n, r in runs.items()})
summary = data.combine({n: r.summary for n, r in runs.items()})
tasks = {str(r.config.get("task", "")) for r in runs.values()}
unit = data.loss_unit(next(iter(runs.values())).config) if len(tasks) == 1 else ""

arms_all = list(dict.fromkeys(list(summary["arm"].astype(str)) + list(steps["arm"].astype(str))))
seeds_all = sorted(set(steps["seed"].tolist()) | set(summary["seed"].tolist()))
c1, c2, c3 = st.columns([3, 2, 3])
arms = c1.multiselect("Arms", arms_all, default=arms_all, key="compare_arms")
seeds = c2.multiselect("Seeds", seeds_all, default=seeds_all, key="compare_seeds")
steps, summary = (data.filter_arms_seeds(df, arms, seeds) for df in (steps, summary))

lrs, alphas = data.grid_shape(summary, steps)
is_grid = len(lrs) * len(alphas) > 1
best = data.best_cells(summary, steps)
if is_grid:
    cell_options = ["best"] + [(lr, a) for lr in lrs for a in alphas]
    cell = c3.selectbox(
        "Learning rate × alpha cell shown in the curves", cell_options, key="compare_cell",
        format_func=lambda c: "each arm's own best cell (lowest median final loss)" if c == "best" else f"lr {c[0]:g}, alpha {c[1]:g}",
    )
    cells = best if cell == "best" else best.assign(lr=cell[0], alpha=cell[1])
else:
    cells = best
    if lrs and alphas:
        c3.caption(f"single cell: lr {lrs[0]:g}, alpha {alphas[0]:g}")

if steps.empty and summary.empty:
    st.info("These runs have no recorded steps for the chosen arms and seeds yet.")
    st.stop()

cell_steps = data.select_cells(steps, cells) if is_grid else steps
cell_summary = data.select_cells(summary, cells) if is_grid else summary


def cell_table(table: str):
    """The chosen runs' `table` for the chosen arms, seeds and cells (the two large per-layer
    tables are only assembled by the sections that draw them)."""
    df = data.filter_arms_seeds(data.combine({n: getattr(r, table) for n, r in runs.items()}), arms, seeds)
    return data.select_cells(df, cells) if is_grid else df


section = st.segmented_control("View", SECTIONS, default=SECTIONS[0], key="compare_section", persist_state="session") or SECTIONS[0]

if section == "Loss":
    # Excess loss first where the task knows its floor (each seed has its own), as the runner ranks arms.
    metrics = [m for m in ("excess_loss", "eval_loss", "loss") if m in steps and steps[m].notna().any()]
    a, b, c, d = st.columns(4)
    metric = a.selectbox("Metric", metrics or ["loss"], format_func=lambda m: plots.METRIC_NAMES[m], key="loss_metric")
    x = b.radio("Against", ["step", "time_s"], format_func=lambda v: plots.X_LABELS[v], key="loss_x", horizontal=True)
    band = c.radio("Spread across seeds", list(data.BANDS), key="loss_band", horizontal=True)
    log_y = d.toggle("Log scale", value=True, key="loss_log")
    curves = data.seed_curves(cell_steps, x=x, metric=metric, band=band)
    st.plotly_chart(plots.loss_curves(curves, x=x, metric=metric, log_y=log_y, loss_unit=unit, band=band), key="fig_loss")
    if not cell_summary.empty:
        per_arm = data.arm_summaries(summary)
        headline = str(per_arm["metric"].iloc[0]) if len(per_arm) and "metric" in per_arm else "final_loss"
        st.plotly_chart(plots.final_loss_by_arm(cell_summary, value=headline, loss_unit=unit, log_y=log_y), key="fig_final")
        st.markdown("**Each arm at its own best cell** (median over seeds; `within_2x`: share of the grid within 2× of the best)")
        st.dataframe(per_arm, hide_index=True, key="arm_summary")
        st.markdown("**Cells shown above, one row per seed**")
        cols = [c for c in ("series", "seed", "lr", "alpha", "status", "final_loss", "best_loss", "final_eval_loss", "steps_to_target", "seconds_to_target", "speedup_steps", "speedup_seconds", "reason") if c in cell_summary]
        st.dataframe(cell_summary[cols], hide_index=True)

elif section == "Grid":
    if not is_grid:
        st.info("These runs trained a single learning rate and alpha. A grid run (e.g. `balora compare --lr 1e-4,1e-3,1e-2 --alpha 8,32,128`) shows each arm's sensitivity here.")
    else:
        values = [v for v in ("final_excess_loss", "final_eval_loss", "final_loss", "best_loss") if v in summary and summary[v].notna().any()]
        a, b = st.columns(2)
        value = a.selectbox("Value", values or ["final_loss"], format_func=lambda v: plots.METRIC_NAMES[v], key="grid_value")
        log_c = b.toggle("Log colour scale", value=True, key="grid_log")
        grid = data.grid_cells(summary, value=value)
        st.plotly_chart(plots.grid_heatmaps(grid, value=value, log_color=log_c, loss_unit=unit), key="fig_grid")
        st.caption("Blank cells never finished; 'diverged' cells ended with a non-finite loss. Lower is better.")

elif section == "Speed-up":
    # The run's own target is on `target_on` (loss or eval_loss): offer that metric first.
    target_on = str(cell_summary["target_on"].dropna().iloc[0]) if "target_on" in cell_summary and cell_summary["target_on"].notna().any() else "loss"
    metrics = [m for m in dict.fromkeys((target_on, "loss", "eval_loss", "excess_loss")) if m in cell_steps and cell_steps[m].notna().any()]
    a, b, c = st.columns(3)
    metric = a.selectbox("Metric", metrics or ["loss"], format_func=lambda m: plots.METRIC_NAMES[m], key="speed_metric")
    rng = data.metric_range(cell_steps, metric)
    if rng is None:
        st.info("No finite values of this metric yet.")
    else:
        targets = cell_summary["target_loss"].dropna() if "target_loss" in cell_summary else []
        default = float(targets.median()) if len(targets) and metric == target_on else rng[0] + 0.25 * (rng[1] - rng[0])
        default = min(max(default, rng[0]), rng[1])
        target = b.number_input(f"Target {plots.METRIC_NAMES[metric]}", min_value=rng[0], max_value=rng[1], value=default, format="%.4g", key="speed_target")
        refs = sorted(set(cell_steps["arm"].astype(str)))
        reference = c.selectbox("Relative to", refs, index=refs.index("lora") if "lora" in refs else 0, key="speed_ref")
        speed = data.speedups(cell_steps, target, metric=metric, reference=reference)
        st.plotly_chart(plots.speedup_bars(speed, target=target, metric=metric, loss_unit=unit, reference=reference), key="fig_speed")
        st.caption("Seconds are training wall-clock (optimizer step + balancing), without diagnostics or evaluation. "
                   "An arm that never reaches the target in a seed is left out of that seed's medians.")
        st.dataframe(speed, hide_index=True)

elif section == "Imbalance":
    cell_layers = cell_table("layers")
    modules = data.layer_names(cell_layers)
    if not modules:
        st.info("No per-layer diagnostics recorded for this selection (runs record them every `diag_every` steps).")
    else:
        a, b = st.columns([1, 3])
        value = a.selectbox("Quantity", ["rel_imbalance", "imbalance"], format_func=lambda v: plots.VALUE_LABELS[v].split(" (")[0], key="imb_value")
        chosen = b.multiselect("Layers for the line chart", modules, default=modules[:2], key="imb_layers")
        st.plotly_chart(plots.imbalance_heatmaps(data.layer_steps(cell_layers, [value]), value=value), key="fig_imb_heat")
        st.plotly_chart(plots.layer_lines(data.layer_steps(cell_layers, [value], modules=chosen), value=value), key="fig_imb_lines")

elif section == "Spectra":
    cell_layers, cell_spectra = cell_table("layers"), cell_table("spectra")
    modules = sorted(set(data.layer_names(cell_layers)) | set(cell_spectra["module"].astype(str)))
    if not modules:
        st.info("No spectra recorded for this selection.")
    else:
        a, b, c = st.columns([3, 3, 1])
        module = a.selectbox("Layer", modules, key="spec_layer")
        log_y = c.toggle("Log scale", value=True, key="spec_log")
        steps_avail = data.spectra_steps(cell_spectra, module)
        if steps_avail:
            step = b.select_slider("Step", steps_avail, value=steps_avail[-1], key="spec_step") if len(steps_avail) > 1 else steps_avail[0]
            sv = data.spectra_at(cell_spectra, module, step)
            st.plotly_chart(plots.singular_values(sv, title=f"Singular values of {module} at step {step}", log_y=log_y), key="fig_spec_at")
            which = st.radio("Evolution of", ["dW", "B", "A"], format_func=lambda w: plots.WHICH_TITLES[w], horizontal=True, key="spec_which")
            st.plotly_chart(plots.spectrum_evolution(data.spectra_over_steps(cell_spectra, module, which), which=which, log_y=log_y), key="fig_spec_evo")
        else:
            st.info(f"No spectra recorded for {module}.")
        scope = st.radio("Condition numbers of", ["this layer", "median over all layers"], horizontal=True, key="spec_cond_scope")
        cond_cols = ["cond_dW", "cond_A", "cond_B"]
        if scope == "this layer":
            cond = data.layer_steps(cell_layers, cond_cols, modules=[module])
        else:
            cond = data.median_over_layers(cell_layers, cond_cols)
        st.plotly_chart(plots.condition_lines(cond), key="fig_cond")
