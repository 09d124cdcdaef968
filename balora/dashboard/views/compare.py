"""Compare: training curves, grids, speed-ups, imbalance and spectra of recorded runs. Layout only."""

from __future__ import annotations

import json

import streamlit as st

from balora.dashboard import compare_plots, frames, loaders, md, plots, run_index, settings

RUNS_DIR = settings.runs_dir()
SAMPLES_DIR = settings.sample_runs_dir()
KIND = {"success": st.success, "info": st.info, "warning": st.warning, "error": st.error}

st.title("Compare runs")


def listed(folder, what: str):
    """balora.list_runs of `folder` (None when there is none); a folder that cannot be listed is
    an error message, and the other folder's runs are still shown."""
    if folder is None or not folder.is_dir():
        return None
    try:
        return loaders.list_runs(folder)
    except Exception as e:  # an unreadable folder is a message, not a traceback
        st.error(f"Could not list the {what} in {md.code(folder)}: {md.text(e)}")
        return None


# The user's runs (may not exist yet: the first `balora compare` or Launch creates it) and
# the bundled samples, read-only, listed as samples/NAME.
own = listed(RUNS_DIR, "runs")
samples = listed(SAMPLES_DIR, "sample runs")
if own is None or own.empty:
    st.info(
        (f"No runs in `{RUNS_DIR}` yet." if RUNS_DIR.is_dir()
         else f"`{RUNS_DIR}` is not a folder: point $BALORA_RUNS (or --runs) at a folder." if RUNS_DIR.exists()
         else f"No runs folder at `{RUNS_DIR}` yet.")
        + f" Make a run with `{settings.compare_command(RUNS_DIR)}` from the folder the dashboard was started in, "
        "or on the **Launch** page: it is listed here."
        + (" Meanwhile, the bundled sample runs (samples/..., read-only) are listed below."
           if samples is not None and len(samples) else "")
    )
runs_df = run_index.index(own, RUNS_DIR, samples, SAMPLES_DIR)
# A damaged run (unreadable config or status) is listed with its reason; the others load.
damaged = loaders.damaged_runs(runs_df)
if damaged:
    st.warning(f"{len(damaged)} run(s) cannot be shown: " + "; ".join(f"{md.code(n)}: {md.text(why)}" for n, why in damaged.items()))
runs_df = runs_df[~runs_df["label"].isin(list(damaged))]
if runs_df.empty:
    st.stop()

names = list(runs_df["label"])
paths = dict(zip(names, runs_df["path"].astype(str)))
status_of = dict(zip(names, loaders.status_labels(runs_df)))
sample_of = dict(zip(names, runs_df["sample"]))

# A run just launched from the Launch page, or named in the URL (?run=NAME, a shareable
# link; applied once per session so it does not undo later choices), opens here selected.
focus = st.session_state.pop("compare_focus", None)
url_run = st.query_params.get("run")
if focus is None and url_run and st.session_state.get("compare_url_run") != url_run:
    st.session_state["compare_url_run"] = focus = url_run
if focus in names:
    st.session_state["compare_runs"] = [focus]
elif focus in damaged:
    st.error(f"Run {md.code(focus)} cannot be shown: {md.text(damaged[focus])}")
elif focus:
    st.warning(f"No run named {md.code(focus)} in {md.code(RUNS_DIR)}.")
if "compare_runs" not in st.session_state:
    st.session_state["compare_runs"] = [run_index.default_label(runs_df)]
else:
    st.session_state["compare_runs"] = [n for n in st.session_state["compare_runs"] if n in names]

# Widget labels come from dicts (their bound __getitem__), never from a function defined on this page: Streamlit
# keeps every widget's metadata, format_func included, for the rest of the session, and such a function holds
# this page's globals (every loaded run and frame): each view kept a whole copy of the runs it last showed.
run_labels = {n: f"{n} ({'sample, read-only, ' if sample_of.get(n) else ''}{status_of.get(n, '?')})" for n in names}
selected = st.multiselect(
    "Runs", names, key="compare_runs", persist_state="session", format_func=run_labels.__getitem__,
    help=f"your runs in {RUNS_DIR}" + (f", then the bundled samples (samples/..., read-only) from {SAMPLES_DIR}"
                                       if SAMPLES_DIR is not None else ""),
)
if not selected:
    st.info("Choose at least one run.")
    st.stop()

