"""Learn: the invariance behind BaLoRA, for workshops. Layout only; the maths is balora.teaching.

Every figure is computed live from the widgets. Each section is an `st.fragment`, so moving a
slider reruns (and redraws) only its own section, and results are cached per input.
"""

import numpy as np
import streamlit as st

from balora import teaching
from balora.dashboard import learn_data, learn_plots
from balora.dashboard.learn_data import GRID_LIM, Y_SCALAR, condition_vs_scale, gauge_runs, invariance_example


st.title("Learn: why balancing LoRA factors helps")
st.markdown(
    """
A LoRA layer adds a low-rank update to a frozen weight. In **PEFT naming**, which this page
uses throughout, `A = lora_A.weight` has shape (r, in) and `B = lora_B.weight` has shape (out, r):
"""
)
st.latex(r"W = W_0 + \Delta W, \qquad \Delta W = s\,B A \quad (s = \text{lora\_alpha} / r;\ s = 1 \text{ on this page}).")
st.info(
    "Naming: the BaLoRA paper writes $W_0 + AB$ with its $A$ of shape (out, r). "
    "**The paper's A is PEFT's B**, and the paper's B is PEFT's A. Every matrix on this page is in PEFT naming."
)
st.markdown("For any invertible r × r matrix $T$ the pair $(BT,\\ T^{-1}A)$ gives the same update:")
st.latex(r"(B T)(T^{-1} A) = B A .")
st.markdown(
    "So the loss cannot tell these pairs apart, yet gradient-based training can: the pairs differ in "
    "**imbalance** $D = B^\\top B - A A^\\top$ and in how well conditioned the problem looks around them. "
    "BaLoRA moves the factors to the **balanced** pair ($B^\\top B = A A^\\top$) after every optimizer step."
)

# --- 1. scalar case ----------------------------------------------------------------------


@st.fragment
def scalar_section() -> None:
    st.header("1. One number split in two: f(a, b) = ½(ab − y)²")
    st.markdown("The smallest LoRA has r = 1 and 1 × 1 matrices. With target $y = 1$:")
    st.latex(r"f(a, b) = \tfrac12 (ab - y)^2, \qquad \nabla f = (ab - y)\,(b,\ a).")
    st.markdown(
        "Its minimisers form a **valley**, the hyperbola $ab = y$. On the valley the Hessian is "
        "$\\begin{pmatrix} b^2 & ab \\\\ ab & a^2 \\end{pmatrix}$: zero curvature along the valley, and curvature "
        "$a^2 + b^2$ across it, smallest at the balanced point $|a| = |b|$. Gradient descent with step size "
        "$\\eta$ can only settle where $a^2 + b^2 < 2/\\eta$."
    )
    col1, col2 = st.columns(2)
    lr_scalar = col1.slider("learning rate η", 0.05, 1.2, 0.5, 0.05, key="scalar_lr")
    unbalance = col2.slider(
        "unbalanced start: (a, b) = (0.5 / c, 0.5 c), c =", 1.0, 8.0, 6.0, 0.5, key="scalar_unbalance",
        help="Both starts have ab = 0.25; c = 1 is the balanced start itself.",
    )
    paths = {
        "balanced": teaching.scalar_gd(0.5, 0.5, Y_SCALAR, lr_scalar, 60),
        "unbalanced": teaching.scalar_gd(0.5 / unbalance, 0.5 * unbalance, Y_SCALAR, lr_scalar, 60),
    }
    a_grid, b_grid, Z = learn_data.scalar_loss_grid(Y_SCALAR, GRID_LIM, learn_data.GRID_N)
    st.plotly_chart(learn_plots.scalar_landscape_figure(a_grid, b_grid, Z, paths, Y_SCALAR), key="fig_scalar_landscape")
    left, right = st.columns(2)
    left.plotly_chart(learn_plots.scalar_loss_figure(paths), key="fig_scalar_loss")
    a_valley = np.geomspace(0.08, 1 / 0.08, 200)
    _, curv = teaching.valley_curvature(a_valley, Y_SCALAR)
    targets = {label: teaching.valley_point_with_imbalance(path.imbalance[0], Y_SCALAR) for label, path in paths.items()}
    right.plotly_chart(
        learn_plots.valley_curvature_figure(a_valley, curv, lr_scalar, paths, Y_SCALAR, targets), key="fig_scalar_curvature"
    )
    d0 = paths["unbalanced"].imbalance[0]
    st.markdown(
        f"Gradient descent keeps $b^2 - a^2$ almost fixed (exactly: each step multiplies it by $1 - \\eta^2 (ab-y)^2$). "
        f"The unbalanced start has $b^2 - a^2 = {d0:.2f}$, so the point of the valley it heads for has curvature "
        f"$\\sqrt{{(b^2-a^2)^2 + 4y^2}} = {teaching.curvature_at_minimiser(d0, Y_SCALAR):.2f}$ and needs "
        f"$\\eta < {2 / teaching.curvature_at_minimiser(d0, Y_SCALAR):.3f}$; the balanced start heads for curvature 2 "
        f"and needs only $\\eta < 1$. Between the two limits the unbalanced run either diverges or is thrown by its "
        "own large steps into a flatter, more balanced part of the valley. (These targets are gradient flow's: finite "
        "steps shrink the imbalance a little on the way, so a run ends slightly flatter than predicted.)"
    )
    for label, path in paths.items():
        state = "diverged" if path.diverged else f"final loss {path.loss[-1]:.2e} at (a, b) = ({path.a[-1]:.2f}, {path.b[-1]:.2f})"
        st.caption(f"{label} start: {state}")


