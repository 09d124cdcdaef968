"""`balora compare`: train arms side by side on a task and write a run directory."""

from __future__ import annotations

import os
import shlex
import sys

from balora.cli import COMMANDS

DEFAULT = "the task's"


def add_parser(sub):
    p = sub.add_parser(
        "compare",
        help=COMMANDS["compare"][1],
        description="Train every (arm, seed, lr, alpha) cell of a task from the same initial adapter weights and "
        "data order, and write losses, per-layer diagnostics and spectra to a run directory "
        "(read it with balora.load_run or the dashboard). Options left out take the task's defaults.",
    )
    p.add_argument("--task", default="synthetic", help="synthetic | lm | encoder (default: synthetic)")
    p.add_argument("--arms", help=f"comma list, e.g. lora,balora,balora-svd,loraplus,riemannian (default: {DEFAULT})")
    p.add_argument("--steps", type=int, help=f"optimizer steps per cell (default: {DEFAULT})")
    p.add_argument("--seeds", help="a count (3 means seeds 0,1,2) or a comma list (0,4,7)")
    p.add_argument("--optimizer", help="adam | adamw | sgd | sign (sign descent)")
    p.add_argument("--lr", help="learning rate, or a grid: a comma list (1e-3,1e-2), lin:START:STOP:N (evenly spaced, "
                                "both ends included) or log:START:STOP:N (evenly spaced in log scale)")
    p.add_argument("--alpha", help="LoRA alpha, or a grid like --lr's (default: the task's, often = rank)")
    p.add_argument("--rank", type=int, help="LoRA r")
    p.add_argument("--weight-decay", type=float, help="weight decay shared by all arms (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--threads", type=int, help="torch CPU threads during the run (default: the task's)")
    p.add_argument("--dtype", help="float32 | bfloat16 (float64 where the task allows)")
    p.add_argument("--eval-every", type=int, help="eval loss every N steps, 0 never (tasks with an eval set)")
    p.add_argument("--layers-every", type=int, help="per-layer report every N steps, 0 never")
    p.add_argument("--spectra-every", type=int, help="singular values of dW, A, B every N steps, 0 never")
    p.add_argument("--target-loss", type=float, help="loss threshold for steps/seconds-to-target (default: the task's)")
    p.add_argument("--select",
                   help="best learning rate in the summaries: arm = one per arm, lowest median over seeds (default); "
                        "seed = each seed its own best, the paper's protocol")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="task or arm option, repeatable: --set model=gpt2 --set loraplus_lr_ratio=4")
    p.add_argument("--out", help="run directory (default: <runs folder>/<task>-<timestamp>, -2 added if taken; the runs folder is "
                                 "./runs or $BALORA_RUNS, the one the dashboard lists)")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier balora run at --out: only the files balora wrote there are deleted")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary table")
    p.add_argument("--list", action="store_true", help="list tasks, arms and optimizers, then exit")
    p.set_defaults(run=run)


def config_from_args(args):
    """argparse namespace -> balora.compare_config.CompareConfig (imported here: parsing `balora --help`
    should not pay for importing the runner, PEFT and transformers)."""
    from balora.compare_config import CompareConfig, parse_set

    return CompareConfig(
        task=args.task, arms=args.arms, steps=args.steps, seeds=args.seeds, optimizer=args.optimizer, lr=args.lr,
        alpha=args.alpha, rank=args.rank, weight_decay=args.weight_decay, device=args.device, threads=args.threads,
        dtype=args.dtype, eval_every=args.eval_every, layers_every=args.layers_every,
        spectra_every=args.spectra_every, target_loss=args.target_loss, select=args.select,
        options=parse_set(args.set),
        out=args.out, force=args.force, quiet=args.quiet,  # None: the runner picks a free runs/<task>-<time>
        command=invoked_command(),
    )


def invoked_command() -> str | None:
    """The command line of this process when it is a `balora compare` call, else None (reconstructed later)."""
    argv0 = sys.argv[0].replace(os.sep, "/")
    if "compare" not in sys.argv[1:]:
        return None
    if os.path.basename(argv0) == "balora":
        prog = ["balora"]
    elif argv0.endswith("balora/cli.py"):
        prog = ["python", "-m", "balora.cli"]
    elif argv0.endswith("balora/__main__.py"):
        prog = ["python", "-m", "balora"]
    else:
        return None
    return shlex.join(prog + sys.argv[1:])


