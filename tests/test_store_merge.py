"""Rolling merges of a live run's parts: every row read once by a reader at any moment, a crash at any
step of a merge leaves a loadable run, few parts per table while the run is live."""

import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from balora.errors import InputError
from balora.store import RunWriter, load_run
from balora.store.layout import table_parts


def writer(path, k=4):
    w = RunWriter(path, {"task": "synthetic", "arms": ["lora"], "seeds": [0], "n_cells": 1}, {"python": "x"})
    w.merge_every = k
    return w


def cell_rows(cell, n_steps):
    """One cell's steps rows: the cell is told apart by its seed, its rows by step; loss is arbitrary data."""
    rng = np.random.default_rng(cell)
    return pd.DataFrame({"arm": "lora", "seed": cell, "lr": 0.1, "alpha": 4.0, "step": np.arange(1, n_steps + 1),
                         "loss": rng.standard_normal(n_steps)})


def same_rows(got: pd.DataFrame, written: list[pd.DataFrame]) -> bool:
    """The loaded steps hold exactly the rows written (each once), whatever their order."""
    want = pd.concat(written, ignore_index=True) if written else cell_rows(0, 0)
    cols = ["seed", "step", "loss"]
    a = got[cols].sort_values(["seed", "step"]).to_numpy(dtype=float)
    b = want[cols].sort_values(["seed", "step"]).to_numpy(dtype=float)
    return a.shape == b.shape and np.array_equal(a, b)


def part_files(path, table="steps"):
    return sorted(p.name for p in (Path(path) / table).iterdir())


def test_a_live_run_keeps_few_parts_and_every_row(tmp_path, monkeypatch):
    k, n = 3, 40
    w = writer(tmp_path / "run", k)
    rewritten, write_part = [], w._write_part

    def count_merged_rows(table, df, first, last=None):
        if last not in (None, first):
            rewritten.append(len(df))
        return write_part(table, df, first, last)

    monkeypatch.setattr(w, "_write_part", count_merged_rows)
    written = []
    for cell in range(n):
        written.append(cell_rows(cell, 1 + cell % 5))
        w.append("steps", written[-1])
        live, covered = table_parts(w.path / "steps")
        levels = math.floor(math.log(cell + 1, k)) + 1
        assert len(live) <= (k - 1) * levels and not covered, (cell, part_files(w.path))
        run = load_run(w.path)
        assert same_rows(run.steps, written) and not run.warnings, cell
    rows = sum(map(len, written))
    assert 0 < sum(rewritten) <= rows * math.ceil(math.log(n, k))  # each row rewritten once per size class
    w.finish("completed")
    assert len(part_files(w.path)) == 1
    run = load_run(w.path)
    assert same_rows(run.steps, written) and not run.warnings


def test_a_reader_in_a_loop_while_the_writer_merges(tmp_path):
    """A writer appending (and merging every 2 parts) in a thread; load_run in a loop meanwhile: each load
    holds the first m cells written, each row once, and no warning."""
    w = writer(tmp_path / "run", 2)
    written, done, stop = [], threading.Event(), threading.Event()

    def write():
        try:
            for cell in range(300):
                if stop.is_set():  # the test failed: no writing on under the next test's patches
                    return
                written.append(cell_rows(cell, 3))  # first: a load may see the part before append returns
                w.append("steps", written[-1])
        finally:
            done.set()

    thread = threading.Thread(target=write)
    thread.start()
    loads, merged_seen = 0, 0
    try:
        while not done.is_set() or loads == 0:
            run = load_run(w.path)
            m = run.steps["seed"].nunique()
            assert not run.warnings, run.warnings
            assert same_rows(run.steps, written[:m]) and set(run.steps["seed"]) == set(range(m)), m
            loads += 1
            merged_seen += any("-" in p.name[5:] for *_, p in table_parts(w.path / "steps")[0])
    finally:
        stop.set()
        thread.join()
    assert loads > 1 and merged_seen
    assert same_rows(load_run(w.path).steps, written)