# --- 2. conservation ---------------------------------------------------------------------


@st.fragment
def conservation_section() -> None:
    st.header("2. What gradient descent conserves")
    st.markdown("For the loss $L = \\tfrac12\\|BA - Y\\|_F^2$ with residual $R = BA - Y$, one gradient step changes the imbalance by")
    st.latex(r"D_{t+1} - D_t = \eta^2 \left(A R^\top R A^\top - B^\top R R^\top B\right), \qquad D = B^\top B - A A^\top,")
    st.markdown(
        "so under gradient flow ($\\eta \\to 0$) $D$ is **constant**: plain (S)GD keeps whatever imbalance the "
        "initialisation gave it, and PEFT's init ($B = 0$) is as unbalanced as it gets. Adam rescales each "
        "coordinate and breaks the cancellation; balancing sets $D = 0$ after every step. "
        "Problem: an 8 × 8 target of rank 2 (singular values 3 and 1), LoRA rank r = 2, PEFT naming."
    )
    c1, c2, c3 = st.columns(3)
    start = c1.radio(
        "start", teaching.STARTS, index=teaching.STARTS.index(learn_data.CONS_START), key="cons_start",
        format_func={"balanced": "balanced", "unbalanced": "unbalanced (large A, small B)", "peft": "PEFT init (B = 0)"}.get,
    )
    lr_gd = c2.select_slider("learning rate, gradient descent", [0.01, 0.02, 0.05, 0.1, 0.2, 0.3], value=learn_data.CONS_LR_GD, key="cons_lr_gd")
    lr_adam = c3.select_slider("learning rate, Adam", [0.003, 0.01, 0.02, 0.05, 0.1], value=learn_data.CONS_LR_ADAM, key="cons_lr_adam")
    cons = learn_data.conservation_paths(start, lr_gd, lr_adam)
    left, right = st.columns(2)
    left.plotly_chart(learn_plots.imbalance_figure(cons), key="fig_cons_imbalance")
    right.plotly_chart(learn_plots.factor_loss_figure(cons), key="fig_cons_loss")
    st.plotly_chart(learn_plots.imbalance_figure(cons, relative=True), key="fig_cons_rel")
    st.caption(
        "Gradient descent: ‖D‖ stays close to where it started (its drift is O(η²) per step, visible at the largest "
        "step sizes: +12% over 120 steps at η = 0.2) while the relative imbalance "
        "falls only because the factors grow. Adam: ‖D‖ drifts. With balancing: ‖D‖ = 0 from the first step with BA ≠ 0."
    )


# --- 3. r = 2 invariance -----------------------------------------------------------------


