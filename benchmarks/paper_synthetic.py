"""The paper's synthetic experiment (its Figure 3), with the paper's protocol; run by
`python benchmarks/bench_convergence.py --paper`.

Protocol, as the official code does it (vcastin/balora, synthetic/synthetic_loss.py and train.py):
- `--set init=paper`: W0 (20 x 20) and the target T with entries N(0, 1), LoRA rank 4, A entries
  N(0, 1), B = 0, scaling 1; loss 1/2 ||W0 + B A - T||^2 on the identity input. All trajectories share
  W0 and T (shared_problem); a trajectory (a seed) differs only by its LoRA init. Depth 2 stacks two
  such layers, LoRA on each, and subtracts 1/2 sum_{i > 2 r} sigma_i(T - W0_prod)^2.
- 8 trajectories, 100 steps, sign descent (the code's "adam" flag: g / (|g| + 1e-8)) or plain gradient
  descent, lr grid linspace(1e-5, 0.3, 50); each trajectory keeps its own best lr by final loss
  (`select="seed"`); a trajectory whose loss passes 1e5 at that lr counts as diverged there, as in the
  code (`threshold=1e5`); the figure shows the median and inter-quartile band over trajectories.
Arms: lora, balora-svd (the paper's SVD gauge: its BaLoRA) and balora (nearest gauge).
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from balora import records
from balora.runner import compare

ARMS = "lora,balora-svd,balora"
OPTIMIZERS = {"sign": "sign descent (the paper's \"Adam\")", "sgd": "gradient descent"}
LR_GRID = "lin:1e-5:0.3:50"
THRESHOLD = 1e5  # the official code's divergence threshold on the loss
START, END = "<!-- paper-synthetic:start -->", "<!-- paper-synthetic:end -->"


def run_paper(out: Path, seeds: int = 8, lr: str = LR_GRID, depths=(1, 2), optimizers=("sign", "sgd")) -> dict:
    """(depth, optimizer) -> (loaded run, seconds it took)."""
    runs = {}
    for depth in depths:
        for opt in optimizers:
            t0 = time.perf_counter()
            run = compare("synthetic", arms=ARMS, steps=100, seeds=seeds, optimizer=opt, lr=lr, out=out /
                          f"paper-depth{depth}-{opt}", force=True, quiet=True, layers_every=0, spectra_every=0,
                          select="seed", init="paper", depth=depth)
            runs[(depth, opt)] = (run, time.perf_counter() - t0)
            print(f"   depth {depth}, {opt}: {len(run.summary)} cells in {runs[(depth, opt)][1]:.0f} s "
                  f"({(run.summary['status'] == 'diverged').sum()} diverged)", flush=True)
    return runs


def paper_cells(run) -> pd.DataFrame:
    """Each (arm, seed) at its own best lr by final excess loss (records.best_cells, select="seed"), where a
    cell whose loss ever passed THRESHOLD counts as diverged."""
    peak = run.steps.groupby(list(records.KEY))["loss"].max().rename("peak").reset_index()
    s = run.summary.merge(peak, on=list(records.KEY), how="left")
    s["status"] = s["status"].astype(object).where(~(s["peak"] > THRESHOLD), "diverged")
    return records.best_cells(s.drop(columns="peak"), "final_excess_loss", select="seed")


def curves(run, cells: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """arm -> DataFrame indexed by step with the median, q25, q75 of the excess loss over its chosen cells.

    A chosen cell that diverged has no finite curve: it is left out of the band (the legend counts it).
    """
    finite = cells[np.isfinite(cells["value"].astype(float))]
    steps = run.steps.merge(finite[list(records.KEY)], on=list(records.KEY))
    out = {}
    for arm, d in sorted(steps.groupby("arm", sort=False), key=lambda item: _arm_order(item[0])):
        by = d.groupby("step")["excess_loss"]
        out[arm] = pd.DataFrame({"median": by.median(), "q25": by.quantile(0.25), "q75": by.quantile(0.75)})
    return out


def _arm_order(arm: str) -> int:
    names = ARMS.split(",")
    return names.index(arm) if arm in names else len(names)


def paper_table(runs: dict) -> pd.DataFrame:
    """One row per (depth, optimizer, arm): final excess loss median [q25, q75] over trajectories, median lr."""
    rows = []
    for (depth, opt), (run, seconds) in runs.items():
        cells = paper_cells(run)
        for arm, g in sorted(cells.groupby("arm", sort=False), key=lambda item: _arm_order(item[0])):
            v = g["value"].astype(float)
            rows.append({"depth": depth, "optimizer": opt, "arm": arm, "median": float(v.median()),
                         "q25": float(v.quantile(0.25, interpolation="nearest")),
                         "q75": float(v.quantile(0.75, interpolation="nearest")),
                         "median_lr": float(g["lr"].median()), "diverged": int(np.isinf(v).sum()),
                         "trajectories": len(g), "seconds": seconds})
    return pd.DataFrame(rows)


def _g(x: float) -> str:
    return "diverged" if math.isinf(x) else f"{x:.3g}"


def markdown(table: pd.DataFrame) -> str:
    """The table in the paper's layout: rows (depth, optimizer), one column per arm, plus the ratios."""
    arms = list(dict.fromkeys(table["arm"]))
    head = "| depth | optimizer | " + " | ".join(arms) + " | lora / balora-svd | lora / balora |"
    lines = [head, "|" + "---|" * (len(arms) + 4)]
    for (depth, opt), g in table.groupby(["depth", "optimizer"], sort=False):
        g = g.set_index("arm")
        cells = [f"{_g(g.loc[a, 'median'])} [{_g(g.loc[a, 'q25'])}, {_g(g.loc[a, 'q75'])}] (lr {g.loc[a, 'median_lr']:.3g})"
                 + (f", {g.loc[a, 'diverged']}/{g.loc[a, 'trajectories']} diverged" if g.loc[a, "diverged"] else "")
                 for a in arms]
        ratios = [f"{g.loc['lora', 'median'] / g.loc[a, 'median']:.3g}x" if a in g.index and "lora" in g.index
                  and g.loc[a, "median"] > 0 else "-" for a in ("balora-svd", "balora")]
        lines.append(f"| {depth} | {OPTIMIZERS[opt]} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def write_docs(table: pd.DataFrame, command: str, header: str, path: Path, lr: str = LR_GRID) -> None:
    """Replace the marked section of `path` (docs/BENCHMARKS.md) with the command and the table;
    lr: the grid the runs used (the text named the paper's grid whatever --paper-lr was)."""
    grid = "linspace(1e-5, 0.3, 50)" if lr == LR_GRID else f"the grid {lr}"
    body = (f"{START}\n{header}\n\n```\n{command}\n```\n\n"
            "Final excess loss over the reference loss after 100 steps: median [q25, q75] over the trajectories, "
            f"each at its own best learning rate of {grid} (median of those lrs in brackets). "
            "The last two columns divide LoRA's median by BaLoRA's (above 1: BaLoRA ends lower).\n\n"
            f"{markdown(table)}\n{END}")
    text = path.read_text() if path.exists() else ""
    if START in text and END in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: body, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text)


