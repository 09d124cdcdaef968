"""Long runs: the dashboard's curves and heatmaps keep at most MAX_PLOT_STEPS steps (about a
chart's width in pixels), evenly spaced with the first and last, each at its unthinned value."""

from __future__ import annotations

import numpy as np
import pandas as pd

from balora.dashboard import frames


def long_steps(n_steps: int = 5003, seeds=(0, 1, 2), arms=("lora", "balora")) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = [{"series": arm, "arm": arm, "seed": seed, "step": step, "loss": float(rng.random()),
             "time_s": 0.01 * step + 0.001 * seed}
            for arm in arms for seed in seeds for step in range(1, n_steps + 1)]
    return pd.DataFrame(rows)


def test_thin_steps_keeps_evenly_spaced_steps_with_first_and_last():
    df = pd.DataFrame({"step": np.repeat(np.arange(1, 5004), 2), "v": np.arange(2 * 5003)})
    out = frames.thin_steps(df, max_steps=1000)
    kept = np.sort(out["step"].unique())
    assert len(kept) == 1000 and kept[0] == 1 and kept[-1] == 5003
    gaps = np.diff(kept)
    assert gaps.max() - gaps.min() <= 1  # evenly spaced
    assert (out.groupby("step").size() == 2).all()  # every row at a kept step is kept
    small = df[df["step"] <= 50]
    assert frames.thin_steps(small, max_steps=1000) is small  # short runs untouched


def test_seed_curves_of_a_long_run_keep_the_unthinned_medians():
    steps = long_steps()
    for x in ("step", "time_s"):
        curves = frames.seed_curves(steps, x=x, metric="loss")
        assert curves.groupby("series").size().max() <= frames.MAX_PLOT_STEPS
        # Independent recomputation: the median over seeds at each kept point.
        want = steps.groupby(["series", "step"])["loss"].median()
        if x == "step":
            got = curves.set_index(["series", "step"])["median"]
            np.testing.assert_allclose(got.to_numpy(), want.loc[got.index].to_numpy())
            assert {1, 5003} <= set(curves["step"])


def test_layer_steps_of_a_long_run_are_thinned():
    n = 3000
    layers = pd.DataFrame({"series": "lora", "module": np.repeat(["q", "v"], n), "step": np.tile(np.arange(n), 2),
                           "seed": 0, "rel_imbalance": np.linspace(0, 1, 2 * n)})
    out = frames.layer_steps(layers, ["rel_imbalance"])
    assert out.groupby("module").size().max() <= frames.MAX_PLOT_STEPS
    assert set(out["step"]) >= {0, n - 1}
