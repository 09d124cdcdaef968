"""`balora inspect PATH`: per-layer imbalance and conditioning of adapters on disk, no base model needed."""

from __future__ import annotations

import json
import math
import sys

import pandas as pd

from balora.errors import InputError

FORMATS = ("table", "json", "csv")
_LIST_COLUMNS = ("sigma", "sigma_A", "sigma_B")
_METADATA_WIDTH = 100  # ss_tag_frequency and friends can be kilobytes of JSON


def add_parser(sub):
    p = sub.add_parser(
        "inspect",
        help="per-layer imbalance, conditioning and spectra of LoRA adapter files",
        description="Read LoRA adapters from files alone (PEFT folder, Trainer output folder with checkpoint-N, "
        "kohya .safetensors, bare .safetensors with PEFT keys) and report per layer: r, scaling, norms, "
        "imbalance ||B^T B - A A^T||_F, rel_imbalance, condition numbers, effective rank and the top "
        "singular values of the scaled dW = s B A.",
    )
    p.add_argument("path", help="adapter folder, Trainer output folder, or .safetensors/.bin file")
    p.add_argument("--format", choices=FORMATS, default="table",
                   help="table for people; json (a list of records) or csv (one row per module and checkpoint)")
    p.add_argument("--adapter", metavar="NAME", help="only this adapter (default: all)")
    p.add_argument("--top", type=int, default=3, metavar="K",
                   help="singular values of dW shown per layer in the table (default 3; json/csv carry all r)")
    p.add_argument("--sort", metavar="COLUMN",
                   help="sort layers by this column, largest first for numbers (e.g. rel_imbalance, cond_dW)")
    p.set_defaults(run=run)


def run(args) -> int:
    from balora.inspection import INSPECT_COLUMNS, inspect

    if args.top < 0:
        raise InputError(f"--top must be >= 0, got {args.top}")
    sortable = [c for c in INSPECT_COLUMNS if c not in _LIST_COLUMNS]
    if args.sort is not None and args.sort not in sortable:
        raise InputError(f"--sort: cannot sort by {args.sort!r}; use one of {', '.join(sortable)}")
    df = inspect(args.path, adapter=args.adapter)
    if args.sort is not None:
        df = sort_rows(df, args.sort)
    if args.format == "json":
        json.dump(records(df), sys.stdout, indent=1, allow_nan=False)
        sys.stdout.write("\n")
    elif args.format == "csv":
        out = df.copy()
        for c in _LIST_COLUMNS:
            out[c] = out[c].map(lambda xs: json.dumps([_finite(x) for x in xs]))
        out.to_csv(sys.stdout, index=False)
    else:
        print_report(df, top=args.top)
    return 0


def sort_rows(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """Sort by column within each checkpoint (checkpoints keep their training order);
    numbers largest first, text alphabetically."""
    numeric = pd.api.types.is_numeric_dtype(df[column]) and not pd.api.types.is_bool_dtype(df[column])
    ckpt = df["checkpoint"].map({c: i for i, c in enumerate(dict.fromkeys(df["checkpoint"]))})
    order = pd.DataFrame({"ckpt": ckpt, "value": df[column]}).sort_values(
        ["ckpt", "value"], ascending=[True, not numeric], kind="stable", na_position="last"
    )
    return df.loc[order.index].reset_index(drop=True)


def _finite(x):
    """JSON has no NaN/Inf: null (status and rank say why)."""
    if x is None or x is pd.NA:
        return None
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def records(df: pd.DataFrame) -> list[dict]:
    """One plain-JSON record per module and checkpoint."""
    out = []
    for row in df.to_dict(orient="records"):
        rec = {}
        for k, v in row.items():
            if k in _LIST_COLUMNS:
                rec[k] = [_finite(float(x)) for x in v]
            elif hasattr(v, "item"):  # numpy scalars
                rec[k] = _finite(v.item())
            else:
                rec[k] = _finite(v)
        out.append(rec)
    return out


# ---- the human format ---------------------------------------------------------------------


def _num(x, unknown="-") -> str:
    if x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x)):
        return unknown
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.3g}"


def _short(value: str) -> str:
    value = " ".join(str(value).split())
    return value if len(value) <= _METADATA_WIDTH else f"{value[:_METADATA_WIDTH]}... ({len(value)} chars)"


def print_report(df: pd.DataFrame, top: int = 3, console=None) -> None:
    """Rich tables: where the numbers come from, one row per layer, then a summary.
    For a Trainer folder the layer table is the last checkpoint's, followed by one row per
    checkpoint so imbalance can be followed over training."""
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:  # pipes get 80 columns by default: too narrow for the table
            console = Console(width=200)
    sources = df.attrs.get("sources", [])
    checkpoints = list(dict.fromkeys(c for c in df["checkpoint"] if c))
    _print_sources(console, sources, checkpoints)
    layers = df[df["checkpoint"] == checkpoints[-1]] if checkpoints else df
    title = f"layers at {checkpoints[-1]} (--format csv gives every checkpoint)" if checkpoints else "layers"
    console.print(_layer_table(layers, top, title))
    if checkpoints:
        console.print(_checkpoint_table(df, checkpoints))
    _print_summary(console, layers)


