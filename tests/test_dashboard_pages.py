"""Every dashboard page under streamlit's AppTest: no exception, the key elements present,
and widgets that change what is shown. Runs and adapters are written into tmp folders."""

from __future__ import annotations

import io
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest

sys.path.insert(0, str(Path(__file__).parent))
from test_dashboard_data import write_run  # noqa: E402

from balora.dashboard import exposure, jobs, settings, uploads  # noqa: E402
from balora.dashboard.app import page_path  # noqa: E402

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
PAGE = {name: str(page_path(f"{name}.py")) for name in ("compare", "inspect", "launch", "learn")}
TIMEOUT = 120  # generous: the first run imports torch and balora on a shared 2-core machine


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    write_run(root / "grid", arms=("lora", "balora", "balora-svd"), lrs=(1e-3, 1e-2), alphas=(8.0, 32.0), steps=20)
    write_run(root / "single", steps=20)
    write_run(root / "stopped", status="interrupted", steps=10)
    write_run(root / "live", status=None, steps=10)
    return root


@pytest.fixture(scope="module")
def real_run(runs_root):
    """A real `balora compare` run (in-process: a few seconds), 2 x 2 grid, 2 seeds."""
    import balora.runner

    return balora.runner.compare(task="synthetic", arms="lora,balora", steps=10, seeds=2, lr=[1e-2, 3e-2], alpha=[4, 8],
                                 target_loss=18.0, out=runs_root / "real", quiet=True)


@pytest.fixture(autouse=True)
def served_locally(monkeypatch):
    """Served on this machine only, as `balora dashboard` serves it, wherever pytest starts
    (test_dashboard_serving covers the other cases)."""
    monkeypatch.setattr(exposure, "served_address", lambda: ("127.0.0.1", "command-line argument or environment variable"))


@pytest.fixture
def app(runs_root, monkeypatch, tmp_path):
    monkeypatch.setenv(settings.ENV_VAR, str(runs_root))
    # An upload stays in its balora-upload-* folder while the session looks at it (a closed tab's is
    # pruned after 12 h): keep the ones these sessions leave in the test's own folder, not /tmp.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return AppTest.from_file(APP, default_timeout=TIMEOUT)


def charts(at) -> list[dict]:
    return [json.loads(e.proto.spec) for e in at.get("plotly_chart")]


def arr(v) -> list:
    """A trace array from a figure's JSON: plotly 6+ sends numeric arrays as base64 "bdata"."""
    if isinstance(v, dict) and "bdata" in v:
        import base64

        import numpy as np

        shape = v.get("shape", -1)  # a 2-D array's shape comes as the text "rows, cols"
        shape = tuple(int(n) for n in shape.split(",")) if isinstance(shape, str) else shape
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).reshape(shape).tolist()
    return list(v)


def titles(at) -> list[str]:
    return [c["layout"]["title"]["text"] for c in charts(at)]


def texts(elements) -> str:
    return " ".join(str(e.value) for e in elements)


def start_button(at):
    """The Launch form's Start button (other buttons come and go with the job panel)."""
    return next(b for b in at.button if b.label == "Start")


