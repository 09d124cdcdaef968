"""Run store: round trip with documented columns and dtypes, atomic parts, tolerant loading, run status."""

import json
import os
import subprocess
import sys
from pathlib import Path

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



@pytest.mark.parametrize("ending", ["completed", "interrupted"])
def test_ctrl_c_while_the_parts_are_merged_keeps_the_runs_status(tmp_path, monkeypatch, ending):
    # Merging a long run's thousands of parts takes seconds after the last cell (2.5 s for 1,000);
    # a Ctrl-C then (or a second Ctrl-C after the first) left status.json "running" for a run whose
    # cells had all ended (or been interrupted).
    w = writer(tmp_path / "run")
    for s in range(1, 5):  # one part per step: something to merge
        w.append("steps", steps_rows("lora", 0, [s]))
    merged = []

    def cut(table, *a, **kw):
        merged.append(table)
        if len(merged) == 2:  # the second table's merge
            raise KeyboardInterrupt
        return rewrite(table, *a, **kw)

    rewrite = w._rewrite
    monkeypatch.setattr(w, "_rewrite", cut)
    with pytest.raises(KeyboardInterrupt):
        w.finish(ending, None if ending == "completed" else "interrupted (Ctrl-C / SIGINT)")
    run = load_run(tmp_path / "run")
    assert run.status == ending and run.status_info["finished"] and not run.stale
    assert run.steps["step"].tolist() == [1, 2, 3, 4]  # the parts, merged or not, load once each


def test_a_run_read_while_its_parts_are_merged_loads_whole(tmp_path, monkeypatch):
    # finish() marks the run, then merges its parts; a reader (the dashboard) that listed the parts
    # just before the merge found them gone: its rows "unreadable, skipped", a completed run read empty.
    w = writer(tmp_path / "run")
    for s in range(1, 4):
        w.append("steps", steps_rows("lora", 0, [s]))
    w.status["status"] = "completed"
    read = pd.read_parquet

    def merge_first(path, *a, **kw):  # the writer merges between the reader's listing and its first read
        if not merged:
            merged.append(True)
            w.compact()
        return read(path, *a, **kw)

    merged: list = []
    monkeypatch.setattr(pd, "read_parquet", merge_first)
    run = load_run(tmp_path / "run")
    assert merged and len(list((tmp_path / "run" / "steps").iterdir())) == 1  # it did merge mid-read
    assert run.steps["step"].tolist() == [1, 2, 3] and not run.warnings

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


def test_a_run_inside_another_run_is_refused(tmp_path):
    # --out run/sub (or $BALORA_RUNS pointing at a run): the new run was written, but list_runs stops at the
    # first run folder it meets and never looks inside, so neither the dashboard nor `balora dashboard --runs
    # run` (the command compare printed) ever showed it.
    outer = writer(tmp_path / "run")
    outer.finish("completed")
    for inner in (tmp_path / "run" / "sub", tmp_path / "run" / "steps" / "x" / "y"):
        with pytest.raises(InputError, match=f"--out {inner}: inside the balora run {tmp_path / 'run'}.*outside") as e:
            writer(inner)
        assert "\n" not in str(e.value) and not inner.exists()
    with pytest.raises(InputError, match=r"\$BALORA_RUNS .*inside the balora run"):
        writer(tmp_path / "run" / "sub", flag="$BALORA_RUNS")
    assert list(list_runs(tmp_path / "run")["name"]) == ["run"]  # where a run inside would not be listed
    writer(tmp_path / "run", force=True)  # the run itself can still be replaced
    writer(tmp_path / "runs" / "a")  # and runs side by side are fine
    writer(tmp_path / "run" / ".." / "b")  # beside the run, spelled through it
    assert sorted(list_runs(tmp_path)["name"]) == ["a", "b", "run"]


def test_a_runs_folder_inside_a_run_folder_still_takes_runs(tmp_path, monkeypatch):
    # $BALORA_RUNS (or ./runs) inside a folder that is a run: `balora dashboard` lists from the runs folder
    # down, so a run written there is listed, and refusing it refused every run of that runs folder.
    writer(tmp_path / "proj").finish("completed")
    runs = tmp_path / "proj" / "runs"
    monkeypatch.setenv("BALORA_RUNS", str(runs))
    writer(runs / "a").finish("completed")
    monkeypatch.delenv("BALORA_RUNS")
    monkeypatch.chdir(tmp_path / "proj")  # the default ./runs, from inside that folder
    writer(Path("runs") / "b").finish("completed")
    assert sorted(list_runs(runs)["name"]) == ["a", "b"]  # what the dashboard lists: both
    with pytest.raises(InputError, match="inside the balora run"):  # a run inside a run of the runs folder: still refused
        writer(runs / "a" / "sub")