def _print_sources(console, sources: list[dict], checkpoints: list[str]) -> None:
    from rich.markup import escape

    if checkpoints:
        steps = [s["step"] for s in sources if s["step"] is not None]
        span = f", steps {min(steps)}..{max(steps)}" if steps else ""
        console.print(f"[bold]Trainer output folder[/]: {len(checkpoints)} checkpoint(s){span}")
    else:
        for s in sources:
            console.print(f"[bold]{escape(s['path'])}[/] ({s['format']}, adapter {escape(s['adapter'])}, "
                          f"{s['modules']} LoRA module(s))")
    notes = dict.fromkeys(n for s in sources for n in s["notes"])
    for note in notes:
        console.print(f"  note: {escape(note)}")
    shown = {}
    for s in sources:
        shown.update({k: v for k, v in s["metadata"].items() if not (k == "format" and v == "pt")})
    for k in sorted(shown):
        console.print(f"  {escape(k)} = {escape(_short(shown[k]))}")


def _layer_table(df: pd.DataFrame, top: int, title: str):
    from rich.table import Table
    from rich.text import Text

    multi_adapter = df["adapter"].nunique() > 1
    multi_kind = df["kind"].nunique() > 1 or bool(df["dora"].any())
    any_status = (df["status"] != "ok").any()
    t = Table(title=title, title_justify="left", header_style="bold")
    t.add_column("module", overflow="fold")
    for name, shown in (("adapter", multi_adapter), ("kind", multi_kind)):
        if shown:
            t.add_column(name)
    for name in ("r", "scaling", "|A|", "|B|", "imbalance", "rel_imb", "cond_A", "cond_B", "cond_dW", "eff_rank"):
        t.add_column(name, justify="right")
    if top:
        t.add_column(f"top {top} sigma(dW)", justify="right")
    if any_status:
        t.add_column("status", overflow="fold")
    for row in df.itertuples(index=False):
        cells = [row.module]
        cells += [row.adapter] if multi_adapter else []
        cells += [row.kind + (" +DoRA" if row.dora else "")] if multi_kind else []
        cells += [str(row.r), _num(row.scaling, unknown="?"), _num(row.norm_A), _num(row.norm_B), _num(row.imbalance),
                  _num(row.rel_imbalance), _num(row.cond_A), _num(row.cond_B), _num(row.cond_dW), _num(row.eff_rank)]
        if top:
            cells.append(" ".join(_num(x) for x in row.sigma[:top]))
        if any_status:
            cells.append(row.status)
        t.add_row(*(Text(c) for c in cells))  # module names are data, not rich markup
    return t


def _checkpoint_table(df: pd.DataFrame, checkpoints: list[str]):
    from rich.table import Table

    from balora.report import summarize

    t = Table(title="over training", title_justify="left", header_style="bold")
    for name in ("checkpoint", "step", "modules", "rel_imb mean", "rel_imb max", "cond_dW median", "eff_rank mean",
                 "sigma_max"):
        t.add_column(name, justify="left" if name == "checkpoint" else "right")
    for c in checkpoints:
        part = df[(df["checkpoint"] == c) & (df["status"] == "ok")]
        agg = summarize(part)
        step = part["step"].iloc[0] if len(part) else pd.NA
        t.add_row(c, "" if step is pd.NA else str(step), str(len(part)),
                  *(_num(agg.get(f"balora/{k}")) for k in
                    ("rel_imbalance_mean", "rel_imbalance_max", "cond_dW_median", "eff_rank_mean", "sigma_max")))
    return t


def _print_summary(console, df: pd.DataFrame) -> None:
    from rich.markup import escape

    from balora.report import summarize

    ok = df[df["status"] == "ok"]
    agg = summarize(ok)
    if agg:
        console.print(
            f"{len(ok)} module(s): rel_imbalance mean {_num(agg['balora/rel_imbalance_mean'])}, "
            f"max {_num(agg['balora/rel_imbalance_max'])}; cond_dW median {_num(agg['balora/cond_dW_median'])}; "
            f"eff_rank mean {_num(agg['balora/eff_rank_mean'])}; largest sigma(dW) {_num(agg['balora/sigma_max'])}"
        )
    bad = df[df["status"] != "ok"]
    for row in bad.head(10).itertuples(index=False):
        console.print(f"[yellow]{escape(f'{row.module}[{row.adapter}]')}[/]: {escape(row.status)}")
    if len(bad) > 10:
        console.print(f"... and {len(bad) - 10} more module(s) without numbers")
