"""Where the dashboard may be reached from: this machine only, unless someone chose otherwise.

Streamlit listens on every interface when `server.address` is unset, which is what happens when
it starts outside the repository root (the project's .streamlit/config.toml is read from the
current folder only). The app then refuses to serve pages. Checked three ways: the rule itself,
the app under AppTest, and real servers started from a temporary folder and talked to through
streamlit's own websocket protocol (no browser needed).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import urllib.request
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from balora.dashboard import exposure, settings

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "dashboard" / "app.py")
FLAG = "command-line argument or environment variable"  # streamlit.config's where_defined for a flag
START_TIMEOUT_S = 90
TIMEOUT = 120


# ------------------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.1.1", "::1", "[::1]", "localhost", "unix:///tmp/balora.sock"])
def test_loopback_addresses_are_local(address):
    assert exposure.is_local(address) and exposure.exposure(address, "<default>", {}) is None


@pytest.mark.parametrize("address", [None, "", "0.0.0.0", "::", "192.168.1.20", "myhost.example"])
def test_other_addresses_are_not_local(address):
    assert not exposure.is_local(address)


def test_unset_address_is_refused_unless_opted_in():
    refused = exposure.exposure(None, "<default>", {})
    assert refused is not None and not refused.allowed and "every network interface" in refused.address
    assert "balora dashboard" in refused.message and "--server.address 127.0.0.1" in refused.message
    # the command names the app where it is (an installed balora has no dashboard/app.py beside the user)
    assert f"streamlit run {exposure.APP_PATH} --server.address" in refused.message and exposure.APP_PATH.is_file()
    assert exposure.ALLOW_ENV in refused.message  # says how to opt in
    # streamlit's own default (0.0.0.0) counts as unset unless someone set it.
    assert not exposure.exposure("0.0.0.0", "<default>", {}).allowed
    opted = exposure.exposure(None, "<default>", {exposure.ALLOW_ENV: "1"})
    assert opted.allowed and "anyone who can reach this machine" in opted.message
    assert not exposure.exposure(None, "<default>", {exposure.ALLOW_ENV: "yes please"}).allowed


@pytest.mark.parametrize("where", [FLAG, "environment variable", "/home/me/.streamlit/config.toml"])
def test_an_address_someone_set_is_served_with_a_warning(where):
    chosen = exposure.exposure("0.0.0.0", where, {})
    assert chosen.allowed and chosen.address == "0.0.0.0" and where in chosen.message


@pytest.mark.parametrize("host", [None, "", "localhost:8501", "LOCALHOST", "127.0.0.1:8501", "127.0.1.1", "[::1]:8501", "x.localhost:8501"])
def test_this_machines_names_are_served(host):
    assert exposure.foreign_host(host, "127.0.0.1", {}) is None


@pytest.mark.parametrize("host", ["evil.example:8501", "192.168.1.5:8501", "127.0.0.1.evil.example", "localhost.evil.example", "[::1"])
def test_other_names_are_foreign_unless_opted_in(host):
    assert exposure.foreign_host(host, "127.0.0.1", {}) == host
    assert exposure.foreign_host(host, "127.0.0.1", {exposure.ALLOW_ENV: "1"}) is None
    assert exposure.foreign_host(host, "unix:///run/balora.sock", {}) is None  # reached through a proxy only


# ------------------------------------------------------------------------------------- AppTest


@pytest.fixture
def served(monkeypatch, tmp_path):
    monkeypatch.setenv(settings.ENV_VAR, str(tmp_path))
    monkeypatch.delenv(exposure.ALLOW_ENV, raising=False)

    def serve(address, where):
        monkeypatch.setattr(exposure, "served_address", lambda: (address, where))
        return AppTest.from_file(APP, default_timeout=TIMEOUT).run()

    return serve


def test_app_refuses_to_serve_an_address_nobody_chose(served, monkeypatch):
    at = served(None, "<default>")
    assert not at.exception
    assert "refuses to serve" in at.error[0].value and "balora dashboard" in at.error[0].value
    assert not at.title and not at.sidebar.caption  # no page ran: nothing of the runs or files shows
    monkeypatch.setenv(exposure.ALLOW_ENV, "1")
    at = served(None, "<default>")
    assert not at.exception and at.title[0].value == "Compare runs"
    assert "anyone who can reach this machine" in " ".join(w.value for w in at.sidebar.warning)


def test_app_serves_a_chosen_address_with_a_warning_and_localhost_quietly(served):
    at = served("0.0.0.0", FLAG)
    assert not at.exception and at.title[0].value == "Compare runs" and not at.error
    assert "Served on 0.0.0.0" in " ".join(w.value for w in at.sidebar.warning)
    at = served("127.0.0.1", "<default>")
    assert not at.exception and at.title[0].value == "Compare runs" and not at.sidebar.warning


# ------------------------------------------------------------------------------------- real servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> set[str] | None:
    """Addresses with a socket listening on `port` (from /proc/net; None where there is none)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            return None
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(addr)
                if width == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:  # four little-endian 32-bit words
                    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                    found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def _server(cmd: list[str], cwd: Path, port: int, streamlit_server):
    """A streamlit server started with `cmd` in `cwd`, a home folder without any streamlit
    config, stopped on exit; waits (bounded) until it answers its health check."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_") and k != exposure.ALLOW_ENV}
    env.update(HOME=str(cwd), BALORA_RUNS=str(cwd / "runs"))
    return streamlit_server(cmd, cwd, env, port, cwd / f"server-{port}.log", START_TIMEOUT_S)


def _page_text(port: int, timeout_s: float = 60, page_name: str = "", host: str = "") -> str:
    """Run the app's script once in a new session, as a browser would (on the page at /`page_name`,
    "" for the default one), and return the text of every message the server sent back (until the
    script finished). `host`: the name the browser's address bar had, sent as Host and Origin as a
    browser sends them (the connection still goes to 127.0.0.1)."""
    websockets = pytest.importorskip("websockets")  # a dependency of streamlit itself
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ClientState_pb2 import ClientState
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    async def talk() -> str:
        texts = []
        named = {"origin": f"http://{host}:{port}", "host": "127.0.0.1", "port": port} if host else {}
        async with websockets.connect(f"ws://{host or '127.0.0.1'}:{port}/_stcore/stream", subprotocols=["streamlit"],
                                      max_size=None, open_timeout=timeout_s, **named) as ws:
            await ws.send(BackMsg(rerun_script=ClientState(query_string="", page_script_hash="", page_name=page_name)).SerializeToString())
            while True:
                msg = ForwardMsg()
                msg.ParseFromString(await ws.recv())
                texts.append(str(msg))
                if msg.WhichOneof("type") == "script_finished":
                    return "\n".join(texts)

    return asyncio.run(asyncio.wait_for(talk(), timeout_s))


def test_started_from_another_folder_it_refuses_to_serve(tmp_path, streamlit_server):
    port = _free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", APP, "--server.port", str(port), "--server.headless", "true",
           "--browser.gatherUsageStats", "false"]
    with _server(cmd, tmp_path, port, streamlit_server):
        listening = _listening(port)
        if listening is not None:  # what streamlit does without server.address: every interface
            assert listening & {"0.0.0.0", "::"}, listening
        text = _page_text(port)
    assert "refuses to serve" in text and "balora dashboard" in text
    assert "Compare runs" not in text  # no page ran
    assert "refuses to serve" in (tmp_path / f"server-{port}.log").read_text()  # and the terminal was told


def test_balora_dashboard_from_another_folder_serves_localhost_only(tmp_path, streamlit_server):
    port = _free_port()
    cmd = [sys.executable, "-m", "balora.cli", "dashboard", "--port", str(port)]
    with _server(cmd, tmp_path, port, streamlit_server) as proc:
        listening = _listening(port)
        if listening is not None:
            assert listening == {"127.0.0.1"}, listening
        text = _page_text(port)
        # `balora dashboard` becomes the server: a SIGTERM to the process it was started as stops the
        # serving (a streamlit child once kept serving after its parent was gone).
        proc.terminate()
        proc.wait(30)
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
    assert "Compare runs" in text and "refuses to serve" not in text


def test_a_page_asked_for_under_a_name_of_another_site_is_refused(tmp_path, streamlit_server):
    """DNS rebinding: a web page at http://evil.example:8501 makes its name resolve to 127.0.0.1, and the
    browser, seeing one origin, lets its script talk to the dashboard listening on this machine only
    (streamlit refuses other origins, not its own one). The Launch page ran for it: it could start jobs
    and read adapter files by path on Inspect. Reached as localhost or 127.0.0.1 (an SSH tunnel too), it serves."""
    port = _free_port()
    cmd = [sys.executable, "-m", "balora.cli", "dashboard", "--port", str(port)]
    with _server(cmd, tmp_path, port, streamlit_server):
        texts = {host: _page_text(port, page_name="launch", host=host) for host in ("evil.example", "localhost", "127.0.0.1")}
    assert "evil.example" in texts["evil.example"] and "Launch a comparison" not in texts["evil.example"]
    assert "Launch a comparison" in texts["localhost"] and "Launch a comparison" in texts["127.0.0.1"]


def test_packaged_app_started_from_another_folder_refuses_every_page(tmp_path, streamlit_server):
    """An installed balora has no dashboard/app.py: `streamlit run .../site-packages/balora/dashboard/app.py`
    from any folder serves every interface. It refused the default page, but streamlit ran a page asked for by
    its URL (/launch, /inspect) straight from the `pages/` folder beside that script, its old multipage
    layout, without the script's check: anyone on the network could start jobs and read files by path."""
    from balora.commands.dashboard import app_path

    # (a checkout from before may keep an untracked pages/__pycache__: harmless, streamlit serves pages/*.py)
    assert not list((app_path().parent / "pages").glob("*.py")), "streamlit serves pages/*.py beside the main script as pages"
    port = _free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", str(app_path()), "--server.port", str(port),
           "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    with _server(cmd, tmp_path, port, streamlit_server):
        texts = {name: _page_text(port, page_name=name) for name in ("launch", "inspect", "")}
    for name, text in texts.items():
        assert "refuses to serve" in text and "Launch a comparison" not in text and "Inspect" not in text, name


