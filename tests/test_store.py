"""Run store: round trip with documented columns and dtypes, atomic parts, tolerant loading, run status."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from balora.errors import InputError
from balora.store import TABLES, RunWriter, list_runs, load_run, to_table


def steps_rows(arm, seed, steps):
    return [{"arm": arm, "seed": seed, "lr": 0.1, "alpha": 4.0, "step": s, "loss": 1.0 / s, "eval_loss": float("nan"),
             "excess_loss": 0.5 / s, "time_s": 0.01 * s, "step_time_s": 0.01, "balance_time_s": 0.0,
             "diag_time_s": 0.0, "eval_time_s": 0.0} for s in steps]


def spectra_rows(arm, step):
    return [{"arm": arm, "seed": 0, "lr": 0.1, "alpha": 4.0, "step": step, "module": "layers.0", "adapter": "default",
             "which": w, "index": i, "value": 3.0 - i} for w in ("dW", "A", "B") for i in range(2)]


def writer(path, **kw):
    return RunWriter(path, {"task": "synthetic", "arms": ["lora"], "seeds": [0], "n_cells": 1}, {"python": "x"}, **kw)


def test_round_trip_columns_dtypes_and_merge(tmp_path):
    path = tmp_path / "run"
    with writer(path) as w:
        w.append("steps", steps_rows("lora", 0, [1, 2, 3]))
        w.append("steps", steps_rows("lora", 0, [4, 5]))
        w.append("spectra", spectra_rows("lora", 0))
        assert w.append("layers", []) is None  # no rows, no part file
        assert len(list((path / "steps").glob("part-*.parquet"))) == 2
    run = load_run(path)
    assert run.status == "completed" and run.complete and not run.stale and not run.warnings
    assert run.status_info["finished"] is not None
    assert run.config["task"] == "synthetic" and run.env == {"python": "x"}
    for table, columns in TABLES.items():
        df = getattr(run, table)
        assert list(df.columns) == list(columns), table
        assert {c: str(t) for c, t in df.dtypes.items()} == {c: str(pd.Series([], dtype=t).dtype)
                                                                for c, t in columns.items()}, table
    assert len(run.layers) == 0 and len(run.summary) == 0  # empty tables keep their columns
    assert list(run.steps["step"]) == [1, 2, 3, 4, 5]
    assert run.steps["loss"].tolist() == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5])
    assert len(run.spectra) == 6 and set(run.spectra["which"]) == {"dW", "A", "B"}
    # a finished run is merged into one part per table
    assert len(list((path / "steps").glob("part-*.parquet"))) == 1
    assert not list(path.rglob(".*tmp"))


def test_part_being_written_is_never_read(tmp_path, monkeypatch):
    """load_run in the middle of an append (after the bytes, before the rename) sees only complete parts."""
    path = tmp_path / "run"
    w = writer(path)
    w.append("steps", steps_rows("lora", 0, [1, 2]))
    seen = {}
    real_replace = os.replace

    def replace_and_peek(src, dst):
        if str(dst).endswith(".parquet"):
            assert os.path.getsize(src) > 0  # the temporary file holds the whole part already
            run = load_run(path)
            seen["rows"], seen["warnings"] = len(run.steps), run.warnings
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_and_peek)
    w.append("steps", steps_rows("lora", 0, [3, 4, 5]))
    assert seen == {"rows": 2, "warnings": []}
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(load_run(path).steps) == 5


def test_truncated_or_corrupt_parts_are_skipped_with_a_warning(tmp_path):
    path = tmp_path / "run"
    w = writer(path)
    good = w.append("steps", steps_rows("lora", 0, [1, 2]))
    bad = w.append("steps", steps_rows("lora", 0, [3, 4]))
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])  # truncated
    (path / "spectra" / "part-00007.parquet").write_text("not parquet")
    run = load_run(path)
    assert list(run.steps["step"]) == [1, 2]
    assert len(run.warnings) == 2 and any(bad.name in m for m in run.warnings)
    assert good.exists() and list(run.spectra.columns) == list(TABLES["spectra"])


def test_duplicate_rows_from_an_interrupted_merge_are_dropped(tmp_path):
    path = tmp_path / "run"
    w = writer(path)
    part = w.append("steps", steps_rows("lora", 0, [1, 2, 3]))
    (path / "steps" / "part-00009.parquet").write_bytes(part.read_bytes())  # a merged copy beside the original
    run = load_run(path)
    assert list(run.steps["step"]) == [1, 2, 3]
    assert any("duplicate" in m for m in run.warnings)


def test_exceptions_mark_the_run(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with writer(tmp_path / "a") as w:
            w.append("steps", steps_rows("lora", 0, [1]))
            raise KeyboardInterrupt
    with pytest.raises(ZeroDivisionError):
        with writer(tmp_path / "b"):
            1 / 0
    a, b = load_run(tmp_path / "a"), load_run(tmp_path / "b")
    assert a.status == "interrupted" and len(a.steps) == 1
    assert b.status == "failed" and "ZeroDivisionError" in b.status_info["message"]


def test_stale_running_status(tmp_path):
    w = writer(tmp_path / "run")
    w.append("steps", steps_rows("lora", 0, [1]))
    fresh = load_run(tmp_path / "run")
    assert fresh.status == "running" and not fresh.stale  # this process is the writer and is alive

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    status["pid"] = int(dead.stdout)
    (tmp_path / "run" / "status.json").write_text(json.dumps(status))
    gone = load_run(tmp_path / "run")
    assert gone.status == "running" and gone.stale and "gone" in gone.status_info["stale_reason"]

    status["pid"] = os.getpid()
    status["updated"] = "2020-01-01T00:00:00+00:00"
    (tmp_path / "run" / "status.json").write_text(json.dumps(status))
    old = load_run(tmp_path / "run")
    assert old.stale and "not updated" in old.status_info["stale_reason"]
    assert len(old.steps) == 1


def test_not_a_run_and_out_dir_rules(tmp_path):
    with pytest.raises(InputError, match="nowhere"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a balora run"):
        load_run(tmp_path / "plain")
    with pytest.raises(InputError, match="not empty"):
        writer(tmp_path / "plain")
    with pytest.raises(InputError, match="will not delete"):
        writer(tmp_path / "plain", force=True)
    assert (tmp_path / "plain" / "notes.txt").exists()

    w = writer(tmp_path / "run")
    w.append("steps", steps_rows("lora", 0, [1]))
    w.finish("completed")
    with pytest.raises(InputError, match="--force"):
        writer(tmp_path / "run")
    writer(tmp_path / "run", force=True)
    assert load_run(tmp_path / "run").steps.empty


def test_list_runs(tmp_path):
    for name in ("a", "nested/b"):
        w = writer(tmp_path / name)
        w.heartbeat({"done": 1, "total": 1}, force=True)
        if name == "a":
            w.finish("completed")
    (tmp_path / "not-a-run").mkdir()
    df = list_runs(tmp_path)
    assert sorted(df["name"]) == ["a", "b"]
    assert dict(zip(df["name"], df["status"])) == {"a": "completed", "b": "running"}
    assert set(df["task"]) == {"synthetic"} and set(df["n_cells"]) == {1}
    assert list_runs(tmp_path / "not-a-run").empty
    assert list(list_runs(tmp_path / "not-a-run").columns) == list(df.columns)


def test_to_table_rejects_nothing_silently():
    df = to_table("steps", steps_rows("lora", 0, [1]))
    assert list(df.columns) == list(TABLES["steps"])
    with pytest.raises((ValueError, TypeError)):
        to_table("steps", [{"arm": "lora", "seed": "zero", "lr": 0.1, "alpha": 1.0, "step": 1}])
