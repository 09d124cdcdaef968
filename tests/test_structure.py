"""The shape of the code, checked on the source: small modules and functions, data flowing one way
(the library never imports the dashboard; the dashboard never imports the training runner), and a
wheel that ships the dashboard inside the package, never as a top-level `dashboard` package."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "balora"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"split these modules (at most {MAX_MODULE_LINES} lines): {long}"


def test_no_function_over_60_lines():
    long = {}
    for p in _modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{p.relative_to(ROOT)}:{node.name}"] = n
    assert not long, f"split these functions (at most {MAX_FUNCTION_LINES} lines): {long}"


def test_library_never_imports_the_dashboard():
    offenders = [str(p.relative_to(ROOT)) for p in _modules()
                 if "dashboard" not in p.relative_to(PACKAGE).parts[:1]
                 and p.relative_to(PACKAGE).parts != ("commands", "dashboard.py")
                 and any(n == "balora.dashboard" or n.startswith("balora.dashboard.") for n in _imports(p))]
    assert not offenders, f"balora/ must not import balora.dashboard: {offenders}"


def test_dashboard_never_imports_the_runner():
    dash = [p for p in _modules() if p.relative_to(PACKAGE).parts[0] == "dashboard"]
    offenders = [str(p.relative_to(ROOT)) for p in dash
                 if any(n == "balora.runner" or n.startswith("balora.runner.") for n in _imports(p))]
    assert not offenders, offenders
    # ...nor through another module: import every non-page module and look.
    names = [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in dash if "views" not in p.parts]
    code = ("import sys\n" + "".join(f"import {n}\n" for n in names if not n.endswith("app"))
            + "print('balora.runner' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.slow
def test_wheel_ships_the_dashboard_inside_the_package(tmp_path):
    # Built from a copy of what the build reads: in the checkout, a balora.egg-info left by an earlier
    # build or `pip install -e .` lists files that pyproject.toml's globs may no longer name.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "balora", src / "balora", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=600)
    if out.returncode != 0 and "No module named" in out.stderr:
        pytest.skip(f"cannot build a wheel here: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("balora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert "dashboard" not in top and {"balora"} <= top
    for page in ("compare", "inspect", "launch", "learn"):
        assert f"balora/dashboard/views/{page}.py" in names
    assert "balora/dashboard/app.py" in names
    assert any(n.startswith("balora/sample_runs/") and n.endswith("config.json") for n in names)
    # Every file the package tracks, so an installed dashboard finds all of it: each sample run's
    # parquet parts and .balora-run marker are package data only if a glob in pyproject.toml names them.
    tracked = subprocess.run(["git", "ls-files", "-z", "balora"], capture_output=True, text=True, cwd=ROOT)
    if tracked.returncode == 0:
        missing = sorted(set(tracked.stdout.split("\0")) - {""} - set(names))
        assert not missing, f"tracked but not in the wheel (add them to package-data): {missing}"


def _documented_modules() -> list[str]:
    """The paths docs/ARCHITECTURE.md's module table names: each row's first cell, where a bare name
    (`entries.py`) lies in the folder of the path before it and `dir/` or `dir/*.py` names a folder."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = text.split("## Modules", 1)[1].split("\n## ", 1)[0]
    named = []
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        folder = ""
        for token in line.split("|")[1].split("`")[1::2]:
            if "/" in token:
                folder = token if token.endswith("/") else token.rsplit("/", 1)[0] + "/"
                named.append(token)
            else:
                named.append(folder + token)
    return named


def test_architecture_module_table_names_every_module():
    # A module missing from the table is a module whose job a newcomer cannot look up.
    import fnmatch

    named = _documented_modules()
    modules = [str(p.relative_to(ROOT)) for p in _modules() if p.name != "__init__.py"]
    missing = [m for m in modules
               if not any(m == n or (n.endswith("/") and m.startswith(n)) or fnmatch.fnmatch(m, n) for n in named)]
    assert not missing, f"add these modules to docs/ARCHITECTURE.md's module table: {missing}"