# ------------------------------------------------------------------------------------- reloads


def _dashboard_flags(argv: list[str]) -> dict[str, str]:
    """The streamlit config options `balora dashboard ARGV` passes on its command line."""
    import argparse

    from balora.commands import dashboard

    parser = argparse.ArgumentParser()
    dashboard.add_parser(parser.add_subparsers())
    cmd = dashboard.build_command(parser.parse_args(["dashboard", *argv]))
    flags = cmd[cmd.index("run") + 2 : cmd.index("--") if "--" in cmd else len(cmd)]
    return {name.removeprefix("--"): value for name, value in zip(flags[::2], flags[1::2])}


def test_balora_dashboard_keeps_its_job_registry_when_a_dashboard_file_changes(monkeypatch):
    """Streamlit watches every module under its main script's folder, which for `balora dashboard` is
    balora/dashboard/ itself. A saved change there (an editable install, a `git pull` while it serves)
    dropped every balora module from sys.modules at the next rerun of an open page: balora.dashboard.jobs
    was imported again with no job in its registry, so Launch showed no running job, could not cancel it,
    and started a second one beside it. Checked with streamlit's own watcher, configured as the command
    configures the server, and the change delivered as its file-watching thread delivers it."""
    from streamlit import config
    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.watcher import local_sources_watcher

    from balora.commands.dashboard import app_path
    from balora.dashboard import jobs

    saved = dict(sys.modules)
    try:
        config.get_config_options(force_reparse=True, options_from_flags=_dashboard_flags([]))
        monkeypatch.setattr(local_sources_watcher, "PathWatcher", None)  # chosen from the config on first use
        watcher = local_sources_watcher.LocalSourcesWatcher(PagesManager(str(app_path())))
        try:
            watcher.update_watched_modules()  # what the server does after a page ran
            watcher.on_path_changed(settings.__file__)  # a save of balora/dashboard/settings.py
            watcher.flush_pending_evictions()  # what the session's next rerun does first
        finally:
            watcher.close()
        kept = sys.modules.get("balora.dashboard.jobs") is jobs
        assert kept, "balora.dashboard.jobs would be imported afresh, its job registry empty"
    finally:
        sys.modules.update(saved)  # whatever was dropped, for the tests that follow
        config.get_config_options(force_reparse=True)


