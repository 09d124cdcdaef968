"""Security rules of issue 6 part 7, checked on the source and on the dashboard's upload helper:

- no pickle is ever loaded except through torch.load(..., weights_only=True);
- uploads are size-limited and cannot write outside their temporary folder;
- the dashboard binds to localhost by default;
- the dashboard writes only to the runs folder (and to temporary folders it deletes): every
  place in dashboard/ that writes a file is listed, with why it is safe, in DASHBOARD_WRITE_SITES.
"""

from __future__ import annotations

import ast
import io
import stat
import struct
import warnings
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("balora", "dashboard", "benchmarks")  # everything a user runs; tests may do as they like

# Modules whose load functions unpickle.
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
PICKLE_FUNCS = {"load", "loads", "Unpickler", "open"}


def _dotted(node: ast.AST) -> str:
    """'torch.load' for Attribute(Name('torch'), 'load'); '' for anything not a plain dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw_is_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """Every call or import in `source` that can unpickle data, as 'file:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and node.module:
            mod = node.module.split(".")[0]
            names = {a.name for a in node.names}
            if mod in PICKLE_MODULES and names & PICKLE_FUNCS:
                found.append(f"{where}: from {node.module} import {', '.join(sorted(names & PICKLE_FUNCS))}")
            if node.module in ("torch", "torch.serialization") and "load" in names:
                found.append(f"{where}: from {node.module} import load (call torch.load(..., weights_only=True) instead)")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, last = name.rpartition(".")
        if name in ("torch.load", "torch.serialization.load") and not _kw_is_true(node, "weights_only"):
            found.append(f"{where}: {name} without weights_only=True")
        elif head.split(".")[0] in PICKLE_MODULES and last in PICKLE_FUNCS:
            found.append(f"{where}: {name}")
        elif last == "read_pickle" or name.endswith("Unpickler"):
            found.append(f"{where}: {name}")
        elif name in ("np.load", "numpy.load") and any(k.arg == "allow_pickle" for k in node.keywords):
            if not any(k.arg == "allow_pickle" and isinstance(k.value, ast.Constant) and k.value.value is False
                       for k in node.keywords):
                found.append(f"{where}: {name} with allow_pickle")
    return found


def _sources():
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            yield path, path.read_text()


def test_no_unpickling_in_package_dashboard_or_benchmarks():
    files = list(_sources())
    assert len(files) > 10, f"found only {len(files)} source files under {SCANNED}: is ROOT right?"
    found = [hit for path, src in files for hit in unsafe_loads(src, str(path.relative_to(ROOT)))]
    assert not found, "pickle may only be loaded through torch.load(..., weights_only=True):\n" + "\n".join(found)


@pytest.mark.parametrize(
    "snippet,bad",
    [
        ("import torch\ntorch.load(f)", True),
        ("import torch\ntorch.load(f, weights_only=False)", True),
        ("import torch\ntorch.load(f, map_location='cpu', weights_only=True)", False),
        ("import torch\nopts = {}\ntorch.load(f, **opts)", True),
        ("from torch import load\nload(f)", True),
        ("import pickle\npickle.loads(b)", True),
        ("import pickle as p\np.load(f)", False),  # aliasing: caught by the import rule below instead
        ("from pickle import Unpickler", True),
        ("import pandas as pd\npd.read_pickle(p)", True),
        ("import numpy as np\nnp.load(p, allow_pickle=True)", True),
        ("import numpy as np\nnp.load(p, allow_pickle=False)", False),
        ("import joblib\njoblib.load(p)", True),
        ("import json\njson.loads(s)", False),
    ],
)
def test_checker_flags_unsafe_loads(snippet, bad):
    assert bool(unsafe_loads(snippet)) is bad, unsafe_loads(snippet)


def test_no_pickle_module_imported_under_another_name():
    """`import pickle as p` would slip past the call check: forbid aliasing pickle-like modules."""
    found = []
    for path, src in _sources():
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in PICKLE_MODULES and a.asname:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: import {a.name} as {a.asname}")
    assert not found, "\n".join(found)


# ------------------------------------------------------------------ dashboard: bind and upload limits


def test_streamlit_config_binds_localhost_and_limits_uploads():
    tomllib = pytest.importorskip("tomllib")
    path = ROOT / ".streamlit" / "config.toml"
    if not path.is_file():
        pytest.skip(".streamlit/config.toml is not written yet")
    server = tomllib.loads(path.read_text()).get("server", {})
    assert server.get("address") in ("127.0.0.1", "localhost", "::1"), f"server.address is {server.get('address')!r}"
    size = server.get("maxUploadSize")
    assert isinstance(size, int) and 0 < size <= 1024, f"server.maxUploadSize must be a small number of MB, got {size!r}"
    settings = pytest.importorskip("balora.dashboard.settings")
    assert settings.MAX_UPLOAD_MB <= size, "the per-widget cap must not exceed Streamlit's own"


