"""The runner: balancing shows in the layer reports, divergence stops one cell, runs survive Ctrl-C and kill -9."""

import math
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pandas as pd
import pytest
import torch
from peft import LoraConfig, get_peft_model

from balora.errors import InputError
from balora.records import arm_summary
from balora.runner import compare
from balora.store import load_run
from balora.tasks import TASKS, Problem, TaskSpec

TINY = {"in_features": 6, "out_features": 5}


def test_balanced_arms_end_balanced_and_lora_keeps_its_imbalance(tmp_path):
    run = compare("synthetic", arms="lora,balora,balora-svd", steps=12, seeds=2, optimizer="sgd", lr=0.01, rank=2,
                  device="cpu", out=tmp_path / "run", quiet=True, layers_every=4, spectra_every=6, **TINY)
    layers = run.layers
    assert sorted(layers["step"].unique()) == [0, 4, 8, 12]
    assert sorted(run.spectra["step"].unique()) == [0, 6, 12]
    assert (layers[layers["step"] == 0]["rel_imbalance"] == 1.0).all()  # PEFT's B = 0 init, every arm
    final = layers[layers["step"] == 12].groupby("arm")["rel_imbalance"].max()
    assert final["balora"] < 1e-4 and final["balora-svd"] < 1e-4
    assert final["lora"] > 0.5
    # plain gradient descent conserves D = B^T B - A A^T up to O(lr^2) per step: ||D|| barely moves
    lora = layers[layers["arm"] == "lora"].pivot_table(index="step", columns="seed", values="imbalance")
    assert np.allclose(lora.loc[12], lora.loc[0], rtol=0.01)
    assert (run.summary.set_index("arm")["final_rel_imbalance_max"].groupby(level=0).max() == final).all()
    # spectra of dW at the last step agree with the layer report's sigma_max
    top = run.spectra[(run.spectra["which"] == "dW") & (run.spectra["index"] == 0) & (run.spectra["step"] == 12)]
    merged = top.merge(layers[layers["step"] == 12], on=["arm", "seed", "lr", "alpha", "module", "adapter"])
    np.testing.assert_allclose(merged["value"], merged["sigma_max"])


def test_timings_targets_and_speedups_are_consistent(tmp_path):
    run = compare("synthetic", arms="lora,balora", steps=30, seeds=2, optimizer="adam", lr="0.03,0.1", alpha="2,4",
                  rank=2, device="cpu", out=tmp_path / "run", quiet=True, layers_every=0, spectra_every=0, **TINY)
    assert len(run.summary) == 2 * 2 * 2 * 2  # arms x seeds x lrs x alphas
    assert run.config["n_cells"] == 16 and run.status_info["progress"]["done"] == 16
    assert run.status_info["progress"]["steps_done"] == run.status_info["progress"]["steps_total"] == 16 * 30
    for key, cell in run.steps.groupby(["arm", "seed", "lr", "alpha"]):
        cell = cell.sort_values("step")
        assert list(cell["step"]) == list(range(1, 31))
        np.testing.assert_allclose(cell["time_s"], np.cumsum(cell["step_time_s"] + cell["balance_time_s"]))
        assert (cell["balance_time_s"] > 0).all() == (key[0] == "balora")
        summary = run.summary.set_index(["arm", "seed", "lr", "alpha"]).loc[key]
        reached = cell[cell["loss"] <= summary["target_loss"]]
        if len(reached):
            assert summary["steps_to_target"] == reached["step"].iloc[0]
            assert summary["seconds_to_target"] == pytest.approx(reached["time_s"].iloc[0])
        else:
            assert math.isnan(summary["steps_to_target"])
        assert summary["final_loss"] == cell["loss"].iloc[-1] and summary["min_loss"] == cell["loss"].min()
    s = run.summary.set_index(["seed", "lr", "alpha", "arm"])
    for (seed, lr, alpha), group in run.summary.groupby(["seed", "lr", "alpha"]):
        lora_steps = s.loc[(seed, lr, alpha, "lora"), "steps_to_target"]
        bal_steps = s.loc[(seed, lr, alpha, "balora"), "steps_to_target"]
        expected = lora_steps / bal_steps if not (math.isnan(lora_steps) or math.isnan(bal_steps)) else math.nan
        assert s.loc[(seed, lr, alpha, "balora"), "speedup_steps"] == pytest.approx(expected, nan_ok=True)
    assert run.summary["target_loss"].notna().all()