runs, read = {}, {}  # read: path -> the version of its files loaded for this page (the watcher's baseline)
for name in selected:
    try:
        runs[name] = loaders.load_run(paths[name], read)
    except Exception as e:  # one unreadable run is a message; the others still load
        st.error(f"Could not read run {md.code(name)} ({md.text(paths[name])}): {md.text(e)}")
if not runs:
    st.stop()
tasks = {n: r.config.get("task") for n, r in runs.items()}  # run -> its task (config.json)

live = []
for name, run in runs.items():
    state = loaders.run_state(run.status, run.status_info)
    KIND[state.kind](f"**{md.text(name)}** — {state.label}. {md.text(state.text)}")
    if state.live:
        live.append(paths[name])
    for w in run.warnings:
        st.warning(f"{md.text(name)}: {md.text(w)}")

with st.expander("Configuration and command of the selected runs"):
    for name, run in runs.items():
        st.markdown(f"**{md.text(name)}**")
        if run.config.get("command"):
            st.code(run.config["command"], language="bash")
        st.json(json.dumps(run.config, default=str), expanded=False)

if live:
    # Re-run the page whenever a run being written adds a part file or rewrites its status since it was read.
    versions = [read[str(p)] for p in live]

    @st.fragment(run_every=settings.REFRESH_S)
    def _watch():
        if [loaders.run_version(p) for p in live] != versions:
            st.rerun()

    _watch()

steps = frames.combine({n: r.steps for n, r in runs.items()})
summary = frames.combine({n: r.summary for n, r in runs.items()})
unit = frames.loss_unit([r.config for r in runs.values()])


def remembered_filter(key: str, options: list) -> None:
    """Keep the user's choice among `options` across reruns, but select every option that was
    not offered before (a run just added): a filter never silently hides a new run's arms or seeds."""
    before = st.session_state.get(f"{key}_options")
    if key not in st.session_state or before is None:
        chosen = list(options)
    else:
        chosen = [v for v in st.session_state[key] if v in options] + [v for v in options if v not in before]
    st.session_state[key] = chosen
    st.session_state[f"{key}_options"] = list(options)


def remembered_layers(key: str, options: list, default: list) -> None:
    """Keep the user's layers across reruns; when the runs shown change to ones without any of them,
    start from `default` (as on a first visit), not from an empty choice and an empty chart."""
    kept = [v for v in st.session_state.get(key, []) if v in options]
    if key not in st.session_state or (not kept and st.session_state.get(f"{key}_options") != list(options)):
        kept = list(default)
    st.session_state[key] = kept
    st.session_state[f"{key}_options"] = list(options)


arms_all, seeds_all = frames.arms_and_seeds(steps, summary)
remembered_filter("compare_arms", arms_all)
remembered_filter("compare_seeds", seeds_all)
c1, c2, c3 = st.columns([3, 2, 3])
# persist_state: a visit to another page keeps the filters and the cell, as it keeps the runs.
arms = c1.multiselect("Arms", arms_all, key="compare_arms", persist_state="session")
seeds = c2.multiselect("Seeds", seeds_all, key="compare_seeds", persist_state="session")
hidden = [f"arm {a}" for a in arms_all if a not in arms] + [f"seed {s}" for s in seeds_all if s not in seeds]
if hidden:
    st.caption("Hidden by the filters above: " + md.text(", ".join(hidden)) + ".")
steps, summary = (frames.filter_arms_seeds(df, arms, seeds) for df in (steps, summary))

