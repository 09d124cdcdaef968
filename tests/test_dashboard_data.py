"""The dashboard's loaders (cached over the run store), frames (pure shaping behind each figure),
uploads and Launch jobs.

`write_run` writes small runs with the store's own RunWriter (so the files are exactly what
`balora compare` writes); the page and browser tests import it from here.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from balora.report import REPORT_COLUMNS
from balora.store import RunWriter, load_run
from balora.dashboard import frames, jobs, loaders, report_frames, run_index, settings, uploads

MODULES = ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj"]
# Per arm: how fast the loss falls, and the relative imbalance it keeps.
ARM_RATE = {"lora": 0.05, "balora": 0.10, "balora-svd": 0.08}
ARM_IMBALANCE = {"lora": 0.9, "balora": 1e-6, "balora-svd": 1e-6}


def _rows(arms, seeds, lrs, alphas, steps, r=4):
    steps_rows, layer_rows, spec_rows, summary_rows = [], [], [], []
    for arm in arms:
        for seed in seeds:
            for lr in lrs:
                for alpha in alphas:
                    key = {"arm": arm, "seed": seed, "lr": lr, "alpha": alpha}
                    # Cell quality depends on lr x alpha so each arm has a unique best cell.
                    rate = ARM_RATE[arm] * (1 + np.log10(lr / min(lrs)) if len(lrs) > 1 else 1) * (alpha / max(alphas)) ** 0.3
                    t = 0.0
                    losses = []
                    for s in range(1, steps + 1):
                        loss = 1.0 * np.exp(-rate * s) + 0.01 * (1 + seed)
                        t += 0.01 * (1.2 if arm != "lora" else 1.0)
                        losses.append(loss)
                        steps_rows.append({**key, "step": s, "loss": loss, "eval_loss": loss * 1.1 if s % 5 == 0 else np.nan,
                                           "excess_loss": loss - 0.01, "time_s": t, "step_time_s": 0.01, "balance_time_s": 0.0,
                                           "diag_time_s": 0.0, "eval_time_s": 0.0})
                    for s in [0, *range(5, steps + 1, 5)]:
                        for i, m in enumerate(MODULES):
                            rel = ARM_IMBALANCE[arm] * (1 + 0.1 * i) / (1 + 0.01 * s)
                            row = {c: None for c in REPORT_COLUMNS if c not in ("sigma", "sigma_A", "sigma_B")}
                            row.update(key, step=s, module=m, adapter="default", kind="linear", out_features=16, in_features=16,
                                       r=r, scaling=2.0, dora=False, dtype="float32", norm_A=1.0, norm_B=0.5 + s / 100,
                                       imbalance=rel * 2, rel_imbalance=min(rel, 1.0), cond_A=3.0 + i, cond_B=5.0 + s / 10,
                                       cond_dW=10.0 + s, eff_rank=3.0, rank=r, sigma_max=1 + s / 10, status="ok")
                            layer_rows.append(row)
                            for which, scale in (("dW", 1.0), ("A", 0.7), ("B", 0.5)):
                                for j in range(r):
                                    spec_rows.append({**key, "step": s, "module": m, "adapter": "default", "which": which,
                                                      "index": j, "value": scale * (1 + s / 10) / (j + 1)})
                    target = 0.2
                    hit = next((k + 1 for k, v in enumerate(losses) if v <= target), None)
                    summary_rows.append({**key, "status": "completed", "reason": "", "steps_done": steps,
                                         "final_loss": losses[-1], "min_loss": min(losses), "best_loss": min(losses),
                                         "final_excess_loss": losses[-1] - 0.01, "final_eval_loss": losses[-1] * 1.1,
                                         "final_rel_imbalance_max": ARM_IMBALANCE[arm], "target_loss": target, "target_on": "loss",
                                         "steps_to_target": hit or np.nan, "seconds_to_target": (hit or np.nan) * 0.01,
                                         "total_seconds": t, "balance_seconds": 0.0, "diag_seconds": 0.0,
                                         "speedup_steps": np.nan, "speedup_seconds": np.nan})
    return steps_rows, layer_rows, spec_rows, summary_rows


def write_run(path: Path, *, arms=("lora", "balora"), seeds=(0, 1), lrs=(1e-3,), alphas=(16.0,), steps=20,
              status: str | None = "completed", task: str = "synthetic") -> Path:
    """A small run written by balora's RunWriter. status None leaves it running (this process
    is its writer and it was just updated, so load_run does not call it stale)."""
    config = {"task": task, "arms": list(arms), "seeds": list(seeds), "steps": steps, "lrs": list(lrs),
              "alphas": list(alphas), "rank": 4, "command": f"balora compare --task {task} --out {path}"}
    w = RunWriter(path, config, {"python": "3"})
    st_rows, ly_rows, sp_rows, su_rows = _rows(arms, seeds, lrs, alphas, steps)
    w.append("steps", st_rows)
    w.append("layers", ly_rows)
    w.append("spectra", sp_rows)
    n = len(arms) * len(seeds) * len(lrs) * len(alphas)
    if status is None:
        w.heartbeat({"done": n // 2, "total": n}, force=True)
        return path
    w.append("summary", su_rows)
    w.heartbeat({"done": n, "total": n}, force=True)
    w.finish(status, None if status == "completed" else "stopped by the test")
    return path


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    return load_run(write_run(tmp_path_factory.mktemp("runs") / "grid", lrs=(1e-3, 1e-2), alphas=(8.0, 32.0), steps=30))


def _by_series(run):
    return {t: frames.combine({"r": getattr(run, t)}) for t in ("steps", "summary", "layers", "spectra")}


# --------------------------------------------------------------------------- settings


def test_runs_dir_precedence(tmp_path):
    env = {settings.ENV_VAR: str(tmp_path / "from-env")}
    assert settings.runs_dir(["--runs", str(tmp_path / "a")], env) == (tmp_path / "a").resolve()
    assert settings.runs_dir([f"--runs={tmp_path / 'b'}"], env) == (tmp_path / "b").resolve()
    assert settings.runs_dir(["-q", "tests/x.py"], env) == (tmp_path / "from-env").resolve()
    default = Path(settings.DEFAULT_RUNS).resolve()  # ./runs, where `balora compare` writes by default
    assert settings.runs_dir([], {}) == default
    assert settings.runs_dir(["--runs"], {}) == default  # no value: ignored, not a crash


# --------------------------------------------------------------------------- run loading and status


@pytest.fixture
def store_loads(monkeypatch) -> list:
    """The paths balora.store.load_run reads (what the dashboard's cache did not serve)."""
    import balora.store

    calls = []
    real = balora.store.load_run
    monkeypatch.setattr(balora.store, "load_run", lambda p: calls.append(p) or real(p))
    return calls


def test_load_run_is_cached_until_files_change(tmp_path, store_loads):
    calls = store_loads
    path = write_run(tmp_path / "live", status=None)
    first = loaders.load_run(path)
    assert first.status == "running" and len(loaders.load_run(path).steps) == len(first.steps)
    assert len(calls) == 1  # same files: served from the cache
    # A writer renames a new part file into place: the next call re-reads the run.
    extra = first.steps[first.steps["step"] == first.steps["step"].max()].assign(step=first.steps["step"].max() + 1)
    extra.to_parquet(path / "steps" / "part-00009.parquet", index=False)
    again = loaders.load_run(path)
    assert len(calls) == 2 and len(again.steps) == len(first.steps) + 4  # 2 arms x 2 seeds


def test_load_run_keeps_only_the_latest_version_of_a_run_being_written(tmp_path, store_loads):
    # Each version of a live run was a cache entry of its own (32 kept): watching a long sweep, the
    # dashboard held the last 32 versions of the run, 387 MiB for a 60 MB run after 12 refreshes.
    from balora.store import run_version

    calls = store_loads
    path = write_run(tmp_path / "live", status=None)
    first = loaders.load_run(path)
    old = run_version(path)
    first.steps.to_parquet(path / "steps" / "part-00009.parquet", index=False)
    loaders.load_run(path)
    assert len(calls) == 2
    loaders._load_run(str(path), old)  # the earlier version is no longer held: read again
    assert len(calls) == 3
    loaders.load_run(path)  # the latest still is
    assert len(calls) == 3


def test_list_runs_sees_new_runs(tmp_path):
    write_run(tmp_path / "one")
    assert loaders.list_runs(tmp_path)["name"].tolist() == ["one"]
    write_run(tmp_path / "nested" / "two", status="interrupted")
    df = loaders.list_runs(tmp_path)
    assert sorted(df["name"]) == ["one", "two"]
    assert dict(zip(df["name"], df["status"]))["two"] == "interrupted"


def test_default_label_is_the_largest_completed_run():
    runs = pd.DataFrame({"label": ["a-small", "b-grid", "c-live", "d-failed"], "status": ["completed", "completed", "running", "failed"],
                         "n_cells": [8, 36, 99, 99], "sample": False})
    assert run_index.default_label(runs) == "b-grid"
    assert run_index.default_label(runs[runs["status"] != "completed"]) == "c-live"
    assert run_index.default_label(runs.iloc[0:0]) is None


def test_labels_under_keep_nested_runs_apart_and_status_labels_mark_stalled(tmp_path):
    write_run(tmp_path / "a" / "grid")
    write_run(tmp_path / "b" / "grid", status="interrupted")
    runs = loaders.list_runs(tmp_path)
    assert sorted(run_index.labels_under(runs["path"], tmp_path)) == ["a/grid", "b/grid"]
    fake = pd.DataFrame({"status": ["running", "running", "completed"], "stale": [True, False, False]})
    assert loaders.status_labels(fake) == ["stalled", "running", "completed"]


def test_a_run_of_the_users_under_samples_never_takes_a_bundled_samples_label(tmp_path):
    own, bundled = tmp_path / "runs", tmp_path / "bundled"
    write_run(own / "samples" / "synthetic-adam")
    write_run(own / "mine")
    write_run(bundled / "synthetic-adam")
    runs = run_index.index(loaders.list_runs(own), own, loaders.list_runs(bundled), bundled)
    assert sorted(runs["label"]) == ["./samples/synthetic-adam", "mine", "samples/synthetic-adam"]
    assert runs.set_index("label").loc["samples/synthetic-adam", "path"] == str(bundled / "synthetic-adam")


def test_run_state_marks_progress_stale_and_interrupted():
    now = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    recent = (now - timedelta(seconds=7)).isoformat()
    s = loaders.run_state("running", {"updated": recent, "progress": {"done": 2, "total": 8}, "stale": False}, now=now)
    assert (s.label, s.live) == ("in progress", True) and "2/8 cells" in s.text and "7 s ago" in s.text
    s = loaders.run_state("running", {"updated": recent, "stale": True, "stale_reason": "the writing process (pid 4) is gone"}, now=now)
    assert (s.label, s.kind, s.live) == ("stalled", "warning", False) and "pid 4" in s.text
    s = loaders.run_state("interrupted", {"progress": {"done": 3, "total": 4}, "message": "SIGTERM"})
    assert s.label == "interrupted" and "3/4" in s.text and "SIGTERM" in s.text
    assert loaders.run_state("failed", {"message": "CUDA OOM"}).kind == "error"
    assert loaders.run_state("completed", {}).kind == "success"


# --------------------------------------------------------------------------- shaping


def test_combine_labels_series_by_run_only_when_several(grid_run):
    one = frames.combine({"a": grid_run.steps})
    assert set(one["series"]) == {"lora", "balora"}
    two = frames.combine({"a": grid_run.steps, "b": grid_run.steps})
    assert set(two["series"]) == {"a: lora", "a: balora", "b: lora", "b: balora"}
    assert len(two) == 2 * len(grid_run.steps)
    empty = frames.combine({"a": grid_run.steps.iloc[0:0]})
    assert empty.empty and {"run", "series", "arm"} <= set(empty.columns)


def test_seed_curves_median_and_spread(grid_run):
    t = _by_series(grid_run)
    cell = frames.select_cell(t["steps"], 1e-2, 32.0)
    curves = frames.seed_curves(cell, metric="loss")
    raw = cell[(cell["arm"] == "lora") & (cell["step"] == 10)]["loss"]
    row = curves[(curves["series"] == "lora") & (curves["step"] == 10)].iloc[0]
    assert row["median"] == pytest.approx(raw.median()) and row["lo"] == pytest.approx(raw.min()) and row["hi"] == pytest.approx(raw.max())
    assert row["n_seeds"] == 2
    iqr = frames.seed_curves(cell, metric="loss", band="interquartile")
    assert iqr["hi"].le(curves["hi"] + 1e-15).all()
    timed = frames.seed_curves(cell, x="time_s", metric="loss")
    assert len(timed) == len(curves)
    lora_t = timed[timed["series"] == "lora"]
    raw_t = cell[cell["arm"] == "lora"].groupby("step")["time_s"].median()
    assert np.allclose(lora_t["time_s"], raw_t.to_numpy())  # drawn at each step's median wall-clock time
    assert timed["series"].iloc[0] == "lora"  # series keep the run's arm order
    # eval_loss only every 5 steps: NaNs are dropped, not drawn as zeros.
    assert len(frames.seed_curves(cell, metric="eval_loss")) == len(curves) // 5
    assert list(frames.seed_curves(cell.iloc[0:0]).columns) == ["series", "step", "median", "lo", "hi", "n_seeds"]


def test_best_cells_follow_arm_summary_then_latest_loss(grid_run):
    from balora.records import arm_summary

    t = _by_series(grid_run)
    best = frames.best_cells(t["summary"], t["steps"]).set_index("series")
    ref = arm_summary(grid_run.summary).set_index("arm")
    for arm in ("lora", "balora"):
        assert (best.loc[arm, "lr"], best.loc[arm, "alpha"]) == (ref.loc[arm, "best_lr"], ref.loc[arm, "best_alpha"])
        assert best.loc[arm, "source"] == "summary"
    # The fixture's loss falls fastest at the largest lr and alpha.
    assert (best.loc["lora", "lr"], best.loc["lora", "alpha"]) == (1e-2, 32.0)
    # A run still being written has no summary yet: fall back to the latest losses.
    from_steps = frames.best_cells(t["summary"].iloc[0:0], t["steps"]).set_index("series")
    assert set(from_steps.index) == {"lora", "balora"} and set(from_steps["source"]) == {"latest loss"}
    assert (from_steps.loc["lora", "lr"], from_steps.loc["lora", "alpha"]) == (1e-2, 32.0)
    sel = frames.select_cells(t["steps"], best.reset_index())
    assert sel.groupby("series")[["lr", "alpha"]].nunique().max().max() == 1
    # Two runs: each series gets its own run's best cell.
    two = frames.combine({"a": grid_run.summary, "b": grid_run.summary})
    assert len(frames.best_cells(two, two.iloc[0:0])) == 4


def test_best_cells_per_seed_follow_records(grid_run):
    """The Compare page's 'each seed's own best cell': records.best_cells(select='seed'), one row per seed."""
    from balora.records import best_cells

    t = _by_series(grid_run)
    best = frames.best_cells(t["summary"], t["steps"], select="seed")
    ref = best_cells(grid_run.summary, select="seed")
    got = best.set_index(["series", "seed"])[["lr", "alpha"]].sort_index()
    want = ref.rename(columns={"arm": "series"}).set_index(["series", "seed"])[["lr", "alpha"]].sort_index()
    # pandas 2 keeps the series index as object here and records' arm as string: the names are the same.
    pd.testing.assert_frame_equal(got, want, check_index_type=False)
    sel = frames.select_cells(t["steps"], best)
    assert len(sel) == sum(len(t["steps"][(t["steps"]["series"] == s) & (t["steps"]["seed"] == seed) &
                                         (t["steps"]["lr"] == lr) & (t["steps"]["alpha"] == a)])
                           for (s, seed), (lr, a) in got.iterrows())
    assert sel.groupby(["series", "seed"])[["lr", "alpha"]].nunique().max().max() == 1
    from_steps = frames.best_cells(t["summary"].iloc[0:0], t["steps"], select="seed")
    assert set(from_steps["source"]) == {"latest loss"} and len(from_steps) == len(got)


def test_seed_curves_count_a_diverged_seed_as_inf_not_as_gone(tmp_path):
    # SGD at lr 0.45: 5 of 6 seeds diverge (their rows stop). The curve went on after that as the
    # "median over 6 seeds" of the one seed left, while the Grid view (balora.records) calls the cell
    # diverged: its median counts a diverged seed as +inf from then on.
    import balora.runner

    run = balora.runner.compare(task="synthetic", arms="lora", steps=60, seeds=6, optimizer="sgd", lr=[0.45],
                                layers_every=0, out=tmp_path / "div", quiet=True)
    assert (run.summary["status"] == "diverged").sum() > 3  # the case: most seeds diverged
    steps, summary = frames.combine({"r": run.steps}), frames.combine({"r": run.summary})
    curves = frames.seed_curves(steps, metric="loss", summary=summary).set_index("step")
    stopped = set(run.summary.loc[run.summary["status"] == "diverged", "seed"])
    last = run.steps.groupby("seed")["step"].max()
    for step in range(1, 61):
        values = []
        for seed, rows in run.steps.groupby("seed"):
            at = rows.loc[rows["step"] == step, "loss"]
            if len(at):
                values.append(float(at.iloc[0]) if np.isfinite(at.iloc[0]) else np.inf)
            elif seed in stopped and step > last[seed]:
                values.append(np.inf)
        want = np.median(values)
        if np.isfinite(want):
            assert curves.loc[step, "median"] == pytest.approx(want), step
        else:
            assert step not in curves.index, step  # not drawn


def test_grid_cells_median_and_diverged_as_nan(grid_run):
    t = _by_series(grid_run)
    summary = t["summary"].copy()
    diverged = (summary["arm"] == "lora") & (summary["lr"] == 1e-2) & (summary["alpha"] == 32.0)
    summary.loc[diverged, "final_loss"] = np.inf
    summary.loc[diverged, "status"] = "diverged"
    grid = frames.grid_cells(summary, value="final_loss")
    assert len(grid) == 2 * 2 * 2
    bad = grid[(grid["series"] == "lora") & (grid["lr"] == 1e-2) & (grid["alpha"] == 32.0)]["final_loss"]
    assert bad.isna().all()
    assert grid[(grid["series"] == "lora") & (grid["lr"] == 1e-2) & (grid["alpha"] == 32.0)]["status"].iloc[0] == "diverged"
    assert set(grid["status"]) == {"completed", "diverged"}
    good = grid[(grid["series"] == "balora") & (grid["lr"] == 1e-3) & (grid["alpha"] == 8.0)]["final_loss"].iloc[0]
    raw = t["summary"][(t["summary"]["arm"] == "balora") & (t["summary"]["lr"] == 1e-3) & (t["summary"]["alpha"] == 8.0)]["final_loss"]
    assert good == pytest.approx(raw.median())


def test_grid_cells_mark_a_real_diverged_cell_not_its_last_finite_loss(tmp_path):
    """A real run's diverged cell keeps its last finite loss (1e28 or so) in final_loss: the grid
    must still show it as diverged (+inf in balora.records' ranking), never as a coloured number."""
    import balora.runner

    run = balora.runner.compare(task="synthetic", arms="lora", steps=10, seeds=1, optimizer="sgd", lr=[1e-2, 10.0],
                                out=tmp_path / "div", quiet=True)
    summary = frames.combine({"r": run.summary})
    blown = summary[summary["lr"] == 10.0]
    assert (blown["status"] == "diverged").all() and np.isfinite(blown["final_excess_loss"]).all()  # the case
    grid = frames.grid_cells(summary, value="final_excess_loss")
    bad = grid[grid["lr"] == 10.0]
    assert bad["final_excess_loss"].isna().all() and (bad["status"] == "diverged").all()
    good = grid[grid["lr"] == 1e-2]["final_excess_loss"].iloc[0]
    assert good == pytest.approx(summary[summary["lr"] == 1e-2]["final_excess_loss"].median())


def test_speedups_match_an_independent_count(grid_run):
    t = _by_series(grid_run)
    cell = frames.select_cell(t["steps"], 1e-3, 32.0)
    target = 0.3
    speed = frames.speedups(cell, target, reference="lora").set_index("series")
    for arm in ("lora", "balora"):
        firsts = []
        for seed in (0, 1):
            c = cell[(cell["arm"] == arm) & (cell["seed"] == seed)].sort_values("step")
            firsts.append(c.loc[c["loss"] <= target, "step"].iloc[0])
        assert speed.loc[arm, "steps_median"] == pytest.approx(np.median(firsts))
    # balora's loss falls twice as fast in the fixture: it needs about half the steps.
    assert speed.loc["balora", "speedup_steps"] > 1.5 and speed.loc["lora", "speedup_steps"] == pytest.approx(1.0)
    assert list(speed.index) == ["lora", "balora"]  # the run's arm order, though balora reaches the target first
    never = frames.speedups(cell, 1e-9)
    assert never["reached"].eq(0).all() and (never["steps_median"] == np.inf).all()  # never: +inf, as in arm_summary


def test_speedups_of_each_arm_at_its_own_best_cell_are_against_lora_at_its_own(grid_run):
    # The Speed-up view opens on each arm's own best cell. When lora's best cell is not balora's,
    # the ratios were left blank (no lora row in balora's cell), though that view is the one the
    # paper compares (arm_summary's speedup_vs_lora: lora at its best over the arm at its best, per seed).
    t = _by_series(grid_run)
    steps = t["steps"]
    steps = steps[~((steps["arm"] == "lora") & (steps["lr"] == 1e-2) & (steps["alpha"] == 32.0))]  # lora's best elsewhere
    summary = t["summary"][~((t["summary"]["arm"] == "lora") & (t["summary"]["lr"] == 1e-2) & (t["summary"]["alpha"] == 32.0))]
    best = frames.best_cells(summary, steps).set_index("series")
    assert tuple(best.loc["lora", ["lr", "alpha"]]) != tuple(best.loc["balora", ["lr", "alpha"]])  # the case
    target = 0.3
    speed = frames.speedups(frames.select_cells(steps, best.reset_index()), target).set_index("series")

    def first_step(arm, seed):
        lr, alpha = best.loc[arm, ["lr", "alpha"]]
        c = steps[(steps["arm"] == arm) & (steps["seed"] == seed) & (steps["lr"] == lr) & (steps["alpha"] == alpha)]
        return c.sort_values("step").loc[c["loss"] <= target, "step"].iloc[0]

    want = np.median([first_step("lora", s) / first_step("balora", s) for s in (0, 1)])
    assert speed.loc["balora", "speedup_steps"] == pytest.approx(want)
    assert speed.loc["lora", "speedup_steps"] == pytest.approx(1.0)


def test_speedups_of_runs_of_one_arm_each_are_against_the_run_of_the_reference_arm(tmp_path):
    # Two Trainer runs (RunRecorder writes one arm per run): RunRecorder(arm="lora") and, with
    # BalanceCallback, RunRecorder(arm="balora"). The reference was only looked up in the arm's own
    # run, so the Speed-up view never had a ratio for them.
    runs = {n: load_run(write_run(tmp_path / n, arms=(n,))) for n in ("lora", "balora")}
    steps = frames.combine({n: r.steps for n, r in runs.items()})
    target = 0.5
    speed = frames.speedups(steps, target, reference="lora").set_index("series")

    def first_step(arm, seed):
        c = runs[arm].steps[runs[arm].steps["seed"] == seed].sort_values("step")
        return c.loc[c["loss"] <= target, "step"].iloc[0]

    want = np.median([first_step("lora", s) / first_step("balora", s) for s in (0, 1)])
    assert speed.loc["balora: balora", "speedup_steps"] == pytest.approx(want)
    # A run that has the reference arm itself still compares within itself.
    both = load_run(write_run(tmp_path / "both", arms=("lora", "balora")))
    mixed = frames.speedups(frames.combine({**{n: r.steps for n, r in runs.items()}, "both": both.steps}), target)
    assert mixed.set_index("series").loc["both: balora", "speedup_steps"] == pytest.approx(want)
    assert mixed.set_index("series").loc["balora: balora"].isna()["speedup_steps"]  # two lora runs: which one is unclear


def test_a_one_arm_run_takes_no_reference_from_a_run_of_another_task(tmp_path):
    # A run of one arm (balora compare --arms balora) shown next to a run of another task that has
    # lora, for the same seeds: its speed-up was taken against that task's lora, though steps to a
    # loss of one task say nothing of another's. Only a run of its own task can lend the reference.
    lm = load_run(write_run(tmp_path / "lm", arms=("balora",), task="lm"))
    other = load_run(write_run(tmp_path / "syn", arms=("lora", "balora"), task="synthetic"))
    steps = frames.combine({"lm": lm.steps, "syn": other.steps})
    tasks = {"lm": "lm", "syn": "synthetic"}
    speed = frames.speedups(steps, 0.5, tasks=tasks).set_index("series")
    assert np.isnan(speed.loc["lm: balora", "speedup_steps"]) and np.isnan(speed.loc["lm: balora", "speedup_seconds"])
    assert speed.loc["syn: balora", "speedup_steps"] > 0  # the other run still compares within itself
    # The same two runs as one task: the one-arm run borrows the other's lora (as without tasks).
    same = frames.speedups(steps, 0.5, tasks={"lm": "synthetic", "syn": "synthetic"}).set_index("series")
    assert same.loc["lm: balora", "speedup_steps"] == pytest.approx(
        frames.speedups(steps, 0.5).set_index("series").loc["lm: balora", "speedup_steps"])
    assert same.loc["lm: balora", "speedup_steps"] > 0


def test_speed_up_defaults_to_excess_loss_and_a_target_every_reference_seed_reaches(grid_run):
    t = _by_series(grid_run)
    cell = frames.select_cell(t["steps"], 1e-3, 32.0)
    summary = frames.select_cell(t["summary"], 1e-3, 32.0)
    assert frames.speed_metrics(cell, summary)[0] == "excess_loss"
    assert frames.speed_metrics(cell.drop(columns="excess_loss"), summary)[0] == "loss"  # the run's own target_on
    # On excess loss (the run's target is on loss): the worst over lora's seeds of its best value.
    target = frames.default_target(cell, summary, "excess_loss", reference="lora")
    lora = cell[cell["arm"] == "lora"]
    assert target == pytest.approx(max(lora[lora["seed"] == s]["excess_loss"].min() for s in (0, 1)))
    assert frames.speedups(cell, target, metric="excess_loss").set_index("series").loc["lora", "reached"] == 2
    # On the metric of the run's own target: that target (0.2 in the fixture).
    assert frames.default_target(cell, summary, "loss") == pytest.approx(0.2)
    assert frames.default_target(cell.iloc[0:0], summary, "loss") is None


def test_tidy_tables_drop_empty_columns_and_keep_numbers():
    df = pd.DataFrame({"arm": ["lora", "balora"], "best": [0.123456, np.nan], "never": [np.nan, np.nan], "reason": [None, "diverged"]})
    shown = frames.tidy(df)
    assert list(shown.columns) == ["arm", "best", "reason"] and shown["best"].dtype == float


def test_arms_seeds_and_damaged_runs():
    a = pd.DataFrame({"arm": ["lora", "balora"], "seed": [1, 0]})
    b = pd.DataFrame({"arm": ["balora-svd"], "seed": [np.int64(2)]})
    assert frames.arms_and_seeds(a, b) == (["lora", "balora", "balora-svd"], [0, 1, 2])
    runs = pd.DataFrame({"label": ["ok", "bad"], "status": ["completed", "damaged"], "reason": [None, "config.json: not an object"]})
    assert loaders.damaged_runs(runs) == {"bad": "config.json: not an object"}
    assert loaders.damaged_runs(runs.iloc[0:0]) == {}


def test_layer_and_spectra_selection(grid_run):
    t = _by_series(grid_run)
    cell = frames.select_cell(t["layers"], 1e-3, 8.0)
    heat = frames.layer_steps(cell, ["rel_imbalance"])
    assert set(heat["module"]) == set(MODULES)
    one = frames.layer_steps(cell, ["rel_imbalance"], modules=[MODULES[1]])
    assert set(one["module"]) == {MODULES[1]}
    spec = frames.select_cell(t["spectra"], 1e-3, 8.0)
    steps = frames.spectra_steps(spec, MODULES[0])
    assert steps == [0, 5, 10, 15, 20, 25, 30]
    at = frames.spectra_at(spec, MODULES[0], 10)
    assert set(at["which"]) == {"dW", "A", "B"} and at["index"].max() == 3
    assert at[(at["which"] == "dW") & (at["index"] == 0)]["value"].iloc[0] == pytest.approx(2.0)
    evo = frames.spectra_over_steps(spec, MODULES[0], "B")
    assert len(evo) == 2 * len(steps) * 4
    med = frames.median_over_layers(cell, ["cond_A"])
    assert med["cond_A"].iloc[0] == pytest.approx(4.0)  # cond_A is 3, 4, 5 over the three layers
    # Two of the three layers rank-deficient (cond inf): the median is inf (drawn as a gap), not the third's 3.
    deficient = cell.assign(cond_A=np.where(cell["module"].isin(MODULES[1:]), np.inf, cell["cond_A"]))
    assert np.isposinf(frames.median_over_layers(deficient, ["cond_A"])["cond_A"]).all()


# --------------------------------------------------------------------------- inspect helpers


def test_save_upload_safetensors_zip_and_refusals(tmp_path):
    p = uploads.save_upload("../../evil/lora.safetensors", b"x", tmp_path)
    assert p == tmp_path / "lora.safetensors" and p.read_bytes() == b"x"  # the client's path is dropped
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("adapter/adapter_config.json", json.dumps({"r": 4}))
        zf.writestr("adapter/adapter_model.safetensors", b"y")
    out = uploads.save_upload("adapter.zip", buf.getvalue(), tmp_path)
    assert out.name == "adapter" and (out / "adapter_config.json").is_file()
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../outside.txt", b"z")
    with pytest.raises(uploads.UploadError, match="outside"):
        uploads.save_upload("evil.zip", evil.getvalue(), tmp_path)
    assert not (tmp_path / "outside.txt").exists()
    with pytest.raises(uploads.UploadError, match="expands"):
        uploads.save_upload("adapter.zip", buf.getvalue(), tmp_path, max_unzipped_mb=1e-6)
    with pytest.raises(uploads.UploadError, match=".safetensors"):
        uploads.save_upload("notes.txt", b"hi", tmp_path)
    with pytest.raises(uploads.UploadError, match="not a valid zip"):
        uploads.save_upload("broken.zip", b"PK-nope", tmp_path)


def test_balanced_folder_download_stores_the_weights_uncompressed(tmp_path):
    # Weights are floats that deflate barely shrinks (7% for fp32) at ~20 MB/s on this machine: a Llama-3-8B
    # r=64 copy took 46 s to zip after 10 s of balancing. The weights go in as they are, the small text files deflated.
    import balora
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "adapter"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"base_model.model.q.lora_A.weight": torch.randn(4, 32, generator=g),
               "base_model.model.q.lora_B.weight": torch.randn(16, 4, generator=g)}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}) + " " * 500)
    result = uploads.balance(folder, "nearest")
    balora.balance_file(folder, tmp_path / "ref")  # the same copy, written to disk
    with zipfile.ZipFile(io.BytesIO(result.data)) as zf:
        members = {Path(i.filename).name: i for i in zf.infolist()}
        assert members["adapter_model.safetensors"].compress_type == zipfile.ZIP_STORED
        assert members["adapter_config.json"].compress_type == zipfile.ZIP_DEFLATED
        for name, info in members.items():
            assert zf.read(info) == (tmp_path / "ref" / name).read_bytes()


