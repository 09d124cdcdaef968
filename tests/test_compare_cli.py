"""`balora compare`: flag parsing, defaults, errors naming the flag, and the recorded command reproducing the run."""

import json
import shlex
import sys

import numpy as np
import pytest
import torch

from balora.cli import build_parser, main
from balora.commands.compare import config_from_args, invoked_command, print_summary
from balora.commands.formatting import num
from balora.compare_config import parse_seeds, parse_set, resolve, resolve_device
from balora.store import load_run
from balora.records import arm_summary

TINY = ["--set", "in_features=6", "--set", "out_features=5", "--rank", "2"]


def resolved(*argv):
    args = build_parser().parse_args(["compare", *argv])
    return resolve(config_from_args(args))[0]


def test_seeds_count_or_list():
    assert resolved("--seeds", "3").seeds == [0, 1, 2]
    assert resolved("--seeds", "0,4,7").seeds == [0, 4, 7]
    assert resolved("--seeds", "5,").seeds == [5]
    assert parse_seeds(2) == [0, 1] and parse_seeds([3, 1]) == [3, 1]


def test_grids_and_task_defaults():
    run = resolved("--lr", "1e-3,1e-2", "--alpha", "4,16", "--arms", "lora,balora-svd", "--optimizer", "sgd")
    assert run.lrs == [1e-3, 1e-2] and run.alphas == [4.0, 16.0] and run.arms == ["lora", "balora-svd"]
    assert run.n_cells == 2 * 8 * 2 * 2  # arms x default seeds x lrs x alphas
    default = resolved()
    assert (default.task, default.steps, default.seeds, default.optimizer) == ("synthetic", 100, list(range(8)), "adam")
    assert default.arms == ["lora", "balora", "balora-svd"]
    assert default.alphas == [float(default.rank)]  # alpha = rank: LoRA scaling 1
    assert resolved("--optimizer", "sgd").lrs != default.lrs  # the task's lr depends on the optimizer
    assert resolved("--rank", "2").alphas == [2.0]
    opts = resolved("--set", "depth=2", "--set", "target=reachable", "--set", "loraplus_lr_ratio=4", "--arms",
                    "loraplus")
    assert opts.task_options["depth"] == 2 and opts.task_options["target"] == "reachable"
    assert opts.arm_options == {"weight_decay": 0.0, "loraplus_lr_ratio": 4.0}


def test_lin_and_log_grids():
    lin = resolved("--lr", "lin:1e-5:0.3:50", "--alpha", "log:1:1000:4")
    np.testing.assert_array_equal(lin.lrs, np.linspace(1e-5, 0.3, 50))  # both ends included, as numpy's
    assert lin.lrs[0] == 1e-5 and lin.lrs[-1] == 0.3 and len(lin.lrs) == 50
    np.testing.assert_allclose(lin.alphas, [1.0, 10.0, 100.0, 1000.0], rtol=1e-12)
    assert lin.n_cells == 3 * 8 * 50 * 4
    mixed = resolved("--lr", "0.5,log:1e-3:1e-1:3")  # a comma list may hold grids
    np.testing.assert_allclose(mixed.lrs, [0.5, 1e-3, 1e-2, 1e-1], rtol=1e-12)
    assert resolved("--lr", "lin:0.2:0.2:1").lrs == [0.2]
    # the recorded command lists the values: it reproduces the grid without the grid syntax
    assert "--lr " + ",".join(repr(x) for x in lin.lrs) in lin.command_reconstructed


def test_select_is_recorded():
    assert resolved().select == "arm"
    run = resolved("--select", "seed")
    assert run.select == "seed" and "--select seed" in run.command_reconstructed


def test_set_values_are_typed():
    assert parse_set(["a=2", "b=0.5", "c=true", "d=none", "e=gpt2", "f=x=y"]) == {
        "a": 2, "b": 0.5, "c": True, "d": None, "e": "gpt2", "f": "x=y"}


