"""Does balancing change how fast LoRA converges? Arms side by side, through balora.compare.

    python benchmarks/bench_convergence.py --quick     # synthetic, 8 seeds, 3-point grids; lm 1 seed, 100 steps
    python benchmarks/bench_convergence.py             # synthetic, 8 seeds, 5-6-point grids; lm 3 seeds, 200 steps
    python benchmarks/bench_convergence.py --plots docs/img   # also write the PNG figures (needs matplotlib)
    python benchmarks/bench_convergence.py --no-lm --init-scales 1,3,10,30   # more initial scales of A
    python benchmarks/bench_convergence.py --paper     # the paper's synthetic figure, its protocol (paper_synthetic.py)

1. Synthetic (the paper's problem: LoRA r=4 on a frozen random 20x20 layer, random target, PEFT's
   B = 0 init, 100 full-batch steps), with torch Adam, SGD and sign descent (what the paper's
   synthetic figure calls "Adam"), once per initial scale of A (--init-scales, the task's
   init_scale option: 1 is PEFT's Kaiming-uniform A, 10 multiplies it by 10; the default runs
   both, because balancing helps little at 1 and a lot at 10). Arms lora, balora (nearest
   gauge), balora-svd (the paper's gauge) and loraplus (PEFT's LoRA+, B's lr 16x A's), each over
   one learning-rate grid per optimizer (the same for every scale) and 8+ seeds (a seed is a new
   problem). Prints, per scale and optimizer: every arm at its own best rate (median and
   quartiles over seeds of the final excess loss over the best rank-4 loss, and of the steps to
   remove 99% of the initial excess), then every arm across the whole grid; at the end one
   overview table of every arm at its best rate, per optimizer and scale.
2. The offline language-model task (a toy GPT-2 pretrained on generated addition text, LoRA r=8,
   fine-tuned with AdamW on subtraction text): eval loss against steps and against seconds.

Every run is written to --out (one balora run directory per experiment: open them in the
dashboard with `balora dashboard --runs OUT`).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import balora
from balora import records
from balora.errors import InputError
from balora.runner import compare
from machine import cpu_line  # beside this file

# Around the task's defaults (adam 3e-2, sgd 0.3, sign 1e-2), factor ~3 apart. A large init_scale
# lowers plain LoRA's stable SGD rate (the curvature across the valley is ~||A0||^2): SGD's grid
# reaches down to 0.003 so that every arm's best rate is inside the grid at init_scale 1 and 10.
SYNTH_GRIDS = {
    "adam": [3e-3, 1e-2, 3e-2, 1e-1, 3e-1],
    "sgd": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
    "sign": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
}
# --quick: 3 points holding every arm's best rate of the full grids at init_scale 1 and 10.
QUICK_GRIDS = {"adam": [1e-2, 3e-2, 1e-1], "sgd": [0.03, 0.1, 0.3], "sign": [3e-3, 1e-2, 3e-2]}
SYNTH_ARMS = "lora,balora,balora-svd,loraplus"
LM_ARMS = "lora,balora,balora-svd"


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _q(s: pd.Series, q: float) -> float:
    # "nearest": interpolating between two infinities (never reached, diverged) gives NaN.
    return float(s.quantile(q, interpolation="nearest")) if len(s) else math.nan


def _fmt(x: float, digits: int = 3, inf: str = "never") -> str:
    """inf reads as `inf`: "never" for steps (target not reached), "diverged" for losses."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return inf if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def _values(summary: pd.DataFrame, column: str) -> pd.DataFrame:
    """column per cell; diverged or failed cells count as +inf (worse than anything that finished)."""
    return summary.assign(value=records.cell_values(summary, column))


def _steps(summary: pd.DataFrame) -> pd.Series:
    """steps_to_target with 'never reached' (NaN) and diverged as +inf, so medians rank them last."""
    return summary["steps_to_target"].where(summary["status"] == "completed", math.inf).fillna(math.inf).astype(float)


