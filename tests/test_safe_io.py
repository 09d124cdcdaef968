"""balora.safe_io: regular files only, a size cap, never blocks on a FIFO or reads a device."""

import json
import os

import pytest

from balora.errors import InputError
from balora.safe_io import (
    is_inside,
    read_bytes_capped,
    read_json_capped,
    read_text_capped,
    regular_file_size,
)

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")


def test_reads_a_regular_file_and_a_symlink_to_one(tmp_path):
    f = tmp_path / "adapter_config.json"
    f.write_text(json.dumps({"r": 8, "name": "é"}), encoding="utf-8")
    link = tmp_path / "link.json"
    link.symlink_to(f)
    assert read_json_capped(f) == {"r": 8, "name": "é"}
    assert read_text_capped(link) == f.read_text(encoding="utf-8")
    assert regular_file_size(f) == len(f.read_bytes())


@needs_fifo
@pytest.mark.timeout(30)
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "adapter_config.json"
    os.mkfifo(fifo)  # nobody writes to it: opening it for reading would block forever
    with pytest.raises(InputError, match="FIFO") as e:
        read_text_capped(fifo, what="adapter config")
    assert "adapter config" in str(e.value) and "\n" not in str(e.value)
    link = tmp_path / "status.json"
    link.symlink_to(fifo)
    with pytest.raises(InputError, match="FIFO"):
        read_json_capped(link)


@pytest.mark.timeout(30)
@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_symlink_to_dev_zero_is_refused(tmp_path):
    link = tmp_path / "adapter_config.json"
    link.symlink_to("/dev/zero")  # reading it never ends
    with pytest.raises(InputError, match="character device"):
        read_text_capped(link)
    with pytest.raises(InputError, match="character device"):
        read_bytes_capped(link, 10)


def test_oversize_file_refused_and_cap_is_inclusive(tmp_path):
    f = tmp_path / "c.json"
    f.write_bytes(b"x" * 101)
    with pytest.raises(InputError, match="more than the 100 bytes"):
        read_bytes_capped(f, 100)
    assert read_bytes_capped(f, 101) == b"x" * 101


def test_directory_missing_and_bad_text(tmp_path):
    with pytest.raises(InputError, match="a directory"):
        read_text_capped(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        read_text_capped(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe{")
    with pytest.raises(InputError, match="not UTF-8"):
        read_text_capped(bad)
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "gone")
    with pytest.raises(InputError, match="does not exist"):
        read_text_capped(dangling)


def test_json_errors_are_one_line(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match="nested too deeply"):
        read_json_capped(deep)
    broken = tmp_path / "broken.json"
    broken.write_text('{"r": ')
    with pytest.raises(InputError, match="malformed JSON") as e:
        read_json_capped(broken)
    assert "\n" not in str(e.value)
    huge_int = tmp_path / "int.json"
    huge_int.write_text("1" * 100_000)  # beyond Python's int-from-string digit limit
    with pytest.raises(InputError, match="cannot be parsed"):
        read_json_capped(huge_int)


def test_is_inside(tmp_path):
    inner = tmp_path / "in"
    inner.mkdir()
    (inner / "a").write_text("a")
    (tmp_path / "outside").write_text("o")
    (inner / "escape").symlink_to(tmp_path / "outside")
    (inner / "stay").symlink_to(inner / "a")
    (inner / "loop").symlink_to(inner / "loop")
    assert is_inside(inner / "a", inner)
    assert is_inside(inner / "stay", inner)
    assert not is_inside(inner / "escape", inner)
    assert not is_inside(inner / "loop", inner)


def test_printable_escapes_controls_and_keeps_text():
    from balora.safe_io import printable

    hostile = "layers.0\x1b[2J\x1b]0;pwned\x07.q_proj\r\nfake line\u202eevil\x9b"
    shown = printable(hostile)
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F or c == "\u202e" for c in shown)
    assert shown == "layers.0\\x1b[2J\\x1b]0;pwned\\x07.q_proj\\r\\nfake line\\u202eevil\\x9b"
    assert printable("model.layers.10.mlp.down_proj é ü 漢") == "model.layers.10.mlp.down_proj é ü 漢"
    assert printable("\udcffname") == "\\udcffname"  # a non-UTF-8 file name: printable on a UTF-8 terminal
    printable("\udcff").encode("utf-8")


NO_USER = "~no_such_user_balora/x"  # ~.cache/x typed for ~/.cache/x: the home of a user who is not here


def test_a_tilde_of_no_user_is_one_line_wherever_a_path_is_taken(tmp_path, monkeypatch, capsys):
    # pathlib's expanduser raises "RuntimeError: Could not determine home directory." for it: load_run,
    # RunRecorder, `compare --set data=`, `--out`, `dashboard --runs`, BALORA_RUNS and BALORA_CACHE crashed with it.
    import balora
    from balora import runs_folder
    from balora.cli import main
    from balora.tasks import text_data, toy_model

    calls = {
        "load_run": lambda: balora.load_run(NO_USER),
        "RunRecorder": lambda: balora.RunRecorder(NO_USER),
        "text file": lambda: text_data.read_texts(NO_USER),
        "pairs file": lambda: text_data.read_pairs(NO_USER, ("a", "b")),
    }
    monkeypatch.setenv(runs_folder.ENV_VAR, NO_USER)
    calls["BALORA_RUNS"] = runs_folder.runs_folder
    monkeypatch.setenv("BALORA_CACHE", NO_USER)
    calls["BALORA_CACHE"] = toy_model.cache_root
    for who, call in calls.items():
        with pytest.raises(InputError, match=r"no user 'no_such_user_balora'.*~/") as err:
            call()
        assert "\n" not in str(err.value), who
    for argv in (["dashboard", "--runs", NO_USER, "--print-command"],
                 ["compare", "--task", "lm", "--set", f"data={NO_USER}", "--steps", "1", "--out", str(tmp_path / "r")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "no_such_user_balora" in err and "~/" in err, err
