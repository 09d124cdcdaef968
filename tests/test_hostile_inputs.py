"""Hostile adapter folders (issue 15): nothing is read from outside the folder given, nothing hangs,
nothing but the adapter's own files is copied, every input error is a one-line message with exit
code 2, and no temporary folder outlives `balora balance`, whatever stops it.

Every input is crafted here in tmp_path: symlinks out of the folder, FIFOs, links to /dev/zero,
backtracking rank_pattern keys, control characters in key names, kills during a balance. Tests
that could hang if a bug came back carry a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import balora
from balora.adapters import peft_config
from balora.cli import main
from balora.errors import InputError

R = 2
CONFIG = {"peft_type": "LORA", "r": R, "lora_alpha": 4}
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
needs_dev_zero = pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")


def tensors(modules=("layers.0.proj", "layers.1.proj"), prefix="base_model.model.") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for m in modules:
        out[f"{prefix}{m}.lora_A.weight"] = torch.randn(R, 6, generator=g)
        out[f"{prefix}{m}.lora_B.weight"] = torch.randn(5, R, generator=g)
    return out


def write_peft(folder: Path, config=None, weights=None, metadata=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG if config is None else config))
    save_file(tensors() if weights is None else weights, str(folder / "adapter_model.safetensors"),
              metadata=metadata or {"format": "pt"})
    return folder


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_input_error(capsys, phrase: str, *argv) -> str:
    """Exit code 2 and a one-line message containing `phrase`."""
    rc, _, err = cli(capsys, *argv)
    assert rc == 2, f"exit {rc}: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert phrase in lines[0], lines[0]
    return lines[0]


# ---- 1. links out of the folder, special files, what a balanced copy holds -------------------------


@pytest.mark.timeout(120)
@needs_fifo
def test_balance_copies_only_the_adapter_files_as_regular_files(tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0 SECRET")
    src = write_peft(tmp_path / "in")
    (src / "README.md").write_text("# my adapter")
    os.chmod(src / "README.md", 0o4755)  # setuid: a copy made by root must not carry it
    (src / "merges.txt").symlink_to(src / "README.md")  # a link inside the folder: copied as a file
    (src / "tokenizer_config.json").symlink_to(secret)  # adapter-file name, but leads out of the folder
    (src / "vocab.txt").symlink_to("/dev/zero") if os.path.exists("/dev/zero") else None
    os.mkfifo(src / "special_tokens_map.json")  # reading it would block forever
    (src / "notes.txt").write_text("not part of an adapter")
    (src / "data").mkdir()
    (src / "data" / "big.bin").write_bytes(b"x" * 10)
    sock = None
    if len(str(src / "added_tokens.json")) < 100:  # AF_UNIX paths are short
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(src / "added_tokens.json"))
    try:
        out = tmp_path / "out"
        rc, stdout, err = cli(capsys, "balance", src, out)
    finally:
        if sock is not None:
            sock.close()
    assert rc == 0, err
    written = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    assert written == {"adapter_config.json", "adapter_model.safetensors", "README.md", "merges.txt"}
    for p in out.rglob("*"):
        assert p.is_file() and not p.is_symlink(), p
        assert b"SECRET" not in p.read_bytes()
    assert (out / "merges.txt").read_text() == "# my adapter"
    assert not (out / "README.md").stat().st_mode & (0o4000 | 0o2000)
    assert "left out of the copy" in stdout
    for name in ("tokenizer_config.json", "special_tokens_map.json", "notes.txt", "data"):
        assert name in stdout, name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_inspect_and_balance_refuse_links_out_of_the_folder(tmp_path, capsys):
    elsewhere = write_peft(tmp_path / "elsewhere")
    linked_config = tmp_path / "linked_config"
    linked_config.mkdir()
    (linked_config / "adapter_config.json").symlink_to(elsewhere / "adapter_config.json")
    save_file(tensors(), str(linked_config / "adapter_model.safetensors"))
    linked_weights = tmp_path / "linked_weights"
    linked_weights.mkdir()
    (linked_weights / "adapter_config.json").write_text(json.dumps(CONFIG))
    (linked_weights / "adapter_model.safetensors").symlink_to(elsewhere / "adapter_model.safetensors")
    for case in (linked_config, linked_weights):
        line = assert_input_error(capsys, "outside the folder", "inspect", case)
        assert str(elsewhere) in line
        assert_input_error(capsys, "outside the folder", "balance", case, tmp_path / f"{case.name}.out")
        with pytest.raises(InputError, match="outside the folder"):
            balora.inspect(case)
        with pytest.raises(InputError, match="outside the folder"):
            balora.balance_file(case, tmp_path / f"{case.name}.lib")
    assert not list(tmp_path.glob("*.out")) and not list(tmp_path.glob("*.lib"))


def test_links_inside_the_folder_and_hub_cache_snapshots_are_read(tmp_path):
    inside = write_peft(tmp_path / "inside")
    (inside / "real.safetensors").write_bytes((inside / "adapter_model.safetensors").read_bytes())
    (inside / "adapter_model.safetensors").unlink()
    (inside / "adapter_model.safetensors").symlink_to("real.safetensors")
    assert len(balora.inspect(inside)) == 2
    # huggingface_hub's cache: snapshot files are links into the repository's blobs/
    repo = tmp_path / "hub" / "models--user--adapter"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    write_peft(blobs)
    snap.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        os.rename(blobs / name, blobs / f"hash-{name}")
        (snap / name).symlink_to(Path("..", "..", "blobs", f"hash-{name}"))
    df = balora.inspect(snap)
    assert list(df["module"]) == ["layers.0.proj", "layers.1.proj"]
    sub = snap / "adapter2"  # an adapter in a subfolder of the snapshot links three levels up
    sub.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (sub / name).symlink_to(Path("..", "..", "..", "blobs", f"hash-{name}"))
    assert list(balora.inspect(sub)["module"]) == ["layers.0.proj", "layers.1.proj"]


def test_trainer_checkpoint_linked_from_elsewhere_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    write_peft(run / "checkpoint-5")
    write_peft(tmp_path / "other" / "checkpoint-9")
    (run / "checkpoint-9").symlink_to(tmp_path / "other" / "checkpoint-9")
    assert_input_error(capsys, "outside the folder", "inspect", run)


@pytest.mark.timeout(60)
@needs_fifo
def test_special_files_named_like_weights_or_configs_never_block(tmp_path, capsys):
    fifo_weights = tmp_path / "fifo_weights"
    fifo_weights.mkdir()
    (fifo_weights / "adapter_config.json").write_text(json.dumps(CONFIG))
    os.mkfifo(fifo_weights / "adapter_model.safetensors")
    assert_input_error(capsys, "FIFO", "inspect", fifo_weights)
    fifo_config = tmp_path / "fifo_config"
    fifo_config.mkdir()
    os.mkfifo(fifo_config / "adapter_config.json")
    save_file(tensors(), str(fifo_config / "adapter_model.safetensors"))
    assert_input_error(capsys, "FIFO", "inspect", fifo_config)
    assert_input_error(capsys, "FIFO", "balance", fifo_config, tmp_path / "out")
    os.mkfifo(tmp_path / "direct.safetensors")
    assert_input_error(capsys, "FIFO", "inspect", tmp_path / "direct.safetensors")
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(60)
@needs_dev_zero
def test_links_to_dev_zero_are_refused(tmp_path, capsys):
    folder = tmp_path / "zero"
    folder.mkdir()
    (folder / "adapter_config.json").symlink_to("/dev/zero")
    save_file(tensors(), str(folder / "adapter_model.safetensors"))
    assert_input_error(capsys, "outside the folder", "inspect", folder)
    named = tmp_path / "zero.safetensors"  # a file the user names directly is still only read if regular
    named.symlink_to("/dev/zero")
    assert_input_error(capsys, "character device", "inspect", named)


# ---- 2. configs: size cap ----------------------------------------------------------------------


def test_oversized_config_is_refused(tmp_path, capsys):
    folder = write_peft(tmp_path / "big")
    cfg = dict(CONFIG, padding="x" * (5 * 2**20))  # valid JSON, 5 MB
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    assert_input_error(capsys, "more than the 4.0 MB", "inspect", folder)


# ---- 3. rank_pattern / alpha_pattern keys ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_backtracking_pattern_key_is_refused_with_its_name(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(peft_config, "PATTERN_SECONDS", 0.3)
    module = "a" * 40  # '(a|aa)+b' tries every way to split it into a's and aa's: ~1e8 paths
    weights = tensors(modules=[module])
    folder = write_peft(tmp_path / "evil", dict(CONFIG, rank_pattern={"q_proj": 8, "(a|aa)+b": 4}), weights)
    t0 = time.perf_counter()
    line = assert_input_error(capsys, "rank_pattern key '(a|aa)+b' takes over 0.3 s", "inspect", folder)
    assert time.perf_counter() - t0 < 30, line


@pytest.mark.timeout(60)
def test_nested_star_key_matches_as_peft_would(tmp_path):
    # re needs minutes for '(.*)*x' against a long name with no x; the answer is still "no match".
    folder = write_peft(tmp_path / "nested", dict(CONFIG, alpha_pattern={"(.*)*x": 64, "layers.1.proj": 8}))
    df = balora.inspect(folder)
    assert list(df["scaling"]) == [4 / R, 8 / R]


PATTERNS = ["q_proj", "v_proj", r"layers\.1\..*", "layers.0.proj", "proj", r"model\.layers\.(0|2)\.mlp\..*",
            "mlp.down_proj", r".*\.k_proj", "lm_head", "^layers.1.proj", "layers[.]1[.]proj"]
MODULES = ["layers.0.proj", "layers.1.proj", "model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj",
           "model.layers.12.self_attn.k_proj", "lm_head", "q_proj", "model.layers.1.self_attn.q_proj_extra"]


@pytest.mark.parametrize("start", range(0, len(PATTERNS), 3))
def test_pattern_matching_equals_peft(start):
    from peft.utils.other import get_pattern_key

    keys = PATTERNS[start:] + PATTERNS[:start]  # PEFT takes the first key that matches: order matters
    for module in MODULES:
        assert peft_config.get_pattern_key(keys, module) == get_pattern_key(keys, module), module


def test_overlong_or_invalid_pattern_keys(tmp_path, capsys):
    folder = write_peft(tmp_path / "long", dict(CONFIG, rank_pattern={"a" * 5000: 2}))
    assert_input_error(capsys, "5000 characters long", "inspect", folder)


# ---- 7. no stray temporary folders ----------------------------------------------------------------

_SLOW_BALANCE = textwrap.dedent("""
    import pathlib, sys, time
    import balora.inspection as ins
    real = ins.write_weights
    def slow(*args, **kwargs):  # the copy is half built when the signal comes
        real(*args, **kwargs)
        pathlib.Path(sys.argv[3]).write_text("ready")
        time.sleep(120)
    ins.write_weights = slow
    from balora.cli import main
    sys.exit(main(["balance", sys.argv[1], sys.argv[2]]))