def test_divergence_stops_only_that_cell(tmp_path):
    run = compare("synthetic", arms="lora,balora", steps=15, seeds=1, optimizer="sgd", lr="0.05,1e4", rank=2,
                  device="cpu", out=tmp_path / "run", quiet=True, layers_every=5, spectra_every=0, **TINY)
    assert run.status == "completed"
    s = run.summary.set_index(["arm", "lr"])
    for arm in ("lora", "balora"):
        assert s.loc[(arm, 0.05), "status"] == "completed"
        assert s.loc[(arm, 1e4), "status"] == "diverged"
        assert s.loc[(arm, 1e4), "steps_done"] < 15
    assert "non-finite loss" in s.loc[("lora", 1e4), "reason"]
    lora_bad = run.steps[(run.steps["arm"] == "lora") & (run.steps["lr"] == 1e4)].sort_values("step")
    assert not math.isfinite(lora_bad["loss"].iloc[-1]) and np.isfinite(lora_bad["loss"].iloc[:-1]).all()
    good = run.steps[run.steps["lr"] == 0.05]
    assert len(good) == 2 * 15 and np.isfinite(good["loss"]).all()


# ------------------------------------------------------------- the task protocol with a task of our own


def _fake_build(cfg, seed, alpha, device):
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(4, 3))
    model = get_peft_model(base, LoraConfig(r=cfg["rank"], lora_alpha=alpha, target_modules=["0"]))
    g = torch.Generator().manual_seed(100 + seed)
    X, Y = torch.randn(3, 8, 4, generator=g), torch.randn(3, 8, 3, generator=g)  # 3 batches: an epoch of 3 steps
    calls = cfg["calls"]

    def eval_loss(m):
        if cfg["nan_eval_at"] and len(calls) >= cfg["nan_eval_at"]:
            return math.nan
        return float(((m(X[0]) - Y[0]) ** 2).mean())

    def loss(m, batch):
        if cfg["fail_at"] and len(calls) >= cfg["fail_at"]:
            raise RuntimeError("task exploded")
        if cfg["sigterm_at"] and len(calls) == cfg["sigterm_at"]:
            os.kill(os.getpid(), getattr(signal, cfg["signal"]))
        calls.append(1)
        x, y = batch
        return ((m(x) - y) ** 2).mean()

    return Problem(model=model, batches=lambda: iter(zip(X, Y)), loss=loss,
                   eval_loss=eval_loss, target_loss=1e9, info={"fake": True})


@pytest.fixture
def fake_task(monkeypatch):
    module = types.ModuleType("balora_fake_task")
    module.TASK = TaskSpec("fake", _fake_build, {"arms": "lora,balora", "steps": 7, "seeds": 1, "optimizer": "sgd",
                                                 "lr": 0.1, "alpha": 2, "rank": 2, "eval_every": 3,
                                                 "layers_every": 0, "spectra_every": 0, "fail_at": 0, "sigterm_at": 0, "signal": "SIGTERM", "nan_eval_at": 0,
                                                 "calls": []})
    monkeypatch.setitem(sys.modules, "balora_fake_task", module)
    monkeypatch.setitem(TASKS, "fake", "balora_fake_task")
    return module


def test_task_protocol_eval_epochs_and_defaults(tmp_path, fake_task):
    run = compare("fake", out=tmp_path / "run", quiet=True, device="cpu", calls=[])
    assert run.config["arms"] == ["lora", "balora"] and run.config["steps"] == 7 and run.config["alphas"] == [2.0]
    assert run.config["problem"] == {"fake": True}
    evaluated = run.steps[run.steps["eval_loss"].notna()]
    assert sorted(evaluated["step"].unique()) == [3, 6, 7]  # every 3 steps and the last
    assert (run.summary["target_on"] == "eval_loss").all() and (run.summary["steps_to_target"] == 3).all()
    assert run.summary["final_eval_loss"].tolist() == evaluated[evaluated["step"] == 7]["eval_loss"].tolist()
    assert (run.steps.groupby("arm").size() == 7).all()  # 3 batches per epoch: the data was restarted twice


