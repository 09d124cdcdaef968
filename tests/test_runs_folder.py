"""One runs folder for `balora compare`, the dashboard and Launch (./runs or $BALORA_RUNS), the
bundled samples listed beside it read-only, and the commands the user is shown."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

sys.path.insert(0, str(Path(__file__).parent))
from test_dashboard_data import write_run  # noqa: E402

from balora import runs_folder  # noqa: E402
from balora.dashboard import jobs, settings  # noqa: E402
from balora.dashboard.app import page_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "dashboard" / "app.py")
TIMEOUT = 120


def test_runs_folder_default_env_and_new_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert runs_folder.runs_folder({}) == tmp_path / "runs"
    assert runs_folder.runs_folder({runs_folder.ENV_VAR: str(tmp_path / "mine")}) == tmp_path / "mine"
    assert runs_folder.new_run_dir("synthetic", {}).startswith("runs/synthetic-")
    env_dir = Path(runs_folder.new_run_dir("lm", {runs_folder.ENV_VAR: str(tmp_path / "mine")}))
    assert env_dir.parent == tmp_path / "mine" and env_dir.name.startswith("lm-")
    # The dashboard reads the same folder unless told otherwise.
    assert settings.runs_dir([], {}) == tmp_path / "runs"
    assert settings.runs_dir([], {runs_folder.ENV_VAR: "mine"}) == tmp_path / "mine"


def test_dashboard_command_names_the_folder_only_when_needed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert runs_folder.dashboard_command(tmp_path / "runs" / "a", {}) == "balora dashboard"
    elsewhere = tmp_path / "my runs" / "b"
    cmd = shlex.split(runs_folder.dashboard_command(elsewhere, {}))
    assert cmd == ["balora", "dashboard", "--runs", str(tmp_path / "my runs")]  # quoted: a space survives
    from balora.cli import build_parser

    args = build_parser().parse_args(cmd[1:])
    assert Path(args.runs) == elsewhere.parent


def test_samples_ship_in_the_package():
    samples = settings.sample_runs_dir()
    assert samples is not None and samples.is_relative_to(ROOT / "balora")
    assert (samples / "synthetic-adam" / "config.json").is_file()
    assert runs_folder.is_sample(samples / "synthetic-adam") and not runs_folder.is_sample(ROOT / "runs")
    import tomllib

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["balora"]
    shipped = {p for g in globs for p in (ROOT / "balora").glob(g)}
    assert {p for p in samples.rglob("*") if p.is_file()} == shipped  # every sample file is package data


def test_compare_writes_into_the_runs_folder_and_prints_the_dashboard_command(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != runs_folder.ENV_VAR}
    proc = subprocess.run([sys.executable, "-m", "balora.cli", "compare", "--task", "synthetic", "--arms", "lora",
                           "--seeds", "1", "--steps", "3", "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    made = [p for p in (tmp_path / "runs").iterdir() if (p / "config.json").is_file()]
    assert len(made) == 1 and made[0].name.startswith("synthetic-")
    last = proc.stdout.strip().splitlines()[-1]
    assert last == f"open it in the dashboard: balora dashboard   (then http://127.0.0.1:8501/?run={made[0].name})"


# ------------------------------------------------------------------------- dashboard: listing


@pytest.fixture(scope="module")
def own_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    write_run(root / "mine", steps=10)
    return root


def _runs_widget(at):
    return at.multiselect(key="compare_runs")


def test_compare_lists_own_runs_and_the_samples_marked(own_runs, monkeypatch):
    monkeypatch.setenv(settings.ENV_VAR, str(own_runs))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    widget = _runs_widget(at)
    samples = sorted(p.name for p in settings.sample_runs_dir().iterdir() if (p / "config.json").is_file())
    options = list(widget.options)
    # The user's run first, then every sample, each marked as a read-only sample.
    assert options[0] == "mine (completed)"
    assert options[1:] == [f"samples/{s} (sample, read-only, completed)" for s in samples]
    assert widget.value == ["mine"]  # opens on the user's own run
    widget.set_value(["mine", "samples/synthetic-sgd"]).run()
    assert not at.exception, [e.value for e in at.exception]
    assert "**samples/synthetic-sgd** — completed" in " ".join(e.value for e in at.success)
    assert any("balora compare" in c.value and "synthetic-sgd" in c.value for c in at.code)  # its command


def test_compare_without_own_runs_shows_the_samples(tmp_path, monkeypatch):
    monkeypatch.setenv(settings.ENV_VAR, str(tmp_path / "not-yet"))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    info = " ".join(i.value for i in at.info)
    assert "No runs folder" in info and "balora compare --task synthetic" in info and "sample runs" in info
    assert _runs_widget(at).value and all(v.startswith("samples/") for v in _runs_widget(at).value)
    assert not (tmp_path / "not-yet").exists()  # listing creates nothing


# ------------------------------------------------------------------------- Launch


def test_launch_command_runs_as_printed(tmp_path):
    spec = jobs.LaunchSpec(arms=["lora", "balora"], lrs=[1e-3, 1e-2], optimizer="sgd", name="x", init_scale=10.0)
    shown = jobs.display_command(spec, tmp_path / "runs" / "x")
    argv = shlex.split(shown)
    assert argv[:2] == ["balora", "compare"] and "balora.cli" not in shown
    assert jobs.build_command(spec, tmp_path / "runs" / "x")[3:] == argv[1:]  # what runs is what is shown
    from balora.cli import build_parser

    args = build_parser().parse_args(argv[1:])
    assert (args.arms, args.lr, args.optimizer, args.set) == ("lora,balora", "0.001,0.01", "sgd", ["init_scale=10"])
    assert args.out == str(tmp_path / "runs" / "x")


def test_launch_refuses_a_runs_folder_inside_the_package():
    spec = jobs.LaunchSpec(name="fine")
    assert any("inside the installed balora package" in e for e in jobs.validate(spec, settings.sample_runs_dir()))
    assert any("inside the installed balora package" in e for e in jobs.validate(spec, jobs.PACKAGE_DIR))


def test_launch_page_shows_the_folder_and_the_whole_command(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setenv(settings.ENV_VAR, str(runs))
    # A stand-in job (stdlib only, starts fast): the page's display is under test, not training.
    script = "import pathlib, sys; pathlib.Path(sys.argv[sys.argv.index('--out') + 1]).mkdir(parents=True)"
    monkeypatch.setattr(jobs, "build_command", lambda spec, out: [sys.executable, "-c", script, "--out", str(out)])
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.switch_page(str(page_path("launch.py"))).run()
    assert not at.exception, [e.value for e in at.exception]
    assert str(runs) in " ".join(c.value for c in at.caption)
    at.text_input(key="launch_name").set_value("shown-cmd")
    next(b for b in at.button if b.label == "Start").click().run()
    manager = jobs.get_manager(runs)
    assert manager.wait(TIMEOUT) == 0
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    code = [c for c in at.code if c.language == "bash"]
    assert len(code) == 1 and code[0].proto.wrap_lines
    argv = shlex.split(code[0].value)
    assert argv[:4] == ["balora", "compare", "--task", "synthetic"]
    assert argv[argv.index("--out") + 1] == str(runs / "shown-cmd")
    assert [p.name for p in runs.iterdir()] == ["shown-cmd"]  # written into the runs folder, nowhere else


def test_readme_quickstart_matches_ci():
    """The README's commands are the ones CI runs: the same extras, torch first."""
    import re

    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    quick = readme[readme.index("## Quickstart"):readme.index("## Commands")]
    blocks = re.findall(r"```bash\n(.*?)```", quick, flags=re.S)
    assert blocks[0].strip().startswith("pip install torch==2.13.0")  # the torch line comes first
    test_cmd = next(b.strip() for b in blocks if "pytest" in b)
    extras = re.search(r'pip install -q -e "\.\[([a-z,]+)\]"', ci).group(1)
    assert test_cmd == f'pip install -e ".[{extras}]" && python -m pytest'
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras.split(",")) == set(declared) - {"bench"}  # every extra with tests ("bench": plots only)