def _report(rel, sigma):
    rows = []
    for m, r_, s in zip(MODULES, rel, sigma):
        row = {c: None for c in REPORT_COLUMNS}
        row.update(module=m, adapter="default", rel_imbalance=r_, sigma=s, sigma_A=[1.0, 0.5], sigma_B=[2.0, 0.1], sigma_max=s[0])
        rows.append(row)
    return pd.DataFrame(rows)


def test_report_helpers():
    before = _report([0.9, 0.5, 1.0], [[2.0, 1.0], [1.0, 0.5], [3.0, 0.0]])
    long = report_frames.report_spectra(before.assign(checkpoint="ckpt"), MODULES[0])
    assert len(long) == 6 and set(long["which"]) == {"dW", "A", "B"}
    table = report_frames.report_table(before.assign(source="/tmp/secret/adapter_model.safetensors", r=4, scaling=2.0))
    assert table.loc[0, "sigma"] == "2 1"
    assert list(table.columns[:6]) == ["module", "r", "scaling", "norm_A", "norm_B", "rel_imbalance"]
    assert "source" not in table and "adapter" not in table  # one adapter: the column says nothing
    nums = report_frames.summary_numbers(before.assign(status=["ok", "ok", "rank-deficient"]))
    assert nums["layers"] == 3 and nums["measured"] == 2 and nums["worst_rel_imbalance"] == 0.9
    # "partial": computed, one value beyond float64 (NaN, said in `note`): drawn, and its note shown.
    mixed = before.assign(status=["ok", "partial", "non-finite values (NaN/Inf) in A or B"],
                          note=["", "imbalance exceed float64 (about 1.8e308): NaN", ""])
    assert report_frames.measured(mixed)["module"].tolist() == MODULES[:2]
    assert report_frames.skipped_layers(mixed) == [f"{MODULES[2]}: non-finite values (NaN/Inf) in A or B"]
    assert report_frames.layer_notes(mixed) == [f"{MODULES[1]}: imbalance exceed float64 (about 1.8e308): NaN"]
    assert report_frames.summary_numbers(mixed)["measured"] == 2
    assert report_frames.source_notes([{"notes": ["a", "b"]}, {"notes": ["a"]}, {}]) == ["a", "b"]
    inspect_frame = pd.concat([before.assign(checkpoint="checkpoint-20", step=20), before.assign(checkpoint="checkpoint-10", step=10)])
    ck = report_frames.checkpoints(inspect_frame)
    assert ck["checkpoint"].tolist() == ["checkpoint-10", "checkpoint-20"] and ck["layers"].tolist() == [3, 3]


