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
    data = pytest.importorskip("balora.dashboard.data")
    dest, outside = upload_dirs
    out = data.save_upload("../outside/evil.safetensors", b"x", dest)
    assert out.resolve().parent == dest.resolve() and not _files(outside)
    out = data.save_upload(str(outside / "abs.safetensors"), b"x", dest)
    assert out.resolve().parent == dest.resolve() and not _files(outside)


@pytest.mark.parametrize("member", ["../outside/evil.txt", "../../evil.txt", "a/../../outside/evil.txt"])
def test_zip_members_cannot_escape_its_folder(upload_dirs, member):
    data = pytest.importorskip("balora.dashboard.data")
    dest, outside = upload_dirs
    with pytest.raises(data.UploadError, match="outside"):
        data.save_upload("adapter.zip", _zip({"adapter/adapter_config.json": b"{}", member: b"x"}), dest)
    assert not _files(outside) and not _files(dest), "nothing may be unpacked from a refused archive"


def test_zip_expansion_is_capped(upload_dirs):
    data = pytest.importorskip("balora.dashboard.data")
    dest, _ = upload_dirs
    bomb = _zip({"adapter/weights.bin": b"\0" * (3 * 2**20)})  # compresses to a few KB
    assert len(bomb) < 2**20
    with pytest.raises(data.UploadError, match="expands"):
        data.save_upload("bomb.zip", bomb, dest, max_unzipped_mb=1)
    assert not _files(dest)


def test_upload_of_other_types_refused(upload_dirs):
    data = pytest.importorskip("balora.dashboard.data")
    dest, _ = upload_dirs
    for name in ("model.pt", "model.bin", "model.pkl", "noext"):
        with pytest.raises(data.UploadError):
            data.save_upload(name, b"\x80\x04", dest)
    assert not _files(dest)


def test_remove_tree_only_removes_dashboard_temporaries(tmp_path):
    data = pytest.importorskip("balora.dashboard.data")
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
    "balora/dashboard/data.py:save_upload": "writes the upload under the temporary folder it is given; name and zip members checked",
    "balora/dashboard/data.py:_balance": "balanced copy built in a TemporaryDirectory deleted before returning",
    "balora/dashboard/data.py:remove_tree": "deletes only folders named balora-upload-* / balora-balance-*",
    "balora/dashboard/jobs.py:JobManager.start": "creates the runs folder; the job's run dir is checked to lie inside it",
    "balora/dashboard/pages/inspect.py:<module>": "mkdtemp(prefix='balora-upload-') for an upload, removed by remove_tree",
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