def test_a_project_folder_that_merely_looks_like_a_run_refuses_only_what_it_would_hide(tmp_path, monkeypatch):
    # A folder with a config.json and a status.json of its own (a web app, a data pipeline) is taken for a
    # run by list_runs. Every --out anywhere below it was refused, though `balora dashboard --runs PARENT`,
    # the command compare prints, lists from the run's parent down and finds it.
    monkeypatch.setenv("BALORA_RUNS", str(tmp_path / "runs"))
    project = tmp_path / "project"
    (project / "experiments").mkdir(parents=True)
    (project / "config.json").write_text("{}")
    (project / "status.json").write_text("{}")
    writer(project / "experiments" / "a").finish("completed")
    assert list(list_runs(project / "experiments")["name"]) == ["a"]
    with pytest.raises(InputError, match="inside the balora run"):  # its parent is what would be listed
        writer(project / "b")


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


def test_list_runs_expands_a_tilde_as_load_run_does(tmp_path, monkeypatch):
    # balora.list_runs("~/runs") in a notebook said "~/runs: no such directory" while load_run("~/runs/a") read it.
    monkeypatch.setenv("HOME", str(tmp_path))
    writer(tmp_path / "runs" / "a").finish("completed")
    assert list(list_runs("~/runs")["name"]) == ["a"] and load_run("~/runs/a").status == "completed"
    with pytest.raises(InputError, match=r"no user 'no_such_user_balora'.*~/"):
        list_runs("~no_such_user_balora/runs")


def test_to_table_rejects_nothing_silently():
    df = to_table("steps", steps_rows("lora", 0, [1]))
    assert list(df.columns) == list(TABLES["steps"])
    with pytest.raises((ValueError, TypeError)):
        to_table("steps", [{"arm": "lora", "seed": "zero", "lr": 0.1, "alpha": 1.0, "step": 1}])


# ------------------------------------------------------------------ damaged runs (issue 15 item 6)

GOOD_STATUS = {"status": "completed", "started": "2026-01-01T00:00:00+00:00", "updated": "2026-01-01T00:00:00+00:00",
               "finished": "2026-01-01T00:00:00+00:00", "message": None,
               "progress": {"done": 1, "total": 1, "steps_done": 3, "steps_total": 3}, "pid": 1, "host": "h"}
GOOD_CONFIG = {"task": "synthetic", "arms": ["lora"], "seeds": [0], "n_cells": 1}

DAMAGED_STATUS = {
    "null": "null", "a list": "[1, 2]", "a string": '"completed"', "a number": "3",
    "an unknown status": '{"status": "done"}', "status not a string": '{"status": 5}',
    "progress a list": '{"status": "running", "progress": [1]}',
    "progress.done a string": '{"status": "running", "progress": {"done": "1"}}',
    "progress.done huge": '{"status": "running", "progress": {"done": 1e999}}',
    "progress.total 400 digits": '{"status": "running", "progress": {"total": ' + "9" * 400 + "}}",
    "NaN": '{"status": "running", "progress": {"done": NaN}}',
    "updated a number": '{"status": "running", "updated": 5}',
    "pid a string": '{"status": "running", "pid": "x"}', "negative pid": '{"status": "running", "pid": -1}',
    "not JSON": '{"status": ', "not UTF-8": b"\xff\xfe{}",
}
DAMAGED_CONFIG = {
    "null": "null", "a list": "[]", "arms a string": '{"task": "synthetic", "arms": "lora"}',
    "seeds floats": '{"seeds": [1.5]}', "n_cells inf": '{"n_cells": 1e400}',
    "n_cells huge": '{"n_cells": 100000000000000000000000000000}', "task a list": '{"task": ["x"]}',
    "Infinity deep inside": '{"task": "synthetic", "task_options": {"x": [Infinity]}}',
}


def _run_folder(path, status=GOOD_STATUS, config=GOOD_CONFIG):
    path.mkdir(parents=True)
    for name, data in (("status.json", status), ("config.json", config)):
        if isinstance(data, bytes):
            (path / name).write_bytes(data)
        else:
            (path / name).write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize("which,variants", [("status.json", DAMAGED_STATUS), ("config.json", DAMAGED_CONFIG)])
def test_damaged_status_or_config_is_one_error_and_listed_as_damaged(tmp_path, which, variants):
    from balora.store import RunError

    _run_folder(tmp_path / "good")
    for i, (case, text) in enumerate(variants.items()):
        kw = {"status": text} if which == "status.json" else {"config": text}
        bad = _run_folder(tmp_path / f"bad{i}", **kw)
        with pytest.raises(RunError, match=which) as e:
            load_run(bad)
        assert isinstance(e.value, InputError) and str(bad) in str(e.value), case
        assert "\n" not in str(e.value), case
    df = list_runs(tmp_path).set_index("name")
    assert df.loc["good", "status"] == "completed" and pd.isna(df.loc["good", "reason"])
    damaged = df.drop(index="good")
    assert len(damaged) == len(variants) and set(damaged["status"]) == {"damaged"}
    assert all(which in r for r in damaged["reason"])
    assert load_run(tmp_path / "good").status == "completed"  # the others still load


