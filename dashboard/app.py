"""Entry point: `streamlit run dashboard/app.py [-- --runs DIR]` or `balora dashboard`.

Only builds the navigation; each page lays itself out. Pages are listed only when their
file exists, so a page still being written elsewhere never breaks the app.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# `streamlit run dashboard/app.py` from a plain checkout puts dashboard/ (not the repo root)
# on sys.path; add the root so `import dashboard` and `import balora` resolve to this tree.
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import streamlit as st  # noqa: E402

from dashboard import settings  # noqa: E402

# (file relative to this script, title, icon, url path)
PAGES = [
    ("pages/compare.py", "Compare", ":material/monitoring:", "compare"),
    ("pages/inspect.py", "Inspect", ":material/search:", "inspect"),
    ("pages/launch.py", "Launch", ":material/play_circle:", "launch"),
    ("pages/learn.py", "Learn", ":material/school:", "learn"),
]


def available_pages() -> list[tuple[str, str, str, str]]:
    return [p for p in PAGES if (HERE / p[0]).is_file()]


st.set_page_config(page_title="balora", page_icon=":material/balance:", layout="wide")
pages = [st.Page(f, title=t, icon=i, url_path=u, default=k == 0) for k, (f, t, i, u) in enumerate(available_pages())]
nav = st.navigation(pages)
with st.sidebar:
    st.caption(f"Runs folder: `{settings.runs_dir()}`")
    st.caption("BaLoRA: balanced LoRA factors, B^T B = A A^T, same dW (arXiv 2605.31484).")
nav.run()
