"""The dashboard's navigation: `streamlit run dashboard/app.py [-- --runs DIR]` or `balora dashboard`.

Both entry points call `main()`: the repository's `dashboard/app.py` (a few lines) and this
module's own `__main__` (what `balora dashboard` runs from an installed package). Pages are
addressed by absolute path, so the app works whichever script streamlit was started on.
"""

from __future__ import annotations

from pathlib import Path

PAGES_DIR = Path(__file__).resolve().parent / "pages"

# (file in pages/, title, icon, url path)
PAGES = [
    ("compare.py", "Compare", ":material/monitoring:", "compare"),
    ("inspect.py", "Inspect", ":material/search:", "inspect"),
    ("launch.py", "Launch", ":material/play_circle:", "launch"),
    ("learn.py", "Learn", ":material/school:", "learn"),
]


def page_path(name: str) -> Path:
    """Absolute path of a page file, e.g. page_path("learn.py") (AppTest.switch_page takes it)."""
    return PAGES_DIR / name


def main() -> None:
    import streamlit as st

    from balora.dashboard import settings

    st.set_page_config(page_title="balora", page_icon=":material/balance:", layout="wide")
    pages = [
        st.Page(page_path(f), title=t, icon=i, url_path=u, default=k == 0)
        for k, (f, t, i, u) in enumerate(PAGES)
    ]
    nav = st.navigation(pages)
    with st.sidebar:
        st.caption(f"Runs folder: `{settings.runs_dir()}`")
        st.caption("BaLoRA: balanced LoRA factors, B^T B = A A^T, same dW (arXiv 2605.31484).")
    nav.run()


if __name__ == "__main__":
    main()