def plot_paper(runs: dict, path: Path) -> None:
    """Rows: depth 1, 2; columns: sign descent, gradient descent; median + IQR band per arm, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({d for d, _ in runs})
    opts = list(dict.fromkeys(o for _, o in runs))
    fig, axes = plt.subplots(len(depths), len(opts), figsize=(5 * len(opts), 3.8 * len(depths)), squeeze=False)
    colors = {"lora": "tab:orange", "balora-svd": "tab:blue", "balora": "tab:green"}
    for (depth, opt), (run, _) in runs.items():
        ax = axes[depths.index(depth)][opts.index(opt)]
        cells = paper_cells(run)
        for arm, c in curves(run, cells).items():
            g = cells[cells["arm"] == arm]
            n_div = int(np.isinf(g["value"].astype(float)).sum())
            label = f"{arm} (median lr {g['lr'].median():.3g})" + (f", {n_div}/{len(g)} diverged" if n_div else "")
            ax.plot(c.index, c["median"], color=colors.get(arm), label=label)
            ax.fill_between(c.index, c["q25"], c["q75"], color=colors.get(arm), alpha=0.2)
        ax.set_yscale("log")
        ax.set_title(f"depth {depth}, {OPTIMIZERS[opt]}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("excess loss")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    n = max(run.summary["seed"].nunique() for run, _ in runs.values())
    fig.suptitle(f"The paper's synthetic experiment (init=paper, 20x20, r=4): median and IQR over {n} trajectories, "
                 "each at its own best lr (per-seed selection)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
