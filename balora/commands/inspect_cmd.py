"""`balora inspect PATH`: per-layer imbalance and conditioning of adapters on disk, no base model needed."""

from __future__ import annotations

import json
import math
import sys
from typing import TYPE_CHECKING

from balora.cli import COMMANDS
from balora.commands.arg_checks import check_threads
from balora.commands.formatting import num, pipe_console, printable_frame, short_module_names
from balora.errors import InputError

if TYPE_CHECKING:  # pandas is imported where it is used: `balora inspect --help` should start at once
    import pandas as pd

FORMATS = ("table", "json", "csv")
_LIST_COLUMNS = ("sigma", "sigma_A", "sigma_B")
_METADATA_WIDTH = 100  # ss_tag_frequency and friends can be kilobytes of JSON


def add_parser(sub):
    p = sub.add_parser(
        "inspect",
        help=COMMANDS["inspect"][1],
        description="Read LoRA adapters from files alone (PEFT folder, Trainer output folder with checkpoint-N, "
        "diffusers pytorch_lora_weights.safetensors, kohya or LyCORIS .safetensors, bare .safetensors with PEFT "
        "keys, or a Hugging Face Hub id user/name[@revision], fetched through the Hub cache: adapter files only, "
        "HF_HUB_OFFLINE honoured; user/name[@revision]/path/in/repo.safetensors, hf://... or a copied "
        "https://huggingface.co/user/name/blob/REV/PATH address fetches that one file, user/name/FOLDER that folder; "
        "an existing local path always wins) and report per layer: r, scaling, norms, "
        "imbalance ||B^T B - A A^T||_F, rel_imbalance, condition numbers, effective rank and the top "
        "singular values of the scaled dW = s B A.",
    )
    p.add_argument("path", help="adapter folder, Trainer output folder, .safetensors/.bin file, or Hub id "
                                   "user/name[@revision][/path/in/repo]")
    p.add_argument("--format", choices=FORMATS, default="table",
                   help="table for people; json (a list of records) or csv (one row per module and checkpoint)")
    p.add_argument("--adapter", metavar="NAME", help="only this adapter (default: all)")
    p.add_argument("--top", type=int, default=None, metavar="K",
                   help="singular values of dW shown per layer in the table (default 1, with --wide 3; "
                        "json/csv carry all r)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch CPU threads (default 1: the per-layer maths works on (n, r) and r x r matrices, "
                        "where more threads mostly wait on each other; 5-10x slower with 2 on a busy 2-core machine)")
    p.add_argument("--wide", action="store_true",
                   help="every column and full module names (the default table fits 100 columns)")
    p.add_argument("--sort", metavar="COLUMN",
                   help="sort layers by this column, largest first for numbers (e.g. rel_imbalance, cond_dW)")
    p.set_defaults(run=run)


def run(args) -> int:
    from balora.inspection import INSPECT_COLUMNS, inspect

    if args.top is not None and args.top < 0:
        raise InputError(f"--top must be >= 0, got {args.top}")
    sortable = [c for c in INSPECT_COLUMNS if c not in _LIST_COLUMNS]
    if args.sort is not None and args.sort not in sortable:
        raise InputError(f"--sort: cannot sort by {args.sort!r}; use one of {', '.join(sortable)}")
    import torch

    torch.set_num_threads(check_threads(args.threads))
    df = inspect(args.path, adapter=args.adapter)
    if args.sort is not None:
        df = sort_rows(df, args.sort)
    if args.format == "json":
        sys.stdout.write(json.dumps(records(df), indent=1, allow_nan=False))  # one write: json.dump writes per token
        sys.stdout.write("\n")
    elif args.format == "csv":
        out = printable_frame(df)  # JSON escapes control characters itself; CSV would pass them through
        for c in _LIST_COLUMNS:
            out[c] = out[c].map(lambda xs: json.dumps([_finite(x) for x in xs]))
        out.to_csv(sys.stdout, index=False)
    else:
        print_report(df, top=args.top, wide=args.wide)
    return 0


