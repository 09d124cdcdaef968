"""dashboard.plots: every figure has a title and labelled axes, draws what its frame holds,
and says "no data" (still titled and labelled) for an empty frame."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from balora.dashboard import compare_plots, inspect_plots, plots


def assert_labelled(fig: go.Figure, *needles: str) -> None:
    """A title, an x and a y axis title, each containing what the caller expects somewhere."""
    assert fig.layout.title.text, "figure has no title"
    xs = [getattr(fig.layout, n).title.text for n in dir(fig.layout) if n.startswith("xaxis") and getattr(fig.layout, n).title.text]
    ys = [getattr(fig.layout, n).title.text for n in dir(fig.layout) if n.startswith("yaxis") and getattr(fig.layout, n).title.text]
    assert xs and ys, f"missing axis titles: x={xs} y={ys}"
    text = " ".join([fig.layout.title.text, *xs, *ys])
    for n in needles:
        assert n in text, f"{n!r} not in {text!r}"


def _curves(series=("lora", "balora"), steps=10, n_seeds=3):
    rows = []
    for k, s in enumerate(series):
        for step in range(1, steps + 1):
            m = np.exp(-0.1 * (k + 1) * step)
            rows.append({"series": s, "step": step, "time_s": 0.1 * step, "median": m, "lo": m * 0.9, "hi": m * 1.1, "n_seeds": n_seeds})
    return pd.DataFrame(rows)


def test_loss_curves_median_line_and_spread_band():
    fig = compare_plots.loss_curves(_curves(), x="step", metric="loss", loss_unit="squared error")
    assert_labelled(fig, "optimizer step", "training loss (squared error)")
    lines = [t for t in fig.data if t.mode == "lines" and t.showlegend is not False]
    bands = [t for t in fig.data if t.fill == "toself"]
    assert [t.name for t in lines] == ["lora", "balora"] and len(bands) == 2
    assert np.allclose(lines[1].y, np.exp(-0.2 * np.arange(1, 11)))
    # The band is the polygon hi forward then lo backward.
    assert np.allclose(bands[0].y[:10], lines[0].y * 1.1) and np.allclose(bands[0].y[10:], (lines[0].y * 0.9)[::-1])
    assert fig.layout.yaxis.type == "log"
    assert lines[0].line.color == plots.ARM_COLORS["lora"]
    lin = compare_plots.loss_curves(_curves(n_seeds=1), x="time_s", metric="eval_loss", log_y=False)
    assert_labelled(lin, "wall-clock time (s)", "evaluation loss")
    assert lin.layout.yaxis.type == "linear" and not [t for t in lin.data if t.fill == "toself"]  # one seed: no band


def test_grid_heatmaps_star_each_arms_best_cell():
    rows = []
    for s, best in (("lora", (1e-3, 8.0)), ("balora", (1e-2, 32.0))):
        for lr in (1e-3, 1e-2):
            for a in (8.0, 32.0):
                rows.append({"series": s, "lr": lr, "alpha": a, "final_loss": 0.1 if (lr, a) == best else 1.0})
    grid = pd.DataFrame(rows)
    grid.loc[(grid["series"] == "lora") & (grid["lr"] == 1e-2) & (grid["alpha"] == 32.0), "final_loss"] = np.nan  # diverged
    fig = compare_plots.grid_heatmaps(grid, value="final_loss")
    assert_labelled(fig, "learning rate", "lora_alpha")
    heat = [t for t in fig.data if isinstance(t, go.Heatmap)]
    assert len(heat) == 2
    # Each arm's best cell: starred label and a frame around (lr index, alpha index).
    assert heat[0].text[0][0] == "<b>★ 0.1</b>" and heat[1].text[1][1] == "<b>★ 0.1</b>"
    assert sum("★" in c for row in heat[0].text for c in row) == 1
    frames = [(sh.xref, sh.x0, sh.y0) for sh in fig.layout.shapes]
    assert ("x", -0.5, -0.5) in frames and ("x2", 0.5, 0.5) in frames
    assert heat[0].zmin == heat[1].zmin and heat[0].zmax == heat[1].zmax  # one colour scale for all arms
    assert heat[0].text[1][1] == "no value" and heat[0].text[0][1] == "1"  # values printed, NaN says so
    unfinished = compare_plots.grid_heatmaps(grid.drop(index=grid.index[-1]).assign(status="diverged"))
    texts = [t for t in unfinished.data if isinstance(t, go.Heatmap)]
    assert texts[0].text[1][1] == "diverged" and texts[1].text[1][1] == ""  # absent cell: blank
    assert sum(t.showscale for t in heat) == 1


def test_grid_heatmaps_give_every_learning_rate_its_own_column():
    # The bundled paper-synthetic-sign sample sweeps lr lin:0.02:0.03:3: 0.025 and 0.03 must not share
    # one "3e-2" column (a category axis draws both cells at the same place).
    lrs, alphas = [0.02, 0.025, 0.03], [4.0, 4.5, 4.500001]
    grid = pd.DataFrame([{"series": "lora", "lr": lr, "alpha": a, "final_loss": 1.0 + i + 3 * j}
                         for i, lr in enumerate(lrs) for j, a in enumerate(alphas)])
    heat = [t for t in compare_plots.grid_heatmaps(grid, value="final_loss").data if isinstance(t, go.Heatmap)][0]
    assert len(set(heat.x)) == len(lrs) and len(set(heat.y)) == len(alphas)
    assert np.allclose([float(x.replace("e-", "e-0")) for x in heat.x], lrs, rtol=1e-6)
    assert np.allclose([float(y) for y in heat.y], alphas, rtol=1e-9)


def test_grid_heatmaps_of_values_at_or_below_zero_colour_every_cell_on_one_linear_scale():
    # A final excess loss is 0 or a rounding below it where training reached the best rank-r loss: a log
    # colour scale cannot show such cells. Every value <= 0 raised (the min of no positive value), and one
    # negative value among positive ones was coloured as the smallest positive one.
    grid = pd.DataFrame({"series": "lora", "lr": [1e-3, 1e-3, 1e-2, 1e-2], "alpha": [8.0, 16.0, 8.0, 16.0],
                         "final_excess_loss": [0.0, -1e-9, 0.0, -3e-9]})
    fig = compare_plots.grid_heatmaps(grid, value="final_excess_loss", log_color=True)
    heat = [t for t in fig.data if isinstance(t, go.Heatmap)][0]
    assert np.allclose(np.asarray(heat.z, dtype=float), [[0.0, 0.0], [-1e-9, -3e-9]])  # drawn as they are, not log10
    assert heat.zmin == -3e-9 and heat.zmax >= 0.0
    sub = fig.layout.title.subtitle.text
    assert "colour on a log scale" not in sub and "values <= 0" in sub  # the log toggle is on: says why it is not
    mixed = grid.assign(final_excess_loss=[-1e-3, 0.5, 0.1, 0.2])
    heat = [t for t in compare_plots.grid_heatmaps(mixed, value="final_excess_loss").data if isinstance(t, go.Heatmap)][0]
    z = np.asarray(heat.z, dtype=float)
    assert heat.zmin == -1e-3 and heat.zmax == 0.5  # the colour range holds every cell: -0.001 is not coloured as 0.1
    assert heat.zmin <= z.min() and z.max() <= heat.zmax


def test_speedup_bars_annotate_ratio_and_unreached():
    speed = pd.DataFrame(
        [
            {"series": "lora", "steps_median": 40.0, "steps_min": 35.0, "steps_max": 45.0, "seconds_median": 4.0, "seconds_min": 3.5, "seconds_max": 4.5, "reached": 3, "n_seeds": 3, "speedup_steps": 1.0, "speedup_seconds": 1.0},
            {"series": "balora", "steps_median": 20.0, "steps_min": 18.0, "steps_max": 22.0, "seconds_median": 2.5, "seconds_min": 2.0, "seconds_max": 3.0, "reached": 2, "n_seeds": 3, "speedup_steps": 2.0, "speedup_seconds": 1.6},
            {"series": "balora-svd", "steps_median": np.nan, "steps_min": np.nan, "steps_max": np.nan, "seconds_median": np.nan, "seconds_min": np.nan, "seconds_max": np.nan, "reached": 0, "n_seeds": 3, "speedup_steps": np.nan, "speedup_seconds": np.nan},
        ]
    )
    fig = compare_plots.speedup_bars(speed, target=0.25, metric="eval_loss", loss_unit="nats/token")
    assert_labelled(fig, "Time to reach an evaluation loss of 0.25 nats/token", "optimizer steps", "seconds (wall clock)")
    steps_bar, secs_bar = fig.data
    assert list(steps_bar.y) == [40.0, 20.0, 0.0]
    assert steps_bar.x[0] == "<b>lora</b>"
    assert steps_bar.x[1] == "<b>balora</b><br>×2.00 vs lora<br>2/3 seeds reached"
    assert steps_bar.x[2] == "<b>balora-svd</b><br>not reached"
    assert "×1.60 vs lora" in secs_bar.x[1]
    assert list(steps_bar.error_y.array) == [5.0, 2.0, 0.0]


def _layers(series=("lora", "balora"), modules=("m.0", "m.1"), steps=(0, 5, 10)):
    rows = []
    for s in series:
        for m in modules:
            for st in steps:
                rows.append({"series": s, "module": m, "step": st, "rel_imbalance": (1.0 if s == "lora" else 1e-6) / (1 + st), "imbalance": 0.0 if s == "balora" else 1.0, "cond_dW": 10.0 + st, "cond_A": 2.0, "cond_B": np.inf if st == 5 else 3.0})
    return pd.DataFrame(rows)


def test_imbalance_heatmaps_log_colour_and_lines():
    heat = compare_plots.imbalance_heatmaps(_layers())
    assert_labelled(heat, "optimizer step", "layer")
    h = [t for t in heat.data if isinstance(t, go.Heatmap)]
    assert len(h) == 2 and list(h[0].y) == ["m.0", "m.1"]
    assert np.allclose(np.asarray(h[0].z, dtype=float)[0], np.log10([1.0, 1 / 6, 1 / 11]))
    assert np.allclose(np.asarray(h[0].customdata, dtype=float)[0], [1.0, 1 / 6, 1 / 11])  # hover shows real values
    # Tick labels are real values at powers of ten, not log10 exponents.
    assert "1e-06" in h[1].colorbar.ticktext or "1e-07" in h[1].colorbar.ticktext
    # Exact zeros (a perfectly balanced layer) are floored, not -inf.
    z = compare_plots.imbalance_heatmaps(_layers(), value="imbalance")
    assert np.isfinite(np.asarray(z.data[1].z, dtype=float)).all()
    lines = compare_plots.layer_lines(_layers(modules=("m.0", "m.1")), value="rel_imbalance")
    assert_labelled(lines, "optimizer step", "relative imbalance")
    assert len(lines.data) == 4 and {t.line.dash for t in lines.data} == {"solid", "dash"}


def _spectra(series=("lora", "balora"), r=3):
    rows = []
    for s in series:
        for w in ("dW", "A", "B"):
            for step in (0, 10):
                for i in range(r):
                    rows.append({"series": s, "which": w, "step": step, "index": i, "value": (1 + step) / (i + 1)})
    return pd.DataFrame(rows)


def test_singular_values_and_evolution():
    sv = _spectra()
    at = plots.singular_values(sv[sv["step"] == 10].drop(columns="step"), title="Singular values of m.0 at step 10")
    assert_labelled(at, "m.0 at step 10", "index i (1 = largest)", "singular value")
    assert len(at.data) == 6 and [a.text for a in at.layout.annotations][:3] == [plots.WHICH_TITLES[w] for w in ("dW", "B", "A")]
    assert list(at.data[0].x) == [1, 2, 3] and np.allclose(at.data[0].y, [11, 5.5, 11 / 3])
    evo = compare_plots.spectrum_evolution(sv[sv["which"] == "dW"].drop(columns="which"), which="dW")
    assert_labelled(evo, "optimizer step", "singular value")
    assert len(evo.data) == 2 * 3 and {t.name for t in evo.data} == {"σ1", "σ2", "σ3"}


def test_spectra_say_how_many_zero_singular_values_a_log_axis_leaves_off():
    # PEFT's init (B = 0) and step 0 of every run: B and dW are zero, all their singular values 0. On the log
    # axis those panels were blank with no word why (the loss figures say it: the same clause here).
    sv = _spectra(series=("lora",))
    sv.loc[(sv["step"] == 0) & sv["which"].isin(["dW", "B"]), "value"] = 0.0
    at0 = sv[sv["step"] == 0].drop(columns="step")
    sub = plots.singular_values(at0, title="at step 0").layout.title.subtitle.text
    assert "6 values <= 0 left off the log scale" in sub  # 3 of dW and 3 of B, counted independently:
    assert int((at0["value"] <= 0).sum()) == 6
    assert "left off" not in plots.singular_values(at0, title="at step 0", log_y=False).layout.title.subtitle.text
    assert "left off" not in plots.singular_values(sv[sv["step"] == 10].drop(columns="step"), title="t").layout.title.subtitle.text
    evo = compare_plots.spectrum_evolution(sv[sv["which"] == "B"].drop(columns="which"), which="B")
    assert "3 values <= 0 left off the log scale" in evo.layout.title.subtitle.text
    assert "left off" not in compare_plots.spectrum_evolution(
        sv[sv["which"] == "A"].drop(columns="which"), which="A").layout.title.subtitle.text


@pytest.mark.parametrize("n", [27, 40])
def test_per_series_panels_for_many_runs_and_arms(n):
    # Compare with ~10 runs of 3 arms: one panel per run and arm. A fixed gap between panels (0.03-0.04 of
    # the width) is more than plotly allows past 26-34 panels: the Grid, Imbalance and Spectra views raised.
    series = [f"run{k // 3} / {('lora', 'balora', 'balora-svd')[k % 3]}" for k in range(n)]
    grid = pd.DataFrame([{"series": s, "lr": lr, "alpha": 8.0, "final_loss": 1.0 + i} for i, s in enumerate(series)
                         for lr in (1e-3, 1e-2)])
    figs = [compare_plots.grid_heatmaps(grid, value="final_loss"),
            compare_plots.imbalance_heatmaps(_layers(series=series)),
            compare_plots.spectrum_evolution(_spectra(series=series).query("which == 'dW'").drop(columns="which"))]
    for fig in figs:
        domains = [getattr(fig.layout, n).domain for n in dir(fig.layout) if n.startswith("xaxis")]
        assert len(domains) == n
        assert all(d[1] > d[0] for d in domains)  # every panel has a width
    assert len([t for t in figs[0].data if isinstance(t, go.Heatmap)]) == n


def test_condition_lines_show_infinite_as_gaps():
    fig = compare_plots.condition_lines(_layers().groupby(["series", "step"], as_index=False)[["cond_dW", "cond_A", "cond_B"]].max())
    assert_labelled(fig, "optimizer step", "condition number")
    cond_b = [t for t in fig.data if t.xaxis == "x2"]
    assert len(fig.data) == 6 and np.isnan(np.asarray(cond_b[0].y, dtype=float)[1])


def _report():
    return pd.DataFrame(
        {
            "module": ["q", "v", "o"], "adapter": ["default"] * 3, "checkpoint": ["checkpoint-10"] * 3, "step": [10, 10, 10],
            "rel_imbalance": [0.9, 0.1, 0.5], "imbalance": [1.0, 0.2, 0.4], "cond_dW": [3.0, np.inf, 5.0],
            "cond_A": [2.0, 2.0, 2.0], "cond_B": [4.0, 1.0, 8.0],
        }
    )


def test_layer_bars_name_every_layer_and_top_n_keeps_the_worst():
    from balora.dashboard import report_frames

    rng = np.random.default_rng(0)
    many = pd.DataFrame({"module": [f"model.layers.{i}.self_attn.q_proj" for i in range(60)], "adapter": "default",
                         "rel_imbalance": rng.random(60), "cond_dW": rng.random(60) * 100, "cond_A": 2.0, "cond_B": 3.0})
    many.loc[7, "cond_dW"] = np.inf  # rank-deficient: never "the largest" of a top-N
    for fig in (inspect_plots.layer_bars(many), inspect_plots.conditioning_by_layer(many)):
        assert list(fig.layout.yaxis.tickvals) == many["module"].tolist()  # a label for every bar, none skipped
        assert fig.layout.height >= 20 * 60
    top = report_frames.worst_layers(many, "rel_imbalance", 10)
    assert top["module"].tolist() == many.sort_values("rel_imbalance", ascending=False)["module"].head(10).tolist()
    worst_cond = report_frames.worst_layers(many, "cond_dW", 5)
    assert "model.layers.7.self_attn.q_proj" not in set(worst_cond["module"])
    assert worst_cond["cond_dW"].is_monotonic_decreasing and len(worst_cond) == 5
    assert report_frames.worst_layers(many, "rel_imbalance", None) is many


def test_inspect_figures():
    bars = inspect_plots.layer_bars(_report(), value="rel_imbalance")
    assert_labelled(bars, "relative imbalance", "layer")
    assert list(bars.data[0].y) == ["q", "v", "o"] and list(bars.data[0].x) == [0.9, 0.1, 0.5]
    # nn.Sequential children are named "0", "1": they must stay labels on a category axis.
    numeric = _report().assign(module=["0", "1", "2"])
    assert inspect_plots.layer_bars(numeric).layout.yaxis.type == "category"
    assert inspect_plots.conditioning_by_layer(numeric).layout.yaxis.type == "category"
    cond = inspect_plots.conditioning_by_layer(_report())
    assert_labelled(cond, "condition number", "layer")
    assert len(cond.data) == 3 and np.isnan(np.asarray(cond.data[0].x, dtype=float)[1])
    two = pd.concat([_report(), _report().assign(checkpoint="checkpoint-20", step=20, rel_imbalance=[0.5, 0.05, 0.2])])
    ck = inspect_plots.across_checkpoints(two, value="rel_imbalance")
    assert_labelled(ck, "training step of the checkpoint", "relative imbalance")
    q = next(t for t in ck.data if t.name == "q")
    assert list(q.x) == [10, 20] and list(q.y) == [0.9, 0.5]
    changes = pd.DataFrame({"module": ["q", "v"], "adapter": ["default"] * 2, "action": ["balanced", "unchanged"],
                            "rel_imbalance_before": [0.9, 0.1], "rel_imbalance_after": [1e-7, 0.1], "dW_rel_change": [2e-7, 0.0]})
    bal = inspect_plots.balance_check(changes)
    assert_labelled(bal, "relative imbalance", "relative change of dW", "layer")
    marker = next(t for t in bal.data if isinstance(t, go.Scatter))
    assert marker.x[0] == 2e-7 and marker.x[1] == pytest.approx(2e-8)  # the exact 0 drawn at the floor


def test_final_loss_by_arm_one_box_per_arm():
    cells = pd.DataFrame({"series": ["lora", "lora", "balora", "balora"], "seed": [0, 1, 0, 1], "final_loss": [0.3, 0.35, 0.2, np.nan]})
    fig = compare_plots.final_loss_by_arm(cells, loss_unit="nats/token")
    assert_labelled(fig, "arm", "final training loss (nats/token)")
    assert [t.name for t in fig.data] == ["lora", "balora"] and len(fig.data[1].y) == 1


def test_final_loss_by_arm_leaves_out_seeds_that_diverged_and_says_so():
    # A diverged cell's final_loss is its last finite loss (1e28 or so), not a final loss: no dot for it.
    cells = pd.DataFrame({"series": ["lora", "lora", "balora", "balora"], "seed": [0, 1, 0, 1],
                          "status": ["completed", "diverged", "diverged", "diverged"],
                          "final_loss": [0.3, 4e28, 2e29, 3e30]})
    fig = compare_plots.final_loss_by_arm(cells)
    assert [list(t.y) for t in fig.data] == [[0.3]]
    assert "3 seeds that diverged left out" in fig.layout.title.subtitle.text


def test_values_a_log_axis_cannot_draw_are_said_in_the_subtitle():
    # An excess loss a rounding below 0 (-2e-7) vanishes from a log axis: the figure says how many.
    cells = pd.DataFrame({"series": ["lora", "balora", "balora"], "seed": [0, 0, 1], "final_excess_loss": [1e-3, -2e-7, 1e-7]})
    log = compare_plots.final_loss_by_arm(cells, value="final_excess_loss", log_y=True).layout.title.subtitle.text
    assert "1 value <= 0 left off the log scale" in log
    assert "left off" not in compare_plots.final_loss_by_arm(cells, value="final_excess_loss").layout.title.subtitle.text
    curves = _curves(n_seeds=3)
    assert "left off" not in compare_plots.loss_curves(curves).layout.title.subtitle.text
    curves.loc[curves.index[:2], "lo"] = 0.0  # the band's edge: not a drawn value
    assert "left off" not in compare_plots.loss_curves(curves).layout.title.subtitle.text
    curves.loc[curves.index[:2], "median"] = 0.0
    assert "2 values <= 0 left off the log scale" in compare_plots.loss_curves(curves).layout.title.subtitle.text


@pytest.mark.parametrize(
    "build",
    [
        lambda e: compare_plots.loss_curves(e),
        lambda e: compare_plots.final_loss_by_arm(e),
        lambda e: compare_plots.grid_heatmaps(e.assign(lr=[], alpha=[], final_loss=[])),
        lambda e: compare_plots.speedup_bars(e, target=0.1),
        lambda e: compare_plots.imbalance_heatmaps(e.assign(module=[], step=[], rel_imbalance=[])),
        lambda e: compare_plots.layer_lines(e.assign(module=[], step=[], rel_imbalance=[])),
        lambda e: plots.singular_values(e),
        lambda e: compare_plots.spectrum_evolution(e),
        lambda e: compare_plots.condition_lines(e),
        lambda e: inspect_plots.layer_bars(e),
        lambda e: inspect_plots.conditioning_by_layer(e),
        lambda e: inspect_plots.across_checkpoints(e),
        lambda e: inspect_plots.balance_check(e),
    ],
)
def test_empty_frames_give_a_labelled_no_data_figure(build):
    fig = build(pd.DataFrame({"series": []}))
    assert_labelled(fig)
    assert not fig.data and fig.layout.annotations and "no" in fig.layout.annotations[0].text


def test_arm_colours_are_fixed_per_arm_across_views_and_runs():
    assert plots.arm_colors(["lora", "balora-svd"]) == {"lora": plots.ARM_COLORS["lora"], "balora-svd": plots.ARM_COLORS["balora-svd"]}
    # An arm without a fixed colour gets the same one whatever else is on the page, and in any order.
    alone = plots.arm_colors(["mystery"])["mystery"]
    assert plots.arm_colors(["x-arm", "lora", "mystery"])["mystery"] == alone == plots.arm_colors(["mystery", "x-arm"])["mystery"]
    assert alone not in plots.ARM_COLORS.values()
    # Two runs of one arm share the arm's colour and differ by dash; one run draws solid lines.
    many = plots.arm_colors(["a: lora", "b: lora", "b: balora"])
    assert many["a: lora"] == many["b: lora"] == plots.ARM_COLORS["lora"] and many["b: balora"] == plots.ARM_COLORS["balora"]
    dashes = plots.run_dashes(["a: lora", "b: lora", "b: balora"])
    assert dashes["a: lora"] != dashes["b: lora"] == dashes["b: balora"]
    assert set(plots.run_dashes(["lora", "balora"]).values()) == {"solid"}
    # Run names may hold ": " themselves; the arm is what follows the last one.
    assert plots.series_arm("sweeps: grid: balora-svd") == "balora-svd"


def test_loss_curves_of_two_runs_keep_the_arm_colour():
    curves = pd.concat([_curves(series=("r1: lora", "r1: balora")), _curves(series=("r2: lora", "r2: balora"))])
    fig = compare_plots.loss_curves(curves)
    lines = {t.name: t.line for t in fig.data if t.mode == "lines"}
    assert lines["r1: lora"].color == lines["r2: lora"].color == plots.ARM_COLORS["lora"]
    assert lines["r1: lora"].dash != lines["r2: lora"].dash


def test_compare_figures_show_run_and_layer_names_as_text_never_as_plotly_tags():
    # A run folder made by someone else names its series ("run: arm") and its layers; Plotly reads
    # <a href>, <b>, <br> in legends, axis labels, subplot titles and tick labels, so a layer named
    # like this was a link on the Imbalance view (the Inspect page had the same, and was mended).
    evil = '<a href="https://attacker.example/x">fix it here</a><br><b>bold</b>'
    series = (f"{evil}: lora", "r: balora")
    curves = _curves(series=series)
    layers = _layers(series=series, modules=(evil, "m.1"))
    cells = pd.DataFrame([{"series": s, "seed": k, "final_loss": 0.1 * (k + 1), "status": "completed"}
                          for s in series for k in range(3)])
    grid = pd.DataFrame([{"series": s, "lr": 1e-3, "alpha": 8.0, "final_loss": 0.1} for s in series])
    speed = pd.DataFrame([{"series": s, "steps_median": 4.0, "steps_min": 3.0, "steps_max": 5.0, "seconds_median": 1.0,
                           "seconds_min": 1.0, "seconds_max": 1.0, "reached": 3, "n_seeds": 3, "speedup_steps": 1.0,
                           "speedup_seconds": 1.0} for s in series])
    sv = _spectra(series=series)
    figs = [compare_plots.loss_curves(curves), compare_plots.final_loss_by_arm(cells), compare_plots.grid_heatmaps(grid),
            compare_plots.speedup_bars(speed, target=0.5, metric="loss"), compare_plots.imbalance_heatmaps(layers),
            compare_plots.layer_lines(layers), compare_plots.condition_lines(layers),
            compare_plots.spectrum_evolution(sv[sv["which"] == "dW"].drop(columns="which")),
            plots.singular_values(sv[sv["step"] == 10].drop(columns="step"), title="Singular values")]
    for fig in figs:
        shown = fig.to_plotly_json()
        for trace in shown["data"]:
            trace.pop("legendgroup", None)  # a key that groups traces, never drawn
        spec = json.dumps(shown, default=str)  # fig.to_json() would escape every < as \u003c
        assert "attacker.example" in spec, "the name is on the figure"
        assert "<a " not in spec and "<br><b>bold" not in spec, spec[:1500]
