"""The maths behind the dashboard's Learn page: small, exact, fast. No plotting, no streamlit.

Four pictures of one fact: a LoRA product B A is unchanged by (B T, T^-1 A) for any
invertible r x r T, and the factorisations it leaves to choose from are not equally easy.

1. Scalar case f(a, b) = 1/2 (ab - y)^2: a valley of minimisers ab = y whose curvature
   across the valley, a^2 + b^2, is smallest at the balanced point |a| = |b|.
2. Conservation: gradient descent keeps D = B^T B - A A^T (b^2 - a^2 in the scalar case)
   constant up to O(lr^2) per step; Adam does not; balancing sets it to zero.
3. r = 2 invariance: (B T, T^-1 A) has the same dW but a different imbalance and a
   different Hessian condition number.
4. Why the gauge matters for Adam: balancing with the "svd" versus the "nearest" gauge,
   under torch Adam and under sign descent.

PEFT naming throughout: A = lora_A.weight (r, in), B = lora_B.weight (out, r), dW = B A.
(The paper writes W0 + A B: its A is PEFT's B.) Every function runs in well under 0.3 s
at its default sizes on two CPU cores, because the page recomputes on every widget change.

One module per picture (scalar, conservation, invariance, gauge); their public names are
re-exported here, so `balora.teaching.conservation_path` and friends are the API.
"""

from __future__ import annotations

from balora.teaching.threads import (  # noqa: F401
    DIVERGED_ABS,
    one_thread,
)
from balora.teaching.scalar import (  # noqa: F401
    ScalarPath,
    curvature_at_minimiser,
    scalar_gd,
    scalar_hessian,
    scalar_loss,
    scalar_loss_grid,
    valley_curvature,
    valley_point_with_imbalance,
)
from balora.teaching.conservation import (  # noqa: F401
    CONSERVATION_OPTIMIZERS,
    FactorPath,
    STARTS,
    conservation_path,
    factor_loss_grads,
    gd_imbalance_change,
    lowrank_target,
    start_factors,
)
from balora.teaching.invariance import (  # noqa: F401
    INVARIANCE_SIGMA,
    InvarianceExample,
    balanced_pair,
    condition_vs_scale,
    factor_hessian,
    hessian_condition,
    invariance_example,
    predicted_scaled_condition,
    transform_2x2,
)
from balora.teaching.gauge import (  # noqa: F401
    GAUGE_ARMS,
    GAUGE_OPTIMIZERS,
    GaugeRun,
    GaugeTask,
    best_rank_loss,
    gauge_loss,
    gauge_run,
    gauge_task,
)