@pytest.mark.parametrize("where", ["parts listed, then merged", "merged part written", "one part deleted"])
def test_a_load_at_each_step_of_a_merge_reads_every_row_once(tmp_path, monkeypatch, where):
    w = writer(tmp_path / "run", 4)
    written = [cell_rows(c, 2) for c in range(4)]
    for rows in written[:3]:
        w.append("steps", rows)
    seen = []
    if where == "parts listed, then merged":  # the reader lists 3 parts; the 4th append merges all 4 away
        read = pd.read_parquet

        def merge_first(path, *a, **kw):
            if not seen:
                seen.append(True)
                w.append("steps", written[3])
            return read(path, *a, **kw)

        monkeypatch.setattr(pd, "read_parquet", merge_first)
        run = load_run(w.path)
        assert seen and same_rows(run.steps, written) and not run.warnings
        assert part_files(w.path) == ["part-00001-00004.parquet"]
        return
    real_replace, real_unlink = os.replace, Path.unlink

    def replace_then_load(src, dst):
        real_replace(src, dst)
        if "part-00001-00004" in str(dst) and where == "merged part written":
            seen.append(load_run(w.path))

    def unlink_then_load(self, *a, **kw):
        real_unlink(self, *a, **kw)
        if where == "one part deleted" and not seen:
            seen.append(load_run(w.path))

    monkeypatch.setattr(os, "replace", replace_then_load)
    monkeypatch.setattr(Path, "unlink", unlink_then_load)
    w.append("steps", written[3])
    assert len(seen) == 1 and same_rows(seen[0].steps, written) and not seen[0].warnings


class Killed(BaseException):
    """The writing process killed at this point (nothing after it runs)."""


@pytest.mark.parametrize("step", ["temporary file written", "merged part renamed", "one part deleted"])
def test_a_crash_at_each_step_of_a_merge_leaves_a_loadable_run(tmp_path, monkeypatch, step):
    w = writer(tmp_path / "run", 4)
    written = [cell_rows(c, 1 + c) for c in range(4)]
    for rows in written[:3]:
        w.append("steps", rows)
    real_replace, real_unlink = os.replace, Path.unlink

    def replace(src, dst):
        if "part-00001-00004" in str(dst):
            if step == "temporary file written":
                raise Killed
            real_replace(src, dst)
            if step == "merged part renamed":
                raise Killed
        else:
            real_replace(src, dst)

    def unlink(self, *a, **kw):
        real_unlink(self, *a, **kw)
        if step == "one part deleted":
            raise Killed

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(Killed):
        w.append("steps", written[3])
    monkeypatch.undo()
    run = load_run(w.path)
    assert same_rows(run.steps, written) and not run.warnings, part_files(w.path)
    # a resumed writer (RunRecorder.reopen) merges what is there and removes what the merge left
    resumed = RunWriter.reopen(w.path, keep_through=10**6)
    more = cell_rows(4, 2)
    resumed.append("steps", more)
    resumed.finish("completed")
    run = load_run(w.path)
    assert same_rows(run.steps, [*written, more]) and not run.warnings
    assert len(part_files(w.path)) == 1


def test_a_load_while_the_finished_run_is_merged_warns_of_nothing(tmp_path, monkeypatch):
    # The merge at finish() wrote the merged part, then deleted the others: a reload in between read
    # both, dropped the copies and warned "duplicate row(s) dropped (an interrupted merge of parts)".
    w = writer(tmp_path / "run", 0)  # no rolling merges: the finish merges all three parts
    written = [cell_rows(c, 2) for c in range(3)]
    for rows in written:
        w.append("steps", rows)
    seen = []
    real_replace = os.replace

    def replace_then_load(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".parquet") and "steps" in str(dst):
            seen.append(load_run(w.path))

    monkeypatch.setattr(os, "replace", replace_then_load)
    w.finish("completed")
    assert len(seen) == 1 and same_rows(seen[0].steps, written) and not seen[0].warnings


def test_a_failing_rolling_merge_keeps_the_parts_and_the_run_going(tmp_path, monkeypatch):
    w = writer(tmp_path / "run", 2)
    monkeypatch.setattr(pd, "read_parquet", lambda *a, **kw: (_ for _ in ()).throw(OSError("disk gone")))
    written = [cell_rows(c, 2) for c in range(3)]
    for rows in written:
        w.append("steps", rows)  # the merge fails: the appends go on
    monkeypatch.undo()
    assert len(part_files(w.path)) == 3 and "disk gone" in w._roll_failed["steps"]
    assert same_rows(load_run(w.path).steps, written)
    w.finish("completed")
    assert same_rows(load_run(w.path).steps, written) and len(part_files(w.path)) == 1


def test_old_plain_part_names_load_as_before(tmp_path):
    """A run written before merged parts named their range: its parts (and a finish merge cut short, the
    merged copy numbered after them) load as they did, duplicates dropped with the warning."""
    w = writer(tmp_path / "run", 0)
    written = [cell_rows(c, 2) for c in range(3)]
    for rows in written:
        w.append("steps", rows)
    pd.concat(written).to_parquet(w.path / "steps" / "part-00004.parquet", index=False)
    run = load_run(w.path)
    assert same_rows(run.steps, written) and any("duplicate" in m for m in run.warnings)


