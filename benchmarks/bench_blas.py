"""How fast this CPU's torch runs the fp32 products a balancing pass is made of, and how fast it could.

A balancing pass at 1B-like shapes is mostly fp32 matrix products (balora/stacked.py): the Grams
A A^T (G, r, in) and B^T B (G, out, r), and the new factors Y A and B X with (G, r, r) maps. Torch
runs fp32 `bmm`/`mm` on the CPU through MKL. This prints, side by side in one run:

- GF/s of a square fp32 product through `torch.mm` (MKL) and through oneDNN
  (`torch.ops.mkldnn._linear_pointwise`, fp32 kernels), which shows what the CPU's vector units
  reach and whether MKL uses them (on some AMD CPUs it takes a slower path than oneDNN);
- GF/s of the pass's product shapes through `torch.bmm` (what balora uses).

Torch has no fp32 batched product on oneDNN at full precision, so a faster library here does not
make the pass faster by itself; the numbers say what part of the pass's time is the product
library's. Nothing is asserted: timings vary with the machine and its load.

    python benchmarks/bench_blas.py [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench_projection import time_interleaved  # beside this file: rounds in rotating order, seconds per call
from cli_args import positive_int  # beside this file
from machine import cpu_line  # beside this file


def square(n: int, reps: int) -> None:
    a, b = torch.randn(n, n), torch.randn(n, n)
    exact = a.double() @ b.double()
    flops = 2 * n**3

    w = b.T.contiguous()  # linear computes a @ weight^T
    fns = {"torch.mm (MKL)": lambda: torch.mm(a, b),
           "oneDNN": lambda: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")}
    print(f"square {n} x {n} fp32, side by side:")
    try:
        fns["oneDNN"]()
    except (RuntimeError, AttributeError) as e:  # a build without oneDNN
        print(f"   oneDNN: not available ({str(e).splitlines()[0]})")
        del fns["oneDNN"]
    for name, times in time_interleaved(fns, reps, "cpu").items():  # speed, and the error against float64
        err = ((fns[name]().double() - exact).abs().max() / exact.abs().max()).item()
        print(f"   {name:<16}{flops / statistics.median(times) / 1e9:6.0f} GF/s   max error {err:.1e} of the largest entry")


def pass_shapes(G: int, r: int, reps: int) -> None:
    """The Grams and forming products of one stack of G pairs per 1B-like projection shape."""
    print(f"\nthe pass's products through torch.bmm, G = {G} pairs per stack, r = {r}, fp32 (caches warm):")
    print(f"   {'(in, out)':<14}{'A A^T':>12}{'B^T B':>12}{'Y A':>12}{'B X':>12}   GF/s")
    for i, o in ((2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)):
        A, B, X = torch.randn(G, r, i), torch.randn(G, o, r), torch.randn(G, r, r)
        out_A, out_B = torch.empty_like(A), torch.empty_like(B)
        fns = {"A A^T": lambda: torch.bmm(A, A.mT), "B^T B": lambda: torch.bmm(B.mT, B),
               "Y A": lambda: torch.bmm(X, A, out=out_A), "B X": lambda: torch.bmm(B, X, out=out_B)}
        sizes = (i, o, i, o)  # the long dimension each product runs over
        times = time_interleaved(fns, reps, "cpu")
        rates = [2 * G * r * r * n / statistics.median(t) / 1e9 for t, n in zip(times.values(), sizes)]
        print(f"   {str((i, o)):<14}" + "".join(f"{x:12.0f}" for x in rates))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--reps", type=positive_int, default=41)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if hasattr(torch.backends, "fp32_precision"):  # torch >= 2.9
        torch.backends.mkldnn.matmul.fp32_precision = "ieee"  # full fp32, as balora's pass sets it
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {cpu_line()}")
    square(2048, 11)
    pass_shapes(16, 16, args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
