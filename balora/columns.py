"""The declared columns of the per-layer report (names and dtypes): no torch, no pandas.

Read by the run store and the dashboard, which must not pay for importing torch to know a
table's columns; `balora.report` builds the rows and re-exports REPORT_COLUMNS.
"""

from __future__ import annotations

# fp16 / bf16: the half-precision storage dtypes whose risks the report measures (balora.precision).
HALF_DTYPE_NAMES = ("fp16", "bf16")

# Identifying columns first, then what a user sorts by, then the spectra (lists, descending).
REPORT_COLUMNS: dict[str, str] = {
    "module": "string",
    "adapter": "string",
    "kind": "string",
    "out_features": "int64",
    "in_features": "int64",
    "r": "int64",
    "scaling": "float64",  # NaN when the source does not say (bare weights file); sigma is then of B A
    "dora": "bool",
    "dtype": "string",
    "norm_A": "float64",
    "norm_B": "float64",
    "imbalance": "float64",  # ||B^T B - A A^T||_F
    "rel_imbalance": "float64",  # imbalance / (||B^T B||_F + ||A A^T||_F), in [0, 1]
    "cond_A": "float64",
    "cond_B": "float64",
    "cond_dW": "float64",  # sigma_1 / sigma_r of dW; inf when sigma_r = 0 exactly (~1e16 if rank < r up to rounding); NaN if dW = 0
    "eff_rank": "float64",  # entropy effective rank of dW
    "rank": "int64",  # numerical rank of dW
    "sigma_max": "float64",
    # Storing the factors in fp16 / bf16, as they are and after balancing (nearest gauge):
    **{
        f"{dt}_{what}{when}": "float64"
        for dt in HALF_DTYPE_NAMES
        for when in ("", "_balanced")
        for what in (
            "underflow",  # fraction of entries of A and B, nonzero, below the dtype's smallest normal
            "overflow",  # fraction of entries that become +-inf
            "dW_error",  # ||B~A~ - BA||_F / ||BA||_F after the cast; inf if it overflows
        )
    },
    "sigma": "object",  # singular values of the scaled dW = s B A, descending, length r
    "sigma_A": "object",
    "sigma_B": "object",
    "status": "string",  # "ok"; "partial" (some values NaN, see note); or why the numbers are missing
    "note": "string",  # which values are NaN and why (beyond float64, failed decomposition); else ""
}
