"""benchmarks/bench_convergence.py's options reach the runs it starts (the runs themselves are faked)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_convergence  # noqa: E402


class _Stop(Exception):
    pass


def _lm_call(monkeypatch, tmp_path, *flags) -> dict:
    """The keyword arguments bench_convergence's lm part passes to balora.compare."""
    seen = {}

    def fake_compare(task, **kwargs):
        seen.update(kwargs, task=task)
        raise _Stop

    monkeypatch.setattr(bench_convergence, "compare", fake_compare)
    with pytest.raises(_Stop):
        bench_convergence.main(["--no-synthetic", "--out", str(tmp_path), *flags])
    assert seen["task"] == "lm"
    return seen


@pytest.mark.parametrize("flags, steps, seeds", [
    ((), 200, 3),  # the published run
    (("--quick",), 100, 1),  # --quick's own lm length
    (("--quick", "--lm-steps", "7", "--lm-seeds", "2"), 7, 2),  # given flags win: --quick used to drop them
    (("--lm-steps", "7"), 7, 3),
])
def test_lm_steps_and_seeds_reach_the_lm_run(monkeypatch, tmp_path, flags, steps, seeds):
    seen = _lm_call(monkeypatch, tmp_path, *flags)
    assert (seen["steps"], seen["seeds"]) == (steps, seeds)


def test_paper_docs_name_the_lr_grid_the_runs_used(tmp_path):
    """--paper --paper-lr GRID: the section written into BENCHMARKS.md names GRID, not the paper's grid."""
    import pandas as pd

    import paper_synthetic as paper

    table = pd.DataFrame([{"depth": 1, "optimizer": "sgd", "arm": arm, "median": m, "q25": m, "q75": m,
                           "median_lr": 1e-3, "diverged": 0, "trajectories": 1}
                          for arm, m in (("lora", 2.0), ("balora-svd", 1.0), ("balora", 1.0))])
    doc = tmp_path / "BENCHMARKS.md"
    paper.write_docs(table, "python benchmarks/bench_convergence.py --paper --paper-lr log:1e-5:6e-3:15", "header", doc,
                     "log:1e-5:6e-3:15")
    text = doc.read_text()
    assert "log:1e-5:6e-3:15" in text.split("```")[-1] and "linspace(1e-5, 0.3, 50)" not in text
    paper.write_docs(table, "python benchmarks/bench_convergence.py --paper", "header", doc)  # the paper's grid
    assert "linspace(1e-5, 0.3, 50)" in doc.read_text()


def test_plots_help_names_the_files_plots_writes(monkeypatch, tmp_path, capsys):
    """--plots' help names the PNG files main() writes (it named synthetic.png and lm.png, files never written)."""
    written = []
    monkeypatch.setattr(bench_convergence, "run_synthetic", lambda args, out: {(1.0, "adam"): object()})
    monkeypatch.setattr(bench_convergence, "run_lm", lambda args, out: object())
    monkeypatch.setattr(bench_convergence, "plot_synthetic", lambda runs, path, select="arm": written.append(path))
    monkeypatch.setattr(bench_convergence, "plot_lm", lambda run, path: written.append(path))
    assert bench_convergence.main(["--out", str(tmp_path / "runs"), "--plots", str(tmp_path / "img")]) == 0
    assert {p.parent for p in written} == {tmp_path / "img"} and len(written) == 2
    capsys.readouterr()
    with pytest.raises(SystemExit):
        bench_convergence.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for path in written:
        assert f" {path.name} " in help_text.replace(",", " "), (path.name, help_text)


def test_unknown_optimizer_stops_in_one_line_before_any_run(monkeypatch, tmp_path):
    """--optimizers adam,adamw: a KeyError traceback came after the adam runs had taken their minutes."""
    started = []
    monkeypatch.setattr(bench_convergence, "compare", lambda task, **kwargs: started.append(kwargs))
    with pytest.raises(SystemExit) as e:
        bench_convergence.main(["--quick", "--no-lm", "--optimizers", "adam,adamw", "--out", str(tmp_path)])
    message = str(e.value.code)
    assert "adamw" in message and "\n" not in message, message
    assert started == []


def test_bad_seeds_stop_in_one_line(tmp_path):
    """--seeds 0: balora's own one-line InputError escaped from the script as a traceback."""
    with pytest.raises(SystemExit) as e:
        bench_convergence.main(["--quick", "--no-lm", "--optimizers", "adam", "--init-scales", "1", "--seeds", "0",
                                "--out", str(tmp_path)])
    message = str(e.value.code)
    assert "--seeds 0" in message and "\n" not in message, message


def test_paper_docs_default_is_this_checkouts_docs_whatever_the_cwd(monkeypatch, tmp_path):
    """--paper run from another folder (e.g. benchmarks/) wrote a new docs/BENCHMARKS.md there, not the project's."""
    seen = {}
    monkeypatch.setattr(bench_convergence, "run_paper_experiment", lambda args, out: seen.setdefault("docs", args.docs) and 0)
    monkeypatch.chdir(tmp_path)
    bench_convergence.main(["--paper", "--out", str(tmp_path / "runs")])
    assert Path(seen["docs"]).resolve() == Path(__file__).resolve().parents[1] / "docs"