def test_upload_paths_are_shown_by_the_upload_name(tmp_path):
    root = tmp_path / "balora-upload-abc"
    inside = root / "adapter" / "peft" / "adapter_config.json"
    assert uploads.shown_path(inside, root, "mine.zip") == "mine.zip/peft/adapter_config.json"
    assert uploads.shown_path(root / "w.safetensors", root, "w.safetensors") == "w.safetensors"
    assert uploads.shown_path("/elsewhere/x", root, "mine.zip") == "/elsewhere/x"
    assert uploads.shown_path("/elsewhere/x", None, "") == "/elsewhere/x"
    message = f"{inside}: not valid JSON; see {root}"
    shown = uploads.redact(message, root, "mine.zip")
    assert str(tmp_path) not in shown and shown.startswith("mine.zip/peft/adapter_config.json:") and shown.endswith("mine.zip")


# --------------------------------------------------------------------------- jobs


def test_launch_validation_bounds(tmp_path):
    (tmp_path / "taken").mkdir()
    ok = jobs.LaunchSpec(task="synthetic", arms=["lora"], seeds=1, steps=10, name="fine-run_1")
    assert jobs.validate(ok, tmp_path) == []
    bad = jobs.LaunchSpec(task="vision", arms=[], seeds=99, steps=10**6, lrs=[1e-3] * 9, alphas=[-1.0], name="../etc")
    errors = " | ".join(jobs.validate(bad, tmp_path))
    for needle in ("task must be", "at least one arm", "steps must be", "seeds must be", "at most", "positive", "run name"):
        assert needle in errors
    assert "already exists" in " ".join(jobs.validate(jobs.LaunchSpec(name="taken"), tmp_path))
    cmd = jobs.build_command(jobs.LaunchSpec(arms=["lora", "balora"], lrs=[1e-3, 1e-2], name="x"), tmp_path / "x")
    assert cmd[cmd.index("--out") + 1] == str(tmp_path / "x") and cmd[cmd.index("--lr") + 1] == "0.001,0.01"
    assert "--set" not in cmd  # the task's default init
    cmd = jobs.build_command(jobs.LaunchSpec(init_scale=10.0, name="x"), tmp_path / "x")
    assert cmd[cmd.index("--set") + 1] == "init_scale=10"
    for spec, needle in ((jobs.LaunchSpec(task="lm", init_scale=10.0, name="y"), "synthetic task only"),
                         (jobs.LaunchSpec(init_scale=0.0, name="y"), "above 0"),
                         (jobs.LaunchSpec(init_scale=1e3, name="y"), "at most 100"),
                         # what `balora compare` refuses is refused by the form, not by a failed job
                         (jobs.LaunchSpec(lrs=[float("inf")], name="y"), "learning rates must be positive finite"),
                         (jobs.LaunchSpec(alphas=[4.0, 4.0], name="y"), "alphas: a value is listed twice")):
        assert needle in " ".join(jobs.validate(spec, tmp_path))


