"""The Learn page's cached computations and its widgets' defaults (no layout).

Kept out of the page script so that `warmup` can fill the same caches in the background: the
first visitor then finds the default figures already computed (the gauge comparison trains
toy problems: about a second per setting on a laptop CPU).
"""

from __future__ import annotations

import streamlit as st

from balora import teaching

Y_SCALAR = 1.0
GRID_LIM = 4.5  # the unbalanced start b0 = c / 2 reaches 4 at the slider's c = 8: drawn inside
# Contour grid of the scalar landscape: 101 x 101 points over a ~450 px square plot is already
# finer than the contour lines need; the browser computes contours from every point on each redraw.
GRID_N = 101

# Widget defaults, shared by the page and the warm-up.
CONS_START = "unbalanced"
CONS_LR_GD = 0.05
CONS_LR_ADAM = 0.02
GAUGE_OPTIMIZER = "adam"
GAUGE_LR = 0.03

conservation_path = st.cache_data(show_spinner=False)(teaching.conservation_path)
invariance_example = st.cache_data(show_spinner=False)(teaching.invariance_example)
condition_vs_scale = st.cache_data(show_spinner=False)(teaching.condition_vs_scale)
scalar_loss_grid = st.cache_data(show_spinner=False)(teaching.scalar_loss_grid)


@st.cache_data(show_spinner=False)
def gauge_runs(optimizer: str, lr: float) -> dict:
    task = teaching.gauge_task()
    return {arm: teaching.gauge_run(optimizer, arm, lr, task=task) for arm in teaching.GAUGE_ARMS}


def conservation_paths(start: str, lr_gd: float, lr_adam: float) -> dict:
    """Each optimizer's path from `start` (Adam at its own learning rate)."""
    return {opt: conservation_path(opt, start, lr_adam if opt == "adam" else lr_gd)
            for opt in teaching.CONSERVATION_OPTIMIZERS}


def warm() -> None:
    """Compute what the page shows with its default widgets (fills the caches above)."""
    scalar_loss_grid(Y_SCALAR, GRID_LIM, GRID_N)
    conservation_paths(CONS_START, CONS_LR_GD, CONS_LR_ADAM)
    invariance_example(0.0, 0.0, 0.0)
    condition_vs_scale(0.0, 0.0)
    gauge_runs(GAUGE_OPTIMIZER, GAUGE_LR)
