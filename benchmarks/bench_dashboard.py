"""How fast the dashboard answers a user, measured in a real browser.

    python benchmarks/bench_dashboard.py [--repeat 5] [--pages compare,inspect,launch,learn]

Starts the app (`streamlit run dashboard/app.py`) on an empty runs folder, so Compare lists the
bundled sample runs and opens on the largest, then drives Debian's headless Chromium through
Playwright (never `playwright install`) and prints the median, min and max over `--repeat`
fresh browser sessions of:

- time to the first plot: of a new browser session on Compare (loading the frontend and
  plotly.js), then of each page opened from the sidebar as a user does (Inspect: from pressing
  Enter on an adapter path; Launch has no plot: time to its form), and to the last of the
  Learn page's plots;
- each Compare view switch (Loss -> Grid -> Speed-up -> Imbalance -> Spectra), to its new plot;
- each Learn slider move (one per section) to the redrawn figure.

Every wait is on the page's own state (a plotly `.main-svg`, a figure whose data changed,
Streamlit's running indicator gone), never a fixed delay. The load average is printed with
the results: the machine may be shared. Targets (issue 12, idle machine): first plot <= 3 s on
every page, any interaction <= 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from cli_args import positive_int  # beside this file

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "dashboard" / "app.py"
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 120_000
PAGES = ("compare", "inspect", "launch", "learn")
COMPARE_VIEWS = {"Grid": "learning rate × alpha", "Speed-up": "Time to reach", "Imbalance": "of every layer",
                 "Spectra": "Singular values of", "Loss": "loss against optimizer step"}
# (key of a Learn slider, key of the figure it redraws): one per section
LEARN_SLIDERS = [("scalar_lr", "fig_scalar_landscape"), ("cons_lr_gd", "fig_cons_imbalance"),
                 ("inv_angle", "fig_inv_factors"), ("gauge_lr", "fig_gauge_loss")]

# A signature of one chart's data, to see that it was redrawn with new numbers.
FIGURE_SIGNATURE_JS = """(key) => {
  const el = document.querySelector(`.st-key-${key} .js-plotly-plot`);
  if (!el || !el.data || !el.querySelector('.main-svg')) return null;
  return JSON.stringify(el.data.map(t => [t.x, t.y, t.z]));
}"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def start_server(runs: Path, port: int, log, root: Path = ROOT) -> subprocess.Popen:
    """`streamlit run ROOT/dashboard/app.py`; another checkout's balora comes first on PYTHONPATH."""
    cmd = [sys.executable, "-m", "streamlit", "run", str(root / "dashboard" / "app.py"), "--server.port", str(port),
           "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--", "--runs", str(runs)]
    env = {k: v for k, v in os.environ.items() if k != "BALORA_RUNS"}
    if root != ROOT:
        env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.terminate()
    raise SystemExit("streamlit did not start within 120 s")


def write_adapter(folder: Path) -> Path:
    """A Trainer output folder with two checkpoints of a 7-module PEFT adapter (Inspect's input)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_startup import write_adapter as one

    for step in (10, 20):
        one(folder / f"checkpoint-{step}")
    return folder


def settled(page) -> None:
    """Streamlit finished the rerun: no running indicator, nothing left marked stale."""
    page.wait_for_selector('[data-testid="stStatusWidget"]', state="detached", timeout=TIMEOUT_MS)
    page.wait_for_function("() => !document.querySelector('[data-stale=\"true\"]')", timeout=TIMEOUT_MS)


def chart_with_title(page, part: str) -> None:
    page.wait_for_function(
        """(part) => Array.from(document.querySelectorAll('.js-plotly-plot')).some(gd => {
             const t = (gd._fullLayout || {}).title; return t && (t.text || '').includes(part) &&
             gd.querySelector('.main-svg'); })""", arg=part, timeout=TIMEOUT_MS)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def open_page(page, title: str) -> None:
    """Go to a page as a user does: its link in the sidebar (no reload of the frontend)."""
    page.locator('[data-testid="stSidebarNav"] a', has_text=title).first.click()


def compare_first(page, url: str, out: dict) -> None:
    """A new visitor: load the app (frontend, plotly.js, the script) until Compare's first plot."""
    out.setdefault("Compare: first plot (new browser session)", []).append(timed(lambda: (
        page.goto(url + "/", wait_until="commit"), page.wait_for_selector(".main-svg", timeout=TIMEOUT_MS))))
    settled(page)


def compare_views(page, out: dict) -> None:
    for view, title in COMPARE_VIEWS.items():
        button = page.locator('[data-testid="stButtonGroup"] button', has_text=view).first
        out.setdefault(f"Compare: switch to {view}", []).append(timed(lambda: (
            button.click(), chart_with_title(page, title), settled(page))))


