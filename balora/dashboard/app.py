"""The dashboard's navigation: `streamlit run dashboard/app.py [-- --runs DIR]` or `balora dashboard`.

Both entry points call `main()`: the repository's `dashboard/app.py` (a few lines) and this
module's own `__main__` (what `balora dashboard` runs from an installed package). Pages are
addressed by absolute path, so the app works whichever script streamlit was started on.
Before any page runs, `main()` checks where the server listens (balora.dashboard.exposure): on
an address nobody chose (streamlit's every-interface default) it only says how to restart, and
on this machine only it refuses a page asked for under another site's name (DNS rebinding).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Not "pages": streamlit serves a pages/ folder beside the main script as pages of their own, run by URL
# (/launch) without main() and its exposure check, until some session has called st.navigation.
PAGES_DIR = Path(__file__).resolve().parent / "views"

# (file in views/, title, icon, url path)
PAGES = [
    ("compare.py", "Compare", ":material/monitoring:", "compare"),
    ("inspect.py", "Inspect", ":material/search:", "inspect"),
    ("launch.py", "Launch", ":material/play_circle:", "launch"),
    ("learn.py", "Learn", ":material/school:", "learn"),
]


def page_path(name: str) -> Path:
    """Absolute path of a page file, e.g. page_path("learn.py") (AppTest.switch_page takes it)."""
    return PAGES_DIR / name


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    """Print `message` to the terminal that started streamlit, once per process (the page says
    it to every visitor; the person at the terminal is the one who can restart it)."""
    if message not in _SAID:
        _SAID.add(message)
        print(f"balora dashboard: {message}", file=sys.stderr, flush=True)


def main() -> None:
    import streamlit as st

    from balora.dashboard import exposure, md, settings, warmup
    from balora.errors import InputError

    # An emoji, not ":material/balance:": the browser drew that favicon from fonts.gstatic.com on every page load
    # (a request to Google per visit, an error offline); an emoji favicon is made in the page itself.
    st.set_page_config(page_title="balora", page_icon="⚖️", layout="wide")
    # Served beyond this machine without anyone choosing it: show only how to restart it.
    exposed = exposure.current()
    if exposed is not None and not exposed.allowed:
        _say_once(exposed.message)
        st.error(exposed.message, icon=":material/gpp_bad:")
        st.stop()
    foreign = exposure.foreign_host(st.context.headers.get("Host"), exposure.served_address()[0]) if exposed is None else None
    if foreign is not None:  # listening on this machine only, asked for under another site's name
        st.error(exposure.foreign_host_message(md.text(foreign)), icon=":material/gpp_bad:")
        st.stop()
    try:  # every page lists or writes runs there: one message, not the same traceback on each page
        runs = settings.runs_dir()
    except InputError as e:  # ~user of no user in --runs or $BALORA_RUNS (~.balora/runs, typed for ~/.balora/runs)
        st.error(md.text(e), icon=":material/folder_off:")
        st.stop()
    pages = [
        st.Page(page_path(f), title=t, icon=i, url_path=u, default=k == 0)
        for k, (f, t, i, u) in enumerate(PAGES)
    ]
    nav = st.navigation(pages)
    with st.sidebar:
        st.caption(f"Runs folder: `{runs}` (yours; the bundled sample runs are listed after yours, "
                   "read-only)")
        st.caption("BaLoRA: balanced LoRA factors, B^T B = A A^T, same dW (arXiv 2605.31484).")
        if exposed is not None:
            st.warning(exposed.message, icon=":material/public:")
    nav.run()
    warmup.start()  # after the first page: torch for Launch, Inspect and Learn, imported while the user reads


if __name__ == "__main__":
    main()