def _file_identity(path: str) -> tuple[int, int, int] | None:
    """(inode, mtime_ns, size) of a file, None if absent: status.json is rewritten by an atomic rename, so each
    write gives it a new inode."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def run(args) -> int:
    from balora.runner import run_compare
    from balora.runs_folder import dashboard_command, dashboard_url
    from balora.store import STATUS, load_run, read_status

    if args.list:
        return _list()
    cfg = config_from_args(args)
    # --out's status.json before the run (a default folder is always a new one). Not its mtime against the start
    # time: Linux stamps files from a coarse clock, up to a tick behind time.time(), so a status this run wrote at
    # once could read as older.
    before = _file_identity(os.path.join(cfg.out, STATUS)) if cfg.out else None
    try:
        path = run_compare(cfg)
    except KeyboardInterrupt:
        status = os.path.join(cfg.out or "", STATUS)
        # Only a status this run wrote: Ctrl-C while the task was still being built leaves --out's older run.
        if cfg.out and os.path.isfile(status) and _file_identity(status) != before:
            # as marked: "completed" when Ctrl-C came while the finished run's parts were being merged
            marked = read_status(cfg.out).get("status", "unknown")
            what = "run" if marked == "completed" else "partial run"
            print(f"balora compare: {what} left in {cfg.out} (marked {marked}; balora.load_run reads it)",
                  file=sys.stderr)
        raise
    result = load_run(path)
    if not args.quiet:
        print_summary(result)
    print(f"run written to {path} ({result.status})")
    if cfg.force:
        _say_kept(path)
    print(f"open it in the dashboard: {dashboard_command(path)}   (then {dashboard_url(path)})")
    return 0


def _say_kept(path) -> None:
    """--force deleted only what the earlier run wrote: name what else is in the folder, left as it was."""
    from balora.safe_io import listed
    from balora.store import foreign_entries

    kept = foreign_entries(path)
    if kept:
        shown = listed(kept, 10)
        print(f"balora compare: --force left {len(kept)} entr{'y' if len(kept) == 1 else 'ies'} in {path} that "
              f"balora did not write: {shown}", file=sys.stderr)


def _to_target(r, n_seeds: int) -> str:
    """An arm_summary row's steps to target: "37 (2/3)", "never (1/3)", or "-" without a target."""
    from balora.commands.formatting import num

    if r.reached != r.reached:  # NaN: the run has no target loss
        return "-"
    steps = "never" if r.steps_to_target == float("inf") else num(r.steps_to_target, digits=4)
    return f"{steps} ({int(r.reached)}/{n_seeds})"


def print_summary(run) -> None:
    """Each arm at its own best grid cell, in a rich table."""
    from rich.console import Console
    from rich.table import Table

    from balora.commands.formatting import num
    from balora.records import arm_summary

    def _g4(x) -> str:
        return num(x, digits=4)

    select = run.config.get("select", "arm")
    s = arm_summary(run.summary, select=select)
    metric = s["metric"].iloc[0] if len(s) else "final_loss"
    near = "2x" if metric == "final_excess_loss" else "5%"
    targets = run.summary["target_loss"].dropna()  # load_run gives every summary column, old runs too
    if len(targets):
        on = run.summary.at[targets.index[0], "target_on"]
        lo, hi = _g4(targets.min()), _g4(targets.max())  # the synthetic task sets one per seed
        target = (f"median steps at the best cell until {on} <= {lo if lo == hi else f'{lo}-{hi} (per seed)'}, "
                  "a seed that never reached it counting as never; (k/n): seeds that reached it")
    else:
        target = "median steps at the best cell (-: the run has no target loss)"
    table = Table(title=f"{run.config.get('task')}, {run.config.get('optimizer')}, "
                        f"{len(run.config.get('seeds', []))} seed(s)",
                  caption=("best cell: one (lr, alpha) per arm, the lowest median over seeds; " if select == "arm" else
                           "best cell: each seed its own (lr, alpha), the paper's protocol (lr, alpha: medians); ")
                          + f"best/worst: median {metric} over seeds at the arm's best/worst (lr, alpha) cell; "
                          f"near best: share of cells within {near} of the best; to target: {target}; "
                          "vs lora: median speed-up in steps to target, each arm at its best cell")
    for col in ("arm", "ok", "div", "lr", "alpha", "best", "worst", "near best", "to target", "vs lora"):
        table.add_column(col, justify="left" if col == "arm" else "right", no_wrap=True)
    for r in s.itertuples(index=False):
        near_best = r.within_2x if near == "2x" else r.within_5pct
        table.add_row(r.arm, f"{r.completed}/{r.cells}", str(r.diverged), _g4(r.best_lr), _g4(r.best_alpha),
                      _g4(r.best), _g4(r.worst), _g4(near_best), _to_target(r, len(run.config.get("seeds") or [])),
                      _g4(r.speedup_vs_lora))
    console = Console()
    if not console.is_terminal:  # piped or logged: rich would assume 80 columns and cut the numbers
        console = Console(width=120)
    console.print(table)
    skipped = run.summary[run.summary["status"] == "skipped"]
    for arm, reason in skipped.drop_duplicates("arm")[["arm", "reason"]].itertuples(index=False):
        print(f"skipped {arm}: {reason}")


def _list() -> int:
    from balora.arms import ARMS
    from balora.optim import OPTIMIZERS
    from balora.tasks import TASKS, available_tasks

    present = available_tasks()
    print("tasks:      " + ", ".join(n + ("" if n in present else " (not installed)") for n in TASKS))
    print("arms:")
    for arm in ARMS.values():
        why = arm.unavailable()
        print(f"  {arm.name:<11} {arm.help}" + (f" [unavailable: {why}]" if why else ""))
    print("optimizers: " + ", ".join(OPTIMIZERS))
    return 0