lrs, alphas = frames.grid_shape(summary, steps)
is_grid = len(lrs) * len(alphas) > 1
best = frames.best_cells(summary, steps)
cell = None  # the cell chosen below: "best", "best per seed" or one (lr, alpha); None for a single cell
if is_grid:
    # "best": one cell per arm (lowest median over seeds); "best per seed": each seed its own, the paper's
    # protocol, preselected when every chosen run was recorded with --select seed.
    cell_options = ["best", "best per seed"] + [(lr, a) for lr in lrs for a in alphas]
    per_seed_runs = all(r.config.get("select") == "seed" for r in runs.values())
    # named, since the ranking is by each run's headline metric (excess or eval loss), not its final training loss
    ranked_by = " / ".join(plots.METRIC_NAMES.get(m, m) for m in frames.ranking_metrics(summary)) or "final loss"
    cell = c3.selectbox(
        "Learning rate × alpha cell shown in the curves", cell_options, key="compare_cell", persist_state="session",
        index=1 if per_seed_runs else 0,
        format_func={"best": f"each arm's own best cell (lowest median {ranked_by})",
                     "best per seed": "each seed's own best cell (the paper's protocol)",
                     **{c: f"lr {c[0]:g}, alpha {c[1]:g}" for c in cell_options[2:]}}.__getitem__,
    )
    if cell == "best per seed":
        cells = frames.best_cells(summary, steps, select="seed")
    else:
        cells = best if cell == "best" else best.assign(lr=cell[0], alpha=cell[1])
else:
    cells = best
    if lrs and alphas:
        c3.caption(f"single cell: lr {lrs[0]:g}, alpha {alphas[0]:g}")

if steps.empty and summary.empty:
    st.info("These runs have no recorded steps for the chosen arms and seeds yet.")
    st.stop()

def in_cells(df):
    """The rows of `df` in the chosen cells (every row when the runs trained a single cell)."""
    return frames.select_cells(df, cells) if is_grid else df


cell_steps, cell_summary = in_cells(steps), in_cells(summary)


def cell_table(table: str):
    """The chosen runs' `table` for the chosen arms, seeds and cells (the two large per-layer
    tables are only assembled by the sections that draw them)."""
    return in_cells(frames.filter_arms_seeds(frames.combine({n: getattr(r, table) for n, r in runs.items()}), arms, seeds))


def why_absent(column: str, absent: list[str]) -> str:
    """Why the `absent` runs recorded no `column`: their task (config.json) against the drawn runs'."""
    return frames.why_unrecorded(column, [tasks[n] for n in absent], [t for n, t in tasks.items() if n not in absent])


def not_drawn(column: str, shown, every_cell, advice: str = "") -> str | None:
    """The "Not drawn" caption for the runs with no `column` in `shown` (the chosen cells), None when none is
    left out. A run that has `column` in `every_cell` (its rows in every cell) only trained no chosen cell (a
    grid's lr x alpha cell chosen beside another run's grid): said so, never that it recorded no `column`."""
    absent = frames.runs_without(shown, column, list(runs))
    if not absent or len(absent) == len(runs):
        return None
    elsewhere = [r for r in absent if r not in frames.runs_without(every_cell, column, absent)]
    unrecorded = [r for r in absent if r not in elsewhere]
    name, codes = plots.METRIC_NAMES[column], lambda rs: ", ".join(md.code(r) for r in rs)  # noqa: E731
    parts = [f"{codes(unrecorded)}, which recorded no {name} ({why_absent(column, unrecorded)}){advice}"] if unrecorded else []
    if elsewhere:
        which = f"lr {cell[0]:g}, alpha {cell[1]:g}" if isinstance(cell, tuple) else "of those shown"
        parts.append(f"{codes(elsewhere)}, which trained no cell {which} (choose another cell above)")
    return "Not drawn: " + "; ".join(parts) + "."