def no_exception(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


# ------------------------------------------------------------------------------------- app


def test_app_opens_on_compare_with_the_runs_folder(app, runs_root):
    at = app.run()
    no_exception(at)
    assert at.title[0].value == "Compare runs"
    assert str(runs_root) in texts(at.sidebar.caption)
    # Opens on a run and draws its loss curves straight away.
    assert at.multiselect(key="compare_runs").value and titles(at)[0].endswith("loss against optimizer step")


# ------------------------------------------------------------------------------------- compare


def test_compare_sections_draw_and_widgets_change_them(app):
    at = app.run()
    at.multiselect(key="compare_runs").set_value(["grid"]).run()
    no_exception(at)
    assert "completed" in texts(at.success)
    loss = charts(at)[0]
    assert loss["layout"]["yaxis"]["type"] == "log" and loss["layout"]["xaxis"]["title"]["text"] == "optimizer step"
    assert {t["name"] for t in loss["data"] if t.get("mode") == "lines"} == {"lora", "balora", "balora-svd"}

    at.toggle(key="loss_log").set_value(False).run()
    assert charts(at)[0]["layout"]["yaxis"]["type"] == "linear"
    at.radio(key="loss_x").set_value("time_s").run()
    assert charts(at)[0]["layout"]["xaxis"]["title"]["text"] == "wall-clock time (s)"
    at.multiselect(key="compare_arms").set_value(["lora"]).run()
    assert {t["name"] for t in charts(at)[0]["data"] if t.get("mode") == "lines"} == {"lora"}
    at.multiselect(key="compare_arms").set_value(["lora", "balora", "balora-svd"]).run()
    before = [arr(t["y"]) for t in charts(at)[0]["data"] if t.get("name") == "lora"]
    at.selectbox(key="compare_cell").set_value((1e-3, 8.0)).run()
    after = [arr(t["y"]) for t in charts(at)[0]["data"] if t.get("name") == "lora"]
    assert before != after  # another lr x alpha cell, other curves

    at.segmented_control(key="compare_section").set_value("Grid").run()
    no_exception(at)
    grid = charts(at)[0]
    assert [t["type"] for t in grid["data"]].count("heatmap") == 3 and titles(at)[0].endswith("across learning rate × alpha")
    starred = [sum("★" in c for row in t["text"] for c in row) for t in grid["data"] if t["type"] == "heatmap"]
    assert starred == [1, 1, 1] and len(grid["layout"]["shapes"]) == 6  # each arm's best cell marked and framed

    at.segmented_control(key="compare_section").set_value("Speed-up").run()
    no_exception(at)
    assert titles(at)[0].startswith("Time to reach an excess loss of")  # the default where the task records it
    first = arr(charts(at)[0]["data"][0]["y"])
    at.number_input(key="speed_target").set_value(0.5).run()
    assert arr(charts(at)[0]["data"][0]["y"]) != first and "0.5" in titles(at)[0]

    at.segmented_control(key="compare_section").set_value("Imbalance").run()
    no_exception(at)
    assert [t.startswith(x) for t, x in zip(titles(at), ("Relative imbalance of every layer", "Relative imbalance of chosen layers"))] == [True, True]
    n_lines = len(charts(at)[1]["data"])
    at.multiselect(key="imb_layers").set_value(["layers.0.q_proj"]).run()
    assert len(charts(at)[1]["data"]) < n_lines

    at.segmented_control(key="compare_section").set_value("Spectra").run()
    no_exception(at)
    assert titles(at)[0].startswith("Singular values of layers.0.q_proj at step 20")
    at.select_slider(key="spec_step").set_value(5).run()
    assert titles(at)[0].endswith("at step 5")
    at.radio(key="spec_which").set_value("A").run()
    assert "lora_A" in titles(at)[1]
    assert titles(at)[2] == "Condition numbers during training"


def test_compare_on_a_real_run_every_section(app, real_run):
    from balora.dashboard import frames

    at = app.run()
    at.multiselect(key="compare_runs").set_value(["real"]).run()
    no_exception(at)
    assert "completed" in texts(at.success) and titles(at)[0] == "Excess loss against optimizer step"
    per_arm = at.dataframe[0].value  # the per-arm summary comes first
    assert set(per_arm["arm"]) == {"lora", "balora"} and {"best_lr", "best_alpha", "within_2x"} <= set(per_arm.columns)
    for section, first_title in (("Grid", "Final excess loss across"), ("Speed-up", "Time to reach"),
                                 ("Imbalance", "Relative imbalance of every layer"), ("Spectra", "Singular values of")):
        at.segmented_control(key="compare_section").set_value(section).run()
        no_exception(at)
        assert titles(at) and titles(at)[0].startswith(first_title), (section, titles(at))
    # The speed-up panel at the run's own target agrees with the runner's summary.
    steps = frames.combine({"real": real_run.steps})
    summary = real_run.summary
    for (lr, alpha), cell in summary.groupby(["lr", "alpha"]):
        speed = frames.speedups(frames.select_cell(steps, lr, alpha), 18.0).set_index("series")
        for arm, g in cell.groupby("arm"):
            # a seed that never reached the target counts as +inf in both
            assert speed.loc[arm, "steps_median"] == pytest.approx(g["steps_to_target"].fillna(np.inf).median())


def test_compare_grid_lowest_training_loss_is_each_cells_own(app, real_run):
    # The Grid view's "best/lowest training loss" is the lowest loss each cell's training reached, from
    # its steps; the summary's best_loss is the task's floor (the best rank-r loss), the same in every cell.
    from balora.dashboard.plots import METRIC_NAMES

    at = app.run()
    at.multiselect(key="compare_runs").set_value(["real"]).run()
    at.segmented_control(key="compare_section").set_value("Grid").run()
    options = at.selectbox(key="grid_value").options
    label = next(o for o in options if "training loss" in o and not o.startswith("final"))
    value = next(k for k, v in METRIC_NAMES.items() if v == label)
    at.selectbox(key="grid_value").set_value(value).run()
    no_exception(at)
    steps = real_run.steps
    lowest = steps.groupby(["arm", "lr", "alpha", "seed"])["loss"].min().groupby(["arm", "lr", "alpha"]).median()
    heat = [t for t in charts(at)[0]["data"] if t["type"] == "heatmap"]
    for arm, t in zip(["lora", "balora"], heat):
        alphas, lrs = sorted(steps["alpha"].unique()), sorted(steps["lr"].unique())
        expected = [[lowest[(arm, lr, a)] for lr in lrs] for a in alphas]
        assert np.allclose(np.asarray(arr(t["customdata"]), dtype=float), expected, rtol=1e-6), (label, arm)


def test_compare_best_cell_choice_names_the_metric_it_ranks_by(app):
    # The cell choice "each arm's own best cell (lowest median ...)" names a metric: each arm's lowest median of
    # that metric over seeds, from the run's own summary, is the cell the per-arm table reports. In the shipped
    # grid sample, balora's lowest median final training loss (alpha 8) is not its best excess loss cell (alpha 2).
    from balora.dashboard.plots import METRIC_NAMES

    at = app.run()
    at.multiselect(key="compare_runs").set_value(["samples/synthetic-adam-grid"]).run()
    no_exception(at)
    label = at.selectbox(key="compare_cell").options[0]
    named = [k for k, v in METRIC_NAMES.items() if k.startswith("final_") and v in label]
    metric = named[0] if named else "final_loss"  # "final loss" as a user reads it: the final training loss
    summary = pd.read_parquet(Path(settings.sample_runs_dir()) / "synthetic-adam-grid" / "summary")
    per_arm = at.dataframe[0].value.set_index("arm")
    for arm, g in summary.groupby("arm"):
        lr, alpha = g.groupby(["lr", "alpha"])[metric].median().idxmin()
        assert (per_arm.loc[arm, "best_lr"], per_arm.loc[arm, "best_alpha"]) == (lr, alpha), (label, arm)


def test_compare_layer_lines_follow_a_switch_to_a_run_with_other_layers(app, real_run):
    # 'grid' has layers.*.q_proj/v_proj, the real run its own layer names: after the switch the line
    # chart shows the new run's first layers, as when the run is opened first, never an empty chart.
    at = app.run()
    at.multiselect(key="compare_runs").set_value(["grid"]).run()
    at.segmented_control(key="compare_section").set_value("Imbalance").run()
    assert at.multiselect(key="imb_layers").value
    at.multiselect(key="compare_runs").set_value(["real"]).run()
    no_exception(at)
    modules = sorted(real_run.layers["module"].astype(str).unique())
    assert at.multiselect(key="imb_layers").value == modules[:2]
    assert {t["name"].split(" · ")[1] for t in charts(at)[1]["data"]} == set(modules[:2])


def test_compare_and_inspect_choices_survive_a_visit_to_another_page(app, adapters):
    # The runs and the view already come back (persist_state); the filters, the cell and the
    # adapter path must too, not silently reset to every seed, the best cell and an empty path.
    at = app.run()
    at.multiselect(key="compare_runs").set_value(["grid"]).run()
    at.multiselect(key="compare_seeds").set_value([1]).run()
    at.multiselect(key="compare_arms").set_value(["lora", "balora"]).run()
    at.selectbox(key="compare_cell").set_value((1e-3, 8.0)).run()
    at.switch_page(PAGE["learn"]).run()
    at.switch_page(PAGE["compare"]).run()
    no_exception(at)
    assert at.multiselect(key="compare_seeds").value == [1]
    assert at.multiselect(key="compare_arms").value == ["lora", "balora"]
    assert at.selectbox(key="compare_cell").value == (1e-3, 8.0)
    at.switch_page(PAGE["inspect"]).run()
    at.text_input(key="insp_path").set_value(str(adapters["peft"])).run()
    at.switch_page(PAGE["compare"]).run()
    at.switch_page(PAGE["inspect"]).run()
    no_exception(at)
    assert at.text_input(key="insp_path").value == str(adapters["peft"]) and at.metric


def test_compare_says_which_runs_the_chosen_metric_leaves_out(app):
    # A synthetic run (excess loss) next to the lm sample (no excess loss): the default metric draws the
    # synthetic run only; the page must say the other run is not drawn, not leave it out silently.
    at = app.run()
    at.multiselect(key="compare_runs").set_value(["single", "samples/lm-toy"]).run()
    no_exception(at)
    metric = at.selectbox(key="loss_metric").value
    drawn = {t["name"].split(": ")[0] for c in charts(at)[:2] for t in c["data"] if t.get("name")}
    lm_steps = __import__("balora").load_run(settings.sample_runs_dir() / "lm-toy").steps
    assert metric == "excess_loss" and lm_steps[metric].isna().all() and drawn == {"single"}  # the case
    assert "samples/lm-toy" in texts(at.caption) and "excess loss" in texts(at.caption)


def test_compare_says_a_run_without_the_chosen_cell_trained_no_such_cell(app):
    # A grid beside a single-cell run, one cell of the grid chosen: the single run has excess loss, only not in
    # that cell. The page said it "recorded no excess loss (not recorded)" and to choose another metric.
    at = app.run()
    at.multiselect(key="compare_runs").set_value(["grid", "single"]).run()
    at.selectbox(key="compare_cell").set_value((0.01, 8.0)).run()
    no_exception(at)
    drawn = {t["name"].split(": ")[0] for c in charts(at)[:2] for t in c["data"] if t.get("name")}
    assert at.selectbox(key="loss_metric").value == "excess_loss" and drawn == {"grid"}  # the case
    notes = [c.value for c in at.caption if c.value.startswith("Not drawn")]
    assert len(notes) == 2 and all("`single`" in n for n in notes)
    assert not any("recorded no" in n or "another metric" in n for n in notes), notes
    assert all("lr 0.01, alpha 8" in n for n in notes), notes


def test_compare_does_not_call_a_run_without_evaluation_another_task(tmp_path, monkeypatch):
    # Two Trainer runs of one task, one evaluated and one not (no eval set): the page said the second
    # recorded no evaluation loss because it was "(another task)".
    import pandas as pd

    write_run(tmp_path / "evaluated", task="trainer")
    plain = write_run(tmp_path / "not-evaluated", task="trainer")
    for table, column in (("steps", "eval_loss"), ("summary", "final_eval_loss")):
        for part in (plain / table).glob("part-*.parquet"):
            pd.read_parquet(part).assign(**{column: np.nan}).to_parquet(part)
    monkeypatch.setenv(settings.ENV_VAR, str(tmp_path))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.multiselect(key="compare_runs").set_value(["evaluated", "not-evaluated"]).run()
    at.selectbox(key="loss_metric").set_value("eval_loss").run()
    no_exception(at)
    said = texts(at.caption)
    assert "Not drawn: `not-evaluated`" in said and "evaluation loss" in said  # the case
    assert "another task" not in said and "no evaluation" in said


def test_compare_best_cell_per_seed(app, real_run):
    """'each seed's own best cell' (the paper's protocol) draws each seed at records.best_cells(select='seed')."""
    from balora.records import arm_summary, best_cells

    at = app.run()
    at.multiselect(key="compare_runs").set_value(["real"]).run()
    assert at.selectbox(key="compare_cell").value == "best"  # the run was recorded with the default --select arm
    at.selectbox(key="compare_cell").set_value("best per seed").run()
    no_exception(at)
    per_arm = at.dataframe[0].value.set_index("arm")
    want = arm_summary(real_run.summary, select="seed").set_index("arm")
    for arm in ("lora", "balora"):
        assert per_arm.loc[arm, "best_lr"] == pytest.approx(want.loc[arm, "best_lr"])
    shown = at.dataframe[1].value  # the cells shown, one row per seed
    picked = best_cells(real_run.summary, select="seed")
    assert sorted(zip(shown["series"], shown["seed"], shown["lr"])) == sorted(zip(picked["arm"], picked["seed"], picked["lr"]))


def test_compare_opens_the_run_named_in_the_url(app):
    at = app
    at.query_params["run"] = "stopped"
    at.run()
    no_exception(at)
    assert at.multiselect(key="compare_runs").value == ["stopped"]
    at.multiselect(key="compare_runs").set_value(["single"]).run()
    assert at.multiselect(key="compare_runs").value == ["single"]  # the URL does not undo a later choice
    at.query_params["run"] = "nope"
    at.run()
    assert "No run named `nope`" in texts(at.warning)


def test_compare_marks_running_and_interrupted_runs(app):
    at = app.run()
    at.multiselect(key="compare_runs").set_value(["live", "stopped"]).run()
    no_exception(at)
    assert "in progress" in texts(at.info) and "refreshes on its own" in texts(at.info)
    assert "interrupted" in texts(at.warning)
    # Two runs: series are labelled by run.
    names = {t["name"] for t in charts(at)[0]["data"] if t.get("mode") == "lines"}
    assert names == {"live: lora", "live: balora", "stopped: lora", "stopped: balora"}
    at.multiselect(key="compare_runs").set_value([]).run()
    no_exception(at)
    assert "Choose at least one run." in texts(at.info) and not charts(at)  # cleared stays cleared



def _watch_a_run_finishing_while_read(tmp_path, monkeypatch, also=lambda path: None):
    """The Compare page on a live run that finishes (its summary, its status) while the page reads it; `also(path)`
    runs then too. Returns whether the page's watcher, ticked once by hand, asked for a rerun."""
    import streamlit

    from balora import store
    from balora.store import RunWriter

    w = RunWriter(tmp_path / "live", {"task": "synthetic", "arms": ["lora"], "seeds": [0], "steps": 2}, {})
    w.append("steps", [{"arm": "lora", "seed": 0, "lr": 0.1, "alpha": 4.0, "step": s, "loss": 1.0 / s} for s in (1, 2)])
    w.heartbeat({"done": 0, "total": 1}, force=True)
    read, watchers, reruns = store.load_run, [], []

    def read_then_finish(path, **kw):
        run = read(path, **kw)
        if not w.finished:  # the writer ends while the page draws what it read
            w.append("summary", [{"arm": "lora", "seed": 0, "lr": 0.1, "alpha": 4.0, "status": "completed",
                                   "steps_done": 2, "final_loss": 0.5}])
            w.finish("completed")
            also(path)
        return run

    monkeypatch.setattr(store, "load_run", read_then_finish)

    def fragment(f=None, *, run_every=None, **kw):  # the timed one (the watcher) is kept, called by hand
        return f if f is not None else lambda g: (lambda: None) if run_every and not watchers.append(g) else g

    monkeypatch.setattr(streamlit, "fragment", fragment)
    monkeypatch.setenv(settings.ENV_VAR, str(tmp_path))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["run"] = "live"
    at.run()
    no_exception(at)
    assert "in progress" in texts(at.info) and len(watchers) == 1
    monkeypatch.setattr(streamlit, "rerun", lambda *a, **kw: reruns.append(True))
    watchers[0]()  # the watcher's next tick
    return bool(reruns)


def test_compare_refreshes_a_run_that_changed_while_it_was_read(tmp_path, monkeypatch):
    """The run finishes (its summary, its status) while the page reads it: the page showed it "in progress"
    without a summary, and its watcher, comparing with the files as they were after the read, never
    refreshed it. The watcher compares with the files as they were read."""
    assert _watch_a_run_finishing_while_read(tmp_path, monkeypatch), \
        "the page would show the run in progress, without its summary, until the user clicks"


def test_compare_refreshes_a_run_that_another_tab_loaded_newer_while_this_one_read_it(tmp_path, monkeypatch):
    """Two browser tabs (two sessions, one server process) on a live run: while this page read the run, the other
    tab loaded it after the writer finished. The page's watcher took the version of the files "load_run last
    served", process-wide: the other tab's, so it compared with files it never showed and never refreshed;
    the page stayed "in progress" without the summary. It compares with the version this page read."""
    from balora.dashboard import loaders

    def other_tab_loads(path):
        assert loaders.load_run(path).status == "completed"  # the other session's load

    assert _watch_a_run_finishing_while_read(tmp_path, monkeypatch, other_tab_loads), \
        "the page would show the run in progress, without its summary, until the user clicks"


def test_compare_shows_run_names_messages_and_the_url_as_text_never_as_markdown(tmp_path, monkeypatch):
    # A run folder shared by someone else names itself and writes its own status message; the
    # ?run= of a link anyone can send lands in a warning. None of it may add an image or a link.
    image = "![px](https:&#47;&#47;attacker.example&#47;p.png)"  # a folder name holds no '/'
    run = write_run(tmp_path / f"r` {image} [click](https:&#47;&#47;attacker.example) `", status="failed")
    status = json.loads((run / "status.json").read_text())
    status["message"] = "boom ![px](https://attacker.example/m.png) [fix it here](https://attacker.example/fix)"
    (run / "status.json").write_text(json.dumps(status))
    monkeypatch.setenv(settings.ENV_VAR, str(tmp_path))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["run"] = run.name
    at.run()
    no_exception(at)
    assert at.multiselect(key="compare_runs").value == [run.name]
    assert "Failed: boom" in texts(at.error)
    html = "\n".join(rendered_markdown(at))
    at.query_params["run"] = "nope` ![u](https://attacker.example/u.png) `"
    at.run()
    no_exception(at)
    assert "No run named" in texts(at.warning)
    html += "\n".join(rendered_markdown(at))
    assert "attacker.example" in html, "the names are shown"
    assert "<img" not in html and "<a " not in html, html


def no_none_cells(table_element) -> None:
    """A table shows no "None": no column without any value, and a dash where a cell has none."""
    from balora.dashboard.frames import NA_TEXT

    assert table_element.proto.placeholder == NA_TEXT
    value = table_element.value
    assert not [c for c in value.columns if value[c].isna().all()], value.columns


def test_compare_filters_a_new_run_never_hides_silently(app):
    at = app.run()
    at.multiselect(key="compare_runs").set_value(["single"]).run()
    at.multiselect(key="compare_arms").set_value(["lora"]).run()
    at.multiselect(key="compare_seeds").set_value([0]).run()
    no_exception(at)
    assert "Hidden by the filters above: arm balora, seed 1" in texts(at.caption)
    at.multiselect(key="compare_runs").set_value(["single", "grid"]).run()
    no_exception(at)
    # balora-svd arrives with the grid run: shown at once; what the user hid stays hidden, and is said.
    assert at.multiselect(key="compare_arms").value == ["lora", "balora-svd"]
    assert "arm balora" in texts(at.caption) and "seed 1" in texts(at.caption)
    names = {t["name"] for t in charts(at)[0]["data"] if t.get("mode") == "lines"}
    assert names == {"single: lora", "grid: lora", "grid: balora-svd"}


def test_compare_view_control_never_blank_and_tables_without_none(app):
    at = app.run()
    at.multiselect(key="compare_runs").set_value(["grid"]).run()
    assert at.segmented_control(key="compare_section").proto.required  # the browser cannot deselect the view
    at.segmented_control(key="compare_section").set_value(None).run()  # and if a client sends "none" anyway:
    no_exception(at)
    assert titles(at)[0].endswith("loss against optimizer step")
    assert len(at.dataframe) == 2
    for table in at.dataframe:
        no_none_cells(table)
    at.segmented_control(key="compare_section").set_value("Speed-up").run()
    assert len(at.dataframe) == 1
    no_none_cells(at.dataframe[0])


def _loaded_runs(path) -> int:
    """How many Run objects of the run at `path` are alive (each page run unpickles its own copy)."""
    import gc

    from balora.store import Run

    gc.collect()
    return sum(isinstance(o, Run) and Path(o.path).name == Path(path).name for o in gc.get_objects())


def test_compare_keeps_no_earlier_copy_of_a_run_alive(app, runs_root):
    # Streamlit never forgets a widget's metadata, format_func included; a lambda defined in the page
    # holds the page's globals (every loaded run and frame). Each view's widgets kept the run as it
    # was when the view was last drawn: a session held one whole copy of a big run per view visited,
    # and kept a run it no longer showed.
    at = app.run()
    at.multiselect(key="compare_runs").set_value(["grid"]).run()
    for section in ("Grid", "Speed-up", "Imbalance", "Spectra", "Loss"):
        at.segmented_control(key="compare_section").set_value(section).run()
        no_exception(at)
    assert _loaded_runs(runs_root / "grid") == 1  # the copy the page shows now
    at.multiselect(key="compare_runs").set_value(["single"]).run()
    no_exception(at)
    assert _loaded_runs(runs_root / "grid") == 0


def test_compare_lists_a_damaged_run_and_loads_the_others(tmp_path, monkeypatch):
    write_run(tmp_path / "good")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("[1, 2]")  # not an object: balora.list_runs calls the run damaged
    (bad / "status.json").write_text('{"status": "completed"}')
    monkeypatch.setenv(settings.ENV_VAR, str(tmp_path))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    no_exception(at)
    assert "1 run(s) cannot be shown: `bad`: " in texts(at.warning) and "config.json" in texts(at.warning)
    assert at.multiselect(key="compare_runs").value == ["good"] and "bad" not in at.multiselect(key="compare_runs").options
    assert "completed" in texts(at.success) and titles(at)[0].endswith("loss against optimizer step")
    at.query_params["run"] = "bad"
    at.run()
    assert "Run `bad` cannot be shown" in texts(at.error)


def test_compare_empty_and_missing_runs_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(settings.ENV_VAR, str(tmp_path))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    no_exception(at)
    assert "No runs in" in texts(at.info)
    monkeypatch.setenv(settings.ENV_VAR, str(tmp_path / "nope"))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    no_exception(at)
    assert "No runs folder" in texts(at.info) and "nope" in texts(at.info)
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv(settings.ENV_VAR, str(tmp_path / "afile"))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    no_exception(at)
    assert "afile` is not a folder: point $BALORA_RUNS" in texts(at.info)


@pytest.mark.parametrize("where", ["env", "flag"])
def test_a_runs_folder_of_no_user_is_a_message_not_a_traceback(monkeypatch, where):
    # export BALORA_RUNS=~.balora/runs (for ~/.balora/runs: the shell leaves ~.balora as it is) or
    # `streamlit run dashboard/app.py -- --runs ~x/runs`: every page showed the InputError as an exception.
    text = "~no_such_user_balora/runs"
    if where == "env":
        monkeypatch.setenv(settings.ENV_VAR, text)
    else:
        monkeypatch.setattr(sys, "argv", ["app.py", "--runs", text])
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    no_exception(at)
    assert "no user 'no_such_user_balora'" in texts(at.error) and "~/" in texts(at.error)


def test_compare_empty_runs_folder_given_by_flag_suggests_a_command_that_writes_there(tmp_path, monkeypatch):
    # `balora dashboard --runs DIR`: a plain `balora compare` writes to ./runs, never listed here;
    # the command the page suggests must write its run into DIR.
    import shlex

    folder = tmp_path / "experiments"
    folder.mkdir()
    monkeypatch.delenv(settings.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["app.py", "--runs", str(folder)])
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    no_exception(at)
    said = texts(at.info)
    command = next(c for c in said.split("`") if c.startswith("balora compare"))
    args = shlex.split(command)
    assert "--out" in args and Path(args[args.index("--out") + 1]).parent == folder


# ------------------------------------------------------------------------------------- inspect


def _write_adapter(folder: Path, seed: int, r: int = 4) -> Path:
    """A PEFT adapter folder (config + safetensors with PEFT key names), B not zero."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (n_in, n_out) in {"0": (16, 16), "2": (16, 8)}.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, n_in, generator=g)
        tensors[f"base_model.model.{module}.lora_B.weight"] = 0.1 * seed * torch.randn(n_out, r, generator=g)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["0", "2"]}))
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    peft = _write_adapter(root / "peft", 1)
    for step in (10, 20):
        _write_adapter(root / "trainer" / f"checkpoint-{step}", step // 10)
    untrained = _write_adapter(root / "untrained", 0)  # seed 0: B = 0, PEFT's init
    return {"peft": peft, "trainer": root / "trainer", "untrained": untrained}


def test_inspect_path_table_figures_and_balance(app, adapters):
    at = app.run()
    at.switch_page(PAGE["inspect"]).run()
    no_exception(at)
    assert "Enter the path" in texts(at.info)
    at.text_input(key="insp_path").set_value("/no/such/adapter").run()
    assert "no such file or folder" in texts(at.error)
    at.text_input(key="insp_path").set_value(str(adapters["peft"] / "adapter_config.json")).run()
    no_exception(at)
    assert at.error and "adapter_config.json" in texts(at.error)  # a clear message, not a traceback

    at.text_input(key="insp_path").set_value(str(adapters["peft"])).run()
    no_exception(at)
    assert at.metric[0].value == "2" and len(at.dataframe) == 1
    assert titles(at)[:2] == ["Relative imbalance by layer", "Condition numbers by layer"]
    assert at.download_button(key="insp_csv")
    at.selectbox(key="insp_value").set_value("sigma_max").run()
    assert titles(at)[0] == "Largest singular value of dW by layer"
    at.selectbox(key="insp_layer").set_value("2").run()
    assert titles(at)[2] == "Singular values of 2"

    at.button(key="insp_balance").click().run()
    no_exception(at)
    assert "Balanced 2 LoRA pair(s)" in texts(at.success)
    change = float(at.metric[-1].value)
    assert change < 1e-5  # dW unchanged, as measured on the written copy
    assert at.download_button(key="insp_download")
    assert titles(at)[-1] == "Balancing: imbalance removed, dW unchanged"
    assert not list(adapters["peft"].parent.glob("*balanced*"))  # nothing written next to the input


def test_inspect_reruns_after_a_balance_reuse_the_copy_without_copying_it(app, adapters, monkeypatch):
    # The balanced copy is as large as the adapter (640 MB for a Llama-3-8B r=64 fp32 one). Every widget after
    # the Balance button reruns the page: each rerun must hand the download the copy already made, not a new
    # one (st.cache_data unpickled the whole copy on every rerun, 1-5 s and +600 MB each at that size), and
    # offer it without hashing it (bytes given to st.download_button are md5-hashed on every rerun).
    import streamlit

    offered = []
    original = streamlit.download_button

    def recording(label, data, *args, **kwargs):
        if kwargs.get("key") == "insp_download":
            offered.append(data)
        return original(label, data, *args, **kwargs)

    monkeypatch.setattr(streamlit, "download_button", recording)
    monkeypatch.setattr(uploads, "DEFERRED_FROM_BYTES", 0)  # this copy is small: as a large one is offered
    at = app.run()
    at.switch_page(PAGE["inspect"]).run()
    at.text_input(key="insp_path").set_value(str(adapters["peft"])).run()
    at.button(key="insp_balance").click().run()
    at.selectbox(key="insp_value").set_value("sigma_max").run()
    at.toggle(key="insp_log").set_value(True).run()
    no_exception(at)
    assert "Balanced 2 LoRA pair(s)" in texts(at.success) and len(offered) == 3
    assert all(callable(d) for d in offered)  # produced when the user downloads it
    copies = [d() for d in offered]
    assert all(c is copies[0] for c in copies)  # one copy, the same object on every rerun
    with zipfile.ZipFile(io.BytesIO(copies[0])) as zf:
        assert sorted(Path(n).name for n in zf.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_inspect_reads_and_balances_on_one_torch_thread(app, tmp_path, monkeypatch):
    # As `balora inspect` and `balora balance`: with torch's default two threads on a busy 2-core machine the
    # page took 17-18 s to show a Llama-3-8B r=16 adapter against 3.9 s with one.
    import balora

    seen = {"inspect": [], "balance_file": []}
    for name in seen:
        real = getattr(balora, name)
        monkeypatch.setattr(balora, name, lambda *a, _real=real, _name=name, **k: (
            seen[_name].append(torch.get_num_threads()), _real(*a, **k))[1])
    folder = _write_adapter(tmp_path / "fresh", 1)  # a path no earlier test cached
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        at = app.run()
        at.switch_page(PAGE["inspect"]).run()
        at.text_input(key="insp_path").set_value(str(folder)).run()
        at.button(key="insp_balance").click().run()
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    no_exception(at)
    assert "Balanced 2 LoRA pair(s)" in texts(at.success)
    assert seen == {"inspect": [1], "balance_file": [1]} and after == 2  # the setting is restored


def test_inspect_balance_that_changes_nothing_says_so_and_offers_no_download(app, adapters):
    at = app.run()
    at.switch_page(PAGE["inspect"]).run()
    at.text_input(key="insp_path").set_value(str(adapters["untrained"])).run()
    at.button(key="insp_balance").click().run()
    no_exception(at)
    assert not at.success and "Nothing was balanced in `untrained`" in texts(at.warning)
    assert "2 x " in texts(at.warning)  # the reason, with its count, in the message itself
    assert not [b for b in at.get("download_button") if b.key == "insp_download"]


def test_inspect_balance_of_an_already_balanced_bf16_adapter_offers_no_copy(app, adapters, tmp_path):
    import balora

    bf16 = tmp_path / "bf16"
    balora.balance_file(adapters["peft"], bf16, dtype="bfloat16")  # balanced, then stored in bf16
    at = app.run()
    at.switch_page(PAGE["inspect"]).run()
    at.text_input(key="insp_path").set_value(str(bf16)).run()
    at.button(key="insp_balance").click().run()
    no_exception(at)
    assert not at.success and "already balanced to within its dtype's rounding" in texts(at.info)
    assert not [b for b in at.get("download_button") if b.key == "insp_download"]


def test_inspect_trainer_folder_across_checkpoints(app, adapters):
    at = app.run()
    at.switch_page(PAGE["inspect"]).run()
    at.text_input(key="insp_path").set_value(str(adapters["trainer"])).run()
    no_exception(at)
    assert titles(at)[0] == "Relative imbalance across checkpoints"
    ck = charts(at)[0]
    assert ck["data"] and all(arr(t["x"]) == [10, 20] for t in ck["data"])
    first = at.metric[1].value
    at.selectbox(key="insp_ck").set_value("checkpoint-10").run()
    assert at.metric[1].value != first  # the per-layer views follow the chosen checkpoint


def test_inspect_upload_and_bad_uploads(app, adapters):
    at = app.run()
    at.switch_page(PAGE["inspect"]).run()
    at.radio(key="insp_source").set_value("An uploaded file").run()
    no_exception(at)
    up = at.file_uploader(key="insp_upload")
    assert set(up.allowed_type) >= {".safetensors", ".zip"} or set(up.allowed_type) >= {"safetensors", "zip"}
    data = (adapters["peft"] / "adapter_model.safetensors").read_bytes()
    up.set_value(("weights.safetensors", data, "application/octet-stream")).run()
    no_exception(at)
    assert at.metric[0].value == "2"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in adapters["peft"].iterdir():
            zf.write(p, f"peft/{p.name}")
    at.file_uploader(key="insp_upload").set_value(("adapter.zip", buf.getvalue(), "application/zip")).run()
    no_exception(at)
    assert at.metric[0].value == "2" and not at.error
    at.file_uploader(key="insp_upload").set_value(("adapter.zip", b"not a zip", "application/zip")).run()
    no_exception(at)
    assert "not a valid zip" in texts(at.error)


def test_inspect_upload_survives_a_visit_to_another_page(app, adapters, tmp_path, monkeypatch):
    # Streamlit drops a file_uploader's value when the page is left: back on Inspect, the upload was
    # gone ("Upload a file to inspect it.") while its temporary copy stayed on disk, unused.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    at = app.run()
    at.switch_page(PAGE["inspect"]).run()
    at.radio(key="insp_source").set_value("An uploaded file").run()
    data = (adapters["peft"] / "adapter_model.safetensors").read_bytes()
    at.file_uploader(key="insp_upload").set_value(("weights.safetensors", data, "application/octet-stream")).run()
    assert at.metric[0].value == "2"
    for other in ("learn", "compare"):
        at.switch_page(PAGE[other]).run()
        at.switch_page(PAGE["inspect"]).run()
        no_exception(at)
        assert at.metric and at.metric[0].value == "2", texts(at.info)
        assert "weights.safetensors" in texts(at.caption) and str(tmp_path) not in texts(at.caption)
        assert len(list(tmp_path.glob("balora-upload-*"))) == 1
    # A new upload replaces the remembered one (and its temporary folder).
    first = next(tmp_path.glob("balora-upload-*"))
    at.file_uploader(key="insp_upload").set_value(("other.safetensors", data, "application/octet-stream")).run()
    no_exception(at)
    assert at.file_uploader(key="insp_upload").value.name == "other.safetensors" and at.metric[0].value == "2"
    assert "uploaded earlier" not in texts(at.caption)  # the uploader itself names it
    at.switch_page(PAGE["learn"]).run()
    at.switch_page(PAGE["inspect"]).run()
    assert "other.safetensors" in texts(at.caption) and "weights.safetensors" not in texts(at.caption)
    assert not first.exists() and len(list(tmp_path.glob("balora-upload-*"))) == 1
    # Forget it: back to asking for a file, and its temporary folder is gone.
    at.button(key="insp_upload_clear").click().run()
    no_exception(at)
    assert "Upload a file" in texts(at.info) and not at.metric
    assert not list(tmp_path.glob("balora-upload-*"))
    # Removing the file from the uploader itself forgets it too (it does not come back from memory).
    at.file_uploader(key="insp_upload").set_value(("weights.safetensors", data, "application/octet-stream")).run()
    assert at.metric[0].value == "2"
    at.file_uploader(key="insp_upload").clear().run()
    no_exception(at)
    assert "Upload a file" in texts(at.info) and not at.metric
    assert not list(tmp_path.glob("balora-upload-*"))


def test_inspect_table_numbers_first_and_no_file_paths(app, adapters, tmp_path):
    from balora.dashboard.report_frames import TABLE_FIRST

    at = app.run()
    at.switch_page(PAGE["inspect"]).run()
    at.text_input(key="insp_path").set_value(str(adapters["peft"])).run()
    no_exception(at)
    table = at.dataframe[0].value
    assert list(table.columns[: len(TABLE_FIRST)]) == TABLE_FIRST  # module, r, scaling, norms, imbalance, conditioning
    assert "source" not in table.columns and str(adapters["peft"]) not in table.to_string()
    assert not at.warning  # a PEFT folder has its config: no scaling note
    # Bare weights (no adapter_config.json beside them): the unknown scaling is said up front.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "weights.safetensors").write_bytes((adapters["peft"] / "adapter_model.safetensors").read_bytes())
    at.text_input(key="insp_path").set_value(str(bare / "weights.safetensors")).run()
    no_exception(at)
    assert "scaling unknown" in texts(at.warning)


def test_inspect_path_field_refuses_special_files_with_a_message(app, tmp_path):
    import os

    fifo_config = _write_adapter(tmp_path / "fifo-config", 1)
    (fifo_config / "adapter_config.json").unlink()
    os.mkfifo(fifo_config / "adapter_config.json")  # opening it would block forever
    zero = _write_adapter(tmp_path / "zero-weights", 1)
    (zero / "adapter_model.safetensors").unlink()
    (zero / "adapter_model.safetensors").symlink_to("/dev/zero")  # reading it would never end
    os.mkfifo(tmp_path / "pipe")
    at = app.run()
    at.switch_page(PAGE["inspect"]).run()
    for path, said in ((fifo_config, "FIFO"), (zero, "/dev/zero"), (tmp_path / "pipe", "FIFO"), (Path("/dev/zero"), "device")):
        at.text_input(key="insp_path").set_value(str(path)).run()
        no_exception(at)
        assert said in texts(at.error) and not at.dataframe, (path, texts(at.error))


def test_inspect_top_n_worst_layers(app, tmp_path):
    # An adapter with 12 layers: the bar charts can show the 10 largest instead of all 12.
    folder = tmp_path / "wide"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(12):
        tensors[f"base_model.model.{i}.lora_A.weight"] = torch.randn(4, 8, generator=g)
        tensors[f"base_model.model.{i}.lora_B.weight"] = (i + 1) * 0.05 * torch.randn(8, 4, generator=g)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    at = app.run()
    at.switch_page(PAGE["inspect"]).run()
    at.text_input(key="insp_path").set_value(str(folder)).run()
    no_exception(at)
    bars = charts(at)[0]
    assert len(bars["layout"]["yaxis"]["tickvals"]) == 12  # every layer named
    at.selectbox(key="insp_top").set_value(10).run()
    no_exception(at)
    bars = charts(at)[0]
    table = at.dataframe[0].value
    worst = table.sort_values("rel_imbalance", ascending=False)["module"].astype(str).head(10).tolist()
    assert bars["layout"]["yaxis"]["tickvals"] == worst and "10 layers with the largest" in bars["layout"]["title"]["subtitle"]["text"]


def test_inspect_upload_errors_are_messages_and_never_show_the_temporary_path(app, adapters, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the uploads' temporary folders land here
    at = app.run()
    at.switch_page(PAGE["inspect"]).run()
    at.radio(key="insp_source").set_value("An uploaded file").run()

    def upload(name, data):
        at.file_uploader(key="insp_upload").set_value((name, data, "application/zip")).run()
        no_exception(at)
        return texts(at.error)

    deep = io.BytesIO()
    with zipfile.ZipFile(deep, "w") as zf:
        zf.writestr("/".join(["d"] * 40) + "/adapter_config.json", b"{}")
    assert "nested" in upload("deep.zip", deep.getvalue())
    link = io.BytesIO()
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("adapter/adapter_model.safetensors")
        info.external_attr = 0o120777 << 16  # a symbolic link to /etc/passwd
        zf.writestr(info, b"/etc/passwd")
    assert "symbolic link" in upload("link.zip", link.getvalue())
    assert not list(tmp_path.glob("balora-upload-*")), "a refused upload leaves no temporary folder"
    # A readable archive with a damaged config: the message names the upload, not the server's folder.
    broken = io.BytesIO()
    with zipfile.ZipFile(broken, "w") as zf:
        zf.write(adapters["peft"] / "adapter_model.safetensors", "peft/adapter_model.safetensors")
        zf.writestr("peft/adapter_config.json", b"{not json")
    message = upload("broken.zip", broken.getvalue())
    assert message and "adapter_config.json" in message and str(tmp_path) not in message
    good = io.BytesIO()
    with zipfile.ZipFile(good, "w") as zf:
        for p in adapters["peft"].iterdir():
            zf.write(p, f"peft/{p.name}")
    upload("good.zip", good.getvalue())
    assert at.metric[0].value == "2"
    files_read = json.dumps([e.value for e in at.json])
    assert "good.zip/peft/adapter_model.safetensors" in files_read and str(tmp_path) not in files_read
    at.button(key="insp_balance").click().run()
    no_exception(at)
    changes = at.dataframe[-1].value  # the balance table, last on the page
    assert set(changes["source"]) == {"good.zip/peft/adapter_model.safetensors"}, "the balance table names the upload"
    assert str(tmp_path) not in changes.to_string()
    assert len(list(tmp_path.glob("balora-upload-*"))) == 1  # the one being looked at
    at.radio(key="insp_source").set_value("A path on this machine").run()
    assert not list(tmp_path.glob("balora-upload-*"))  # moving on removes it



def rendered_markdown(at) -> list[str]:
    """Every Markdown body on the page (alerts, captions, markdown) as HTML, rendered by an
    independent CommonMark parser (markdown-it-py, a dependency of streamlit's rich)."""
    from markdown_it import MarkdownIt

    parser = MarkdownIt("commonmark")
    kinds = ("error", "warning", "info", "success", "caption", "markdown")
    return [parser.render(str(e.value)) for kind in kinds for e in getattr(at, kind)]


def test_inspect_shows_names_from_the_file_as_text_never_as_markdown(app):
    # Tensor keys and upload names come from whoever made the file; Streamlit renders alert and
    # caption bodies as Markdown, where an image is fetched by the viewer's browser as the page opens.
    evil = "x ![px](https://attacker.example/p.png) [fix it here](https://attacker.example/fix) <b>bold</b>"
    name = "a` ![u](https:&#47;&#47;attacker.example&#47;u.png) `.safetensors"  # no '/': the name keeps it
    g = torch.Generator().manual_seed(0)
    weights = {f"{evil}.lora_A.weight": torch.full((2, 6), float("nan")), f"{evil}.lora_B.weight": torch.randn(5, 2, generator=g),
               "ok.lora_A.weight": torch.randn(2, 6, generator=g), "ok.lora_B.weight": torch.randn(5, 2, generator=g)}
    from safetensors.torch import save

    at = app.run()
    at.switch_page(PAGE["inspect"]).run()
    at.radio(key="insp_source").set_value("An uploaded file").run()
    at.file_uploader(key="insp_upload").set_value((name, save(weights), "application/octet-stream")).run()
    no_exception(at)
    assert "could not be measured" in texts(at.warning)  # the NaN pair, named in a warning
    at.button(key="insp_balance").click().run()  # refused: its message names the NaN pair again
    no_exception(at)
    assert "non-finite" in texts(at.error)
    pages = rendered_markdown(at)
    at.file_uploader(key="insp_upload").set_value(("b.safetensors", save({f"{evil}.lora_A.weight": torch.zeros(2, 6)}),
                                                    "application/octet-stream")).run()
    no_exception(at)
    assert "without its lora_B" in texts(at.error)
    pages += rendered_markdown(at)
    html = "\n".join(pages)
    assert "attacker.example" in html, "the names are shown"
    assert "<img" not in html and "<a " not in html and "<b>" not in html, html



def test_inspect_charts_show_names_from_the_file_as_text_never_as_plotly_tags(app, tmp_path):
    # Plotly reads <a href>, <b>, <br> in axis labels, legends and titles: a module name holding one
    # was a link on every chart of the page.
    evil = '<a href="https://attacker.example/x">fix it here</a><br><b>bold</b>'
    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "two"
    for adapter in ("", "other"):  # two adapters: their names join the labels and the spectra's legend
        (folder / adapter).mkdir(parents=True, exist_ok=True)
        (folder / adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
        save_file({f"base_model.model.{evil}.lora_A.weight": torch.randn(2, 6, generator=g),
                   f"base_model.model.{evil}.lora_B.weight": torch.randn(5, 2, generator=g)},
                  str(folder / adapter / "adapter_model.safetensors"))
    at = app.run()
    at.switch_page(PAGE["inspect"]).run()
    at.text_input(key="insp_path").set_value(str(folder)).run()
    no_exception(at)
    at.button(key="insp_balance").click().run()
    no_exception(at)
    specs = json.dumps(charts(at))
    assert len(charts(at)) >= 4 and "attacker.example" in specs, "the name is on the charts"
    assert "<a " not in specs and "<b>" not in specs and "<br>" not in specs, specs[:2000]


def test_inspect_spectra_legend_shows_an_adapter_name_as_written(app, tmp_path):
    # The legend entry is escaped once for Plotly (which decodes entities once): escaped by the page
    # and again by plots.singular_values, an adapter folder "q&a" read "q&amp;a" in the legend.
    import html

    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "two"
    for adapter in ("", "q&a <v2>"):
        (folder / adapter).mkdir(parents=True, exist_ok=True)
        (folder / adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
        save_file({"base_model.model.q.lora_A.weight": torch.randn(2, 6, generator=g),
                   "base_model.model.q.lora_B.weight": torch.randn(5, 2, generator=g)},
                  str(folder / adapter / "adapter_model.safetensors"))
    at = app.run()
    at.switch_page(PAGE["inspect"]).run()
    at.text_input(key="insp_path").set_value(str(folder)).run()
    no_exception(at)
    spectra = [c for c in charts(at) if c["layout"]["title"]["text"].startswith("Singular values")]
    shown = {html.unescape(t["name"]) for t in spectra[0]["data"] if t.get("showlegend", True)}
    assert any("q&a <v2>" in name for name in shown), shown


# ------------------------------------------------------------------------------------- launch


def test_launch_form_validation_and_a_job_to_compare(app, runs_root, monkeypatch):
    # The job is a stand-in that copies a run written by RunWriter into its --out (stdlib only,
    # so it starts fast): the page's job handling is under test here; `balora compare` itself
    # is tested with the runner, and the command line Launch builds is parsed by the real CLI below.
    script = (
        "import shutil, sys, time; time.sleep(0.5);"
        f"shutil.copytree({str(runs_root / 'single')!r}, sys.argv[sys.argv.index('--out') + 1])"
    )
    real_cmd = jobs.build_command(jobs.LaunchSpec(arms=["lora", "balora"], lrs=[1e-3], alphas=[8.0], optimizer="sgd", name="x",
                                                  init_scale=10.0), runs_root / "x")
    from balora.cli import build_parser
    from balora.compare_config import parse_set

    args = build_parser().parse_args(real_cmd[3:])  # what Launch runs is a valid `balora compare` command line
    assert (args.command, args.arms, args.lr, args.out) == ("compare", "lora,balora", "0.001", str(runs_root / "x"))
    assert parse_set(args.set) == {"init_scale": 10.0}
    monkeypatch.setattr(jobs, "build_command", lambda spec, out: [sys.executable, "-c", script, "--out", str(out)])
    at = app.run()
    at.switch_page(PAGE["launch"]).run()
    no_exception(at)
    assert at.title[0].value == "Launch a comparison" and str(runs_root) in texts(at.caption)
    at.multiselect[0].set_value([])
    start_button(at).click().run()
    assert "choose at least one arm" in texts(at.error)

    at.multiselect[0].set_value(["lora", "balora"])
    at.text_input(key="launch_name").set_value("from-launch")
    at.number_input(key="launch_init_scale").set_value(10.0)
    start_button(at).click().run()
    no_exception(at)
    manager = jobs.get_manager(runs_root)
    assert manager.job is not None and manager.job.spec.name == "from-launch"
    assert manager.job.spec.init_scale == 10.0
    assert manager.wait(TIMEOUT) == 0
    at.run()
    assert "finished" in texts(at.success)
    at.button(key="launch_open").click().run()
    no_exception(at)
    assert at.title[0].value == "Compare runs" and at.multiselect(key="compare_runs").value == ["from-launch"]
    assert (runs_root / "from-launch" / "status.json").is_file()


def start_stand_in_job(app, runs_root, monkeypatch, script: str, name: str):
    """Start a job named `name` from the Launch page, running `script` (python -c) in place of
    `balora compare`; returns the app after the click and the job manager."""
    monkeypatch.setattr(jobs, "build_command", lambda spec, out: [sys.executable, "-c", script, "--out", str(out)])
    at = app.run()
    at.switch_page(PAGE["launch"]).run()
    at.text_input(key="launch_name").set_value(name)
    start_button(at).click().run()
    return at, jobs.get_manager(runs_root)


def test_launch_shows_a_running_job_and_cancels_it(app, runs_root, monkeypatch):
    # A stand-in job that reports progress in status.json the way the runner does, then waits.
    script = (
        "import json, pathlib, sys, time; out = pathlib.Path(sys.argv[sys.argv.index('--out') + 1]); out.mkdir();"
        "(out / 'status.json').write_text(json.dumps({'status': 'running', 'progress': {'done': 3, 'total': 12}}));"
        "time.sleep(60)"
    )
    at, manager = start_stand_in_job(app, runs_root, monkeypatch, script, "slow-one")
    job = manager.job
    try:
        for _ in range(200):  # until the stand-in has written its status
            if job.progress():
                break
            time.sleep(0.05)
        at.run()
        no_exception(at)
        assert at.progress and "3/12 cells" in at.progress[0].proto.text and at.progress[0].proto.value == 25
        assert start_button(at).disabled  # one job at a time
        assert "A job is running (slow-one)" in texts(at.info)
        at.button(key="launch_cancel").click().run()
        no_exception(at)
    finally:
        manager.cancel()
    assert manager.wait(30) is not None and job.state() == "cancelled"
    at.run()
    assert "cancelled" in texts(at.warning)


def test_launch_cancelled_before_writing_says_nothing_was_kept(app, runs_root, monkeypatch):
    # Cancelled while still starting (importing torch, building the task): no run folder exists,
    # so the page must not claim one was kept and marked interrupted.
    at, manager = start_stand_in_job(app, runs_root, monkeypatch, "import time; time.sleep(60)", "never-wrote")
    manager.cancel()
    assert manager.wait(30) is not None and manager.job.state() == "cancelled"
    at.run()
    no_exception(at)
    assert not (runs_root / "never-wrote").exists()
    said = texts(at.warning)
    assert "cancelled" in said and "marked interrupted" not in said and "before it wrote anything" in said


def test_launch_refuses_a_grid_the_command_line_refuses_and_starts_nothing(app, runs_root, monkeypatch):
    # "8 32" typed for two alphas: the page dropped the space and started a job with one alpha, 832;
    # `balora compare --alpha "8 32"` refuses it. The form must refuse it too, and start no job.
    from balora.compare_config import parse_floats
    from balora.errors import InputError

    started = []
    monkeypatch.setattr(jobs.JobManager, "start", lambda self, spec: started.append(spec))
    at = app.run()
    at.switch_page(PAGE["launch"]).run()
    at.text_input(key="launch_name").set_value("spaced-grid")
    for field, typed in ((1, "8 32"), (0, "1e-3 1e-2"), (1, "1 6")):
        with pytest.raises(InputError, match="is not a number"):
            parse_floats(typed, "--alpha")
        at.text_input[field].set_value(typed)
        start_button(at).click().run()
        no_exception(at)
        assert "give numbers separated by commas" in texts(at.error) and not started, started
        at.text_input[field].set_value("")
    at.text_input[1].set_value(" 8 , 32 ")  # spaces around the commas are fine, as on the command line
    start_button(at).click().run()
    assert [spec.alphas for spec in started] == [parse_floats(" 8 , 32 ", "--alpha")]
    assert not (runs_root / "spaced-grid").exists()


def _inspect_fresh_adapter(app, tmp_path):
    """The Inspect page on a freshly initialised PEFT adapter (B = 0) written under tmp_path."""
    fresh = _write_adapter(tmp_path / "fresh", seed=0)
    at = app.run()
    at.switch_page(PAGE["inspect"]).run()
    at.text_input(key="insp_path").set_value(str(fresh)).run()
    no_exception(at)
    return at


def test_inspect_metrics_of_a_fresh_peft_adapter_say_n_a_not_nan(app, tmp_path):
    # PEFT's init (B = 0): dW = 0 has no condition number; the metric says n/a, as for no layers.
    at = _inspect_fresh_adapter(app, tmp_path)
    shown = {m.label: m.value for m in at.metric}
    assert shown["LoRA layers"] == "2" and shown["Median cond(dW)"] == "n/a"
    assert not any(v.lower() == "nan" for v in shown.values())


def test_inspect_spectra_of_a_fresh_peft_adapter_say_what_the_log_axis_leaves_off(app, tmp_path):
    # B = 0: every singular value of B and dW is 0. The log axis drew two blank panels without a word, and
    # the page had no way to see them; it says how many values it left off and a toggle draws them.
    at = _inspect_fresh_adapter(app, tmp_path)
    spectra = next(c for c in charts(at) if c["layout"]["title"]["text"].startswith("Singular values of"))
    zeros = sum(1 for t in spectra["data"] for v in arr(t["y"]) if v <= 0)
    assert zeros == 8  # r = 4 values of dW and of B, all 0
    assert "8 values <= 0 left off the log scale" in spectra["layout"]["title"]["subtitle"]["text"]
    at.toggle(key="insp_sv_log").set_value(False).run()
    spectra = next(c for c in charts(at) if c["layout"]["title"]["text"].startswith("Singular values of"))
    assert spectra["layout"]["yaxis"]["type"] == "linear" and "left off" not in spectra["layout"]["title"]["subtitle"]["text"]


def test_inspect_balance_metrics_name_the_pairs_they_cover_when_some_were_left_unchanged(app, tmp_path):
    # One trained pair and one at PEFT's init (B = 0, relative imbalance 1, left unchanged). The page's
    # "Worst relative imbalance" said 1 above and "Worst relative imbalance (before: 0.5)" after Balance: the
    # second covers the balanced pair only, and the copy's worst is still 1.
    folder = tmp_path / "half"
    folder.mkdir()
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(4, 16, generator=g), torch.randn(16, 4, generator=g)
    save_file({"base_model.model.0.lora_A.weight": A, "base_model.model.0.lora_B.weight": B,
               "base_model.model.2.lora_A.weight": torch.randn(4, 16, generator=g),
               "base_model.model.2.lora_B.weight": torch.zeros(16, 4)}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["0", "2"]}))
    A64, B64 = A.double().numpy(), B.double().numpy()
    rel = np.linalg.norm(B64.T @ B64 - A64 @ A64.T) / (np.linalg.norm(B64.T @ B64) + np.linalg.norm(A64 @ A64.T))
    at = app.run()
    at.switch_page(PAGE["inspect"]).run()
    at.text_input(key="insp_path").set_value(str(folder)).run()
    assert {m.label: m.value for m in at.metric}["Worst relative imbalance"] == "1"
    at.button(key="insp_balance").click().run()
    no_exception(at)
    label = next(m.label for m in at.metric if "relative imbalance" in m.label and "before" in m.label)
    assert f"before: {rel:.3g}" in label and rel < 0.9  # the balanced pair's own, recomputed here
    assert "balanced pair" in label, label  # not the file's worst (1, left as it is)


def test_warmup_never_leaves_pil_half_imported_for_plotly(tmp_path):
    # plotly's JSON encoder takes PIL.Image from sys.modules without importing it: while the warm-up
    # thread was half-way through importing it (torch pulls it in), a page drawing a chart showed
    # "partially initialized module 'PIL.Image' has no attribute 'Image'" in a red box. PIL.Image
    # must be whole before that thread starts.
    pytest.importorskip("PIL")
    import subprocess

    code = ("import sys; from balora.dashboard import warmup; warmup.start(); m = sys.modules.get('PIL.Image');"
            "print(m is not None and hasattr(m, 'Image'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.strip().splitlines()[-1] == "True", out.stderr[-2000:]


def test_launch_run_name_survives_a_visit_to_another_page(app, runs_root):
    # The default name is made once per task; after a visit to Compare the field came back empty
    # and Start failed with "run name: letters, digits...".
    at = app.run()
    at.switch_page(PAGE["launch"]).run()
    name = at.text_input(key="launch_name").value
    assert name.startswith("synthetic-")
    at.switch_page(PAGE["compare"]).run()
    at.switch_page(PAGE["launch"]).run()
    no_exception(at)
    assert at.text_input(key="launch_name").value == name
    assert jobs.validate(jobs.LaunchSpec(name=at.text_input(key="launch_name").value), runs_root) == []