def test_a_marked_run_without_its_status_is_listed_as_damaged(tmp_path):
    from balora.store.layout import MARKER

    _run_folder(tmp_path / "good")
    lost = _run_folder(tmp_path / "lost")
    (lost / MARKER).write_text("")
    (lost / "status.json").unlink()
    other = _run_folder(tmp_path / "model")  # an unmarked folder with only a config.json is not a run
    (other / "status.json").unlink()
    df = list_runs(tmp_path).set_index("name")
    assert sorted(df.index) == ["good", "lost"]
    assert df.loc["lost", "status"] == "damaged" and "status.json" in df.loc["lost", "reason"]


def test_special_files_named_status_or_config_never_hang(tmp_path):
    """A FIFO named status.json (opening it would block until a writer came) and /dev/zero behind
    config.json (reading it would never end): RunError at once, from load_run and list_runs. The same
    among part files: skipped with a warning, the other parts read."""
    import threading

    from balora.store import RunError

    fifo_run = _run_folder(tmp_path / "fifo")
    (fifo_run / "status.json").unlink()
    os.mkfifo(fifo_run / "status.json")
    parts_run = tmp_path / "parts"
    writer(parts_run).append("steps", steps_rows("lora", 0, [1]))
    os.mkfifo(parts_run / "steps" / "part-00002.parquet")
    (parts_run / "layers" / "part-00001.parquet").symlink_to("/dev/zero")
    zero_run = _run_folder(tmp_path / "zero")
    (zero_run / "config.json").unlink()
    (zero_run / "config.json").symlink_to("/dev/zero")
    result = {}

    def read_all():
        for run in (fifo_run, zero_run):
            try:
                load_run(run)
            except RunError as e:
                result[run.name] = str(e)
        result["parts"] = load_run(parts_run)
        result["listed"] = list_runs(tmp_path)

    t = threading.Thread(target=read_all, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "reading a FIFO or /dev/zero blocked"
    assert "FIFO" in result["fifo"] and "status.json" in result["fifo"]
    assert "symbolic link out of the run folder" in result["zero"] and "config.json" in result["zero"]  # never opened
    listed = result["listed"].set_index("name")
    assert listed.loc["parts", "status"] == "running" and "FIFO" in listed.loc["fifo", "reason"]
    assert set(listed.drop(index="parts")["status"]) == {"damaged"}
    parts = result["parts"]  # special part files are skipped with a warning, the good part is read
    assert len(parts.steps) == 1 and len(parts.warnings) == 2
    assert any("FIFO" in w for w in parts.warnings) and any("device" in w for w in parts.warnings)


def test_odd_but_valid_status_values_do_not_crash(tmp_path):
    # a hand-written status with a naive time, no pid and a missing file beside it
    run = _run_folder(tmp_path / "r", status={"status": "running", "updated": "2020-01-01T00:00:00"})
    r = load_run(run)
    assert r.status == "running" and r.stale and "not updated" in r.status_info["stale_reason"]
    assert r.warnings == ["env.json: missing"]
    (run / "status.json").unlink()
    r = load_run(run)
    assert r.status == "unknown" and "status.json: missing" in r.warnings


def test_read_status_and_run_version(tmp_path):
    from balora.store import read_status, run_version

    assert read_status(tmp_path / "nothing-yet") == {}
    w = writer(tmp_path / "run")
    assert read_status(w.path)["status"] == "running"
    v0 = run_version(w.path)
    assert run_version(w.path) == v0  # nothing changed
    w.append("steps", steps_rows("lora", 0, [1]))
    v1 = run_version(w.path)
    assert v1 != v0
    w.heartbeat({"done": 1}, force=True)
    v2 = run_version(w.path)
    assert v2 != v1 and read_status(w.path)["progress"]["done"] == 1
    w.finish("completed")
    assert run_version(w.path) != v2


# ------------------------------------------------------------------ --force deletes only balora's files (item 5)


def _finished_run(path):
    w = writer(path)
    w.append("steps", steps_rows("lora", 0, [1, 2]))
    w.append("steps", steps_rows("lora", 0, [3]))
    w.finish("completed")
    return path


def test_force_deletes_only_what_balora_wrote(tmp_path):
    from balora.store import MARKER

    run = _finished_run(tmp_path / "run")
    assert (run / MARKER).is_file()
    (run / "notes.txt").write_text("mine")
    (run / "other-tool").mkdir()
    (run / "other-tool" / "data.bin").write_bytes(b"x")
    (run / "steps" / "my-steps.csv").write_text("mine too")
    outside = tmp_path / "outside.json"
    outside.write_text("keep")
    (run / "env.json").unlink()
    (run / "env.json").symlink_to(outside)  # a link where balora's file was: removed as a link, never followed

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "part-00001.parquet").write_bytes(b"not balora's")
    (run / "layers").rename(tmp_path / "layers-moved")
    (run / "layers").symlink_to(elsewhere)  # a table folder that leads out of the run: refused before any delete
    with pytest.raises(InputError, match="layers is not a folder balora made"):
        writer(run, force=True)
    assert (elsewhere / "part-00001.parquet").exists() and list((run / "steps").glob("part-*.parquet"))
    (run / "layers").unlink()

    w = writer(run, force=True)
    assert sorted(w.kept) == ["notes.txt", "other-tool/", "steps/my-steps.csv"]
    assert (run / "notes.txt").read_text() == "mine" and (run / "other-tool" / "data.bin").exists()
    assert (run / "steps" / "my-steps.csv").exists() and outside.read_text() == "keep"
    assert not list((run / "steps").glob("part-*.parquet"))  # the old run's parts are gone
    w.finish("completed")
    assert load_run(run).steps.empty and not load_run(run).warnings


