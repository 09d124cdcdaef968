"""The Learn page under streamlit's AppTest: it runs, shows its key elements, and every kind
of widget changes what is drawn."""

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

PAGE = str(Path(__file__).resolve().parents[1] / "balora" / "dashboard" / "views" / "learn.py")
# Generous: the first run trains a few toy problems, and CI machines may be shared.
TIMEOUT = 120


@pytest.fixture(scope="module")
def app():
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    return at


def charts(at) -> dict:
    """Plotly figures by widget key (the element id ends with the key), as parsed JSON."""
    out = {}
    for el in at.get("plotly_chart"):
        key = el.proto.id.rsplit("-", 1)[-1]
        out[key] = json.loads(el.proto.spec)
    return out


def test_page_runs_with_its_sections_formulas_and_charts(app):
    figs = charts(app)
    assert len(figs) >= 10
    for key in ("fig_scalar_landscape", "fig_cons_imbalance", "fig_inv_factors", "fig_inv_sweep", "fig_gauge_loss"):
        assert key in figs
    assert len(app.header) == 4
    assert len(app.latex) >= 4
    text = " ".join(m.value for m in app.markdown) + " ".join(i.value for i in app.info)
    assert "paper's A is PEFT's B" in text
    assert {m.label for m in app.metric} >= {"relative imbalance", "Hessian condition number"}


def test_every_chart_has_a_title_and_labelled_axes(app):
    for key, fig in charts(app).items():
        layout = fig["layout"]
        assert layout.get("title", {}).get("text"), key
        axes = [name for name in layout if name.startswith(("xaxis", "yaxis"))]
        assert any(a.startswith("xaxis") for a in axes) and any(a.startswith("yaxis") for a in axes), key
        for name in axes:
            assert layout[name].get("title", {}).get("text"), f"{key}: {name} has no title"


def changed_after(at, change, keys):
    """Apply change(at), rerun, and return which of the figures under keys differ."""
    before = charts(at)
    change(at)
    at.run()
    assert not at.exception, at.exception
    after = charts(at)
    return {k for k in keys if json.dumps(before[k], sort_keys=True) != json.dumps(after[k], sort_keys=True)}


def test_learning_rate_slider_changes_the_scalar_figures(app):
    keys = ("fig_scalar_landscape", "fig_scalar_loss", "fig_scalar_curvature", "fig_inv_factors")
    changed = changed_after(app, lambda at: at.slider(key="scalar_lr").set_value(0.2), keys)
    assert changed == {"fig_scalar_landscape", "fig_scalar_loss", "fig_scalar_curvature"}


def test_start_radio_changes_the_conservation_figures(app):
    keys = ("fig_cons_imbalance", "fig_cons_loss", "fig_cons_rel")
    assert changed_after(app, lambda at: at.radio(key="cons_start").set_value("peft"), keys) == set(keys)


def test_transform_sliders_change_factors_and_conditioning(app):
    metric = lambda at: next(m.value for m in at.metric if m.label == "Hessian condition number")  # noqa: E731
    cond_before = metric(app)
    keys = ("fig_inv_factors", "fig_inv_spectrum", "fig_inv_sweep")
    assert changed_after(app, lambda at: at.slider(key="inv_shear").set_value(1.0), keys) == set(keys)
    assert metric(app) != cond_before
    dw_change = next(m.value for m in app.metric if m.label.startswith("max |ΔdW|"))
    assert float(dw_change) < 1e-10  # the product did not move


def test_optimizer_choice_changes_the_gauge_comparison(app):
    keys = ("fig_gauge_loss", "fig_gauge_move")
    sign = "sign descent (the paper's synthetic Adam)"
    assert changed_after(app, lambda at: at.radio(key="gauge_optimizer").set_value(sign), keys) == set(keys)


def test_loss_figures_draw_every_positive_loss_where_it_is():
    # Gradient descent from the unbalanced start at the slider's smallest learning rate reaches losses of
    # 1e-30 and below; the Learn figures drew every value under 1e-12 at 1e-12, a curve stalled flat there.
    # Only an exact 0 (no log) is drawn at a floor, below every positive value of the figure.
    import numpy as np

    from balora import teaching
    from balora.dashboard import learn_plots

    a, b, losses = 0.5 / 6, 0.5 * 6, []
    for _ in range(61):  # the page's path, in plain float64 numpy: a <- a - lr (ab - 1) b, b <- b - lr (ab - 1) a
        losses.append(0.5 * (a * b - 1.0) ** 2)
        a, b = a - 0.05 * (a * b - 1.0) * b, b - 0.05 * (a * b - 1.0) * a
    losses = np.array(losses)
    assert losses.min() < 1e-25  # the case
    paths = {"balanced": teaching.scalar_gd(0.5, 0.5, 1.0, 0.5, 60), "unbalanced": teaching.scalar_gd(0.5 / 6, 3.0, 1.0, 0.05, 60)}
    assert (paths["balanced"].loss == 0).any()  # an exact 0 in the same figure
    fig = learn_plots.scalar_loss_figure(paths)
    drawn = np.asarray(fig.data[1].y, dtype=float)
    pos = losses > 0
    assert np.allclose(drawn[pos], losses[pos], rtol=1e-6, atol=0)
    zeros = np.asarray(fig.data[0].y, dtype=float)[paths["balanced"].loss == 0]
    assert (zeros < drawn[pos].min()).all()  # exactly 0: below every positive value, not above some
    assert fig.layout.yaxis.range[0] <= np.log10(zeros.min())  # and inside the axis
    cons = {"gd": teaching.conservation_path("gd", "peft", 0.3)}
    true = cons["gd"].loss
    assert np.nanmin(true) < 1e-20
    assert np.allclose(np.asarray(learn_plots.factor_loss_figure(cons).data[0].y, dtype=float), true, rtol=1e-9, atol=0)