# ------------------------------------------------------------------------------------- start-up refusals


def _dashboard(tmp_path, *argv: str):
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    env.update(HOME=str(tmp_path), BALORA_RUNS=str(tmp_path / "runs"))
    # A server that did start is stopped by the timeout: the test then fails on what it printed.
    return subprocess.run([sys.executable, "-m", "balora.cli", "dashboard", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def test_a_port_in_use_is_refused_in_one_line(tmp_path):
    """The port was checked by streamlit only after `balora dashboard` had said it was serving there:
    "serving on http://127.0.0.1:8501" then "Port 8501 is not available" and exit code 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _dashboard(tmp_path, "--port", str(port))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(port) in lines[0] and "--port" in lines[0] and "serving" not in lines[0], lines


@pytest.mark.parametrize("host", ["198.51.100.7", "no-such-host.invalid"])  # 198.51.100.0/24: documentation only
def test_a_host_that_is_not_this_machine_is_refused_in_one_line(tmp_path, host):
    """An address of another machine (a typo, a laptop's address from yesterday) or a name that does not
    resolve ended in a traceback from streamlit's server, after "serving on http://HOST:PORT"."""
    try:
        with socket.socket() as s:
            s.bind((host, 0))
        pytest.skip(f"{host} is an address of this machine here")
    except OSError:
        pass
    done = _dashboard(tmp_path, "--host", host, "--port", str(_free_port()))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and host in lines[0] and "--host" in lines[0] and "Traceback" not in done.stderr, lines


def test_an_empty_runs_folder_name_is_refused(tmp_path):
    """`balora dashboard --runs "$RUNS"` with RUNS unset: the empty name resolved to the current folder,
    which the dashboard then listed as the runs folder and Launch wrote new runs into (the app itself,
    given `-- --runs ""`, falls back to $BALORA_RUNS or ./runs)."""
    done = _dashboard(tmp_path, "--runs", "", "--print-command")
    assert done.returncode == 2 and "--runs" in done.stderr and not done.stdout, (done.stdout, done.stderr)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "::"])
def test_the_url_it_prints_opens_the_address_it_serves(host):
    """`balora dashboard --host ::1` said "serving on http://::1:8501", which no browser opens."""
    from urllib.parse import urlsplit

    from balora.commands.dashboard import url

    parts = urlsplit(url(host, 8501))
    assert (parts.scheme, parts.hostname, parts.port) == ("http", host, 8501)