def test_force_refuses_a_foreign_folder_and_handles_old_unmarked_runs(tmp_path):
    # another tool's folder with a config.json and a status.json: not balora's, nothing deleted
    foreign = _run_folder(tmp_path / "foreign", status={"state": "ok"}, config={"model": "x"})
    (foreign / "weights.bin").write_bytes(b"w")
    before = sorted(p.name for p in foreign.iterdir())
    with pytest.raises(InputError, match="will not delete anything"):
        writer(foreign, force=True)
    assert sorted(p.name for p in foreign.iterdir()) == before

    # a run written before the marker existed (like the sample runs): only the known names go
    old = _finished_run(tmp_path / "old")
    (old / ".balora-run").unlink()
    (old / "README.md").write_text("how I made it")
    assert load_run(old).status == "completed"  # still loads without the marker
    w = writer(old, force=True)
    assert w.kept == ["README.md"] and (old / "README.md").exists()
    assert not list((old / "steps").glob("part-*.parquet"))


def test_compare_cli_force_says_what_it_kept(tmp_path, capsys):
    from balora.cli import main

    out = tmp_path / "run"
    argv = ["compare", "--out", str(out), "--arms", "lora", "--seeds", "1", "--steps", "3", "--quiet",
            "--set", "in_features=6", "--set", "out_features=5", "--rank", "2"]
    assert main(argv) == 0
    (out / "notes.txt").write_text("mine")
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    err = capsys.readouterr().err
    assert "notes.txt" in err and "did not write" in err
    assert (out / "notes.txt").read_text() == "mine" and load_run(out).status == "completed"


def test_two_writers_that_both_found_the_folder_empty_do_not_both_write(tmp_path, monkeypatch):
    """The emptiness check and the first write are two steps: two runs that both passed the check (two
    `balora compare` picking the same default folder at once) wrote into one folder, each overwriting the
    other's status and part files. The marker is created exclusively: the second writer is refused."""
    from balora.store import writer as writer_module

    out = tmp_path / "run"
    first = RunWriter(out, {"task": "first"})
    monkeypatch.setattr(writer_module, "any", lambda entries: False, raising=False)  # it checked before the first wrote
    with pytest.raises(InputError, match="another balora run"):
        RunWriter(out, {"task": "second"})
    monkeypatch.undo()
    first.append("steps", [{"arm": "lora", "seed": 0, "lr": 0.1, "alpha": 1.0, "step": 1, "loss": 1.0}])
    first.finish("completed")
    run = load_run(out)
    assert run.config["task"] == "first" and run.status == "completed" and len(run.steps) == 1


def test_run_files_linked_out_of_the_run_folder_are_not_read(tmp_path):
    """config.json or status.json linking to another run's (or any JSON file this user can read) was read as
    the run's own: the run showed another's arms and status. Such a run is damaged; a link that stays in the
    run folder is read."""
    from balora.store import RunError

    other = _run_folder(tmp_path / "other")
    run = _run_folder(tmp_path / "runs" / "mine")
    for name in ("config.json", "status.json"):
        (run / name).unlink()
        (run / name).symlink_to(other / name)
        with pytest.raises(RunError, match=f"{name}: is a symbolic link out of the run folder"):
            load_run(run)
        listed = list_runs(tmp_path / "runs").set_index("name")
        assert listed.loc["mine", "status"] == "damaged" and "symbolic link out" in listed.loc["mine", "reason"]
        (run / name).unlink()
        (run / f"real-{name}").write_bytes((other / name).read_bytes())
        (run / name).symlink_to(run / f"real-{name}")  # inside the run folder: read
        assert load_run(run).config == load_run(other).config
