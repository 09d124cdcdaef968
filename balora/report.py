"""Per-layer diagnostics: factor pairs -> rows -> one DataFrame with fixed columns and dtypes."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import torch
from torch import nn

# The columns (identifying first, then what a user sorts by, then the spectra) are declared in
# balora.columns, torch-free for the run store and the dashboard; re-exported here.
from balora.columns import REPORT_COLUMNS
from balora.imbalance import FactorStats, factor_stats
from balora.linalg import all_finite
from balora.pairs import FactorPair, group_by_shape
from balora.precision import HALF_DTYPES, balanced_for_storage, storage_risk
from balora.safe_io import listed

PRECISION_COLUMNS = [c for c in REPORT_COLUMNS if c.startswith(tuple(HALF_DTYPES))]
# A row whose fp16 dW error is above this is reported as losing its adapter to the cast.
PRECISION_LOSS = 1e-2


def to_frame(rows: list[dict], columns: dict[str, str] = REPORT_COLUMNS) -> pd.DataFrame:
    """Rows -> DataFrame with exactly `columns`, in order, with their dtypes (also when empty)."""
    df = pd.DataFrame(rows, columns=list(columns))
    return df.astype(columns)


def pair_rows(pairs: list[FactorPair], precision: bool = False) -> list[dict]:
    """One row per pair, in the order given; pairs of one shape are measured by one batched call.

    precision: also measure the fp16/bf16 storage columns (PRECISION_COLUMNS; False leaves them
    NaN). They take a balancing and two casts per pair, several times the rest of the row on CPU,
    so the training-time diagnostics (runner, RunRecorder) leave them out and `layer_report` and
    `balora.inspect`, which describe an adapter as it would be shipped, ask for them.
    Never raises for the factors' values: NaN/Inf factors, values beyond float64 and failed
    decompositions (torch.linalg.LinAlgError) are said in the row (`status`, `note`); any other
    error (out of memory, a bug) propagates.
    """
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
        try:
            measured = [_measure(A, B, scaling, precision)] * len(group)
            positions = list(range(len(group)))
        except torch.linalg.LinAlgError:  # find the pair, keep the others' numbers (other errors are bugs)
            measured = [_measure_one(A[g : g + 1], B[g : g + 1], scaling[g : g + 1], precision)
                        for g in range(len(group))]
            positions = [0] * len(group)
        measured = _on_host(measured)
        for g, (i, p, ok) in enumerate(zip(idx, group, finite.tolist())):
            stats, prec, error = measured[g]
            rows[i] = _row(p, stats, prec, positions[g], ok, error)
    return rows  # type: ignore[return-value]


def _on_host(measured: list[tuple]) -> list[tuple]:
    """The measurements with their tensors on the CPU, one copy per distinct measurement: the rows
    read each value as a Python number, which on a GPU would be one device read per value."""
    moved: dict[int, tuple] = {}
    out = []
    for m in measured:
        if id(m) not in moved:
            stats, prec, error = m
            if stats is not None and stats.norm_A.device.type != "cpu":
                stats = FactorStats(**{f.name: getattr(stats, f.name).cpu() for f in dataclasses.fields(stats)})
                prec = {k: v.cpu() for k, v in prec.items()}
            moved[id(m)] = (stats, prec, error)
        out.append(moved[id(m)])
    return out


def _measure(A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, precision: bool):
    """(FactorStats, {precision column: (G,)}, None) for a batch of pairs."""
    stats = factor_stats(A, B, scaling)
    prec: dict[str, torch.Tensor] = {}
    if precision:
        for when, (X, Y) in {"": (A, B), "_balanced": balanced_for_storage(A, B)}.items():
            risks = storage_risk(X, Y)
            for dt, dtype in HALF_DTYPES.items():
                risk = risks[dtype]
                prec.update({f"{dt}_underflow{when}": risk.underflow, f"{dt}_overflow{when}": risk.overflow,
                             f"{dt}_dW_error{when}": risk.dW_error})
    return stats, prec, None


def _measure_one(A, B, scaling, precision: bool):
    try:
        return _measure(A, B, scaling, precision)
    except torch.linalg.LinAlgError as e:
        return None, {}, f"decomposition failed: {str(e).splitlines()[0][:200]}"


def _row(p: FactorPair, st, prec: dict, g: int, finite: bool, error: str | None) -> dict:
    nan = float("nan")
    measured = finite and st is not None
    beyond: list[str] = []  # values that are finite in truth but not in float64

    def f(name, values):  # values: a (G,) tensor, or a FactorStats field's name
        if not measured:
            return nan
        v = float((getattr(st, values) if isinstance(values, str) else values)[g])
        if math.isinf(v) and name in _SCALED:
            beyond.append(name)
            return nan
        return v

    def spectrum(name):
        if not measured:
            return []
        values = getattr(st, name)[g].tolist()
        if any(math.isinf(v) for v in values):
            beyond.append(name)
            return [nan] * len(values)
        return values

    sigma = spectrum("sigma")
    row = {
        "module": p.module,
        "adapter": p.adapter,
        "kind": p.kind,
        "out_features": p.out_features,
        "in_features": p.in_features,
        "r": p.r,
        "scaling": nan if p.scaling is None else float(p.scaling),
        "dora": p.dora,
        "dtype": str(p.A.dtype).removeprefix("torch."),
        **{name: f(name, name) for name in _STAT_FIELDS},
        "rank": int(st.rank[g]) if measured else 0,
        **{c: f(c, prec[c]) if c in prec else nan for c in PRECISION_COLUMNS},
        "sigma_max": sigma[0] if sigma else nan,
        "sigma": sigma,
        "sigma_A": spectrum("sigma_A"),
        "sigma_B": spectrum("sigma_B"),
    }
    row["status"], row["note"] = _status(finite, error, beyond)
    return row


# Values rescaled by the factors' size (the others are ratios, fractions or counts): inf means
# the true value exceeds float64, which is said in the row rather than shown as inf.
_SCALED = ("norm_A", "norm_B", "imbalance")
_STAT_FIELDS = ("norm_A", "norm_B", "imbalance", "rel_imbalance", "cond_A", "cond_B", "cond_dW", "eff_rank")


def _status(finite: bool, error: str | None, beyond: list[str]) -> tuple[str, str]:
    if not finite:
        return "non-finite values (NaN/Inf) in A or B", ""
    if error is not None:
        return error, "diagnostics of this pair could not be computed"
    if beyond:
        return "partial", f"{', '.join(beyond)} exceed float64 (about 1.8e308): NaN"
    return "ok", ""


def layer_report(model: nn.Module, adapter: str | None = None, precision: bool = True) -> pd.DataFrame:
    """One row per LoRA module and adapter of a PEFT model, columns REPORT_COLUMNS.

    Pairs balora cannot treat are omitted (balance_ lists them with the reason).
    precision: measure the fp16/bf16 storage columns (see pair_rows); False leaves them NaN,
    for reports made during training (BalanceCallback's logs).
    Under FSDP2 call it on every rank: it gathers the factors, and called on one rank only it blocks
    until the process group's timeout (report on every rank, print on one).
    """
    from balora.adapters.live import model_pairs, require_model

    require_model("layer_report", model)
    # As balance_: an unknown adapter name is refused (a typo must not read as "no layers"), and a model
    # without LoRA layers (a plain module, one after merge_and_unload) warns instead of an empty frame alone.
    pairs = [p for p in model_pairs(model, adapter) if p.skip_reason is None]
    with torch.no_grad():
        return to_frame(pair_rows(pairs, precision=precision))


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


def precision_summary(report: pd.DataFrame, loss: float = PRECISION_LOSS) -> str:
    """One line for `balora inspect`: the layers that lose more than `loss` of dW when their factors
    are stored in fp16, and whether balancing first fixes them ("" for a report without rows)."""
    if not isinstance(report, pd.DataFrame):
        raise TypeError("precision_summary: expects a layer report (balora.inspect(path) or balora.layer_report(model)); "
                        f"got {type(report).__name__}")
    measured = report.dropna(subset=["fp16_dW_error"]) if "fp16_dW_error" in report else report.iloc[0:0]
    if measured.empty:
        return ""
    bad = measured[measured["fp16_dW_error"] > loss]
    if bad.empty:
        return f"fp16: no layer loses more than {loss:g} of dW (largest change {measured['fp16_dW_error'].max():.1e})"
    names = list(dict.fromkeys(f"{m}[{a}]" for m, a in zip(bad["module"], bad["adapter"])))
    shown = listed(names, 3)
    # Counted per layer (a Trainer folder has a row per checkpoint): fixed if fixed in every row.
    unfixed = {f"{m}[{a}]" for m, a, e in zip(bad["module"], bad["adapter"], bad["fp16_dW_error_balanced"])
               if not e <= loss}
    fixed = len(names) - len(unfixed)
    # The balanced columns balance every pair, `balora balance` a rank-deficient one (rank < r, its
    # test: projection's, at the same RANK_RTOL) only when told: the command said must fix them.
    deficient = any(f"{m}[{a}]" not in unfixed and k < r
                    for m, a, k, r in zip(bad["module"], bad["adapter"], bad["rank"], bad["r"]))
    if fixed == len(names):
        verdict = ("balancing fixes all of them (balora balance IN OUT --dtype float16"
                   + (" --on-rank-deficient balance)" if deficient else ")"))
    elif fixed:
        verdict = f"balancing fixes {fixed} of the {len(names)}"
    else:
        verdict = "balancing does not fix them"
    return f"fp16: {len(names)} layer(s) lose more than {loss:g} of dW ({shown}); {verdict}"


def precision_warning(report: pd.DataFrame, loss: float = PRECISION_LOSS) -> str | None:
    """precision_summary when some layer loses more than `loss` of dW in fp16, else None
    (a rule for balora.commands.inspect_cmd.SUMMARY_RULES)."""
    line = precision_summary(report, loss)
    return line if line and not line.startswith("fp16: no layer") else None
