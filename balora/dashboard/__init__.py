"""The balora Streamlit dashboard: `streamlit run dashboard/app.py` or `balora dashboard`.

Three layers (see docs/ARCHITECTURE.md): cached loaders (`loaders`, over balora.load_run /
balora.inspect; `uploads` for files in and out), pure shaping (`frames`, `report_frames`,
`run_index`) and figure builders (`plots` and its page modules: DataFrame -> plotly Figure,
never st.*), and `views/` (the pages, layout only). `exposure` decides whether the app may serve at all.
"""