""")


def _start_slow_balance(tmp_path: Path, src: Path, out: Path):
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_BALANCE, str(src), str(out), str(ready)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the balance never reached the write"
        time.sleep(0.1)
    temporaries = [p for p in tmp_path.iterdir() if p.name.endswith(".balora-tmp")]
    assert len(temporaries) == 1 and f".{os.getpid()}." not in temporaries[0].name
    return proc


@pytest.mark.timeout(200)
@pytest.mark.parametrize("sig", [s for s in ("SIGTERM", "SIGHUP") if hasattr(signal, s)])
def test_signal_during_balance_leaves_nothing(tmp_path, sig):
    src, out = write_peft(tmp_path / "in"), tmp_path / "out"
    proc = _start_slow_balance(tmp_path, src, out)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "ready"]


@pytest.mark.timeout(200)
def test_temporary_folder_of_a_killed_balance_is_removed_by_the_next(tmp_path, capsys):
    src, out = write_peft(tmp_path / "in"), tmp_path / "out"
    proc = _start_slow_balance(tmp_path, src, out)
    proc.kill()  # SIGKILL: no cleanup is possible in the process itself
    proc.communicate(timeout=60)
    (stale,) = [p for p in tmp_path.iterdir() if p.name.endswith(".balora-tmp")]
    # A temporary folder of a process that still runs (this one) is left alone.
    live = tmp_path / f".out.{os.getpid()}.abc.balora-tmp"
    live.mkdir()
    rc, _, err = cli(capsys, "balance", src, out)
    assert rc == 0, err
    assert not stale.exists() and live.is_dir() and out.is_dir()


# ---- 8. terminal output, merged modules, exit codes, messages, many modules ------------------------


def test_control_characters_are_escaped_on_the_terminal(tmp_path, capsys):
    evil = "layers.0\x1b[2J\x1b]0;pwned\x07.proj\rfake"
    folder = write_peft(tmp_path / "ctl", weights=tensors(modules=[evil]),
                        metadata={"format": "pt", "ss_note": "\x1b[31mred\x1b[0m\nsecond line"})
    for argv in (["inspect", folder], ["inspect", folder, "--wide"], ["inspect", folder, "--format", "csv"],
                 ["balance", folder, tmp_path / "out"]):
        rc, out, err = cli(capsys, *argv)
        assert rc == 0, err
        assert "\x1b" not in out + err and "\x07" not in out + err and "\r" not in out + err, argv
        assert "\\x1b" in out, argv
    rc, out, _ = cli(capsys, "inspect", folder, "--format", "json")
    assert json.loads(out)[0]["module"] == evil  # JSON keeps the exact name, escaped by JSON itself
    bad = tensors(modules=[evil])
    bad[f"base_model.model.{evil}.lora_B.weight"] = torch.randn(5, R + 1)
    write_peft(tmp_path / "ctl_bad", weights=bad)
    line = assert_input_error(capsys, "shapes do not chain", "inspect", tmp_path / "ctl_bad")
    assert "\x1b" not in line and "\\x1b" in line


def test_two_keys_naming_one_module_are_an_error(tmp_path, capsys):
    weights = {**tensors(prefix=""), **tensors(prefix="base_model.model.")}
    path = tmp_path / "dup.safetensors"
    save_file(weights, str(path))
    line = assert_input_error(capsys, "both name the A factor of module 'layers.0.proj'", "inspect", path)
    assert "'base_model.model.layers.0.proj.lora_A.weight'" in line and "'layers.0.proj.lora_A.weight'" in line


@pytest.mark.parametrize("config, phrase", [
    (dict(CONFIG, alpha_pattern={"proj": 10**400}), "alpha_pattern['proj'] must be a finite number"),
    (dict(CONFIG, r=10**400), "r must be a positive integer"),
    (dict(CONFIG, lora_alpha=-(10**400)), "lora_alpha must be a finite number"),
])
def test_overflowing_numbers_are_input_errors(tmp_path, capsys, config, phrase):
    folder = write_peft(tmp_path / "overflow")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert_input_error(capsys, phrase, "inspect", folder)


def test_deep_nesting_and_huge_checkpoint_numbers_are_input_errors(tmp_path, capsys):
    deep = write_peft(tmp_path / "deep")
    (deep / "adapter_config.json").write_text('{"peft_type": "LORA", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert_input_error(capsys, "nested too deeply", "inspect", deep)
    run = tmp_path / "run"
    write_peft(run / ("checkpoint-" + "9" * 200))  # a file name holds at most 255 bytes
    assert_input_error(capsys, "step number with 200 digits", "inspect", run)
    run2 = tmp_path / "run2"
    write_peft(run2 / "checkpoint-99999999999999999999")
    assert_input_error(capsys, "step number with 20 digits", "inspect", run2)


def test_not_a_flat_dict_says_what_it_found(tmp_path, capsys):
    nested = tmp_path / "nested.bin"
    torch.save({"model": tensors()}, nested)
    assert_input_error(capsys, "'model' holds a nested dict", "inspect", nested)
    as_list = tmp_path / "list.bin"
    torch.save(list(tensors().values()), as_list)
    assert_input_error(capsys, "found a list instead", "inspect", as_list)


def test_many_modules_table_is_bounded_and_says_so(tmp_path, capsys):
    from balora.commands import inspect_cmd

    n = inspect_cmd.MAX_TABLE_ROWS + 37
    path = tmp_path / "many.safetensors"
    save_file(tensors(modules=[f"m.{i}" for i in range(n)], prefix=""), str(path))
    rc, out, err = cli(capsys, "inspect", path)
    assert rc == 0, err
    assert "and 37 more module(s)" in out
    assert f"{n} modules" in out or f"{n} module(s)" in out
    rc, out, _ = cli(capsys, "inspect", path, "--format", "csv")
    assert len(out.strip().splitlines()) == n + 1


def test_many_slowish_keys_are_bounded_together(monkeypatch):
    monkeypatch.setattr(peft_config, "TABLE_SECONDS", 0.0)  # any time at all is over the table's bound
    table = peft_config.PatternTable({"q_proj": 1, "k_proj": 2}, "alpha_pattern", "cfg.json")
    with pytest.raises(InputError, match=r"cfg.json: alpha_pattern key '(q|k)_proj' and the other keys take over 0 s"):
        table.key_for("model.layers.0.self_attn.v_proj")


def test_sparse_meta_tensors_and_broken_links_are_input_errors(tmp_path, capsys):
    sparse = {**tensors(prefix="")}
    sparse["layers.0.proj.lora_A.weight"] = sparse["layers.0.proj.lora_A.weight"].to_sparse()
    torch.save(sparse, tmp_path / "sparse.bin")
    assert_input_error(capsys, "is a sparse_coo tensor", "inspect", tmp_path / "sparse.bin")
    torch.save({k: torch.empty(v.shape, device="meta") for k, v in tensors(prefix="").items()}, tmp_path / "meta.bin")
    assert_input_error(capsys, "is a meta tensor", "balance", tmp_path / "meta.bin", tmp_path / "out.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    assert_input_error(capsys, "not a readable PyTorch weights file (EOFError: the file ends too early",
                       "inspect", tmp_path / "empty.bin")
    loop = write_peft(tmp_path / "loop")
    (loop / "adapter_config.json").unlink()
    (loop / "adapter_config.json").symlink_to(loop / "adapter_config.json")
    assert_input_error(capsys, "broken symbolic link", "inspect", loop)
    assert not (tmp_path / "out.bin").exists()


def test_unreadable_folder_is_an_input_error(tmp_path, capsys, monkeypatch):
    folder = write_peft(tmp_path / "locked")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", denied)  # as for a folder without read permission (tests run as root)
    assert_input_error(capsys, "cannot read it (Permission denied)", "inspect", folder)


def test_huge_integer_in_diffusers_metadata_is_an_input_error(tmp_path, capsys):
    path = tmp_path / "lora.safetensors"
    save_file(tensors(prefix="unet."), str(path), metadata={"lora_adapter_metadata": '{"unet.r": ' + "1" * 5000 + "}"})
    assert_input_error(capsys, "lora_adapter_metadata is not valid JSON", "inspect", path)


def test_output_that_is_a_symlink_is_refused_and_its_target_kept(tmp_path, capsys):
    src = write_peft(tmp_path / "in")
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep.txt").write_text("keep")
    (tmp_path / "out").symlink_to(tmp_path / "target")
    assert_input_error(capsys, "is a symbolic link", "balance", src, tmp_path / "out", "--force")
    assert (tmp_path / "out").is_symlink() and os.listdir(tmp_path / "target") == ["keep.txt"]


def test_output_that_is_a_fifo_is_refused_even_with_force(tmp_path, capsys):
    # os.replace would swap any special file for the output: run as root, `balance x /dev/null --force`
    # replaced /dev/null with a regular file.
    src = write_peft(tmp_path / "in") / "adapter_model.safetensors"
    fifo = tmp_path / "out.safetensors"
    os.mkfifo(fifo)
    assert_input_error(capsys, "is not a regular file (a device, FIFO or socket)", "balance", src, fifo, "--force")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_force_replaces_only_an_adapter_folder(tmp_path, capsys):
    src = write_peft(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert_input_error(capsys, "not empty and not an adapter folder, so --force will not delete anything",
                       "balance", src, out, "--force")
    assert os.listdir(out) == ["notes.txt"]
    (out / "notes.txt").unlink()  # empty: replaced
    assert cli(capsys, "balance", src, out, "--force")[0] == 0
    (out / "extra.txt").write_text("from an earlier copy")  # an adapter folder (its config): replaced
    assert cli(capsys, "balance", src, out, "--force")[0] == 0
    assert (out / "adapter_config.json").is_file() and not (out / "extra.txt").exists()


def test_force_never_replaces_a_trainer_output_folder(tmp_path, capsys):
    # A Trainer's output holds its final adapter (adapter_config.json at the top, so "an adapter folder")
    # and its checkpoint-N folders: `balance x run --force`, run named by mistake, deleted every checkpoint.
    src = write_peft(tmp_path / "in")
    run = write_peft(tmp_path / "run")
    write_peft(run / "checkpoint-500")
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert_input_error(capsys, "holds Trainer checkpoints (checkpoint-500)", "balance", src, run, "--force")
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before


def test_stale_temporaries_only_of_dead_processes_of_this_machine(tmp_path):
    from balora.adapters.writing import OWNER_FILE, remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # its pid is free once it has exited
    dead.wait()
    folders = {}
    for name, host in (("mine", socket.gethostname()), ("other", "another-machine"), ("unmarked", None)):
        folder = tmp_path / f".out.{dead.pid}.{name}.balora-tmp"
        folder.mkdir()
        (folder / "partial.safetensors").write_bytes(b"x")
        if host is not None:
            (folder / OWNER_FILE).write_text(json.dumps({"pid": dead.pid, "host": host}))
        folders[name] = folder
    user_folder = tmp_path / ".out.notapid.balora-tmp"  # not balora's naming: never touched
    user_folder.mkdir()
    removed = remove_stale_temporaries(tmp_path / "out")
    assert set(removed) == {folders["mine"], folders["unmarked"]}
    assert folders["other"].is_dir() and user_folder.is_dir()


def test_a_running_balance_to_a_longer_name_keeps_its_temporary_folder(tmp_path):
    """A balance to OUT.N (OUT.1000, a step number) stages in `.OUT.N.<pid>.<random>.balora-tmp`; one to OUT
    read that N as the pid of a dead process and deleted the running copy's folder under it."""
    from balora.adapters.writing import remove_stale_temporaries, staged_output

    src = write_peft(tmp_path / "in")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # a number no process has
    dead.wait()
    with staged_output(tmp_path / f"out.{dead.pid}") as staged:  # this process: alive
        staged.mkdir()
        assert remove_stale_temporaries(tmp_path / "out") == []
        balora.balance_file(src, tmp_path / "out")
        assert staged.is_dir()
        (staged / "x").write_text("x")
    assert (tmp_path / f"out.{dead.pid}" / "x").is_file()