def test_launch_passes_the_typed_values_to_the_job_exactly(tmp_path):
    # Two learning rates that differ in the 9th digit pass the form's checks: the job must get both
    # as typed (6 significant digits made them one value, and `balora compare` then refused the run).
    spec = jobs.LaunchSpec(lrs=[0.0012345678, 0.0012345679], alphas=[3.14159265], init_scale=2.718281828, name="x")
    assert jobs.validate(spec, tmp_path) == []
    cmd = jobs.build_command(spec, tmp_path / "x")
    assert [float(v) for v in cmd[cmd.index("--lr") + 1].split(",")] == spec.lrs
    assert [float(v) for v in cmd[cmd.index("--alpha") + 1].split(",")] == spec.alphas
    assert float(cmd[cmd.index("--set") + 1].split("=")[1]) == spec.init_scale


def _job_steps(spec: jobs.LaunchSpec, out: Path) -> int:
    """Training steps of the job Launch would start, as `balora compare` itself resolves its command line."""
    from balora.cli import build_parser
    from balora.commands.compare import config_from_args
    from balora.compare_config import resolve

    run = resolve(config_from_args(build_parser().parse_args(jobs.build_command(spec, out)[3:]))).run
    return run.n_cells * run.steps


def test_launch_bounds_keep_a_job_to_minutes(tmp_path):
    # The page promises "sizes are bounded so that a job takes minutes on a laptop CPU", but every bound was
    # per field: 5 arms x 4 seeds x 4 lrs x 4 alphas x 300 steps of the lm task is 96,000 steps, hours at the
    # lm task's own rate (balora/tasks/lm.py: 200 steps in 40-55 s per arm on 2 busy cores). On a shared
    # dashboard that holds the one job slot all afternoon.
    lm_step_s = 55 / 200
    arms = list(jobs.available_arms())
    for task in settings.LAUNCH_TASKS:
        biggest = jobs.LaunchSpec(task=task, arms=arms, seeds=settings.LAUNCH_MAX_SEEDS,
                                  steps=settings.LAUNCH_MAX_STEPS[task], lrs=[1e-3, 2e-3, 3e-3, 4e-3][:settings.LAUNCH_MAX_GRID],
                                  alphas=[4.0, 8.0, 16.0, 32.0][:settings.LAUNCH_MAX_GRID], name="big")
        total = _job_steps(biggest, tmp_path / "big")
        errors = " ".join(jobs.validate(biggest, tmp_path))
        assert (total <= settings.LAUNCH_MAX_TRAIN_STEPS[task]) == (errors == ""), (task, total, errors)
        if errors:
            assert f"{total:,} training steps" in errors
    assert settings.LAUNCH_MAX_TRAIN_STEPS["lm"] * lm_step_s <= 15 * 60
    # The lm form's defaults (two arms, one seed, 100 steps) and a small grid still run.
    for spec in (jobs.LaunchSpec(task="lm", arms=["lora", "balora"], seeds=1, steps=100, name="x"),
                 jobs.LaunchSpec(task="lm", arms=["lora", "balora"], seeds=1, steps=300, lrs=[1e-3, 3e-3], name="x")):
        assert _job_steps(spec, tmp_path / "x") <= settings.LAUNCH_MAX_TRAIN_STEPS["lm"]
        assert jobs.validate(spec, tmp_path) == []