def test_dashboard_command_binds_localhost_by_default():
    import argparse

    from balora.commands import dashboard  # only this subcommand: importing them all costs seconds

    parser = argparse.ArgumentParser()
    dashboard.add_parser(parser.add_subparsers())
    cmd = dashboard.build_command(parser.parse_args(["dashboard"]))
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert 0 < int(cmd[cmd.index("--server.maxUploadSize") + 1]) <= 1024


@pytest.fixture
def upload_dirs(tmp_path):
    dest = tmp_path / "balora-upload-x"
    dest.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    return dest, outside


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_upload_name_cannot_escape_its_folder(upload_dirs):
    data = pytest.importorskip("balora.dashboard.uploads")
    dest, outside = upload_dirs
    out = data.save_upload("../outside/evil.safetensors", b"x", dest)
    assert out.resolve().parent == dest.resolve() and not _files(outside)
    out = data.save_upload(str(outside / "abs.safetensors"), b"x", dest)
    assert out.resolve().parent == dest.resolve() and not _files(outside)



@pytest.mark.parametrize("name", ["...zip", "..zip", "....zip"])
def test_zip_upload_named_with_dots_stays_in_its_folder(upload_dirs, name):
    # The archive unpacks into a folder named after it: "...zip" has the stem "..", the folder above
    # the upload's own (the server's temporary directory). A good archive was unpacked there, and a
    # refused one made the clean-up delete that whole directory.
    data = pytest.importorskip("balora.dashboard.uploads")
    dest, _ = upload_dirs
    neighbour = dest.parent / "another-program" / "keep.txt"
    neighbour.parent.mkdir()
    neighbour.write_text("not the dashboard's")
    before = {p for p in dest.parent.iterdir()}
    with pytest.raises(data.UploadError):
        data.save_upload(name, b"not a zip", dest)
    assert neighbour.read_text() == "not the dashboard's" and dest.is_dir() and not _files(dest)
    out = data.save_upload(name, _zip({"adapter_config.json": b"{}"}), dest)
    assert out.resolve().is_relative_to(dest.resolve()) and out.resolve() != dest.resolve()
    assert _files(dest) == {out / "adapter_config.json"}
    assert {p for p in dest.parent.iterdir()} == before, "nothing written beside the upload's folder"

@pytest.mark.parametrize("member", ["../outside/evil.txt", "../../evil.txt", "a/../../outside/evil.txt"])
def test_zip_members_cannot_escape_its_folder(upload_dirs, member):
    data = pytest.importorskip("balora.dashboard.uploads")
    dest, outside = upload_dirs
    with pytest.raises(data.UploadError, match="outside"):
        data.save_upload("adapter.zip", _zip({"adapter/adapter_config.json": b"{}", member: b"x"}), dest)
    assert not _files(outside) and not _files(dest), "nothing may be unpacked from a refused archive"


def test_zip_expansion_is_capped(upload_dirs):
    data = pytest.importorskip("balora.dashboard.uploads")
    dest, _ = upload_dirs
    bomb = _zip({"adapter/weights.bin": b"\0" * (3 * 2**20)})  # compresses to a few KB
    assert len(bomb) < 2**20
    with pytest.raises(data.UploadError, match="expands"):
        data.save_upload("bomb.zip", bomb, dest, max_unzipped_mb=1)
    assert not _files(dest)


def test_upload_of_other_types_refused(upload_dirs):
    data = pytest.importorskip("balora.dashboard.uploads")
    dest, _ = upload_dirs
    for name in ("model.pt", "model.bin", "model.pkl", "noext"):
        with pytest.raises(data.UploadError):
            data.save_upload(name, b"\x80\x04", dest)
    assert not _files(dest)


def _patched(members: dict[str, bytes], patch) -> bytes:
    """A zip of `members` with its bytes edited by patch(bytearray, central_directory_offset)."""
    raw = bytearray(_zip(members))
    patch(raw, raw.find(b"PK\x01\x02"))
    return bytes(raw)


def _bad_crc(raw, cd):  # the stored CRC of the first member, in its local header and the directory
    struct.pack_into("<I", raw, 14, 1234)
    struct.pack_into("<I", raw, cd + 16, 1234)