def test_pickled_tensors_claiming_more_values_than_the_file_stores_are_refused(tmp_path, capsys):
    # torch.load rebuilds a tensor from (storage, offset, shape, stride): a stride-0 tensor, or many
    # views of one storage, declares any number of values from a few stored bytes. Measuring or
    # balancing such a file materialises them all: a 2 KB .bin (zipped, an upload) would need GBs.
    n = 2**20
    stride0 = {"l.lora_A.weight": torch.ones(1).expand(R, n), "l.lora_B.weight": torch.ones(1).expand(n, R)}
    torch.save(stride0, tmp_path / "stride0.bin")
    storage = torch.randn(2 * R * 50 + 64)
    views = {}
    for i in range(64):  # 64 pairs, each a view of the same stored values at another offset
        views[f"m{i}.lora_A.weight"] = storage[i : i + R * 50].view(R, 50)
        views[f"m{i}.lora_B.weight"] = storage[i + R * 50 : i + 2 * R * 50].view(50, R)
    torch.save(views, tmp_path / "views.bin")
    stored = sum(v.untyped_storage().nbytes() for v in (stride0["l.lora_A.weight"], stride0["l.lora_B.weight"]))
    assert (tmp_path / "stride0.bin").stat().st_size < 4096 and stored < 64  # the file holds almost nothing
    for case in ("stride0.bin", "views.bin"):
        assert_input_error(capsys, "more values than it stores", "inspect", tmp_path / case)
        assert_input_error(capsys, "more values than it stores", "balance", tmp_path / case, tmp_path / f"out-{case}")
        assert not (tmp_path / f"out-{case}").exists()
    # Tied weights (one tensor under two names) and views that split one storage are what torch.save
    # writes for ordinary models: still read, and measured as the independent copies are.
    a, b = torch.randn(R, 6), torch.randn(5, R)
    joint = torch.cat([a.flatten(), b.flatten()])
    shared = {"x.lora_A.weight": joint[: a.numel()].view(R, 6), "x.lora_B.weight": joint[a.numel():].view(5, R),
              "tied.lora_A.weight": a, "tied.lora_B.weight": b, "tied2.lora_A.weight": a, "tied2.lora_B.weight": b}
    torch.save(shared, tmp_path / "shared.bin")
    df = balora.inspect(tmp_path / "shared.bin")
    assert len(df) == 3 and df["rel_imbalance"].nunique() == 1


def test_pytorch_file_with_compressed_records_is_refused(tmp_path, capsys):
    # torch.save stores every record of its zip uncompressed, and balora maps tensors straight from
    # the file (mmap): a re-zipped .bin (deflated records) was read as its compressed bytes (wrong
    # values, no error), and a deflated data.pkl of zeros inflates ~1000x in memory (a zip bomb).
    import zipfile

    torch.save(tensors(), tmp_path / "plain.bin")
    with zipfile.ZipFile(tmp_path / "plain.bin") as zf, zipfile.ZipFile(tmp_path / "rezipped.bin", "w") as out:
        for info in zf.infolist():
            out.writestr(info.filename, zf.read(info), compress_type=zipfile.ZIP_DEFLATED)
    assert torch.load(tmp_path / "rezipped.bin", weights_only=True).keys() == tensors().keys()  # torch itself reads it
    assert_input_error(capsys, "compressed", "inspect", tmp_path / "rezipped.bin")
    assert_input_error(capsys, "compressed", "balance", tmp_path / "rezipped.bin", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()
    assert len(balora.inspect(tmp_path / "plain.bin")) == 2  # what torch.save writes is read as before