def test_job_manager_runs_one_job_at_a_time(tmp_path, monkeypatch):
    # A stand-in for `balora compare` that writes a status.json and waits: the manager's
    # bookkeeping (one job, progress, cancel) does not depend on what the child computes.
    script = (
        "import json, sys, time, pathlib; out = pathlib.Path(sys.argv[sys.argv.index('--out') + 1]); out.mkdir();"
        "(out / 'status.json').write_text(json.dumps({'status': 'running', 'progress': {'done': 1, 'total': 4}}));"
        "import os; print('cache', os.environ['BALORA_CACHE'], flush=True); time.sleep(30)"
    )
    monkeypatch.delenv("BALORA_CACHE", raising=False)
    monkeypatch.setattr(jobs, "build_command", lambda spec, out: [jobs.sys.executable, "-c", script, "--out", str(out)])
    m = jobs.JobManager(tmp_path)
    monkeypatch.setitem(jobs._MANAGERS, tmp_path.resolve(), m)
    job = m.start(jobs.LaunchSpec(arms=["lora"], seeds=1, steps=5, name="a"))
    try:
        with pytest.raises(jobs.JobError, match="already running"):
            m.start(jobs.LaunchSpec(arms=["lora"], seeds=1, steps=5, name="b"))
        for _ in range(100):
            if job.progress():
                break
            time.sleep(0.05)
        assert job.progress() == (1, 4) and job.state() == "running"
        assert job.run_dir == (tmp_path / "a").resolve()
        for _ in range(100):
            if job.output:
                break
            time.sleep(0.05)
        # The lm task's model cache stays under the runs folder unless the user chose one.
        assert job.tail() == f"cache {tmp_path.resolve() / '.cache'}"
    finally:
        m.cancel()
    assert m.wait(10) is not None and job.state() == "cancelled"
    assert not (tmp_path / "b").exists()


