"""balora.records: rows and tables shared by the runner, RunRecorder, the CLI, the dashboard and benchmarks.

Every expectation is computed by hand or by an independent numpy/itertools loop over the same table."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from balora import records
from balora.errors import InputError
from balora.store import TABLES, to_table


def test_due_every_and_last():
    assert [s for s in range(1, 11) if records.due(s, 3)] == [3, 6, 9]
    assert [s for s in range(1, 11) if records.due(s, 3, last=10)] == [3, 6, 9, 10]
    assert not any(records.due(s, 0, last=10) for s in range(1, 11))  # 0: never, not even the last step
    assert records.due(0, 5)  # step 0 (before training) is a multiple of every period


def _report_row(module, sigma, rel):
    return {"module": module, "adapter": "default", "kind": "linear", "r": len(sigma), "rel_imbalance": rel,
            "sigma": sigma, "sigma_A": [2 * x for x in sigma], "sigma_B": [3 * x for x in sigma]}


def test_split_report_rows():
    key = {"arm": "balora", "seed": 1, "lr": 0.1, "alpha": 4.0}
    report = [_report_row("q", [3.0, 1.0], 0.25), _report_row("v", [5.0, 0.5], 0.75)]
    layers, spectra = records.split_report(key, 7, report)
    assert [r["module"] for r in layers] == ["q", "v"]
    assert all(r["step"] == 7 and r["arm"] == "balora" and "sigma" not in r and "sigma_A" not in r for r in layers)
    assert layers[1]["rel_imbalance"] == 0.75
    assert len(spectra) == 2 * 3 * 2  # layers x (dW, A, B) x r
    got = {(r["module"], r["which"], r["index"]): r["value"] for r in spectra}
    assert got[("q", "dW", 0)] == 3.0 and got[("v", "A", 1)] == 1.0 and got[("v", "B", 0)] == 15.0
    # and the spectra rows fit the store's table as they are
    assert len(to_table("spectra", spectra)) == 12
    assert records.split_report(key, 7, report, layers=False)[0] == []
    assert records.split_report(key, 7, report, spectra=False)[1] == []
    assert records.max_rel_imbalance(report) == 0.75 and math.isnan(records.max_rel_imbalance([]))


def test_summary_row_and_first_reached():
    key = {"arm": "lora", "seed": 0, "lr": 0.01, "alpha": 8.0}
    losses = [4.0, 2.0, 3.0, math.inf]  # diverged at the last step
    reached = records.first_reached([(1, 4.0, 0.1), (2, 2.0, 0.25), (3, 1.0, 0.4)], 2.5)
    assert reached == (2.0, 0.25)
    assert all(math.isnan(x) for x in records.first_reached([(1, 4.0, 0.1)], 2.5))
    assert all(math.isnan(x) for x in records.first_reached([(1, 4.0, 0.1)], None))
    row = records.summary_row(key, "diverged", "non-finite loss", steps_done=3, losses=losses, best_loss=0.5,
                              target=2.5, reached=reached, total_seconds=1.5)
    assert row["final_loss"] == 3.0 and row["min_loss"] == 2.0 and row["final_excess_loss"] == 2.5
    assert row["steps_to_target"] == 2.0 and row["target_loss"] == 2.5 and row["total_seconds"] == 1.5
    assert math.isnan(row["speedup_steps"]) and math.isnan(row["final_eval_loss"])
    assert set(row) == set(TABLES["summary"])  # every summary column, nothing else
    empty = records.summary_row(key, "failed", steps_done=0, losses=[])
    assert all(math.isnan(empty[c]) for c in ("final_loss", "min_loss", "best_loss", "final_excess_loss"))


def test_with_speedups_within_a_group():
    rows = [{"arm": "lora", "steps_to_target": 40.0, "seconds_to_target": 2.0},
            {"arm": "balora", "steps_to_target": 10.0, "seconds_to_target": 4.0},
            {"arm": "balora-svd", "steps_to_target": math.nan, "seconds_to_target": math.nan}]
    out = records.with_speedups(rows)
    assert out[0]["speedup_steps"] == 1.0 and out[1]["speedup_steps"] == 4.0 and out[1]["speedup_seconds"] == 0.5
    assert math.isnan(out[2]["speedup_steps"])
    no_ref = records.with_speedups([{"arm": "balora", "steps_to_target": 10.0, "seconds_to_target": 1.0}])
    assert math.isnan(no_ref[0]["speedup_steps"])


def _grid(seed_values: dict) -> pd.DataFrame:
    """seed_values[(arm, lr)] = per-seed final_excess_loss, NaN meaning diverged."""
    rows = []
    for (arm, lr), values in seed_values.items():
        for seed, v in enumerate(values):
            rows.append({"arm": arm, "seed": seed, "lr": lr, "alpha": 4.0,
                         "status": "diverged" if math.isnan(v) else "completed", "final_excess_loss": v,
                         "final_eval_loss": math.nan, "final_loss": 1.0, "steps_to_target": 10.0 * (seed + 1)})
    return pd.DataFrame(rows)


def test_best_cells_per_arm_is_the_lowest_median_cell():
    nan = math.nan
    table = {("lora", 0.01): [3.0, 1.0, 2.0], ("lora", 0.1): [0.5, 9.0, 4.0], ("lora", 1.0): [nan, nan, 0.1],
             ("balora", 0.01): [1.0, 1.0, 1.0], ("balora", 0.1): [0.2, 0.3, nan]}
    summary = _grid(table)
    best = records.best_cells(summary, select="arm")
    assert len(best) == 6 and set(best.groupby("arm")["seed"].apply(sorted).map(tuple)) == {(0, 1, 2)}
    for arm in ("lora", "balora"):
        # independent: median over seeds with diverged = +inf, smallest over the grid
        meds = {lr: np.median([math.inf if math.isnan(v) else v for v in vals])
                for (a, lr), vals in table.items() if a == arm}
        want = min(meds, key=meds.get)
        got = best[best["arm"] == arm]
        assert set(got["lr"]) == {want}
        assert sorted(got["value"]) == sorted(math.inf if math.isnan(v) else v for v in table[(arm, want)])
    with pytest.raises(InputError, match="selection 'nope'"):
        records.best_cells(summary, select="nope")
    assert records.best_cells(summary.iloc[0:0]).empty



def test_best_cells_per_arm_of_completed_cells_without_the_metric():
    """A Trainer run recorded by RunRecorder that never logged a loss (max_steps below logging_steps, 500 by
    default; no evaluation): its cell completed without any metric. Selecting per arm raised "Encountered
    all NA values" (the Compare page failed on such a run); the cell ranks last, as in select="seed"."""
    nan = math.nan
    table = {("trainer", 0.01): [nan], ("lora", 0.01): [nan, 1.0], ("lora", 0.1): [3.0, 2.0]}
    summary = _grid(table).assign(status="completed", final_loss=nan)
    assert records.headline_metric(summary) == "final_excess_loss"
    for select in ("arm", "seed"):
        best = records.best_cells(summary, select=select)
        assert set(best.loc[best["arm"] == "trainer", "lr"]) == {0.01}  # the arm keeps its one cell
        # independent: per arm, the lr whose median over seeds (a missing value +inf) is smallest
        if select == "arm":
            meds = {lr: np.median([math.inf if math.isnan(v) else v for v in vals])
                    for (a, lr), vals in table.items() if a == "lora"}
            assert set(best.loc[best["arm"] == "lora", "lr"]) == {min(meds, key=meds.get)}