def test_an_error_in_a_cell_fails_the_run_and_keeps_what_was_done(tmp_path, fake_task):
    with pytest.raises(RuntimeError, match="task exploded"):
        compare("fake", out=tmp_path / "run", quiet=True, device="cpu", calls=[], fail_at=10)
    run = load_run(tmp_path / "run")
    assert run.status == "failed"
    assert "task exploded" in run.status_info["message"] and "arm=balora" in run.status_info["message"]
    s = run.summary.set_index("arm")
    assert s.loc["lora", "status"] == "completed" and s.loc["balora", "status"] == "failed"
    assert len(run.steps[run.steps["arm"] == "balora"]) == 3


@pytest.mark.parametrize("name", [n for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)])
def test_sigterm_marks_the_run_interrupted_and_restores_the_handler(tmp_path, fake_task, name):
    """SIGTERM (kill PID, a scheduler) and SIGHUP (the ssh session or terminal closed: the run was left
    'running' until it read as stalled) end a run as Ctrl-C does."""
    sig = getattr(signal, name)
    before = signal.getsignal(sig)
    with pytest.raises(KeyboardInterrupt, match=name):
        compare("fake", out=tmp_path / "run", quiet=True, device="cpu", calls=[], sigterm_at=9, signal=name)
    assert signal.getsignal(sig) is before
    run = load_run(tmp_path / "run")
    assert run.status == "interrupted" and f"terminated ({name}) during arm=balora" in run.status_info["message"]
    s = run.summary.set_index("arm")
    assert s.loc["lora", "status"] == "completed" and s.loc["balora", "status"] == "interrupted"
    assert s.loc["balora", "reason"].startswith("interrupted at step")