def test_a_killed_job_is_reaped_and_its_run_reads_stale_without_the_launch_page(tmp_path, monkeypatch):
    # A job killed with SIGKILL (the OOM killer, kill -9) stayed a zombie until the Launch page polled it:
    # its pid still answered os.kill(pid, 0), so Compare showed the run "running" for up to 10 minutes.
    import os
    import signal

    script = (
        "import sys, time; from balora.store import RunWriter; out = sys.argv[sys.argv.index('--out') + 1];"
        "w = RunWriter(out, {'task': 'synthetic', 'arms': ['lora'], 'seeds': [0], 'steps': 5}, {});"
        "w.heartbeat({'done': 0, 'total': 1}, force=True); print('written', flush=True); time.sleep(60)"
    )
    monkeypatch.setattr(jobs, "build_command", lambda spec, out: [jobs.sys.executable, "-c", script, "--out", str(out)])
    m = jobs.JobManager(tmp_path)
    monkeypatch.setitem(jobs._MANAGERS, tmp_path.resolve(), m)
    job = m.start(jobs.LaunchSpec(arms=["lora"], seeds=1, steps=5, name="killed"))
    try:
        for _ in range(600):  # the manager's reader thread collects the output; nobody polls the job here
            if job.output:
                break
            time.sleep(0.05)
        assert job.output and load_run(job.run_dir).status == "running" and not load_run(job.run_dir).stale
        os.kill(job.proc.pid, signal.SIGKILL)
        for _ in range(200):
            if load_run(job.run_dir).stale:
                break
            time.sleep(0.05)
        run = load_run(job.run_dir)
        assert run.stale and "is gone" in run.status_info["stale_reason"]
    finally:
        m.cancel()
    assert m.wait(10) == -signal.SIGKILL and job.state() == "failed"
    # what the page says of it: "exit code -9" told a workshop nothing
    assert jobs.how_it_ended(job.proc.returncode) == "killed by SIGKILL: out of memory (the kernel's OOM killer), or by hand"
    assert jobs.how_it_ended(2) == "exit code 2" and jobs.how_it_ended(-signal.SIGTERM) == "killed by SIGTERM"