def best_cells(summary: pd.DataFrame, metric: str, select: str = "arm") -> dict[str, pd.DataFrame]:
    """Per arm, the rows (one per seed) of the (lr, alpha) cell with the smallest median metric."""
    return dict(iter(records.best_cells(summary, metric, select=select).groupby("arm", sort=False)))


def print_best_table(summary: pd.DataFrame, metric: str, label: str, select: str = "arm") -> list[dict]:
    """Every arm at its own best learning rate (per seed with select="seed": the median lr is shown):
    median [q25, q75] over seeds."""
    cells = best_cells(summary, metric, select)
    lora_steps = _steps(cells["lora"]).set_axis(cells["lora"]["seed"]) if "lora" in cells else None
    print(f"   {'arm':<12}{'best lr':>9}  {label + ' med [q25, q75]':<40}{'steps to target med [q25, q75]':<34}"
          f"{'reached':>8}{'diverged':>9}{'speed-up vs lora':>17}")
    rows = []
    for arm, g in cells.items():
        v = _values(g, metric)["value"]
        st = _steps(g)
        speed = math.nan
        if lora_steps is not None:
            ratio = (lora_steps / st.set_axis(g["seed"])).replace([math.inf, -math.inf], math.nan)
            speed = float(ratio.median()) if ratio.notna().any() else math.nan
        row = {"arm": arm, "best_lr": float(g["lr"].median()), "median": float(v.median()), "q25": _q(v, 0.25),
               "q75": _q(v, 0.75), "steps_median": float(st.median()), "steps_q25": _q(st, 0.25),
               "steps_q75": _q(st, 0.75), "reached": int(st.apply(math.isfinite).sum()), "seeds": len(g),
               "diverged": int((g["status"] == "diverged").sum()), "speedup": speed}
        rows.append(row)
        metric_txt = (f"{_fmt(row['median'], inf='diverged')} [{_fmt(row['q25'], inf='diverged')}, "
                      f"{_fmt(row['q75'], inf='diverged')}]")
        steps_txt = f"{_fmt(row['steps_median'])} [{_fmt(row['steps_q25'])}, {_fmt(row['steps_q75'])}]"
        print(f"   {arm:<12}{row['best_lr']:>9.3g}  {metric_txt:<40}{steps_txt:<34}"
              f"{row['reached']:>4}/{row['seeds']:<3}{row['diverged']:>9}{_fmt(speed, 2):>17}")
    return rows