def test_parts_over_the_size_cap_wait_for_the_finish(tmp_path):
    """merge_max_bytes bounds what one rolling merge rewrites (the training loop waits for it)."""
    w = writer(tmp_path / "run", 2)
    written = [cell_rows(c, 2000) for c in range(8)]  # rows enough that data, not the footer, sets the size
    w.merge_max_bytes = 0
    w.append("steps", written[0])
    # two parts of one append fit under the cap and merge; two merged ones (twice the data) do not
    w.merge_max_bytes = 2.5 * (w.path / "steps" / "part-00001.parquet").stat().st_size
    for rows in written[1:]:
        w.append("steps", rows)
    assert part_files(w.path) == ["part-00001-00002.parquet", "part-00003-00004.parquet",
                                  "part-00005-00006.parquet", "part-00007-00008.parquet"]
    assert same_rows(load_run(w.path).steps, written)
    w.finish("completed")
    assert part_files(w.path) == ["part-00001-00008.parquet"] and same_rows(load_run(w.path).steps, written)


def test_force_clears_merged_parts_and_their_temporary_names(tmp_path):
    w = writer(tmp_path / "run", 2)
    for c in range(3):
        w.append("steps", cell_rows(c, 2))
    (w.path / "steps" / ".part-00003-00004.parquet.tmp").write_bytes(b"a merge cut short")
    assert part_files(w.path) == [".part-00003-00004.parquet.tmp", "part-00001-00002.parquet", "part-00003.parquet"]
    again = RunWriter(w.path, {"task": "synthetic"}, {}, force=True)
    assert again.kept == [] and part_files(w.path) == []


def test_files_force_leaves_are_not_read_or_merged_by_the_next_run(tmp_path):
    """`part-1.parquet` (not a name balora writes) beside `part-00001.parquet` is another tool's file:
    --force leaves it, so the new run written there must neither read its rows nor merge it away."""
    w = writer(tmp_path / "run", 0)
    w.append("steps", cell_rows(9, 2))
    w.finish("completed")
    foreign = {"part-0.parquet": cell_rows(7, 1), "part-1.parquet": cell_rows(8, 1),
               "part-\u0661.parquet": cell_rows(6, 1), "part-00002.parquet\n": cell_rows(5, 1)}
    for name, rows in foreign.items():
        rows.to_parquet(w.path / "steps" / name, index=False)
    again = RunWriter(w.path, {"task": "synthetic"}, {}, force=True)
    assert sorted(again.kept) == sorted(f"steps/{n}" for n in foreign)
    written = [cell_rows(c, 3) for c in range(2)]
    for rows in written:
        again.append("steps", rows)
    run = load_run(again.path)
    assert same_rows(run.steps, written) and run.warnings == []
    again.finish("completed")
    assert same_rows(load_run(again.path).steps, written)
    assert set(foreign) <= set(part_files(again.path))  # still there, untouched


def test_a_part_linked_out_of_the_run_folder_is_not_read(tmp_path):
    """A run folder someone else made: a part that links to a file elsewhere (another run's rows) is
    skipped with a warning; a link inside the run folder is read."""
    elsewhere = writer(tmp_path / "other", 0)
    elsewhere.append("steps", cell_rows(7, 3))
    w = writer(tmp_path / "run", 0)
    written = [cell_rows(0, 2)]
    w.append("steps", written[0])
    (w.path / "steps" / "part-00002.parquet").symlink_to(elsewhere.path / "steps" / "part-00001.parquet")
    run = load_run(w.path)
    assert same_rows(run.steps, written)
    assert [m for m in run.warnings if "part-00002" in m and "out of the run folder" in m]
    os.replace(w.path / "steps" / "part-00001.parquet", w.path / "kept.parquet")
    (w.path / "steps" / "part-00001.parquet").symlink_to(w.path / "kept.parquet")
    assert same_rows(load_run(w.path).steps, written)


def test_a_part_missing_from_the_numbering_is_warned_of(tmp_path):
    """A gap that listing again does not close (a part removed by hand) is named, not passed over."""
    w = writer(tmp_path / "run", 0)
    written = [cell_rows(c, 2) for c in range(6)]
    for rows in written:
        w.append("steps", rows)
    for n in (2, 4, 5):
        (w.path / "steps" / f"part-0000{n}.parquet").unlink()
    run = load_run(w.path)
    assert same_rows(run.steps, [written[i] for i in (0, 2, 5)])
    assert [m for m in run.warnings if m.startswith("steps:") and "2, 4-5 missing" in m]