def test_a_job_is_interrupted_when_the_dashboard_stops(tmp_path):
    # Stopping the dashboard with Ctrl-C interrupts its job (the terminal signals both), but stopping it with
    # SIGTERM (kill PID, a service manager), which streamlit turns into a clean exit, left the job running on
    # its own: the restarted dashboard no longer knew it, could not cancel it, and let a second job start.
    import os
    import signal
    import subprocess
    import sys

    parent = (  # the dashboard's process: streamlit exits cleanly on SIGTERM
        "import signal, sys, time; from pathlib import Path; from balora.dashboard import jobs;"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0));"
        f"m = jobs.get_manager(Path({str(tmp_path)!r}));"
        "job = m.start(jobs.LaunchSpec(arms=['lora'], seeds=4, steps=1000, lrs=[1e-3, 2e-3, 3e-3, 4e-3],"
        " alphas=[2.0, 4.0, 8.0, 16.0], name='long'));"
        "[time.sleep(0.1) for _ in range(1200) if not job.progress()];"
        "print(job.proc.pid, flush=True); time.sleep(300)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    dashboard = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, env=env)
    child = None
    try:
        child = int(dashboard.stdout.readline())
        assert load_run(tmp_path / "long").status == "running"
        dashboard.send_signal(signal.SIGTERM)
        dashboard.wait(60)
        for _ in range(300):
            if load_run(tmp_path / "long").status != "running":
                break
            time.sleep(0.1)
        run = load_run(tmp_path / "long")
        assert run.status == "interrupted" and "SIGTERM" in run.status_info["message"], run.status_info
    finally:
        dashboard.kill()
        dashboard.wait()
        dashboard.stdout.close()
        if child is not None:
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