def loss_view() -> None:
    """Loss against step or time, final losses per arm, and the per-arm and per-seed tables."""
    metrics = frames.recorded(steps, frames.LOSS_METRICS)
    a, b, c, d = st.columns(4)
    metric = a.selectbox("Metric", metrics or ["loss"], format_func=plots.METRIC_NAMES.__getitem__, key="loss_metric")
    x = b.radio("Against", ["step", "time_s"], format_func=plots.X_LABELS.__getitem__, key="loss_x", horizontal=True)
    band = c.radio("Spread across seeds", list(frames.BANDS), key="loss_band", horizontal=True)
    log_y = d.toggle("Log scale", value=True, key="loss_log")
    curves = frames.seed_curves(cell_steps, x=x, metric=metric, band=band, summary=cell_summary)
    st.plotly_chart(compare_plots.loss_curves(curves, x=x, metric=metric, log_y=log_y, loss_unit=unit, band=band), key="fig_loss")
    # runs of another task, not evaluated, or without the chosen cell: said, not silently left out
    note = not_drawn(metric, cell_steps, steps, advice="; choose another metric above to compare them")
    if note:
        st.caption(note)
    if not cell_summary.empty:
        per_seed = is_grid and cell == "best per seed"
        per_arm = frames.arm_summaries(summary, select="seed" if per_seed else "arm")
        headline = frames.headline_metric(summary)
        st.plotly_chart(compare_plots.final_loss_by_arm(cell_summary, value=headline, loss_unit=unit, log_y=log_y), key="fig_final")
        note = not_drawn(headline, cell_summary, summary)
        if note:
            st.caption(note)
        st.markdown("**Each arm at its own best cell" + (", each seed at its own (the paper's protocol; lr, alpha: medians)" if per_seed else "")
                    + "** (median over seeds; `within_2x`: share of the grid within 2× of the best)")
        st.dataframe(frames.tidy(per_arm), hide_index=True, placeholder=frames.NA_TEXT, key="arm_summary")
        st.markdown("**Cells shown above, one row per seed**")
        st.dataframe(frames.tidy(frames.seed_rows(cell_summary)), hide_index=True, placeholder=frames.NA_TEXT)


def grid_view() -> None:
    """Each arm's final value over the learning rate x alpha grid."""
    if not is_grid:
        st.info("These runs trained a single learning rate and alpha. A grid run (e.g. `balora compare --lr 1e-4,1e-3,1e-2 --alpha 8,32,128`) shows each arm's sensitivity here.")
    else:
        values = frames.recorded(summary, frames.GRID_VALUES)
        a, b = st.columns(2)
        value = a.selectbox("Value", values or ["final_loss"], format_func=plots.METRIC_NAMES.__getitem__, key="grid_value")
        log_c = b.toggle("Log colour scale", value=True, key="grid_log")
        grid = frames.grid_cells(summary, value=value)
        st.plotly_chart(compare_plots.grid_heatmaps(grid, value=value, log_color=log_c, loss_unit=unit), key="fig_grid")
        st.caption("Blank cells never finished; 'diverged' cells ended with a non-finite loss. Lower is better.")


def speedup_view() -> None:
    """Steps and seconds to a target, relative to a reference arm."""
    metrics = frames.speed_metrics(cell_steps, cell_summary)
    a, b, c = st.columns(3)
    metric = a.selectbox("Metric", metrics or ["loss"], format_func=plots.METRIC_NAMES.__getitem__, key="speed_metric",
                         help="Excess loss (loss minus the best a rank-r update can reach) when the task records it: "
                              "every seed then aims at the same distance from its own optimum.")
    refs = sorted(set(cell_steps["arm"].astype(str)))
    reference = c.selectbox("Relative to", refs, index=refs.index("lora") if "lora" in refs else 0, key="speed_ref")
    rng = frames.metric_range(cell_steps, metric)
    if rng is None:
        st.info("No finite values of this metric yet.")
    else:
        default = frames.default_target(cell_steps, cell_summary, metric, reference=reference)
        kept = st.session_state.get("speed_target")
        if st.session_state.get("speed_target_for") != metric or kept is None or not rng[0] <= kept <= rng[1]:
            st.session_state["speed_target"] = default  # another metric or selection: its own default
        st.session_state["speed_target_for"] = metric
        target = b.number_input(f"Target {plots.METRIC_NAMES[metric]}", min_value=rng[0], max_value=rng[1], format="%.4g", key="speed_target")
        speed = frames.speedups(cell_steps, target, metric=metric, reference=reference, tasks=tasks)
        st.plotly_chart(compare_plots.speedup_bars(speed, target=target, metric=metric, loss_unit=unit, reference=reference), key="fig_speed")
        st.caption("Seconds are training wall-clock (optimizer step + balancing), without diagnostics or evaluation. "
                   "A seed in which an arm never reaches the target counts as never (inf steps, speed-up 0) in "
                   "that arm's medians; `reached` says in how many seeds it did.")
        st.dataframe(frames.tidy(speed), hide_index=True, placeholder=frames.NA_TEXT)


