"""What balancing an FSDP2-sharded adapter communicates and costs, at 1B-like adapter shapes.

    torchrun --nproc_per_node 2 benchmarks/bench_fsdp2.py             # Llama-3.2-1B-like, r=16, fp32 (~1 min)
    torchrun --nproc_per_node 2 benchmarks/bench_fsdp2.py --model 3B --r 8
    torchrun --nproc_per_node 2 benchmarks/bench_fsdp2.py --ops    # ops per step for 4, 8, 16 blocks, then exit

Every rank builds the LoRA factors of every targeted Linear (bench_projection's shapes) as
FSDP2 lays them out (DTensor parameters on a 1-D mesh, gloo on CPU), in two layouts: "rows",
FSDP2's default (every factor Shard(0)), and "grams", with lora_A by columns (Shard(1), what
balora.lora_shard_placement gives fully_shard). It then times, side by side in rotating order:

  gather         balora.distributed.gather_pairs on "rows": the whole factors, one all_gather
                 (what layer_report and balance_(check=True) gather)
  step rows      balora.sharded_step.balance_step on "rows": the A factors gathered whole, B's
                 r x r Grams all-reduced, each rank forming its own rows of A' and B': what
                 BalanceCallback does after a step with FSDP2's default layout
  step grams     balance_step on "grams": both r x r Grams all-reduced, local products
  adamw          one torch.optim.AdamW step over this rank's shards (torch's default implementation)

and prints what each pass communicated (balora.distributed.last_comm, measured), the gathered
bytes by arithmetic for 2, 4 and 8 ranks, and for scale what FSDP2 itself all-gathers per step
for the frozen bf16 base weights (forward and backward: twice the model, less the local shard).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from bench_projection import MODELS, ModelShape, module_shapes  # same folder: run as a script
from balora.distributed import gather_pairs, last_comm
from balora.pairs import FactorPair
from balora.policy import BalancePolicy
from balora.sharded_step import balance_step
from cli_args import positive_int  # beside this file


def sharded_adapter(m: ModelShape, r: int, mesh, a_dim: int) -> tuple[list[nn.Parameter], list[FactorPair]]:
    """Factors as after some training (B small, nonzero), the same on every rank, then sharded:
    A (r, in) along a_dim, B (out, r) by rows."""
    g = torch.Generator().manual_seed(0)
    params, pairs = [], []
    for name, n_in, n_out in module_shapes(m):
        A = torch.randn(r, n_in, generator=g) / n_in**0.5  # (r, in)
        B = torch.randn(n_out, r, generator=g) * 1e-3  # (out, r)
        A_p, B_p = (nn.Parameter(distribute_tensor(t, mesh, [Shard(d)], src_data_rank=None)) for t, d in ((A, a_dim), (B, 0)))
        for p in (A_p, B_p):
            p.grad = distribute_tensor(torch.randn(p.shape, generator=g) * 1e-3, mesh, p.placements, src_data_rank=None)
        params += [A_p, B_p]
        pairs.append(FactorPair(name, "default", "linear", A_p.detach(), B_p.detach(), 2.0, extra={"params": (A_p, B_p)}))
    return params, pairs


def expected_bytes(m: ModelShape, r: int, world: int, element_size: int = 4, only_A: bool = False) -> int:
    """Bytes one rank receives when every factor (only_A: every A) is gathered, each padded to
    ceil(rows / world) rows."""
    rows_cols = [(r, n_in) for _, n_in, _ in module_shapes(m)]
    if not only_A:
        rows_cols += [(n_out, r) for _, _, n_out in module_shapes(m)]
    return (world - 1) * sum(math.ceil(rows / world) * cols for rows, cols in rows_cols) * element_size


def ops_table(m: ModelShape, r: int, mesh, rank: int) -> None:
    """Ops one balance_step dispatches on each rank (opcount.OpCounter, collectives included) for
    the adapters of the first 4, 8 and 16 blocks of m, both layouts, with 1 and 2 threads per rank
    (one thread: pair by pair; two: stacked, as on a GPU), after a first pass."""
    from dataclasses import replace

    from opcount import count_ops

    policy = BalancePolicy(check=False)
    rows = []
    for blocks in (4, 8, 16):
        shape = replace(m, layers=blocks)
        counts = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for a_dim in (1, 0):
                _, pairs = sharded_adapter(shape, r, mesh, a_dim)
                balance_step(pairs, policy)
                counts.append(count_ops(lambda: balance_step(pairs, policy)).total)
        torch.set_num_threads(1)
        rows.append((blocks, len(pairs), counts))
    if rank == 0:
        print(f"ops per balance_step, {m.name} factors, r={r}, fp32 (rank 0):")
        print(f"  {'blocks':>6}{'pairs':>7}   1 thread: columns / rows   2 threads: columns / rows")
        for blocks, n, c in rows:
            print(f"  {blocks:>6}{n:>7}   {c[0]:>10} / {c[1]:<10}   {c[2]:>11} / {c[3]}")


def base_params(m: ModelShape) -> int:
    """Frozen weights of the Llama-like model (embedding tied with the output, as in Llama 3.2)."""
    per_layer = sum(n_in * n_out for _, n_in, n_out in module_shapes(m)) // m.layers
    return m.layers * per_layer + m.vocab * m.hidden


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1B", choices=sorted(MODELS))
    ap.add_argument("--r", type=positive_int, default=16)
    ap.add_argument("--reps", type=positive_int, default=5)
    ap.add_argument("--ops", action="store_true", help="only the ops-per-step table, then exit")
    args = ap.parse_args()
    if "RANK" not in os.environ:  # plain `python bench_fsdp2.py`: init_process_group's env:// traceback said only "RANK"
        ap.error("run it under torchrun: torchrun --nproc_per_node 2 benchmarks/bench_fsdp2.py")
    torch.set_num_threads(1)  # ranks share the machine's cores
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    m = MODELS[args.model]
    if args.ops:
        ops_table(m, args.r, mesh, rank)
        dist.destroy_process_group()
        return
    params, rows = sharded_adapter(m, args.r, mesh, a_dim=0)
    _, grams = sharded_adapter(m, args.r, mesh, a_dim=1)
    opt = torch.optim.AdamW(params, lr=1e-4)
    policy = BalancePolicy(check=False)  # as BalanceCallback runs it
    comm = {}

    def timed_pass(name, fn):
        def run():
            fn()
            comm[name] = last_comm()
        return run

    timed = {"gather": timed_pass("gather", lambda: gather_pairs(rows)),
             "step rows": timed_pass("step rows", lambda: balance_step(rows, policy)),
             "step grams": timed_pass("step grams", lambda: balance_step(grams, policy)),
             "adamw": opt.step}
    times: dict[str, list[float]] = {k: [] for k in timed}
    names = list(timed)
    for rep in range(args.reps + 1):  # the first round warms up and is dropped
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            dist.barrier()
            t0 = time.perf_counter()
            timed[name]()
            dist.barrier()
            if rep:
                times[name].append(time.perf_counter() - t0)
    if rank == 0:
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{m.name}, r={args.r}, fp32, {len(rows)} LoRA pairs, {world} gloo ranks on CPU, median of {args.reps}:")
        for k in names:
            # paired: the median over rounds of the two times of one round (benchmarks/README.md), so a
            # load spike from other processes mostly cancels; a ratio of medians would not
            paired = statistics.median(a / b for a, b in zip(times[k], times["adamw"]))
            extra = f"   / adamw = {paired:.2f}x (paired median)" if k != "adamw" else ""
            print(f"  {k:<12}{med[k] * 1e3:9.1f} ms{extra}")
        print("communicated per pass (this rank, measured):")
        for k in ("step rows", "step grams"):
            c = comm[k]
            print(f"  {k:<12}{c.collectives} collective(s): gathered {c.bytes_received / 1e6:.3f} MB, "
                  f"all-reduced {c.bytes_reduced / 1e6:.3f} MB")
        c = comm["gather"]
        print(f"  {'gather':<12}{c.collectives} collective(s): gathered {c.bytes_received / 1e6:.3f} MB (every factor)")
        # measured bytes against the arithmetic
        assert comm["gather"].bytes_received == expected_bytes(m, args.r, world)
        assert comm["step rows"].bytes_received == expected_bytes(m, args.r, world, only_A=True)
        assert comm["step rows"].bytes_reduced == len(rows) * args.r**2 * 8  # B's Grams, float64
        assert comm["step grams"].bytes_received == 0 and comm["step grams"].bytes_reduced == len(grams) * 2 * args.r**2 * 8
        base = base_params(m)
        reduced = len(grams) * 2 * args.r**2 * 8
        print(f"by arithmetic, per step: 'grams' all-reduces {reduced / 1e6:.3f} MB whatever the number of ranks, "
              f"'rows' {reduced / 2e6:.3f} MB and gathers the A factors;")
        print(f"  {'ranks':>5}  {'rows: A gathered (fp32)':>24}  {'every factor (fp32)':>20}  {'FSDP2 base all-gathers (bf16, fwd+bwd)':>40}")
        for w in (2, 4, 8):
            fsdp = 2 * (w - 1) / w * base * 2
            print(f"  {w:>5}  {expected_bytes(m, args.r, w, only_A=True) / 1e6:>21.1f} MB  "
                  f"{expected_bytes(m, args.r, w) / 1e6:>17.1f} MB  {fsdp / 1e9:>37.2f} GB")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