@st.fragment
def invariance_section() -> None:
    st.header("3. Same product, different geometry (r = 2)")
    st.markdown(
        "Start from the balanced factorisation of a rank-2, 6 × 6 target $Y = U\\,\\mathrm{diag}(s_1, s_2)\\,V^\\top$ "
        "with $s_1 = 3$, $s_2 = 1$: $B = U S^{1/2}$, $A = S^{1/2} V^\\top$. Apply"
    )
    st.latex(r"T = c\,\begin{pmatrix}\cos\theta & -\sin\theta\\ \sin\theta & \cos\theta\end{pmatrix}\begin{pmatrix}1 & h\\ 0 & 1\end{pmatrix}, \qquad (B, A) \mapsto (BT,\ T^{-1}A).")
    st.markdown(
        "The Hessian of $\\tfrac12\\|BA - Y\\|^2$ has $r^2 = 4$ zero eigenvalues (moving along the invariance does "
        "not change the loss); we drop them and take max / min of the rest. At the balanced pair it is "
        "$2 s_1/s_r$; rescaling by $c$ makes it $(\\max(c, 1/c)^4 + 1)\\, s_1/s_r$: shrinking $B$ is as bad as growing it."
    )
    c1, c2, c3 = st.columns(3)
    angle_deg = c1.slider("rotation angle θ (degrees)", -180, 180, 0, 5, key="inv_angle")
    shear = c2.slider("shear h", -2.0, 2.0, 0.0, 0.1, key="inv_shear")
    log_scale = c3.slider("log-scale ln c", -1.5, 1.5, 0.0, 0.1, key="inv_log_scale")
    angle = float(np.deg2rad(angle_deg))
    ex = invariance_example(angle, shear, log_scale)
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("max |ΔdW| vs T = I", f"{ex.dW_change:.1e}")
    m2.metric("relative imbalance", f"{ex.rel_imbalance:.3f}")
    m3.metric("Hessian condition number", f"{ex.cond:.1f}")
    m4.metric("at the balanced pair", f"{ex.cond_balanced:.1f}")
    st.plotly_chart(learn_plots.factors_heatmap_figure(ex), key="fig_inv_factors")
    left, right = st.columns(2)
    left.plotly_chart(learn_plots.hessian_spectrum_figure(ex.eigenvalues, 2), key="fig_inv_spectrum")
    log_scales, conds, rels = condition_vs_scale(angle, shear)
    predicted = np.array([teaching.predicted_scaled_condition(s) for s in log_scales]) if shear == 0 else None
    right.plotly_chart(
        learn_plots.condition_sweep_figure(log_scales, conds, rels, log_scale, ex.cond, predicted), key="fig_inv_sweep"
    )
    st.caption(
        "A rotation alone (h = 0, c = 1) changes neither the imbalance nor the condition number: balanced pairs are "
        "unique only up to an orthogonal T. The open circles, the closed form, are drawn when T has no shear (h = 0)."
    )


# --- 4. gauge and Adam -------------------------------------------------------------------


@st.fragment
def gauge_section() -> None:
    st.header("4. Why the gauge matters for Adam")
    st.markdown(
        "Balanced pairs with a given product are unique only up to an orthogonal $O$: "
        "$B' = Q_B U S^{1/2} O$, $A' = O^\\top S^{1/2} V^\\top Q_A^\\top$. The paper takes $O = I$ (**svd** gauge), whose "
        "order, signs and rotations of the r directions can jump between steps. The **nearest** gauge takes the "
        "balanced pair closest to the current one. Gradient descent does not care, but Adam keeps per-coordinate "
        "moments: if the coordinates are re-shuffled every step, its moments point at the wrong entries. Sign "
        "descent keeps no state, so only the rotation part of a jump reaches it: the gauge matters much less there."
    )
    st.markdown(
        "Live task: a frozen random 20 × 20 layer, LoRA r = 4 with PEFT's init ($B = 0$), a random target, "
        "100 steps on 4 seeds. Loss is the mean squared error of the layer's output on 100 random inputs, "
        "reported above the best any rank-4 update can reach."
    )
    c1, c2 = st.columns(2)
    opt_label = c1.radio("optimizer", ["torch Adam", "sign descent (the paper's synthetic Adam)"], key="gauge_optimizer")
    optimizer = "adam" if opt_label == "torch Adam" else "sign"
    lr_gauge = c2.select_slider("learning rate", [0.001, 0.003, 0.01, 0.03, 0.1], value=learn_data.GAUGE_LR, key="gauge_lr")
    runs = gauge_runs(optimizer, lr_gauge)
    left, right = st.columns(2)
    left.plotly_chart(learn_plots.gauge_loss_figure(runs, "torch Adam" if optimizer == "adam" else "sign descent"), key="fig_gauge_loss")
    right.plotly_chart(learn_plots.gauge_displacement_figure(runs), key="fig_gauge_move")
    finals = {learn_plots.LABELS[arm]: float(np.median(run.excess_loss[:, -1])) for arm, run in runs.items()}
    st.markdown(
        "Median excess loss after 100 steps: "
        + ", ".join(f"{name} **{value:.2e}**" for name, value in finals.items())
        + ". Try several learning rates: which arm wins depends on the optimizer and the step size, and a null "
        "result is a result."
    )


scalar_section()
conservation_section()
invariance_section()
gauge_section()