def imbalance_view() -> None:
    """Per-layer imbalance during training: heatmaps and chosen layers' lines."""
    cell_layers = cell_table("layers")
    modules = frames.layer_names(cell_layers)
    if not modules:
        st.info("No per-layer diagnostics recorded for this selection (a run records them every `--layers-every` "
                "optimizer steps of `balora compare`; 0 turns them off).")
    else:
        a, b = st.columns([1, 3])
        quantities = {v: plots.VALUE_LABELS[v].split(" (")[0] for v in ("rel_imbalance", "imbalance")}
        value = a.selectbox("Quantity", list(quantities), format_func=quantities.__getitem__, key="imb_value")
        remembered_layers("imb_layers", modules, modules[:2])
        chosen = b.multiselect("Layers for the line chart", modules, key="imb_layers")
        st.plotly_chart(compare_plots.imbalance_heatmaps(frames.layer_steps(cell_layers, [value]), value=value), key="fig_imb_heat")
        st.plotly_chart(compare_plots.layer_lines(frames.layer_steps(cell_layers, [value], modules=chosen), value=value), key="fig_imb_lines")


def spectra_view() -> None:
    """Singular values of one layer at a step and over training, and condition numbers."""
    cell_layers, cell_spectra = cell_table("layers"), cell_table("spectra")
    modules = sorted(set(frames.layer_names(cell_layers)) | set(cell_spectra["module"].astype(str)))
    if not modules:
        st.info("No spectra recorded for this selection (a run records them every `--spectra-every` optimizer steps "
                "of `balora compare`; 0 turns them off).")
    else:
        a, b, c = st.columns([3, 3, 1])
        module = a.selectbox("Layer", modules, key="spec_layer")
        log_y = c.toggle("Log scale", value=True, key="spec_log")
        steps_avail = frames.spectra_steps(cell_spectra, module)
        if steps_avail:
            step = b.select_slider("Step", steps_avail, value=steps_avail[-1], key="spec_step") if len(steps_avail) > 1 else steps_avail[0]
            sv = frames.spectra_at(cell_spectra, module, step)
            st.plotly_chart(plots.singular_values(sv, title=f"Singular values of {md.plot_label(module)} at step {step}", log_y=log_y), key="fig_spec_at")
            which = st.radio("Evolution of", ["dW", "B", "A"], format_func=plots.WHICH_TITLES.__getitem__, horizontal=True, key="spec_which")
            st.plotly_chart(compare_plots.spectrum_evolution(frames.spectra_over_steps(cell_spectra, module, which), which=which, log_y=log_y), key="fig_spec_evo")
        else:
            st.info(f"No spectra recorded for {md.text(module)}.")
        scope = st.radio("Condition numbers of", ["this layer", "median over all layers"], horizontal=True, key="spec_cond_scope")
        cond_cols = ["cond_dW", "cond_A", "cond_B"]
        if scope == "this layer":
            cond = frames.layer_steps(cell_layers, cond_cols, modules=[module])
        else:
            cond = frames.median_over_layers(cell_layers, cond_cols)
        st.plotly_chart(compare_plots.condition_lines(cond), key="fig_cond")


VIEWS = {"Loss": loss_view, "Grid": grid_view, "Speed-up": speedup_view, "Imbalance": imbalance_view, "Spectra": spectra_view}
SECTIONS = list(VIEWS)


@st.fragment
def view_section() -> None:
    """The chosen view. A fragment: switching views or moving one of the view's own widgets reruns only
    this part (the runs, filters and cells above are kept), so the browser redraws only the view."""
    # `required`: a click on the chosen view keeps it (never a blank page).
    section = st.segmented_control("View", SECTIONS, default=SECTIONS[0], required=True, key="compare_section", persist_state="session") or SECTIONS[0]

    VIEWS[section]()


view_section()
