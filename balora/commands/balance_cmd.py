"""`balora balance IN OUT`: a balanced copy of an adapter on disk, in its own format, dW unchanged."""

from __future__ import annotations

from balora.cli import COMMANDS
from balora.commands.arg_checks import check_threads
from balora.commands.formatting import num, pipe_console, printable_frame
from balora.policy import METHODS, RANK_DEFICIENT_POLICIES  # no torch: `balora balance --help` starts at once

_SHOWN_ROWS = 20  # the per-module table lists the most imbalanced pairs first


def add_parser(sub):
    p = sub.add_parser(
        "balance",
        help=COMMANDS["balance"][1],
        description="Balance every LoRA pair of the adapter at IN onto B^T B = A A^T without changing "
        "dW = s B A, and write the result to OUT in the input's format (PEFT folder, kohya or bare "
        ".safetensors, .bin): same keys, dtypes (unless --dtype), config and metadata. Nothing is written unless the "
        "whole copy checks out. For a Trainer output folder, balance one checkpoint-N folder.",
    )
    p.add_argument("input", metavar="IN", help="PEFT adapter folder, diffusers/kohya/LyCORIS .safetensors, .safetensors/.bin with PEFT keys, "
                        "or Hub id user/name[@revision][/path/in/repo] (one file or folder of the repository)")
    p.add_argument("output", metavar="OUT", help="where to write the balanced copy (not inside IN)")
    p.add_argument("--method", choices=METHODS, default="nearest",
                   help="nearest: the balanced pair closest to the stored one (default); svd: the paper's gauge")
    p.add_argument("--on-rank-deficient", choices=[p for p in RANK_DEFICIENT_POLICIES if p != "raise"], default="skip",
                   help="pairs whose product has rank < r: skip (copy unchanged, default) or balance anyway")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default=None,
                   help="write every floating tensor in this dtype but the .alpha scales of kohya, LyCORIS and "
                        "Flux-style diffusers files (kept as stored, so the scaling stays exact), balanced first, so "
                        "small factors survive the cast; "
                        "reports each pair's dW change against the original, the cast included")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch CPU threads (default 1, as inspect: the work is on (n, r) and r x r matrices, where "
                        "more threads mostly wait on each other; 4-6x slower with 2 on a busy 2-core machine)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT if it is a file, an empty folder or an adapter folder "
                   "(a folder of other things, or a Trainer output folder with checkpoint-N folders, is never replaced)")
    p.set_defaults(run=run)


def run(args) -> int:
    from rich.markup import escape

    import torch

    from balora.inspection import balance_file

    torch.set_num_threads(check_threads(args.threads))
    summary = balance_file(args.input, args.output, method=args.method,
                           on_rank_deficient=args.on_rank_deficient, force=args.force, dtype=args.dtype)
    console = pipe_console()
    if not console.is_terminal:
        console = pipe_console(width=160)
    console.print(escape(str(summary)))
    changes = summary.changes
    if len(changes):
        console.print(_changes_table(changes))
    return 0


def _changes_table(changes):
    from rich.table import Table
    from rich.text import Text

    changes = printable_frame(changes)  # module names come from the file's author
    multi_source = changes["source"].nunique() > 1
    shown = changes.sort_values("rel_imbalance_before", ascending=False, kind="stable", na_position="last")
    title = "what changed" + (f" (the {_SHOWN_ROWS} most imbalanced of {len(changes)} pairs)"
                              if len(changes) > _SHOWN_ROWS else "")
    t = Table(title=title, title_justify="left", header_style="bold")
    for name in (["source"] if multi_source else []) + ["module", "adapter", "action", "rel_imb before",
                                                         "rel_imb after", "dW rel change"]:
        t.add_column(name, justify="right" if name.startswith(("rel", "dW")) else "left", overflow="fold")
    for row in shown.head(_SHOWN_ROWS).itertuples(index=False):
        action = row.action if row.action == "balanced" else f"unchanged: {row.reason}"
        cells = ([row.source] if multi_source else []) + [
            row.module, row.adapter, action, num(row.rel_imbalance_before), num(row.rel_imbalance_after),
            num(row.dW_rel_change),
        ]
        t.add_row(*(Text(c) for c in cells))
    return t
