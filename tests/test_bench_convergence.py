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