def print_grid_table(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Median metric over seeds for every arm and learning rate (inf: some seed diverged past the median)."""
    s = _values(summary, metric)
    grid = s.pivot_table(index="arm", columns="lr", values="value", aggfunc="median", sort=False)
    print("   " + "arm / lr".ljust(12) + "".join(f"{lr:>12.3g}" for lr in grid.columns))
    for arm, row in grid.iterrows():
        print(f"   {arm:<12}" + "".join(f"{_fmt(x, inf='diverged'):>12}" for x in row))
    return grid


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--init-scales {text}: expected a comma list of positive numbers, e.g. 1,10") from None
    if not scales or any(not math.isfinite(x) or x <= 0 for x in scales) or len(set(scales)) != len(scales):
        raise SystemExit(f"--init-scales {text}: expected distinct positive numbers, e.g. 1,10")
    return scales


def parse_optimizers(text: str) -> list[str]:
    """Checked before the first run: an unknown name used to raise a KeyError only when its turn came,
    after the runs before it had taken their minutes."""
    opts = [x.strip() for x in text.split(",") if x.strip()]
    if not opts or any(o not in SYNTH_GRIDS for o in opts):
        raise SystemExit(f"--optimizers {text}: expected a comma list of {', '.join(SYNTH_GRIDS)}")
    return opts


def _scale_label(scale: float) -> str:
    return "init_scale 1 (PEFT's init)" if scale == 1 else f"init_scale {scale:g} (A init {scale:g}x PEFT's)"


def run_synthetic(args, out: Path) -> dict[tuple[float, str], object]:
    """(init_scale, optimizer) -> the loaded run; prints the tables as it goes."""
    runs = {}
    scales, opts = parse_scales(args.init_scales), parse_optimizers(args.optimizers)
    for scale in scales:
        for opt in opts:
            grid = QUICK_GRIDS[opt] if args.quick else SYNTH_GRIDS[opt]
            name = f"synthetic-init{scale:g}-{opt}"
            t0 = time.perf_counter()
            run = compare("synthetic", arms=SYNTH_ARMS, steps=100, seeds=args.seeds, optimizer=opt, lr=grid,
                          out=out / name, force=True, quiet=True, layers_every=0, spectra_every=0,
                          init_scale=scale)
            took = time.perf_counter() - t0
            runs[(scale, opt)] = run
            print(f"\n== synthetic, {_scale_label(scale)}, {opt}: r=4, 20x20, 100 steps, {args.seeds} seeds, "
                  f"lr grid {grid}; {len(run.summary)} cells in {took:.0f} s; {_load()} ==")
            print(f"   run: {out / name}")
            print("   each arm at its own best lr (" + ("the lr with the smallest median final excess loss" if
                  args.select == "arm" else "each seed its own lr, the paper's protocol; median lr shown") + "):")
            print_best_table(run.summary, "final_excess_loss", "final excess loss", args.select)
            print("   median final excess loss over seeds, every arm at every lr (inf: diverged):")
            print_grid_table(run.summary, "final_excess_loss")
    if runs:
        print_overview(runs, args.select)
    return runs


def print_overview(runs: dict, select: str = "arm") -> None:
    """One line per (optimizer, init_scale): each arm's median final excess loss at its own best lr."""
    arms = list(dict.fromkeys(a for run in runs.values() for a in run.summary["arm"].unique()))
    print("\n== synthetic overview: median final excess loss at each arm's own best lr (that lr) ==")
    print(f"   {'optimizer':<10}{'init_scale':>11}" + "".join(f"{a:>20}" for a in arms))
    for opt in dict.fromkeys(o for _, o in runs):
        for (scale, o), run in runs.items():
            if o != opt:
                continue
            cells = best_cells(run.summary, "final_excess_loss", select)
            txt = []
            for a in arms:
                g = cells.get(a)
                if g is None:
                    txt.append("-")
                    continue
                med = float(_values(g, "final_excess_loss")["value"].median())
                txt.append(f"{_fmt(med, 2, inf='diverged')} ({float(g['lr'].median()):g})")
            print(f"   {opt:<10}{scale:>11g}" + "".join(f"{t:>20}" for t in txt))


def run_lm(args, out: Path):
    # --quick shortens only what was not asked for: it used to replace a given --lm-steps/--lm-seeds
    steps = args.lm_steps if args.lm_steps is not None else 100 if args.quick else 200
    seeds = args.lm_seeds if args.lm_seeds is not None else 1 if args.quick else 3
    t0 = time.perf_counter()
    run = compare("lm", arms=LM_ARMS, steps=steps, seeds=seeds, optimizer="adamw", out=out / "lm", force=True,
                  quiet=True, eval_every=10, layers_every=0, spectra_every=0)
    took = time.perf_counter() - t0
    s = run.summary
    print(f"\n== lm (offline toy GPT-2, LoRA r=8, AdamW lr {s['lr'].iloc[0]:g}, alpha {s['alpha'].iloc[0]:g}), "
          f"{steps} steps, {seeds} seed(s): {len(s)} cells in {took:.0f} s; {_load()} ==")
    print(f"   run: {out / 'lm'}")
    print(f"   {'arm':<12}{'final eval loss median [min, max]':<36}{'steps to target':>16}{'s to target':>12}"
          f"{'total s':>9}{'balance s':>10}")
    for arm, g in s.groupby("arm", sort=False):
        ev = g["final_eval_loss"]
        ev_txt = f"{_fmt(float(ev.median()), 4)} [{_fmt(float(ev.min()), 4)}, {_fmt(float(ev.max()), 4)}]"
        print(f"   {arm:<12}{ev_txt:<36}{_fmt(float(_steps(g).median())):>16}"
              f"{_fmt(float(g['seconds_to_target'].fillna(math.inf).median())):>12}"
              f"{float(g['total_seconds'].median()):>9.1f}{float(g['balance_seconds'].median()):>10.2f}")
    print(f"   target: eval loss {_fmt(float(s['target_loss'].iloc[0]), 4)} (the task's floor + half the initial excess)")
    return run


def plot_synthetic(runs: dict, path: Path, select: str = "arm") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = list(dict.fromkeys(sc for sc, _ in runs))
    opts = list(dict.fromkeys(o for _, o in runs))
    fig, axes = plt.subplots(len(scales), len(opts), figsize=(5 * len(opts), 4 * len(scales)), squeeze=False)
    for (scale, opt), run in runs.items():
        ax = axes[scales.index(scale)][opts.index(opt)]
        cells = best_cells(run.summary, "final_excess_loss", select)
        steps = run.steps
        start = 0.0
        for arm, g in cells.items():
            lr = float(g["lr"].median())  # per-seed selection: each seed its own lr, the median shown
            d = steps.merge(g[list(records.KEY)], on=list(records.KEY))
            med = d.groupby("step")["excess_loss"].median()
            lo = d.groupby("step")["excess_loss"].quantile(0.25)
            hi = d.groupby("step")["excess_loss"].quantile(0.75)
            n_div = int((g["status"] == "diverged").sum())
            line, = ax.plot(med.index, med.values,
                            label=f"{arm} (lr {lr:g})" + (f", {n_div}/{len(g)} diverged" if n_div else ""))
            ax.fill_between(med.index, lo.values, hi.values, alpha=0.15, color=line.get_color())
            start = max(start, float(med.iloc[0]) if len(med) else 0.0)
        ax.set_yscale("log")
        if start > 0:  # a diverging arm would squash every other curve: keep the axis near the initial loss
            ax.set_ylim(top=10 * start)
        ax.set_title(f"synthetic, init_scale {scale:g}, {opt}: each arm at its best lr", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("excess loss (median, quartile band)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lm(run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = run.steps[run.steps["eval_loss"].notna()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for arm, d in steps.groupby("arm", sort=False):
        by_step = d.groupby("step")
        line, = axes[0].plot(by_step["eval_loss"].median().index, by_step["eval_loss"].median().values, label=arm)
        axes[0].fill_between(by_step["eval_loss"].min().index, by_step["eval_loss"].min().values,
                             by_step["eval_loss"].max().values, alpha=0.15, color=line.get_color())
        for _, s in d.groupby("seed"):
            axes[1].plot(s["time_s"], s["eval_loss"], color=line.get_color(), alpha=0.7,
                         label=arm if _ == d["seed"].min() else None)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("eval loss (median over seeds, min-max band)")
    axes[1].set_xlabel("training seconds (step + balancing)")
    axes[1].set_ylabel("eval loss (one line per seed)")
    for ax in axes:
        ax.set_title("offline lm task (toy GPT-2, AdamW)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3-point lr grids; lm: 1 seed, 100 steps")
    ap.add_argument("--seeds", type=int, default=8, help="synthetic seeds (at least 8 for the published tables)")
    ap.add_argument("--optimizers", default="adam,sgd,sign")
    ap.add_argument("--init-scales", default="1,10",
                    help="synthetic task's init_scale values (multiplies PEFT's A init; 1 = PEFT's), comma list")
    ap.add_argument("--lm-seeds", type=int, default=None, help="lm seeds (default 3; --quick 1)")
    ap.add_argument("--lm-steps", type=int, default=None, help="lm steps per cell (default 200; --quick 100)")
    ap.add_argument("--no-lm", action="store_true", help="skip the language-model task")
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--out", default="bench_runs", help="folder for the balora run directories")
    ap.add_argument("--plots", default=None,
                    help="folder to write convergence_synthetic.png and convergence_lm.png into (needs matplotlib)")
    ap.add_argument("--select", default="arm", choices=("arm", "seed"),
                    help="best lr: arm = one per arm, lowest median over seeds; seed = each seed its own (the paper's)")
    ap.add_argument("--paper", action="store_true",
                    help="only the paper's synthetic experiment with its protocol (depth 1 and 2, sign descent and "
                         "gradient descent, 8 trajectories, per-seed best lr of linspace(1e-5, 0.3, 50)); writes "
                         "docs/img/paper_synthetic.png and its table into docs/BENCHMARKS.md")
    ap.add_argument("--paper-lr", default="lin:1e-5:0.3:50", help="--paper's lr grid (the paper's by default)")
    # This checkout's docs, not ./docs: run from another folder, --paper wrote a stray docs/BENCHMARKS.md there.
    ap.add_argument("--docs", default=str(Path(__file__).resolve().parents[1] / "docs"),
                    help="--paper: the docs folder to write the figure and table into (default: this checkout's)")
    args = ap.parse_args(argv)
    try:
        return run_benchmark(args)
    except InputError as e:  # balora's one-line message (e.g. --seeds 0), not a traceback
        raise SystemExit(f"bench_convergence: error: {e}") from None


def run_benchmark(args) -> int:
    out = Path(args.out)
    print(f"bench_convergence: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, balora {balora.__version__}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M:%S')}; {_load()}")
    print(cpu_line())
    if args.paper:
        return run_paper_experiment(args, out)
    runs, lm = {}, None
    if not args.no_synthetic:
        runs = run_synthetic(args, out)
    if not args.no_lm:
        lm = run_lm(args, out)
    if args.plots:
        folder = Path(args.plots)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            if runs:
                plot_synthetic(runs, folder / "convergence_synthetic.png", args.select)
            if lm is not None:
                plot_lm(lm, folder / "convergence_lm.png")
            print(f"\nplots written to {folder}/ (matplotlib)")
        except ImportError:
            print("\nplots skipped: matplotlib is not installed (pip install matplotlib)")
    print(f"\ndone; {_load()}")
    return 0


def run_paper_experiment(args, out: Path) -> int:
    """--paper: four runs, the four-panel figure, the table printed and written into docs/BENCHMARKS.md."""
    import paper_synthetic as paper  # beside this script (python puts the script's folder on the path)

    t0 = time.perf_counter()
    print(f"\n== the paper's synthetic experiment: {paper.ARMS}, {args.seeds} trajectories, lr {args.paper_lr} ==")
    runs = paper.run_paper(out, seeds=args.seeds, lr=args.paper_lr)
    took = time.perf_counter() - t0
    table = paper.paper_table(runs)
    print(paper.markdown(table))
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    header = (f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} shared CPU cores (torch "
              f"{torch.__version__}, balora {balora.__version__}): {sum(len(r.summary) for r, _ in runs.values())} "
              f"cells in {took / 60:.1f} min; {_load()} at the end. Figure: `docs/img/paper_synthetic.png`.")
    docs = Path(args.docs)
    (docs / "img").mkdir(parents=True, exist_ok=True)
    paper.write_docs(table, command, header, docs / "BENCHMARKS.md", args.paper_lr)
    try:
        paper.plot_paper(runs, docs / "img" / "paper_synthetic.png")
        print(f"\nfigure written to {docs / 'img' / 'paper_synthetic.png'}; table to {docs / 'BENCHMARKS.md'}")
    except ImportError:
        print("\nfigure skipped: matplotlib is not installed (pip install matplotlib)")
    print(f"done in {took:.0f} s; {_load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