def test_headline_metric_falls_back():
    s = _grid({("lora", 0.1): [1.0]})
    assert records.headline_metric(s) == "final_excess_loss"
    assert records.headline_metric(s.assign(final_excess_loss=math.nan)) == "final_loss"
    assert records.headline_metric(s.assign(final_excess_loss=math.nan, final_eval_loss=2.0)) == "final_eval_loss"


def test_arm_summary_against_a_brute_force_ranking():
    rng = np.random.default_rng(0)
    rows = []
    for arm, seed, lr, alpha in itertools.product(["lora", "balora"], range(4), [0.01, 0.1, 1.0], [4.0, 8.0]):
        diverged = rng.random() < 0.15
        rows.append({"arm": arm, "seed": seed, "lr": lr, "alpha": alpha,
                     "status": "diverged" if diverged else "completed",
                     "final_excess_loss": math.nan if diverged else float(rng.uniform(0.1, 2.0)),
                     "steps_to_target": float(rng.integers(5, 50))})
    rows.append({"arm": "riemannian", "seed": 0, "lr": 0.1, "alpha": 4.0, "status": "skipped"})
    summary = pd.DataFrame(rows).assign(final_eval_loss=math.nan, final_loss=1.0)
    s = records.arm_summary(summary).set_index("arm")
    assert list(s.reset_index().columns) == records.ARM_SUMMARY_COLUMNS
    assert s.loc["riemannian", "cells"] == 1 and math.isnan(s.loc["riemannian", "best_lr"])
    picked = {}
    for arm in ("lora", "balora"):
        cells = {}
        for (lr, alpha), g in summary[summary["arm"] == arm].groupby(["lr", "alpha"]):
            v = [x if st == "completed" else math.inf for x, st in zip(g["final_excess_loss"], g["status"])]
            cells[(lr, alpha)] = float(np.median(v))
        (lr, alpha), top = min(cells.items(), key=lambda kv: kv[1])
        picked[arm] = summary[(summary["arm"] == arm) & (summary["lr"] == lr) & (summary["alpha"] == alpha)]
        assert (s.loc[arm, "best_lr"], s.loc[arm, "best_alpha"]) == (lr, alpha)
        assert s.loc[arm, "best"] == pytest.approx(top) and s.loc[arm, "worst"] == max(cells.values())
        assert s.loc[arm, "within_2x"] == pytest.approx(np.mean([v <= 2 * top for v in cells.values()]))
        assert s.loc[arm, "steps_to_target"] == np.median(picked[arm]["steps_to_target"])
    ratio = picked["lora"].set_index("seed")["steps_to_target"] / picked["balora"].set_index("seed")["steps_to_target"]
    assert s.loc["balora", "speedup_vs_lora"] == pytest.approx(float(np.median(ratio)))
    assert s.loc["lora", "speedup_vs_lora"] == pytest.approx(1.0)
    assert list(records.arm_summary(summary.iloc[0:0]).columns) == records.ARM_SUMMARY_COLUMNS