# --------------------------------------------------------------------------- serving defaults


def test_project_config_binds_localhost_and_caps_uploads():
    import tomllib

    cfg = tomllib.loads((settings.REPO_ROOT / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["address"] == "127.0.0.1" and cfg["server"]["headless"] is True
    assert 0 < cfg["server"]["maxUploadSize"] <= 200 and settings.MAX_UPLOAD_MB <= cfg["server"]["maxUploadSize"]


def test_balora_dashboard_repeats_every_project_streamlit_setting(capsys):
    """From an installed package there is no .streamlit/config.toml in the current folder, and
    `balora dashboard` repeated only some of its settings: theme.base = "light" was lost, so a user
    whose system theme is dark got the Learn page's black curves on a dark background."""
    import shlex
    import tomllib

    from balora.cli import main

    cfg = tomllib.loads((settings.REPO_ROOT / ".streamlit" / "config.toml").read_text())
    assert main(["dashboard", "--print-command"]) == 0
    cmd = shlex.split(capsys.readouterr().out)
    flags = dict(zip(cmd[5::2], cmd[6::2]))  # after `python -m streamlit run APP`: --flag value pairs
    for section, options in cfg.items():
        for key, value in options.items():
            want = str(value).lower() if isinstance(value, bool) else str(value)
            assert flags.get(f"--{section}.{key}") == want, f"{section}.{key}: {flags.get(f'--{section}.{key}')!r} != {want!r}"


def test_balora_dashboard_command_line(tmp_path, capsys):
    from balora.cli import main

    assert main(["dashboard", "--print-command"]) == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[1:4] == ["-m", "streamlit", "run"] and Path(cmd[4]) == settings.REPO_ROOT / "balora" / "dashboard" / "app.py"
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1" and "--runs" not in cmd
    assert main(["dashboard", "--print-command", "--runs", str(tmp_path), "--host", "0.0.0.0", "--port", "9000"]) == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[cmd.index("--server.address") + 1] == "0.0.0.0" and cmd[cmd.index("--server.port") + 1] == "9000"
    assert cmd[-3:] == ["--", "--runs", str(tmp_path)]
    # What follows `--` is exactly what the app's settings read.
    assert settings.runs_dir(cmd[cmd.index("--") + 1 :], {}) == tmp_path.resolve()
    assert main(["dashboard", "--print-command", "--port", "0"]) == 2
    (tmp_path / "file").write_text("x")
    assert main(["dashboard", "--print-command", "--runs", str(tmp_path / "file")]) == 2


def test_printed_dashboard_command_runs_as_printed_with_spaces_in_paths(tmp_path, capsys):
    """`balora dashboard --print-command` printed the arguments joined by spaces: a runs folder named
    "my runs" came out as `--runs /.../my runs`, which a shell splits into two arguments."""
    import shlex

    from balora.cli import main

    runs = tmp_path / "my runs ü"
    assert main(["dashboard", "--print-command", "--runs", str(runs)]) == 0
    cmd = shlex.split(capsys.readouterr().out)
    assert cmd[-3:] == ["--", "--runs", str(runs)]
    assert settings.runs_dir(cmd[cmd.index("--") + 1 :], {}) == runs