def sort_rows(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """Sort by column within each checkpoint (checkpoints keep their training order);
    numbers largest first, text alphabetically."""
    import pandas as pd

    numeric = pd.api.types.is_numeric_dtype(df[column]) and not pd.api.types.is_bool_dtype(df[column])
    ckpt = df["checkpoint"].map({c: i for i, c in enumerate(dict.fromkeys(df["checkpoint"]))})
    order = pd.DataFrame({"ckpt": ckpt, "value": df[column]}).sort_values(
        ["ckpt", "value"], ascending=[True, not numeric], kind="stable", na_position="last"
    )
    return df.loc[order.index].reset_index(drop=True)


def _finite(x):
    """JSON has no NaN/Inf. NaN (not measured: status says why) is null; an infinity is a result (cond_dW
    of a rank-deficient product, the fp16 error of a factor that overflows) and is kept, as the string
    "inf" or "-inf" (float() reads it back); as null it read like "not measured"."""
    import pandas as pd

    if x is None or x is pd.NA:
        return None
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
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

# The default table fits 100 columns: (header, column). Headers are column names, so each can be
# passed to --sort. A column added here (e.g. a precision-risk flag) shows by default.
DEFAULT_COLUMNS = [("r", "r"), ("scaling", "scaling"), ("norm_A", "norm_A"), ("norm_B", "norm_B"),
                   ("rel_imbalance", "rel_imbalance"), ("cond_dW", "cond_dW")]
# Shown above the table (file, checkpoint), not in it.
_HEADER_COLUMNS = ("source", "checkpoint", "step")
_DEFAULT_WIDTH = 100  # a pipe or log gets this; --wide gets room for every column
_WIDE_WIDTH = 250
MAX_TABLE_ROWS = 500  # layers listed in the table; the summary line covers them all


def _short(value: str) -> str:
    value = " ".join(str(value).split())
    return value if len(value) <= _METADATA_WIDTH else f"{value[:_METADATA_WIDTH]}... ({len(value)} chars)"


def print_report(df: pd.DataFrame, top: int | None = None, console=None, wide: bool = False) -> None:
    """Rich tables: where the numbers come from, one row per layer, then a summary line.

    The default layer table fits 100 columns (short module names, the numbers that matter,
    top sigma of dW); `wide` shows every column with full module names. For a Trainer folder the
    layer table is the last checkpoint's, followed by one row per checkpoint so imbalance can
    be followed over training. `top`: singular values of dW per row (default 1, wide 3).
    """
    if top is None:
        top = 3 if wide else 1
    df = printable_frame(df)
    if console is None:
        console = pipe_console()
        # Pipes get 80 columns by default, too narrow for the table; squeezed into a terminal narrower
        # than 100 columns, rich cut numbers ("0.5…" for 0.596) and dropped the module column. Laid out
        # for 100 columns, a narrow terminal wraps the lines, which loses nothing.
        if not console.is_terminal or console.width < _DEFAULT_WIDTH:
            console = pipe_console(width=_WIDE_WIDTH if wide else _DEFAULT_WIDTH)
    sources = df.attrs.get("sources", [])
    checkpoints = list(dict.fromkeys(c for c in df["checkpoint"] if c))
    _print_sources(console, sources, checkpoints)
    layers = df[df["checkpoint"] == checkpoints[-1]] if checkpoints else df
    title = f"layers at {checkpoints[-1]} (--format csv gives every checkpoint)" if checkpoints else "layers"
    shown = layers.head(MAX_TABLE_ROWS)  # rich lays out ~2,000 rows/s: 20k modules would print for 10 s
    table = _wide_table(shown, top, title) if wide else _layer_table(shown, top, title)
    if wide:  # every column at its natural width, never folded: scroll sideways (less -S) rather than guess
        from rich.measure import Measurement

        natural = Measurement.get(console, console.options.update(width=10_000), table).maximum
        console = pipe_console(file=console.file, width=max(console.width, natural), force_terminal=console.is_terminal)
    console.print(table)
    if len(layers) > len(shown):
        console.print(f"... and {len(layers) - len(shown)} more module(s): --format csv lists every one, "
                      "--sort rel_imbalance puts the worst first")
    if checkpoints:
        console.print(_checkpoint_table(df, checkpoints))
    _print_summary(console, layers)


def _print_sources(console, sources: list[dict], checkpoints: list[str]) -> None:
    from rich.markup import escape

    if checkpoints:
        steps = [s["step"] for s in sources if s["step"] is not None]
        span = f", steps {min(steps)}..{max(steps)}" if steps else ""
        n = sum(c.startswith("checkpoint-") for c in checkpoints)
        final = " and the final adapter" if "final" in checkpoints else ""
        console.print(f"[bold]Trainer output folder[/]: {n} checkpoint(s){span}{final}")
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


def _new_table(title: str):
    from rich import box
    from rich.table import Table

    # No vertical rules and no outer padding: two spaces between columns, all of it for numbers.
    return Table(title=title, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD, show_edge=False,
                 pad_edge=False)


def _layer_table(df: pd.DataFrame, top: int, title: str):
    """module (shortened), [adapter], r, scaling, norms, rel_imbalance, cond_dW, top sigma of dW."""
    from rich.text import Text

    names = short_module_names(list(df["module"]))
    multi_adapter = df["adapter"].nunique() > 1
    t = _new_table(title)
    t.add_column("module", overflow="fold")
    if multi_adapter:
        t.add_column("adapter", overflow="fold")
    for header, _ in DEFAULT_COLUMNS:
        t.add_column(header, justify="right", no_wrap=True)
    if top:
        t.add_column("sigma_max(dW)" if top == 1 else f"top {top} sigma(dW)", justify="right", no_wrap=True)
    for row in df.to_dict(orient="records"):
        cells = [names[row["module"]] + (" (DoRA)" if row["dora"] else "")]
        cells += [row["adapter"]] if multi_adapter else []
        cells += [num(row[col], unknown="?" if col == "scaling" else "-") for _, col in DEFAULT_COLUMNS]
        if top:
            cells.append(" ".join(num(x) for x in row["sigma"][:top]))
        t.add_row(*(Text(str(c)) for c in cells))  # module names are data, not rich markup
    return t


def _wide_table(df: pd.DataFrame, top: int, title: str):
    """Every column of the report, full module names; lists of singular values cut to `top`."""
    import pandas as pd

    from rich.text import Text

    columns = [c for c in df.columns if c not in _HEADER_COLUMNS]
    t = _new_table(title)
    for c in columns:
        numeric = pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
        header = f"{c} (top {top})" if c in _LIST_COLUMNS else c
        t.add_column(header, justify="right" if numeric or c in _LIST_COLUMNS else "left",
                     overflow="fold", no_wrap=c not in ("module", "status"))
    for row in df.to_dict(orient="records"):
        cells = []
        for c in columns:
            v = row[c]
            if c in _LIST_COLUMNS:
                cells.append(" ".join(num(x) for x in v[:top]))
            elif isinstance(v, str):
                cells.append(v)
            elif isinstance(v, bool):
                cells.append("yes" if v else "no")
            else:
                cells.append(num(v, unknown="?" if c == "scaling" else "-"))
        t.add_row(*(Text(c) for c in cells))
    return t


def _checkpoint_table(df: pd.DataFrame, checkpoints: list[str]):
    import pandas as pd

    from balora.report import summarize

    t = _new_table("over training")
    for name in ("checkpoint", "step", "modules", "rel_imb mean", "rel_imb max", "cond_dW median", "eff_rank mean",
                 "sigma_max"):
        # no_wrap: a checkpoint's name is what tells the rows apart (rich cut checkpoint-100 to "checkpoint-1…")
        t.add_column(name, justify="left" if name == "checkpoint" else "right", no_wrap=name == "checkpoint",
                     min_width=max(map(len, checkpoints)) if name == "checkpoint" else None)
    for c in checkpoints:
        part = df[(df["checkpoint"] == c) & (df["status"] == "ok")]
        agg = summarize(part)
        step = part["step"].iloc[0] if len(part) else pd.NA
        t.add_row(c, "" if step is pd.NA else str(step), str(len(part)),
                  *(num(agg.get(f"balora/{k}")) for k in
                    ("rel_imbalance_mean", "rel_imbalance_max", "cond_dW_median", "eff_rank_mean", "sigma_max")))
    return t


# Extra lines for the summary: each rule takes the layer table and returns a warning or None;
# a new check is one more rule appended to SUMMARY_RULES.
def _precision_rule(df: pd.DataFrame) -> str | None:
    """Layers that lose more than 1e-2 of dW stored in fp16, and whether balancing fixes them."""
    from balora.report import precision_warning  # here, not at the top: `balora --help` stays fast

    return precision_warning(df)


SUMMARY_RULES: list = [_precision_rule]


def summary_line(df: pd.DataFrame) -> str:
    """One line: modules, layers, adapters, the worst imbalance and where, median conditioning."""
    ok = df[df["status"] == "ok"]
    names = short_module_names(list(df["module"]))
    blocks = {b for b in (_block(m) for m in df["module"]) if b}
    adapters = list(dict.fromkeys(df["adapter"]))
    parts = [_count(len(df), "module") + (f" in {_count(len(blocks), 'layer')}" if blocks else "")
             + (f", {len(adapters)} adapters ({', '.join(adapters)})" if len(adapters) > 1 else "")]
    if len(ok):
        worst = ok.loc[ok["rel_imbalance"].astype(float).fillna(-1.0).idxmax()]
        where = names[worst["module"]] + (f"[{worst['adapter']}]" if len(adapters) > 1 else "")
        parts.append(f"worst rel_imbalance {num(worst['rel_imbalance'])} at {where}")
        parts.append(f"median cond_dW {num(ok['cond_dW'].median())}")
    if len(ok) < len(df):
        parts.append(f"{len(df) - len(ok)} without numbers")
    return "; ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _block(module: str) -> str | None:
    """`model.layers.3.self_attn.q_proj` -> `model.layers.3` (the last numbered block), else None."""
    p = module.split(".")
    idx = [i for i, seg in enumerate(p[:-1]) if seg.isdigit()]
    return ".".join(p[:idx[-1] + 1]) if idx else None


def _print_summary(console, df: pd.DataFrame) -> None:
    from rich.markup import escape

    console.print(escape(summary_line(df)))
    for rule in SUMMARY_RULES:
        note = rule(df)
        if note:
            console.print(f"[yellow]warning[/]: {escape(note)}")
    bad = df[df["status"] != "ok"]
    for row in bad.head(10).itertuples(index=False):
        console.print(f"[yellow]{escape(f'{row.module}[{row.adapter}]')}[/]: {escape(row.status)}")
    if len(bad) > 10:
        console.print(f"... and {len(bad) - 10} more module(s) without numbers")