def test_arm_summary_counts_a_seed_that_never_reached_the_target_as_never():
    # One seed of three reached the target: the median seed did not, so the arm's steps to target are
    # "never", not the lucky seed's 5 (which had once read as a 10x speed-up over lora).
    rows = []
    for arm, steps in (("lora", [50.0, 50.0, 50.0]), ("balora", [5.0, math.nan, math.nan])):
        for seed, st in enumerate(steps):
            rows.append({"arm": arm, "seed": seed, "lr": 0.1, "alpha": 4.0, "status": "completed",
                         "final_excess_loss": 1.0, "final_eval_loss": math.nan, "final_loss": 1.0,
                         "target_loss": 0.5, "steps_to_target": st})
    s = records.arm_summary(pd.DataFrame(rows)).set_index("arm")
    assert s.loc["balora", "steps_to_target"] == math.inf and s.loc["balora", "reached"] == 1
    assert s.loc["lora", "steps_to_target"] == 50 and s.loc["lora", "reached"] == 3
    assert s.loc["balora", "speedup_vs_lora"] == 0.0  # median of 10, 0, 0
    no_target = records.arm_summary(pd.DataFrame(rows).assign(target_loss=math.nan)).set_index("arm")
    assert math.isnan(no_target.loc["balora", "reached"]) and no_target.loc["balora", "steps_to_target"] == 5


def test_target_speedups_from_steps():
    rows = []
    # lora reaches loss <= 1 at step 4 (seed 0) and 6 (seed 1); balora at 2 and 3; time_s = 0.5 s per step
    for arm, hits in (("lora", (4, 6)), ("balora", (2, 3))):
        for seed, hit in enumerate(hits):
            for step in range(1, 9):
                rows.append({"arm": arm, "seed": seed, "lr": 0.1, "alpha": 4.0, "step": step,
                             "loss": 0.5 if step >= hit else 2.0, "time_s": 0.5 * step})
    steps = to_table("steps", rows)
    out = records.target_speedups(steps, 1.0).set_index("arm")
    assert list(out.index) == ["lora", "balora"]
    assert out.loc["lora", "steps_median"] == 5.0 and out.loc["balora", "steps_median"] == 2.5
    assert out.loc["balora", "speedup_steps"] == pytest.approx(np.median([4 / 2, 6 / 3]))
    assert out.loc["balora", "seconds_max"] == 1.5 and out.loc["balora", "reached"] == 2
    never = records.target_speedups(steps, 0.1).set_index("arm")
    assert never["reached"].tolist() == [0, 0] and never["speedup_steps"].isna().all()
    assert (never["steps_median"] == math.inf).all()
    assert records.target_speedups(steps.iloc[0:0], 1.0).empty
    # One lucky balora seed of three: the median seed never got there (no 4x from the lucky one), and
    # the seed where only lora got there is a speed-up of 0.
    lucky = steps[steps["seed"] == 0].copy()
    for seed in (1, 2):
        lucky = pd.concat([lucky, steps[steps["seed"] == 0].assign(
            seed=seed, loss=lambda d: d["loss"].where(d["arm"] == "lora", 2.0))])
    out = records.target_speedups(lucky, 1.0).set_index("arm")
    assert out.loc["balora", "reached"] == 1 and out.loc["balora", "steps_median"] == math.inf
    assert out.loc["balora", "steps_min"] == out.loc["balora", "steps_max"] == 2
    assert out.loc["balora", "speedup_steps"] == 0.0  # median of 2, 0, 0