def _lying_size(raw, cd):  # 3 MB of zeros declared as 10 bytes: the declared total fits any cap
    struct.pack_into("<I", raw, 22, 10)
    struct.pack_into("<I", raw, cd + 24, 10)


def _many_entries() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(100_000):
            zf.writestr(f"adapter/{i}", b"")
    return buf.getvalue()


def _with_info(name: str, mode: int, data: bytes = b"x") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("adapter/adapter_config.json", b"{}")
        info = zipfile.ZipInfo(name)
        info.external_attr = mode << 16
        zf.writestr(info, data)
    return buf.getvalue()


HOSTILE_ZIPS = {
    "bad CRC": (lambda: _patched({"adapter/w.bin": b"hello" * 100}, _bad_crc), "damaged"),
    "size smaller than it inflates to": (lambda: _patched({"adapter/w.bin": b"\0" * (3 * 2**20)}, _lying_size), "damaged|expands"),
    "two members with one name": (lambda: _dup(), "twice"),
    "a file that is also a folder": (lambda: _zip({"adapter/x": b"1", "adapter/x/y": b"2"}), "both a file and a folder"),
    "an over-long name": (lambda: _zip({"adapter/" + "n" * 300: b"1"}), "too long"),
    "an over-long path": (lambda: _zip({"adapter/" + "/".join(["d" * 200] * 8) + "/f": b"1"}), "too long|nested"),
    "deep nesting": (lambda: _zip({"/".join(["d"] * 40) + "/f": b"1"}), "nested"),
    "100k entries": (_many_entries, "100000 entries"),
    "a symlink member": (lambda: _with_info("adapter/passwd", stat.S_IFLNK | 0o777, b"/etc/passwd"), "symbolic link"),
    "a FIFO member": (lambda: _with_info("adapter/pipe", stat.S_IFIFO | 0o644), "FIFO"),
    "an empty archive": (lambda: _zip({}), "no files"),
    "a truncated archive": (lambda: _zip({"adapter/a.json": b"1" * 1000})[:-30], "not a valid zip"),
}


def _dup() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it is asked to write
        zf.writestr("adapter/a.json", b"1")
        zf.writestr("adapter/a.json", b"2")
    return buf.getvalue()


@pytest.mark.parametrize("case", list(HOSTILE_ZIPS))
def test_hostile_zips_are_one_message_and_leave_nothing(upload_dirs, case):
    data = pytest.importorskip("balora.dashboard.uploads")
    dest, outside = upload_dirs
    build, expected = HOSTILE_ZIPS[case]
    with pytest.raises(data.UploadError, match=expected) as err:
        data.save_upload("upload.zip", build(), dest, max_unzipped_mb=1)
    assert str(err.value).startswith("upload.zip: ") and "\n" not in str(err.value)
    assert not any(dest.iterdir()) and not any(outside.iterdir()), "a refused archive leaves nothing behind"


def test_over_long_upload_names_are_refused(upload_dirs):
    data = pytest.importorskip("balora.dashboard.uploads")
    dest, _ = upload_dirs
    for name in ("x" * 300 + ".safetensors", "y" * 300 + ".zip"):
        with pytest.raises(data.UploadError, match="longer than"):
            data.save_upload(name, b"x", dest)
    assert not any(dest.iterdir())


def test_stale_upload_folders_are_pruned_and_nothing_else(tmp_path, monkeypatch):
    import os
    import tempfile

    data = pytest.importorskip("balora.dashboard.uploads")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    old, fresh, other = tmp_path / "balora-upload-old", tmp_path / "balora-upload-new", tmp_path / "someone-else"
    for d in (old, fresh, other):
        d.mkdir()
        (d / "f").write_text("x")
    day_ago = old.stat().st_mtime - 86400
    os.utime(old, (day_ago, day_ago))
    os.utime(other, (day_ago, day_ago))
    new = data.new_upload_dir()
    assert new.parent == tmp_path and new.name.startswith("balora-upload-")
    assert not old.exists() and fresh.exists() and other.exists()


def test_remove_tree_only_removes_dashboard_temporaries(tmp_path):
    data = pytest.importorskip("balora.dashboard.uploads")
    keep = tmp_path / "runs"
    (keep / "r1").mkdir(parents=True)
    (keep / "r1" / "status.json").write_text("{}")
    data.remove_tree(keep)
    assert (keep / "r1" / "status.json").is_file()
    gone = tmp_path / "balora-upload-123"
    gone.mkdir()
    data.remove_tree(gone)
    assert not gone.exists()


# ------------------------------------------------------------------ dashboard: where it writes