def compare_again(page, out: dict) -> None:
    out.setdefault("Compare: first plot (from the sidebar)", []).append(timed(lambda: (
        open_page(page, "Compare"), chart_with_title(page, COMPARE_VIEWS["Loss"]))))
    settled(page)


def inspect_session(page, adapter: Path, out: dict) -> None:
    open_page(page, "Inspect")
    box = page.locator(".st-key-insp_path input")
    box.wait_for(timeout=TIMEOUT_MS)
    settled(page)
    box.fill(str(adapter))
    out.setdefault("Inspect: first plot (after Enter on a path)", []).append(timed(lambda: (
        box.press("Enter"), page.wait_for_selector(".main-svg", timeout=TIMEOUT_MS))))
    settled(page)


def launch_session(page, out: dict) -> None:
    out.setdefault("Launch: form shown (no plot on this page)", []).append(timed(lambda: (
        open_page(page, "Launch"), page.wait_for_selector('[data-testid="stFormSubmitButton"]', timeout=TIMEOUT_MS))))
    settled(page)


def learn_session(page, out: dict) -> None:
    t0 = time.perf_counter()
    open_page(page, "Learn")
    page.wait_for_selector(".st-key-fig_scalar_landscape .main-svg", timeout=TIMEOUT_MS)
    out.setdefault("Learn: first plot", []).append(time.perf_counter() - t0)
    page.wait_for_selector(".st-key-fig_gauge_move .main-svg", timeout=TIMEOUT_MS)  # the page's last figure
    settled(page)
    out.setdefault("Learn: all plots", []).append(time.perf_counter() - t0)
    for slider_key, fig_key in LEARN_SLIDERS:
        slider = page.locator(f".st-key-{slider_key} input[type=range]")
        page.locator(f".st-key-{slider_key}").scroll_into_view_if_needed()
        before = page.evaluate(FIGURE_SIGNATURE_JS, fig_key)

        def move():
            slider.focus()
            slider.press("ArrowRight")
            page.wait_for_function(f"(b) => {{ const s = ({FIGURE_SIGNATURE_JS})({json.dumps(fig_key)}); "
                                   "return s !== null && s !== b; }", arg=before, timeout=TIMEOUT_MS)

        out.setdefault(f"Learn: slider {slider_key} -> {fig_key}", []).append(timed(move))
        settled(page)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=positive_int, default=5)
    parser.add_argument("--pages", default=",".join(PAGES))
    parser.add_argument("--app-root", type=Path, default=ROOT,
                        help="measure another checkout (e.g. `git archive REV | tar -x -C DIR`): its dashboard and "
                             "its balora package (default: this one)")
    args = parser.parse_args()
    if not CHROMIUM.exists():
        raise SystemExit(f"{CHROMIUM} is missing: apt-get install chromium chromium-driver")
    from playwright.sync_api import sync_playwright

    pages = args.pages.split(",")
    if not set(pages) <= set(PAGES):  # a typo used to measure nothing for that page, silently
        parser.error(f"--pages {args.pages}: expected a comma list of {', '.join(PAGES)}")
    results: dict[str, list[float]] = {}
    loads = [load()]
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "server.log", "w") as log:
        runs = Path(tmp) / "runs"  # empty: Compare lists the bundled samples
        adapter = write_adapter(Path(tmp) / "trainer")
        port = free_port()
        server = start_server(runs, port, log, args.app_root.resolve())
        url = f"http://127.0.0.1:{port}"
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
                for i in range(args.repeat):
                    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})  # a fresh session
                    page = ctx.new_page()
                    compare_first(page, url, results)
                    if "compare" in pages:
                        compare_views(page, results)
                    if "inspect" in pages:
                        inspect_session(page, adapter, results)
                    if "launch" in pages:
                        launch_session(page, results)
                    if "learn" in pages:
                        learn_session(page, results)
                    if "compare" in pages:
                        compare_again(page, results)
                    ctx.close()
                    loads.append(load())
                    print(f"session {i + 1}/{args.repeat} done ({loads[-1]})", file=sys.stderr)
                browser.close()
        finally:
            server.terminate()
            server.wait(10)
    print(f"balora dashboard at {args.app_root}, {args.repeat} fresh browser sessions (the first also warms the "
          "server's caches)")
    print(f"load average (1/5/15 min) before: {loads[0]}; after: {loads[-1]}")
    print(f"{'what':<48} {'median s':>9} {'min s':>7} {'max s':>7}")
    for what, times in results.items():
        print(f"{what:<48} {statistics.median(times):>9.2f} {min(times):>7.2f} {max(times):>7.2f}")


if __name__ == "__main__":
    main()