def test_target_speedups_counts_a_cell_that_diverged_before_its_first_eval_as_never():
    # Eval every 5 steps; lora seed 2 diverges at step 3, before any eval: its rows have no eval_loss.
    # It never reached the target, so it counts as never (as arm_summary counts it), not as absent,
    # which made lora read "reached 2 of 2, median 5" when one cell of three never got there.
    rows = []
    for arm, seed in itertools.product(("lora", "balora"), range(3)):
        last = 2 if (arm, seed) == ("lora", 2) else 10
        for step in range(1, last + 1):
            evaluated = step % 5 == 0
            rows.append({"arm": arm, "seed": seed, "lr": 0.1, "alpha": 4.0, "step": step, "loss": 2.0,
                         "eval_loss": (0.5 if arm == "balora" or step == 10 else 2.0) if evaluated else math.nan,
                         "time_s": 0.5 * step})
    steps = to_table("steps", rows)
    out = records.target_speedups(steps, 1.0, metric="eval_loss").set_index("arm")
    # independently: per cell the first evaluated step <= 1.0, never = inf
    first = {}
    for key, g in steps.groupby(["arm", "seed"]):
        hit = g[g["eval_loss"] <= 1.0]["step"]
        first[key] = float(hit.min()) if len(hit) else math.inf
    for arm in ("lora", "balora"):
        mine = [first[(arm, s)] for s in range(3)]
        assert out.loc[arm, "n_seeds"] == 3 and out.loc[arm, "reached"] == sum(v < math.inf for v in mine)
        assert out.loc[arm, "steps_median"] == np.median(mine)
    speedups = [first[("lora", s)] / first[("balora", s)] for s in range(3)]
    assert out.loc["balora", "speedup_steps"] == np.median(speedups)  # 2, 2, inf
    # a run that records no eval loss at all has no cells for it (not cells that never reached it)
    assert records.target_speedups(steps.assign(eval_loss=math.nan), 1.0, metric="eval_loss").empty


def test_max_rel_imbalance_does_not_depend_on_the_order_of_the_layers():
    # A layer whose factors went non-finite (a diverging cell) has no rel_imbalance: the cell's
    # final_rel_imbalance_max read NaN when that layer came first and the others' max when it came later.
    import torch

    from balora.pairs import FactorPair
    from balora.report import pair_rows

    g = torch.Generator().manual_seed(0)
    pairs = [FactorPair(f"layers.{i}", "default", "linear", torch.randn(2, 5, generator=g),
                        torch.randn(4, 2, generator=g) * (i + 1), 1.0) for i in range(3)]
    pairs[1] = FactorPair("layers.1", "default", "linear", pairs[1].A * math.inf, pairs[1].B, 1.0)
    rows = pair_rows(pairs)
    finite = []
    for p in (pairs[0], pairs[2]):  # independently, in float64 numpy
        A, B = p.A.double().numpy(), p.B.double().numpy()
        finite.append(np.linalg.norm(B.T @ B - A @ A.T) / (np.linalg.norm(B.T @ B) + np.linalg.norm(A @ A.T)))
    for order in itertools.permutations(rows):
        assert records.max_rel_imbalance(list(order)) == pytest.approx(max(finite), rel=1e-5)
    assert math.isnan(records.max_rel_imbalance([rows[1]])) and math.isnan(records.max_rel_imbalance([]))


def test_arm_summary_takes_a_run_and_refuses_other_tables_in_one_line():
    # balora.arm_summary(balora.load_run(path)) raised "'Run' object has no attribute 'empty'", and a
    # layer report (one row per LoRA layer) a KeyError naming one column.
    summary = _grid({("lora", 0.1): [1.0, 2.0], ("balora", 0.1): [0.5, 0.7]})

    class Run:  # what balora.load_run returns, as far as arm_summary needs
        def __init__(self, summary, select=None):
            self.summary, self.config = summary, ({"select": select} if select else {})

    pd.testing.assert_frame_equal(records.arm_summary(Run(summary)), records.arm_summary(summary))
    # A run recorded with --select seed is ranked by its own rule, as `balora compare` prints it: here each
    # seed's own best cell (1.0 and 0.5) against the arm's one best cell (lr 1.0, median 1.25).
    grid = _grid({("lora", 0.1): [1.0, 3.0], ("lora", 1.0): [2.0, 0.5]})
    by_seed = records.arm_summary(Run(grid, "seed"))
    pd.testing.assert_frame_equal(by_seed, records.arm_summary(grid, select="seed"))
    assert by_seed["best"].item() == 0.75 and records.arm_summary(Run(grid))["best"].item() == 1.25
    with pytest.raises(TypeError, match=r"^arm_summary: expects a run's summary table .*got str$"):
        records.arm_summary("runs/x")
    report = pd.DataFrame({"module": ["q_proj"], "adapter": ["default"], "rel_imbalance": [0.1], "summary": [1]})
    with pytest.raises(InputError, match=r"^arm_summary: .*no arm, seed, lr, alpha, status column.*layer report"):
        records.arm_summary(report)
    with pytest.raises(InputError, match=r"^arm_summary: .*no status column"):
        records.arm_summary(summary.drop(columns="status"))
