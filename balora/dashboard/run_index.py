"""Which runs the dashboard lists: the user's runs folder and the bundled samples beside it.

Pure pandas over the cached `list_runs` loader; no st.* calls. Samples are labelled
`samples/NAME` and flagged `sample=True`, so pages can mark them and Launch never writes there.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

SAMPLES_PREFIX = "samples/"


def labels_under(paths: pd.Series, root: Path) -> list[str]:
    """Each run's folder relative to `root` ("grid", "sweeps/grid"), so two runs with the same
    folder name in different subfolders stay apart; the folder name when not under `root`."""
    out = []
    for path in paths.astype(str):
        try:
            out.append(Path(path).relative_to(root).as_posix())
        except ValueError:
            out.append(Path(path).name)
    return out


def index(user: pd.DataFrame | None, user_root: Path, samples: pd.DataFrame | None = None,
          samples_root: Path | None = None) -> pd.DataFrame:
    """One row per run: list_runs' columns plus `label` (unique on the page) and `sample`.

    `user` and `samples` are `balora.list_runs` frames of the two folders (None: no such folder).
    The user's runs come first; a samples folder that is also the user's folder is listed once.
    """
    parts = []
    if user is not None:
        # ./samples/NAME for a run of the user's own under samples/: never the label of a bundled sample
        labels = [f"./{x}" if x.startswith(SAMPLES_PREFIX) else x for x in labels_under(user["path"], user_root)]
        parts.append(user.assign(label=labels, sample=False))
    if samples is not None and samples_root is not None and Path(samples_root).resolve() != Path(user_root).resolve():
        parts.append(samples.assign(label=[SAMPLES_PREFIX + s for s in labels_under(samples["path"], samples_root)],
                                    sample=True))
    if not parts:
        return pd.DataFrame({"path": pd.Series(dtype=str), "label": pd.Series(dtype=str),
                             "sample": pd.Series(dtype=bool)})
    return pd.concat(parts, ignore_index=True)


def default_label(runs: pd.DataFrame) -> str | None:
    """The run a page opens on: the user's own runs before the samples; among those the largest
    completed run (most cells: grids, many seeds), so every section has something to show."""
    if runs.empty:
        return None
    ranked = runs.assign(_done=runs["status"].astype(str) == "completed").sort_values(
        ["sample", "_done", "n_cells", "label"], ascending=[True, False, False, True], kind="stable"
    )
    return str(ranked["label"].iloc[0])