@pytest.mark.parametrize("argv,flag", [
    (["--seeds", "0,x"], "--seeds"),
    (["--seeds", "0"], "--seeds"),
    (["--lr", "fast"], "--lr"),
    (["--alpha", "4,4"], "--alpha"),
    (["--steps", "0"], "--steps"),
    (["--rank", "0"], "--rank"),
    (["--arms", "lora,dora"], "--arms"),
    (["--optimizer", "lion"], "--optimizer"),
    (["--task", "nope"], "--task"),
    (["--set", "nope=1"], "--set nope"),
    (["--set", "depth"], "--set depth"),
    (["--set", "init_scale=0"], "--set init_scale"),
    (["--set", "init_scale=big"], "--set init_scale"),
    (["--dtype", "float16"], "--dtype"),
    (["--rank", "30"], "--rank"),
    (["--lr", "lin:1e-5:0.3"], "--lr lin:1e-5:0.3"),
    (["--lr", "lin:1e-5:0.3:many"], "--lr"),
    (["--lr", "lin:1e-5:0.3:0"], "--lr"),
    (["--lr", "lin:-0.1:0.3:5"], "--lr"),
    (["--lr", "log:0:0.3:5"], "--lr"),
    (["--lr", "cos:1e-5:0.3:5"], "--lr"),
    (["--lr", "lin:0.1:0.1:3"], "--lr"),
    (["--alpha", "log:4:x:3"], "--alpha"),
    (["--set", "init=kaiming"], "--set init"),
    (["--set", "shared_problem=maybe"], "--set shared_problem"),
    (["--select", "median"], "--select"),
    (["--seeds", "4294967296"], "--seeds"),  # a count: once a MemoryError
    (["--seeds", "0,99999999999999999999"], "--seeds"),  # a seed: once an overflow half-way through the run
    (["--lr", "lin:0.1:0.2:99999999999"], "--lr"),  # once a MemoryError
    (["--target-loss", "nan"], "--target-loss"),  # once recorded as null
    (["--target-loss", "-1"], "--target-loss"),
    (["--weight-decay", "-1"], "--weight-decay"),  # once a run folder marked failed, exit 1
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--weight-decay", "inf"], "--weight-decay"),  # once a "completed" run
    # an arm option for an arm not in --arms: once accepted and dropped, even from config.json
    (["--arms", "lora,balora", "--set", "loraplus_lr_ratio=4"], "--set loraplus_lr_ratio"),
    (["--arms", "loraplus", "--set", "loraplus_lr_ratio=abc"], "--set loraplus_lr_ratio"),  # once a bare ValueError
    (["--arms", "loraplus", "--set", "loraplus_lr_ratio=none"], "--set loraplus_lr_ratio"),  # once a TypeError
    (["--arms", "loraplus", "--set", "loraplus_lr_ratio=-2"], "--set loraplus_lr_ratio"),  # once B by gradient ascent
    (["--arms", "riemannian", "--set", "riemannian_reg=-1"], "--set riemannian_reg"),  # once accepted
    (["--set", "target_fraction=-1"], "--set target_fraction"),  # once a target below the best loss: "never"
    (["--set", "target_fraction=abc"], "--set target_fraction"),  # once a bare ValueError, exit 1
    (["--set", "depth=abc"], "--set depth"),  # once a bare ValueError, exit 1
    (["--set", "in_features=2.5"], "--set in_features"),  # once cut to 2, then blamed on --rank
])
def test_bad_flags_exit_2_naming_the_flag(tmp_path, capsys, argv, flag):
    out = tmp_path / "run"
    assert main(["compare", *argv, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("balora compare: error: ") and flag in err and "\n" not in err
    assert not out.exists()  # nothing is written for bad input


def test_cuda_refused_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["compare", "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert "--device cuda" in capsys.readouterr().err


@pytest.mark.parametrize("device,expected", [("cuda:1", "has 1 CUDA device(s), cuda:0 to cuda:0"),
                                             ("meta", "runs on cpu or cuda"), ("cuda:0", None)])
def test_a_device_the_machine_lacks_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch, device,
                                                                           expected):
    """cuda:N past the machine's GPUs failed inside the first cell ("invalid device ordinal") after the run
    folder was written; meta was taken as a device to train on. A one-GPU machine is simulated."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    if expected is None:
        assert resolve_device(device) == torch.device(device)
        return
    out = tmp_path / "r"
    assert main(["compare", "--device", device, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--device {device}: " in err and expected in err and "\n" not in err
    assert not out.exists()


def test_run_summary_and_the_recorded_command_reproduces_it(tmp_path, capsys):
    out = tmp_path / "first"
    argv = ["compare", "--arms", "lora,balora", "--steps", "8", "--seeds", "0,3", "--lr", "0.01,0.05",
            "--layers-every", "4", "--spectra-every", "0", *TINY, "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert f"run written to {out} (completed)" in captured.out
    assert "balora" in captured.out and "vs lora" in captured.out  # the summary table
    run = load_run(out)
    lo, hi = run.summary["target_loss"].min(), run.summary["target_loss"].max()
    assert lo < hi  # the synthetic task's target is per seed, and the caption says which
    caption = " ".join(captured.out.split())  # rich wraps the caption
    assert (f"until loss <= {num(lo, digits=4)}-{num(hi, digits=4)} (per seed), a seed that never reached it "
            "counting as never; (k/n): seeds that reached it") in caption
    s = arm_summary(run.summary).set_index("arm")
    for arm, r in s.iterrows():  # each arm's "to target" cell: its median steps and how many of 2 seeds got there
        steps = "never" if r["steps_to_target"] == float("inf") else num(r["steps_to_target"], digits=4)
        assert f"{arm} " in captured.out and f"{steps} ({int(r['reached'])}/2)" in captured.out
    assert "step/s" in captured.err or "s/step" in captured.err  # the progress bar, with its rate and ETA
    assert run.config["command"] == run.config["command_reconstructed"]  # not launched as `balora`: rebuilt
    assert len(run.summary) == 2 * 2 * 2 and len(run.spectra) == 0

    again = tmp_path / "again"
    cmd = shlex.split(run.config["command"])
    assert cmd[:2] == ["balora", "compare"]
    cmd[cmd.index("--out") + 1] = str(again)
    assert main(cmd[1:] + ["--quiet"]) == 0
    rerun = load_run(again)
    cols = ["arm", "seed", "lr", "alpha", "step", "loss"]
    key = ["arm", "seed", "lr", "step"]
    assert rerun.steps[cols].sort_values(key).reset_index(drop=True).equals(
        run.steps[cols].sort_values(key).reset_index(drop=True))

    assert main(argv) == 2  # the directory is taken now
    assert "--force" in capsys.readouterr().err
    assert main(argv + ["--force", "--quiet", "--steps", "2"]) == 0
    assert load_run(out).config["steps"] == 2


def test_invoked_command(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/bin/balora", "compare", "--seeds", "2", "--set", "model=my model"])
    assert invoked_command() == "balora compare --seeds 2 --set 'model=my model'"
    monkeypatch.setattr(sys, "argv", ["/src/balora/cli.py", "compare", "--quiet"])
    assert invoked_command() == "python -m balora.cli compare --quiet"
    monkeypatch.setattr(sys, "argv", ["pytest", "compare"])
    assert invoked_command() is None


def test_list(capsys):
    assert main(["compare", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("synthetic", "lora", "balora-svd", "loraplus", "riemannian", "sign"):
        assert name in out


def test_summary_caption_without_a_target(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["compare", "--arms", "lora,balora", "--steps", "4", "--seeds", "1", *TINY, "--out", str(out),
                 "--quiet"]) == 0
    capsys.readouterr()
    run = load_run(out)
    run.summary["target_loss"] = float("nan")
    print_summary(run)
    caption = " ".join(capsys.readouterr().out.split())
    assert "to target: median steps at the best cell (-: the run has no target loss)" in caption


def test_two_compares_in_the_same_second_get_a_folder_each(tmp_path, monkeypatch, capsys):
    """Without --out the folder is <runs>/<task>-<time to the second>: a second `balora compare` started in
    the same second (two shells, a script, the dashboard's Launch) found the first's folder, exited 2 and told
    the user to pass --force, which would have deleted the first run. It now takes <name>-2, the first intact."""
    from balora import runs_folder

    monkeypatch.setenv(runs_folder.ENV_VAR, str(tmp_path))
    monkeypatch.setattr(runs_folder.time, "strftime", lambda fmt: "20260101-000000")  # both in one second
    argv = ["compare", "--arms", "lora", "--steps", "3", "--seeds", "1", *TINY, "--quiet"]
    assert main(argv) == 0
    first = tmp_path / "synthetic-20260101-000000"
    before = load_run(first)
    for force in ([], ["--force"]):  # --force is about a folder named with --out: never the other run's
        assert main([*argv, "--optimizer", "sgd", *force]) == 0, capsys.readouterr().err
    runs = sorted(p.name for p in tmp_path.iterdir())
    assert runs == [first.name, f"{first.name}-2", f"{first.name}-3"]
    after = load_run(first)
    assert after.status == "completed" and after.config == before.config
    assert after.steps.equals(before.steps) and after.config["optimizer"] == "adam"
    for name in runs[1:]:
        second = load_run(tmp_path / name)
        assert second.status == "completed" and second.config["optimizer"] == "sgd"
        assert second.config["out"] == str(tmp_path / name)
        assert f"--out {tmp_path / name}" in second.config["command_reconstructed"]
    assert f"run written to {tmp_path / runs[-1]}" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["--out", "runs folder"])
def test_an_out_that_cannot_be_created_is_one_line_exit_2(tmp_path, monkeypatch, capsys, where):
    """--out (or $BALORA_RUNS) under a file, or in a folder the user cannot write to, is bad input: it gave
    "error: NotADirectoryError: [Errno 20] ... (rerun with --debug for the traceback)" and exit 1, the code
    kept for bugs, without naming the flag."""
    from balora import runs_folder

    (tmp_path / "file").write_text("x")
    argv = ["compare", "--arms", "lora", "--steps", "2", "--seeds", "1", *TINY, "--quiet"]
    if where == "--out":
        argv += ["--out", str(tmp_path / "file" / "run")]
    else:
        monkeypatch.setenv(runs_folder.ENV_VAR, str(tmp_path / "file"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    flag = "--out" if where == "--out" else "$BALORA_RUNS"  # the setting to change
    assert err.startswith(f"balora compare: error: {flag} {tmp_path / 'file'}/") and "\n" not in err
    assert "--debug" not in err and (tmp_path / "file").read_text() == "x"


def test_out_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch, capsys):
    """`--out=~/runs/x` reaches balora unexpanded (a shell expands ~ only at the start of a word): the run's
    JSON files went to a folder literally named ~ in the current folder, then pandas, which expands ~ itself,
    wrote the first table under the real home, failed there, and the run ended "failed" with exit 1."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert main(["compare", "--arms", "lora", "--steps", "2", "--seeds", "1", *TINY, "--quiet", "--out=~/x"]) == 0
    assert f"run written to {home / 'x'} (completed)" in capsys.readouterr().out
    run = load_run(home / "x")
    assert run.status == "completed" and len(run.steps) == 2 and run.config["out"] == str(home / "x")
    assert load_run("~/x").status == "completed"
    assert list(cwd.iterdir()) == []  # no folder named ~


@pytest.mark.parametrize("seeds", ["4,", "0,", "0,4", "2"])
def test_the_reconstructed_command_names_the_same_seeds(seeds):
    """One seed was written as `--seeds 4`, which reads back as a count: seeds 0..3 (a different run),
    and `--seeds 0` as an error."""
    run = resolved("--seeds", seeds)
    argv = shlex.split(run.command_reconstructed)
    assert argv[:2] == ["balora", "compare"]
    assert resolved(*argv[2:]).seeds == run.seeds


def test_ctrl_c_before_the_run_writes_names_no_older_run(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the task was still being built (before this run wrote anything) said 'run left in
    OUT (marked completed)' of the older run already in --out; only a status this run wrote is named."""
    import balora.runner
    from balora.store import STATUS

    out = tmp_path / "r"
    assert main(["compare", "--arms", "lora", "--steps", "2", "--seeds", "1", *TINY, "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    old = (out / STATUS).read_text()

    def interrupted_while_building(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(balora.runner, "run_compare", interrupted_while_building)
    assert main(["compare", "--arms", "lora", "--steps", "2", "--seeds", "1", *TINY, "--out", str(out), "--force"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "left in" not in err and (out / STATUS).read_text() == old

    def interrupted_after_writing(cfg):  # this run's own status: named, as marked
        status = json.loads(old)
        status["status"] = "interrupted"
        (out / STATUS).write_text(json.dumps(status))
        raise KeyboardInterrupt

    monkeypatch.setattr(balora.runner, "run_compare", interrupted_after_writing)
    assert main(["compare", "--arms", "lora", "--steps", "2", "--seeds", "1", *TINY, "--out", str(out), "--force"]) == 130
    assert f"partial run left in {out} (marked interrupted" in capsys.readouterr().err


def test_an_out_holding_something_else_does_not_suggest_force(tmp_path, capsys):
    """--out naming a non-empty folder that is not a balora run said "choose another path or pass --force to
    replace a previous run there", and the suggested --force was then refused ("not a balora run, so --force
    will not delete anything"). Only a folder holding a balora run is offered --force now."""
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    argv = ["compare", "--arms", "lora", "--steps", "2", "--seeds", "1", *TINY, "--quiet", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--force" not in err and "not a balora run" in err and "\n" not in err
    assert main(argv + ["--force"]) == 2  # what the message no longer suggests is indeed refused
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json"]

    run = tmp_path / "run"
    assert main(["compare", "--arms", "lora", "--steps", "2", "--seeds", "1", *TINY, "--quiet", "--out", str(run)]) == 0
    capsys.readouterr()
    again = ["compare", "--arms", "lora", "--steps", "3", "--seeds", "1", *TINY, "--quiet", "--out", str(run)]
    assert main(again) == 2  # a balora run there: --force is offered, and works
    assert "pass --force" in capsys.readouterr().err
    assert main(again + ["--force"]) == 0 and load_run(run).config["steps"] == 3


def test_ctrl_c_names_the_run_it_wrote_whatever_the_filesystem_clock(tmp_path, monkeypatch, capsys):
    """Whether this run wrote --out's status.json was told by its mtime >= the time the command started. Linux
    stamps files from a coarse clock, up to a tick (~4 ms) behind time.time(), so a status written just after
    the start could read as older and 'partial run left in OUT' went unsaid (test above, flaky under load).
    The status file is now compared with what --out held before the run."""
    import os

    import balora.runner
    from balora.store import STATUS

    out = tmp_path / "r"
    assert main(["compare", "--arms", "lora", "--steps", "2", "--seeds", "1", *TINY, "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    older = json.loads((out / STATUS).read_text())
    old_mtime = os.stat(out / STATUS).st_mtime

    def interrupted_after_writing(cfg):  # this run's status, stamped as a coarse clock may stamp it
        (out / STATUS).write_text(json.dumps({**older, "status": "interrupted"}))
        os.utime(out / STATUS, (old_mtime + 1e-3, old_mtime + 1e-3))  # before this command started
        raise KeyboardInterrupt

    monkeypatch.setattr(balora.runner, "run_compare", interrupted_after_writing)
    argv = ["compare", "--arms", "lora", "--steps", "2", "--seeds", "1", *TINY, "--out", str(out), "--force"]
    assert main(argv) == 130
    assert f"partial run left in {out} (marked interrupted" in capsys.readouterr().err