def test_bad_options_name_the_flag(tmp_path, fake_task):
    with pytest.raises(InputError, match="--set nope"):
        compare("fake", out=tmp_path / "a", quiet=True, nope=1)
    with pytest.raises(InputError, match="--task: unknown task 'nope'.*synthetic"):
        compare("nope", out=tmp_path / "b", quiet=True)
    with pytest.raises(InputError, match=r"^--task: a task name \(synthetic.*got a Linear; .*--set model=") as e:
        compare(torch.nn.Linear(300, 300), out=tmp_path / "b", quiet=True)  # its repr is not the message
    assert len(str(e.value)) < 200
    with pytest.raises(InputError, match="--lr"):
        compare("fake", lr="0.1,-1", out=tmp_path / "c", quiet=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()  # nothing written for bad input


# ------------------------------------------------------------- killed runs


def _start(out):
    cmd = [sys.executable, "-m", "balora.cli", "compare", "--arms", "lora,balora", "--steps", "300", "--seeds", "40",
           "--layers-every", "1", "--spectra-every", "1", "--quiet", "--out", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_parts(proc, out, timeout=180):
    t0 = time.monotonic()
    while not list((out / "steps").glob("part-*.parquet")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, "no part file appeared"
        time.sleep(0.05)


def test_interrupted_and_killed_runs_load(tmp_path):
    """SIGINT -> a loadable run marked interrupted; SIGKILL -> a loadable run still 'running', flagged stale."""
    a, b = tmp_path / "sigint", tmp_path / "sigkill"
    pa, pb = _start(a), _start(b)  # concurrently: each pays the import time once
    try:
        _wait_for_parts(pa, a)
        pa.send_signal(signal.SIGINT)
        _wait_for_parts(pb, b)
        pb.kill()
        _, err = pa.communicate(timeout=120)
        pb.wait(timeout=60)
    finally:
        for p in (pa, pb):
            if p.poll() is None:
                p.kill()
    assert pa.returncode == 130, err
    assert "partial run left in" in err

    run = load_run(a)
    assert run.status == "interrupted" and not run.complete and not run.warnings
    assert run.status_info["message"].startswith("interrupted (Ctrl-C / SIGINT) during arm=")
    assert 0 < len(run.steps) < 2 * 40 * 300
    assert set(run.summary["status"]) <= {"completed", "interrupted"} and len(run.summary) < 80
    assert run.config["command"].startswith("python -m balora.cli compare --arms lora,balora")
    assert len(run.layers) > 0

    killed = load_run(b)
    assert killed.status == "running" and killed.stale and "gone" in killed.status_info["stale_reason"]
    assert len(killed.steps) > 0 and not killed.warnings


def test_arm_summary_picks_each_arms_best_cell():
    rows = []
    # lora is best at lr 0.1 (excess 1.0 for every seed), balora at lr 0.01 (0.5); one diverged balora seed
    for seed in range(3):
        for lr, lora_excess, bal_excess in ((0.01, 4.0, 0.5), (0.1, 1.0, 3.0)):
            rows.append({"arm": "lora", "seed": seed, "lr": lr, "alpha": 4.0, "status": "completed",
                         "final_excess_loss": lora_excess, "steps_to_target": 40.0})
            diverged = seed == 2 and lr == 0.1
            rows.append({"arm": "balora", "seed": seed, "lr": lr, "alpha": 4.0,
                         "status": "diverged" if diverged else "completed",
                         "final_excess_loss": math.nan if diverged else bal_excess, "steps_to_target": 10.0 + seed})
    summary = pd.DataFrame(rows).assign(final_eval_loss=math.nan, final_loss=1.0)
    s = arm_summary(summary).set_index("arm")
    assert s.loc["lora", "best_lr"] == 0.1 and s.loc["lora", "best"] == 1.0 and s.loc["lora", "worst"] == 4.0
    assert s.loc["balora", "best_lr"] == 0.01 and s.loc["balora", "best"] == 0.5
    assert s.loc["balora", "worst"] == 3.0  # median over seeds (3.0, 3.0, diverged = inf)
    assert s.loc["balora", "diverged"] == 1 and s.loc["balora", "completed"] == 5
    assert s.loc["lora", "within_2x"] == 0.5 and s.loc["balora", "within_5pct"] == 0.5
    assert s.loc["balora", "steps_to_target"] == 11.0
    assert s.loc["balora", "speedup_vs_lora"] == pytest.approx(np.median([40 / 10, 40 / 11, 40 / 12]))
    assert (s["metric"] == "final_excess_loss").all()
    assert list(arm_summary(summary.iloc[:0]).columns) == list(arm_summary(summary).columns)


# ------------------------------------------------------------- grids that diverge: each cell ends, the grid goes on


def test_a_grid_diverging_in_balancing_completes(tmp_path):
    # lr 3e38 with large targets: the first update overflows B to inf while the step's loss was finite,
    # so the balanced arms meet the non-finite factors in balancing, plain LoRA at its next loss.
    run = compare("synthetic", arms="lora,balora,balora-svd", steps=5, seeds=1, optimizer="sgd", lr="0.05,3e38",
                  rank=2, device="cpu", out=tmp_path / "run", quiet=True, layers_every=1, spectra_every=0,
                  std=100.0, **TINY)
    assert run.status == "completed"
    s = run.summary.set_index(["arm", "lr"])
    assert (s.xs(0.05, level="lr")["status"] == "completed").all()
    for arm in ("balora", "balora-svd"):
        assert s.loc[(arm, 3e38), "status"] == "diverged"
        assert "during balancing" in s.loc[(arm, 3e38), "reason"] and "non-finite" in s.loc[(arm, 3e38), "reason"]
    assert s.loc[("lora", 3e38), "status"] == "diverged"


def test_a_cell_that_blows_up_in_its_last_step_is_diverged_not_completed(tmp_path, fake_task):
    """No training loss follows a cell's last update, so factors it made non-finite (or an eval loss that came
    out NaN at the last step) left the cell "completed": ranked by its last finite loss, counted in "ok", while
    the balanced arm, meeting the same factors in balancing, was "diverged"."""
    from balora.tasks.synthetic import build

    opts = dict(steps=1, seeds=1, optimizer="sgd", lr=3e38, rank=2, device="cpu", quiet=True, layers_every=1,
                spectra_every=0, std=100.0, **TINY)
    run = compare("synthetic", arms="lora,balora", out=tmp_path / "syn", **opts)
    # the same step by hand: plain SGD on the task's model overflows the factors
    cfg = {**load_run(tmp_path / "syn").config["task_options"], "rank": 2, "dtype": "float32"}
    problem = build(cfg, 0, 2.0, torch.device("cpu"))
    params = [p for p in problem.model.parameters() if p.requires_grad]
    problem.loss(problem.model, next(iter(problem.batches()))).backward()
    torch.optim.SGD(params, lr=3e38).step()
    assert not all(torch.isfinite(p).all() for p in params)
    s = run.summary.set_index("arm")
    assert (s["status"] == "diverged").all(), s[["status", "reason"]]
    assert "non-finite factors" in s.loc["lora", "reason"]
    assert arm_summary(run.summary).set_index("arm").loc["lora", "diverged"] == 1

    # an eval loss that is NaN at the last step (7 steps, 7 loss calls for the first arm)
    run = compare("fake", out=tmp_path / "fake", quiet=True, device="cpu", calls=[], nan_eval_at=7)
    s = run.summary.set_index("arm")
    assert s.loc["lora", "status"] == "diverged" and "non-finite eval loss" in s.loc["lora", "reason"]
    assert s.loc["balora", "status"] == "diverged"  # its first eval (step 3) already came out NaN
    lora = run.steps[run.steps["arm"] == "lora"].sort_values("step")
    assert list(lora["step"]) == list(range(1, 8)) and math.isnan(lora["eval_loss"].iloc[-1])


def test_a_cell_that_diverges_after_its_loss_keeps_that_loss(tmp_path):
    """A balanced arm whose factors overflow in step 1's update diverges in balancing, after step 1's loss was
    measured: that loss was dropped (no steps row, final_loss NaN, steps_done 0), while plain LoRA, diverging
    at the same update, kept it. Step 1's loss (B = 0) is 1/2 ||W0 - T||^2 for every arm."""
    from balora.tasks.synthetic import problem_tensors

    run = compare("synthetic", arms="lora,balora,balora-svd", steps=3, seeds=1, optimizer="sgd", lr=3e38, rank=2,
                  device="cpu", out=tmp_path / "run", quiet=True, layers_every=0, spectra_every=0, std=100.0, **TINY)
    (W0,), T = problem_tensors({**run.config["task_options"], "rank": 2}, 0)
    first = float(0.5 * ((W0.float().double() - T) ** 2).sum())
    s = run.summary.set_index("arm")
    assert (s["status"] == "diverged").all()
    for arm in ("lora", "balora", "balora-svd"):
        cell = run.steps[(run.steps["arm"] == arm) & run.steps["loss"].notna() & (run.steps["step"] == 1)]
        assert len(cell) == 1, arm
        assert cell["loss"].iloc[0] == pytest.approx(first, rel=1e-5)
        assert s.loc[arm, "final_loss"] == cell["loss"].iloc[0] and s.loc[arm, "steps_done"] == 1


def test_a_grid_diverging_in_the_diagnostics_completes(tmp_path, monkeypatch):
    """The issue's grid: SGD on large factors; at lr 0.0857 the factors grow so large after a finite loss that
    the layer report's float32 products overflow and its SVD fails (torch.linalg.svdvals raised _LinAlgError).
    Simulated here (a Gram that overflows fails the report), whatever the report does with such factors
    today, then run as it is."""
    import balora.cell

    real = balora.cell.pair_rows

    def svd_like(pairs):
        if any(not torch.isfinite(p.B.mT @ p.B).all() or not torch.isfinite(p.A @ p.A.mT).all() for p in pairs):
            raise torch.linalg.LinAlgError("linalg.svd: the input matrix contained non-finite values")
        return real(pairs)

    grid = np.linspace(1e-5, 0.3, 50)  # the grid: its cell 14 broke the whole run
    lr = float(grid[14])
    lrs = [0.0612, lr, 0.3]  # the last diverges at once, in its loss
    opts = dict(arms="lora", steps=100, seeds=1, optimizer="sgd", lr=lrs, device="cpu", quiet=True, layers_every=1,
                spectra_every=0, std=4.47213595, init_scale=7.74596669)
    monkeypatch.setattr(balora.cell, "pair_rows", svd_like)
    run = compare("synthetic", out=tmp_path / "simulated", **opts)
    assert run.status == "completed" and len(run.summary) == 3
    s = run.summary.set_index("lr")
    assert s.loc[0.0612, "status"] == "completed"
    assert s.loc[lr, "status"] == "diverged"
    assert "during diagnostics" in s.loc[lr, "reason"] and "LinAlgError" in s.loc[lr, "reason"]
    assert s.loc[0.3, "status"] == "diverged"
    monkeypatch.undo()
    real_run = compare("synthetic", out=tmp_path / "real", **opts)
    assert real_run.status == "completed"
    assert list(real_run.summary.sort_values("lr")["status"]) == ["completed", "diverged", "diverged"]


def test_an_error_unrelated_to_the_numbers_still_stops_the_run(tmp_path, monkeypatch):
    import balora.cell

    def broken(pairs):
        raise KeyError("a bug in the report")

    monkeypatch.setattr(balora.cell, "pair_rows", broken)
    with pytest.raises(KeyError, match="a bug in the report"):
        compare("synthetic", arms="lora", steps=3, seeds=1, optimizer="sgd", lr=0.01, rank=2, device="cpu",
                out=tmp_path / "run", quiet=True, layers_every=1, spectra_every=0, **TINY)
    run = load_run(tmp_path / "run")
    assert run.status == "failed" and run.summary["status"].tolist() == ["failed"]
    assert "during diagnostics" not in run.summary["reason"].iloc[0] and "diagnostics" in run.summary["reason"].iloc[0]


def test_numeric_cause_tells_numbers_from_bugs():
    from balora.cell import numeric_cause

    finite, bad = [torch.ones(2, 3)], [torch.tensor([[1.0, math.inf]])]
    assert numeric_cause(RuntimeError("shape mismatch"), finite, 1.0) is None
    assert numeric_cause(RuntimeError("anything"), bad, 1.0) == "non-finite factors"
    assert numeric_cause(RuntimeError("anything"), finite, math.nan) == "non-finite loss"
    assert numeric_cause(torch.linalg.LinAlgError("svd failed"), finite, 1.0) == "numerical failure"
    assert numeric_cause(RuntimeError("value cannot be converted to type float without overflow"), finite, 1.0) \
        == "overflow"


# ------------------------------------------------------------- best cell per seed (the paper's protocol)


def test_per_seed_selection_on_a_hand_made_table():
    from balora.records import best_cells

    # final excess loss per (arm, seed, lr): seed 0 is best at lr 0.1, seed 1 at 0.01, seed 2 diverges at 0.1
    table = {("lora", 0): {0.01: 5.0, 0.1: 1.0}, ("lora", 1): {0.01: 1.0, 0.1: 9.0}, ("lora", 2): {0.01: 2.0, 0.1: None},
             ("balora", 0): {0.01: 0.5, 0.1: 0.7}, ("balora", 1): {0.01: None, 0.1: None},
             ("balora", 2): {0.01: 0.4, 0.1: 0.2}}
    rows = [{"arm": arm, "seed": seed, "lr": lr, "alpha": 4.0, "status": "completed" if v is not None else "diverged",
             "final_excess_loss": v if v is not None else math.nan, "steps_to_target": 10.0 * (seed + 1),
             "final_eval_loss": math.nan, "final_loss": 1.0}
            for (arm, seed), cells in table.items() for lr, v in cells.items()]
    summary = pd.DataFrame(rows)
    per_seed = best_cells(summary, select="seed").set_index(["arm", "seed"])
    assert per_seed.loc[("lora", 0), "lr"] == 0.1 and per_seed.loc[("lora", 1), "lr"] == 0.01
    assert per_seed.loc[("lora", 2), "lr"] == 0.01 and per_seed.loc[("balora", 2), "lr"] == 0.1
    assert per_seed.loc[("balora", 1), "value"] == math.inf  # every cell diverged: it counts, as the worst
    assert list(per_seed["value"].loc["lora"]) == [1.0, 1.0, 2.0]
    # the median rule picks one lr per arm instead: lora lr 0.01 (median of 5, 1, 2 = 2 < 9)
    per_arm = best_cells(summary, select="arm").set_index(["arm", "seed"])
    assert set(per_arm.loc["lora", "lr"]) == {0.01} and list(per_arm.loc["lora", "value"]) == [5.0, 1.0, 2.0]
    s = arm_summary(summary, select="seed").set_index("arm")
    assert s.loc["lora", "best"] == 1.0 and s.loc["balora", "best"] == 0.5  # medians of (1, 1, 2), (0.5, inf, 0.2)
    assert arm_summary(summary, select="arm").set_index("arm").loc["lora", "best"] == 2.0
    with pytest.raises(InputError, match="seed"):
        best_cells(summary, select="trajectory")


def test_the_python_api_takes_every_option_of_the_command(tmp_path):
    """balora.compare says "same options as `balora compare`": threads was missing and fell into
    **task_options, refused as "--set threads: unknown option"."""
    import dataclasses
    import inspect

    from balora.compare_config import CompareConfig

    params = inspect.signature(compare).parameters
    fields = {f.name for f in dataclasses.fields(CompareConfig)} - {"options", "command"}
    assert fields <= set(params), sorted(fields - set(params))
    before = torch.get_num_threads()
    run = compare("synthetic", arms="lora", steps=2, seeds=1, rank=2, device="cpu", out=tmp_path / "run",
                  quiet=True, threads=1, **TINY)
    assert run.status == "completed" and run.config["threads"] == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("threads", [0, 10**12])
def test_a_thread_count_torch_cannot_take_is_refused_before_the_run_folder(tmp_path, threads):
    """10**12 threads used to reach torch.set_num_threads inside the run and end in "ValueError: Overflow
    when unpacking long", after the run folder was made."""
    with pytest.raises(InputError, match=r"^--threads \d+: must be an integer"):
        compare("synthetic", arms="lora", steps=2, seeds=1, rank=2, device="cpu", out=tmp_path / "run",
                quiet=True, threads=threads, **TINY)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_a_run_started_with_nohup_outlives_its_terminal(tmp_path, fake_task):
    """`nohup balora compare ...` ignores SIGHUP so that the run survives a closed terminal: the run's own
    handler must leave that as it is, not turn the hang-up into an interrupt."""
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        run = compare("fake", out=tmp_path / "run", quiet=True, device="cpu", calls=[], sigterm_at=9, signal="SIGHUP")
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
    assert run.status == "completed" and (run.summary["status"] == "completed").all()


def test_a_thread_count_up_to_the_machines_cpus_is_taken_on_a_large_machine(monkeypatch):
    """MAX_THREADS (1024) bounds typos, not machines: on one with more CPUs (large SMP servers have 1,500-2,000)
    `--threads $(nproc)` was refused though torch takes it. Past the CPU count the bound still holds."""
    import os

    from balora.commands.arg_checks import check_threads
    from balora.compare_config import CompareConfig, resolve

    monkeypatch.setattr(os, "cpu_count", lambda: 1536)
    assert check_threads(1536) == 1536
    assert resolve(CompareConfig(task="synthetic", arms="lora", threads=1536, device="cpu")).run.threads == 1536
    with pytest.raises(InputError, match="1537"):
        check_threads(1537)
    with pytest.raises(InputError, match="1537"):
        resolve(CompareConfig(task="synthetic", arms="lora", threads=1537, device="cpu"))
