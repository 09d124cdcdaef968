"""Per-layer diagnostics: factor pairs -> rows -> one DataFrame with fixed columns and dtypes."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from balora.imbalance import factor_stats
from balora.linalg import all_finite
from balora.pairs import FactorPair, group_by_shape

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
    "cond_dW": "float64",  # sigma_1 / sigma_r of dW; inf when rank < r, NaN when dW = 0
    "eff_rank": "float64",  # entropy effective rank of dW
    "rank": "int64",  # numerical rank of dW
    "sigma_max": "float64",
    "sigma": "object",  # singular values of the scaled dW = s B A, descending, length r
    "sigma_A": "object",
    "sigma_B": "object",
    "status": "string",  # "ok", or why the numbers are missing
}


def to_frame(rows: list[dict], columns: dict[str, str] = REPORT_COLUMNS) -> pd.DataFrame:
    """Rows -> DataFrame with exactly `columns`, in order, with their dtypes (also when empty)."""
    df = pd.DataFrame(rows, columns=list(columns))
    return df.astype(columns)


def pair_rows(pairs: list[FactorPair]) -> list[dict]:
    """One row per pair, in the order given; pairs of one shape are measured by one batched call."""
    rows: list[dict | None] = [None] * len(pairs)
    for idx in group_by_shape(pairs).values():
        group = [pairs[i] for i in idx]
        A = torch.stack([p.A for p in group])  # (G, r, in)
        B = torch.stack([p.B for p in group])  # (G, out, r)
        finite = all_finite(A) & all_finite(B)  # (G,)
        if not bool(finite.all()):
            # A NaN in one module must not break the batched decompositions of the others.
            A = torch.where(finite[:, None, None], A, torch.zeros_like(A))
            B = torch.where(finite[:, None, None], B, torch.zeros_like(B))
        scaling = torch.tensor([1.0 if p.scaling is None else p.scaling for p in group], dtype=torch.float64)
        stats = factor_stats(A, B, scaling)
        for g, (i, p) in enumerate(zip(idx, group)):
            rows[i] = _row(p, stats, g, bool(finite[g]))
    return rows  # type: ignore[return-value]


def _row(p: FactorPair, st, g: int, finite: bool) -> dict:
    nan = float("nan")

    def f(t):
        return float(t[g]) if finite else nan

    sigma = st.sigma[g].tolist() if finite else []
    return {
        "module": p.module,
        "adapter": p.adapter,
        "kind": p.kind,
        "out_features": p.out_features,
        "in_features": p.in_features,
        "r": p.r,
        "scaling": nan if p.scaling is None else float(p.scaling),
        "dora": p.dora,
        "dtype": str(p.A.dtype).removeprefix("torch."),
        "norm_A": f(st.norm_A),
        "norm_B": f(st.norm_B),
        "imbalance": f(st.imbalance),
        "rel_imbalance": f(st.rel_imbalance),
        "cond_A": f(st.cond_A),
        "cond_B": f(st.cond_B),
        "cond_dW": f(st.cond_dW),
        "eff_rank": f(st.eff_rank),
        "rank": int(st.rank[g]) if finite else 0,
        "sigma_max": sigma[0] if sigma else nan,
        "sigma": sigma,
        "sigma_A": st.sigma_A[g].tolist() if finite else [],
        "sigma_B": st.sigma_B[g].tolist() if finite else [],
        "status": "ok" if finite else "non-finite values (NaN/Inf) in A or B",
    }


def layer_report(model: nn.Module, adapter: str | None = None) -> pd.DataFrame:
    """One row per LoRA module and adapter of a PEFT model, columns REPORT_COLUMNS.

    Pairs balora cannot treat are omitted (balance_ lists them with the reason).
    """
    from balora.adapters.live import iter_lora_pairs

    pairs = [p for p in iter_lora_pairs(model, adapter) if p.skip_reason is None]
    with torch.no_grad():
        return to_frame(pair_rows(pairs))


def summarize(report: pd.DataFrame) -> dict[str, float]:
    """Aggregates of a layer report, as flat floats for Trainer logs and run summaries."""
    if report.empty:
        return {}
    return {
        "balora/rel_imbalance_mean": float(report["rel_imbalance"].mean()),
        "balora/rel_imbalance_max": float(report["rel_imbalance"].max()),
        "balora/imbalance_max": float(report["imbalance"].max()),
        "balora/cond_dW_median": float(report["cond_dW"].median()),
        "balora/eff_rank_mean": float(report["eff_rank"].mean()),
        "balora/sigma_max": float(report["sigma_max"].max()),
    }
