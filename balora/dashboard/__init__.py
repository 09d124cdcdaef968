"""The balora Streamlit dashboard: `streamlit run dashboard/app.py` or `balora dashboard`.

Three layers (see docs/ARCHITECTURE.md): `data` (cached loaders over balora.load_run /
balora.inspect), `plots` (DataFrame -> plotly Figure, never st.*), `pages/` (layout only).
"""