# Calls that write to, create or delete files, or start a process that will. Generic names
# (copy, rename, remove, replace) count only on shutil / os, because DataFrame has them too; a
# Path.rename would slip through, the price of a static check.
WRITE_CALLS = {
    "write_text", "write_bytes", "mkdir", "touch", "unlink", "rmdir", "extract", "extractall", "save_file",
    "save_pretrained", "to_parquet", "mkdtemp", "mkstemp", "TemporaryDirectory", "NamedTemporaryFile", "Popen",
    "balance_file", "compare", "rmtree", "copyfile", "copytree", "makedirs",
}
MODULE_WRITE_CALLS = {"shutil": {"copy", "copy2", "move"}, "os": {"remove", "rename", "replace", "system"}}
PATH_WRITERS = {"to_csv", "to_json", "to_pickle", "savefig", "write_image", "write_html"}  # write when given a path

# Every function of dashboard/ that writes, and why that is allowed. A new write site fails the
# test below until it is reviewed and listed here.
DASHBOARD_WRITE_SITES = {
    "balora/dashboard/uploads.py:save_upload": "writes a .safetensors upload under the temporary folder it is given; on failure removes its partial zip unpacking",
    "balora/dashboard/uploads.py:unpack_zip": "unpacks checked zip members under the upload's temporary folder (exclusive create, byte cap)",
    "balora/dashboard/uploads.py:new_upload_dir": "mkdtemp(prefix='balora-upload-'), removed by remove_tree",
    "balora/dashboard/uploads.py:_balance": "balanced copy built in a TemporaryDirectory deleted before returning",
    "balora/dashboard/uploads.py:remove_tree": "deletes only folders named balora-upload-* / balora-balance-*",
    "balora/dashboard/jobs.py:JobManager.start": "creates the runs folder; the job's run dir is checked to lie inside it",
}


def _write_sites(path: Path, root: Path = ROOT) -> dict[str, list[str]]:
    """{'file:Class.function': ['line N: call', ...]} for every call in `path` that writes."""
    tree = ast.parse(path.read_text())
    sites: dict[str, list[str]] = {}

    def visit(node, scope):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, scope + [child.name])
                continue
            if isinstance(child, ast.Call):
                name = _dotted(child.func) or getattr(child.func, "attr", "")
                last = name.rpartition(".")[2]
                head = name.rpartition(".")[0]
                writes = (last in WRITE_CALLS or last in MODULE_WRITE_CALLS.get(head, ())
                          or (last in PATH_WRITERS and bool(child.args)))
                if last == "open":  # open(), io.open(), Path.open(): writes only in a w/a/x/+ mode
                    mode = child.args[1] if len(child.args) > 1 else next((k.value for k in child.keywords if k.arg == "mode"), None)
                    writes = isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+")
                if writes:
                    key = f"{path.relative_to(root).as_posix()}:{'.'.join(scope) or '<module>'}"
                    sites.setdefault(key, []).append(f"line {child.lineno}: {name or last}")
            visit(child, scope)

    visit(tree, [])
    return sites


def test_dashboard_writes_only_where_reviewed():
    if not (ROOT / "balora" / "dashboard").is_dir():
        pytest.skip("no dashboard yet")
    sites: dict[str, list[str]] = {}
    for path in sorted((ROOT / "balora" / "dashboard").rglob("*.py")):
        sites.update(_write_sites(path))
    new = {k: v for k, v in sites.items() if k not in DASHBOARD_WRITE_SITES}
    assert not new, (
        "the dashboard may write only to the runs folder and to temporary folders it deletes; review these write "
        "sites and list them in DASHBOARD_WRITE_SITES with why they are safe:\n"
        + "\n".join(f"  {k}: {', '.join(v)}" for k, v in new.items())
    )


def test_write_site_scanner_sees_writes(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from pathlib import Path\n"
        "def f(df):\n    open('x', 'w').write('1')\n    df.to_csv('out.csv')\n    df.to_csv(index=False)\n"
        "    open('y').read()\n    'a'.replace('a', 'b')\n    df.rename(columns={})\n    df.copy()\n"
        "class C:\n    def g(self):\n        Path('y').write_text('2')\n        import os\n        os.remove('z')\n"
    )
    sites = _write_sites(probe, tmp_path)
    assert set(sites) == {"probe.py:f", "probe.py:C.g"}, sites
    assert len(sites["probe.py:f"]) == 2, sites  # open(.., 'w') and to_csv(path); not to_csv(index=False)
    assert len(sites["probe.py:C.g"]) == 2, sites
