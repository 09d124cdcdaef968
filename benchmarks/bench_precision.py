"""What storing a LoRA adapter in fp16 / bf16 does to dW, as the pair is and after balancing.

    python benchmarks/bench_precision.py                    # 4 pairs x 2 seeds of 1024 x 1024, r = 16
    python benchmarks/bench_precision.py --n 4096 --r 64    # other shapes
    python benchmarks/bench_precision.py --seeds 5
    python benchmarks/bench_precision.py --cost --threads 1 # what the precision columns add to a report

Each row starts from the same random pairs (A ~ N(0, 1/in), as PEFT's kaiming init gives, and B
~ N(0, 0.01^2), as after some training) and makes them more imbalanced with the same dW: B is
multiplied by c and A by 1/c, for c = 1 down to 1e-6. For each c it prints, for fp16 and bf16,
the relative change of dW caused by storing the factors in that dtype,
||B~ A~ - B A||_F / ||B A||_F (median over the pairs and seeds), as they are and after
`balora.balance_pairs` (nearest gauge) balanced them in fp32, and the fraction of factor
entries below the dtype's smallest normal. The "as is / balanced" column is the ratio of the
two fp16 errors, measured side by side on the same pairs.

The errors are balora.precision's (r x r traces, dW never formed); --check also forms every
dW in float64 and prints the largest relative disagreement with them.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from balora.balance import balance_pairs
from balora.pairs import FactorPair
from balora.precision import HALF_DTYPES, cast_dw_error, storage_risk
from cli_args import positive_int  # beside this file

SCALES = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def make_pairs(n: int, r: int, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, n, generator=g) / n**0.5, torch.randn(n, r, generator=g) * 0.01) for _ in range(count)]


def balanced(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pair = FactorPair("m", "default", "linear", A, B, 1.0)
    new, _ = balance_pairs([pair], "nearest", on_rank_deficient="balance")
    return new[0]


def formed_error(A, B, dtype) -> float:
    """The same dW error from the formed float64 products (the check)."""
    dW = B.double() @ A.double()
    dW_c = B.to(dtype).double() @ A.to(dtype).double()
    return float((dW_c - dW).norm() / dW.norm())


def measure(pairs, c: float, check: bool) -> tuple[dict[str, float], float]:
    values: dict[str, list[float]] = {}
    worst = 0.0
    for A0, B0 in pairs:
        A, B = A0 / c, B0 * c  # same dW, more imbalanced as c falls
        for when, (X, Y) in (("as is", (A, B)), ("balanced", balanced(A, B))):
            risks = storage_risk(X[None], Y[None])
            for name, dtype in HALF_DTYPES.items():
                values.setdefault(f"{name} {when}", []).append(float(risks[dtype].dW_error[0]))
                values.setdefault(f"{name} under {when}", []).append(float(risks[dtype].underflow[0]))
                values.setdefault(f"{name} over {when}", []).append(float(risks[dtype].overflow[0]))
                if check:
                    got = float(cast_dw_error(X[None], Y[None], X.to(dtype)[None], Y.to(dtype)[None])[0])
                    ref = formed_error(X, Y, dtype)
                    if not (math.isinf(got) and not math.isfinite(ref)):  # both say: the cast overflowed
                        worst = max(worst, abs(got - ref) / ref if ref > 0 else abs(got))
    return {k: statistics.median(v) for k, v in values.items()}, worst


def report_cost(n: int, r: int, count: int, rounds: int) -> None:
    """Time balora.report.pair_rows with the precision columns (layer_report, inspect) and without
    them (the training-time diagnostics), back to back."""
    from balora.report import pair_rows

    pairs = [FactorPair(f"m{i}", "default", "linear", A, B, 2.0) for i, (A, B) in enumerate(make_pairs(n, r, count, 0))]
    pair_rows(pairs, precision=True)  # warm-up
    ratios, times = [], {False: [], True: []}
    for _ in range(rounds):
        for precision in (False, True):
            t0 = time.perf_counter()
            pair_rows(pairs, precision=precision)
            times[precision].append(time.perf_counter() - t0)
        ratios.append(times[True][-1] / times[False][-1])
    print(f"pair_rows over {count} pairs of {n} x {n}, r = {r}, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.1f}: without precision columns {statistics.median(times[False]) * 1e3:.0f} ms, "
          f"with {statistics.median(times[True]) * 1e3:.0f} ms, ratio {statistics.median(ratios):.2f}x "
          f"(median of {rounds} rounds)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=positive_int, default=1024, help="in = out features")
    ap.add_argument("--r", type=positive_int, default=16)
    ap.add_argument("--pairs", type=positive_int, default=4)
    ap.add_argument("--seeds", type=positive_int, default=2)
    ap.add_argument("--check", action="store_true", help="also form dW in float64 and compare")
    ap.add_argument("--cost", action="store_true", help="time the report with and without the precision columns")
    ap.add_argument("--rounds", type=positive_int, default=9, help="--cost: rounds of back-to-back timings")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch threads (1 on a loaded machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cost:
        report_cost(args.n, args.r, args.pairs * args.seeds, args.rounds)
        return
    torch.manual_seed(0)
    pairs = [p for s in range(args.seeds) for p in make_pairs(args.n, args.r, args.pairs, s)]
    print(f"{len(pairs)} pairs, in = out = {args.n}, r = {args.r}; B scaled by c, A by 1/c (same dW)")
    print("| c (B x c, A / c) | fp16 dW error as is | fp16 balanced | as is / balanced | fp16 underflow as is"
          " | fp16 overflow as is | fp16 underflow balanced | bf16 dW error as is | bf16 balanced |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for c in SCALES:
        v, w = measure(pairs, c, args.check)
        worst = max(worst, w)
        ratio = v["fp16 as is"] / v["fp16 balanced"]
        print(f"| {c:g} | {v['fp16 as is']:.2e} | {v['fp16 balanced']:.2e} | {ratio:.3g} "
              f"| {v['fp16 under as is']:.1%} | {v['fp16 over as is']:.2%} | {v['fp16 under balanced']:.1%} "
              f"| {v['bf16 as is']:.2e} | {v['bf16 balanced']:.2e} |")
    if args.check:
        print(f"largest relative disagreement with the formed float64 dW: {worst:.1e}")


if __name__ == "__main__":
    main()
