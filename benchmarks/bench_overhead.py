"""What balancing and diagnostics add to the step time of the lm task, measured side by side.

    python benchmarks/bench_overhead.py                        # the lm defaults (toy GPT-2)
    python benchmarks/bench_overhead.py --set toy_size=tiny --steps 20 --repeats 1   # quick check
    python benchmarks/bench_overhead.py --profile              # also: where the balancing time goes

Two configurations of one task, same seed, lr, alpha and data, run by the real runner:

  plain     arm lora, --layers-every 0 --spectra-every 0: no balancing, no diagnostics
  default   arm balora (nearest gauge after every step) with the task's default
            --layers-every / --spectra-every schedule

Eval is off in both: it is not part of either overhead. Repeats alternate plain / default so
that drifting machine load hits both alike. Per-step times come from the runner's own clocks
(the ones every run records): train = forward + backward + optimizer step, then balance,
then diagnostics. Two figures:

  within    (balance + diagnostics) / train of the default arm: one process, one time window,
            so machine load largely cancels
  between   (default arm total) / (plain arm total) - 1, medians over repeats: includes any
            indirect cost (e.g. caches) but is noisier on a shared machine

The first run also pays the one-time toy-model pretraining if the cache is empty; it is
outside every timer. The load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import tempfile
from pathlib import Path

import torch

from balora.compare_config import CompareConfig, parse_set
from balora.errors import InputError
from balora.runner import run_compare
from balora.store import load_run
from balora.tasks import get_task
from cli_args import positive_int  # beside this file


def measure(task: str, arm: str, diagnostics: bool, args, out: Path) -> dict:
    """Seconds per step of one cell: train, balance, diag (from the run's summary row)."""
    defaults = get_task(task).defaults
    cfg = CompareConfig(
        task=task, arms=arm, steps=args.steps, seeds=1, eval_every=0,
        layers_every=None if diagnostics else 0, spectra_every=None if diagnostics else 0,
        threads=args.threads, options=parse_set(args.set), out=str(out), force=True, quiet=True,
    )
    run = load_run(run_compare(cfg))
    row = run.summary.iloc[0]
    if row["status"] != "completed":
        raise SystemExit(f"bench_overhead: {arm} cell ended {row['status']}: {row['reason']}")
    n = int(row["steps_done"])
    return {
        "train": (row["total_seconds"] - row["balance_seconds"]) / n,
        "balance": row["balance_seconds"] / n,
        "diag": row["diag_seconds"] / n,
        "layers_every": run.config["layers_every"] if diagnostics else 0,
        "spectra_every": run.config["spectra_every"] if diagnostics else 0,
        "threads": run.config.get("threads") or defaults.get("threads") or torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="lm")
    parser.add_argument("--steps", type=int, default=100, help="steps per measured cell (default 100)")
    parser.add_argument("--repeats", type=int, default=3, help="plain/default pairs (default 3)")
    parser.add_argument("--threads", type=positive_int, help="torch threads (default: the task's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="task option, repeatable")
    parser.add_argument("--profile", action="store_true", help="profile one extra default cell (cProfile)")
    args = parser.parse_args()
    if args.repeats < 1 or args.steps < 1:  # default[0] below: --repeats 0 ended in an IndexError
        parser.error("--steps and --repeats must be at least 1")
    try:
        plain, default = measure_all(args)
    except InputError as e:  # balora's one-line message (--task, --set), not a traceback
        parser.error(str(e))
    print_figures(args, plain, default)


def measure_all(args) -> tuple[list[dict], list[dict]]:
    """The plain and default cells, alternating, after one warm-up cell."""
    plain, default = [], []
    with tempfile.TemporaryDirectory() as tmp:
        measure(args.task, "lora", False, args, Path(tmp) / "warmup")  # pretrain/caches/imports outside the figures
        for i in range(args.repeats):
            plain.append(measure(args.task, "lora", False, args, Path(tmp) / f"plain{i}"))
            default.append(measure(args.task, "balora", True, args, Path(tmp) / f"default{i}"))
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(measure, args.task, "balora", True, args, Path(tmp) / "profile")
            stats = pstats.Stats(profiler)
            print("\nthe default arm under cProfile: balora's functions by cumulative time")
            stats.sort_stats("cumulative").print_stats("balora/", 25)
    return plain, default


def print_figures(args, plain: list[dict], default: list[dict]) -> None:
    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    d = default[0]
    print(f"\ntask {args.task} {' '.join('--set ' + s for s in args.set)}: {args.steps} steps x {args.repeats} "
          f"repeats, threads {d['threads']}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"default diagnostics schedule: layers every {d['layers_every']}, spectra every {d['spectra_every']} steps")
    print(f"{'':10s}{'train ms':>10s}{'balance ms':>12s}{'diag ms':>10s}{'total ms':>10s}   (per step, median)")
    for name, rows in (("plain", plain), ("default", default)):
        parts = [med(rows, k) * 1e3 for k in ("train", "balance", "diag")]
        print(f"{name:10s}{parts[0]:10.2f}{parts[1]:12.3f}{parts[2]:10.3f}{sum(parts):10.2f}")
    spread = {name: [sum(r[k] for k in ("train", "balance", "diag")) * 1e3 for r in rows]
              for name, rows in (("plain", plain), ("default", default))}
    print("per-repeat totals (ms/step): " + "; ".join(f"{n} {' '.join(f'{v:.1f}' for v in vals)}"
                                                     for n, vals in spread.items()))
    within = statistics.median((r["balance"] + r["diag"]) / r["train"] for r in default)
    # the totals the table prints (plain's diag is not zero: the runner's clocks still tick)
    between = sum(med(default, k) for k in ("train", "balance", "diag")) / sum(
        med(plain, k) for k in ("train", "balance", "diag")) - 1
    print(f"\noverhead within the default arm: (balance + diag) / train = {within * 100:.1f}%")
    print(f"overhead between arms: default / plain - 1 = {between * 100:.1f}% "
          "(noisy on a shared machine: compare with the per-repeat spread above)")


if __name__ == "__main__":
    main()