@pytest.mark.parametrize("kind", ["directory", "link out"])
def test_a_merge_leaves_what_is_named_like_a_part_but_is_not_one(tmp_path, kind):
    """A crafted folder (what --force leaves as another's): a directory named like a part was read as a pandas
    dataset by the finish merge, and a part linked out of the run had its target's rows merged in and the link
    deleted. The merge now refuses to read or delete them; the run still loads, its own rows once."""
    w = writer(tmp_path / "run", k=100)  # no rolling merge: the finish merges
    written = []
    for cell in range(2):
        written.append(cell_rows(cell, 3))
        w.append("steps", written[-1])
    odd = tmp_path / "run" / "steps" / "part-00003.parquet"
    if kind == "directory":
        odd.mkdir()
    else:
        outside = tmp_path / "elsewhere.parquet"
        cell_rows(7, 3).to_parquet(outside)
        odd.symlink_to(outside)
    w._parts["steps"] = 3  # the writer's next part comes after it
    written.append(cell_rows(2, 3))
    w.append("steps", written[-1])
    w.finish("completed")
    assert "not a regular file" in w.status["message"] and str(odd) in w.status["message"]
    assert os.path.lexists(odd) and (kind == "directory" or (tmp_path / "elsewhere.parquet").is_file())
    run = load_run(tmp_path / "run")
    assert same_rows(run.steps, written)
    assert any("part-00003.parquet" in m for m in run.warnings)



@pytest.fixture
def live_writer(tmp_path):
    """Another process writing a run at tmp_path / "run" (one part appended), alive until the test ends."""
    path = tmp_path / "run"
    script = ("import sys; from balora.store import RunWriter; "
              f"w = RunWriter({str(path)!r}, {{'task': 'synthetic'}}, {{}}); "
              "w.append('steps', [dict(arm='lora', seed=0, lr=0.1, alpha=1.0, step=1, loss=2.0)]); "
              "print('open', flush=True); sys.stdin.readline()")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "open"
        yield path, proc
    finally:
        proc.kill()
        proc.wait()


def test_a_run_still_written_by_another_process_is_not_reopened(live_writer):
    """A training resumed (RunRecorder -> RunWriter.reopen) while the first process still writes the run:
    both numbered their parts from the same count and replaced and merged away each other's, so the
    loaded run silently lacked cells of both. Refused while that process lives; resumed once it is gone."""
    path, first = live_writer
    with pytest.raises(InputError, match=f"process {first.pid} on this machine is still writing"):
        RunWriter.reopen(path, keep_through=10**6)
    first.kill()
    first.wait()
    resumed = RunWriter.reopen(path, keep_through=10**6)  # its writer is gone: taken up
    resumed.append("steps", cell_rows(1, 3))
    resumed.finish("completed")
    assert list(load_run(path).steps["seed"]) == [0, 1, 1, 1]


def test_force_over_a_run_another_process_still_writes_is_refused(live_writer):
    """`balora compare --out X --force` while an earlier compare still wrote X deleted its files and both wrote
    on: the new run loaded "completed" with the old run's arms and seeds mixed into its rows. Refused, nothing
    deleted; replaced once that process is gone."""
    path, first = live_writer
    before = part_files(path)
    with pytest.raises(InputError, match=f"process {first.pid} on this machine is still writing"):
        RunWriter(path, {"task": "synthetic"}, {}, force=True)
    assert part_files(path) == before and load_run(path).status == "running"
    first.kill()
    first.wait()
    RunWriter(path, {"task": "synthetic"}, {}, force=True).finish("completed")
    assert load_run(path).steps.empty


def test_a_run_another_process_still_writes_is_not_offered_force(live_writer):
    """Without --force, a run another live process still writes was answered "choose another path or pass
    --force ... to replace the balora run there", and that --force was then refused ("process N ... is still
    writing this run"). The live writer is named at once; the refusal stays RunFolderTaken, so a default
    folder name taken by a compare started in the same second still moves on to the next name."""
    from balora.store import RunFolderTaken

    path, first = live_writer
    with pytest.raises(RunFolderTaken, match=f"process {first.pid} on this machine is still writing") as e:
        RunWriter(path, {"task": "synthetic"}, {})
    assert "--force" not in str(e.value) and load_run(path).status == "running"
    first.kill()
    first.wait()
    with pytest.raises(RunFolderTaken, match="pass --force"):  # its writer gone: --force is offered, and works
        RunWriter(path, {"task": "synthetic"}, {})
