"""How long `balora inspect` takes on a file with very many tiny LoRA pairs (issue 15: 20k pairs < 10 s).

    python benchmarks/bench_many_modules.py                 # 20,000 pairs, r=2, 4 -> 3
    python benchmarks/bench_many_modules.py --pairs 50000

Writes a bare .safetensors with N pairs (A (2, 4), B (3, 2)) into a temporary folder and runs
`balora inspect FILE` (table, --format csv, --format json) each in a fresh process, printing
wall-clock and CPU seconds (user + system of the child, so a busy shared machine shows up as
wall >> CPU), the CPU microseconds per pair, and the load average. Per-pair costs dominate
here (parsing the header, one row per pair, output), not arithmetic.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from cli_args import positive_int  # beside this file


def write_many(path: Path, pairs: int) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(pairs):
        tensors[f"model.layers.{i}.proj.lora_A.weight"] = torch.randn(2, 4, generator=g)  # (r, in)
        tensors[f"model.layers.{i}.proj.lora_B.weight"] = torch.randn(3, 2, generator=g)  # (out, r)
    save_file(tensors, str(path))


def run_cli(args: list[str]) -> tuple[float, float, int]:
    """(wall s, CPU s of the child, exit code) of `python -m balora.cli ARGS`, output discarded."""
    return run([sys.executable, "-m", "balora.cli", *args])


def run(cmd: list[str]) -> tuple[float, float, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, rc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=positive_int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "many.safetensors"
        write_many(path, args.pairs)
        print(f"{args.pairs} pairs, {path.stat().st_size / 2**20:.1f} MiB; load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} CPU(s)")
        # start-up: the libraries inspect needs (torch, safetensors, pandas, rich), nothing read yet
        baseline_wall, baseline_cpu, _ = run([sys.executable, "-c", "import balora.inspection, rich.table"])
        print(f"  {'imports (start-up)':28s} wall {baseline_wall:6.1f} s  CPU {baseline_cpu:6.1f} s")
        for fmt in ("table", "csv", "json"):
            wall, cpu, rc = run_cli(["inspect", str(path), "--format", fmt])
            per_pair = 1e6 * (cpu - baseline_cpu) / args.pairs
            print(f"  {'inspect --format ' + fmt:28s} wall {wall:6.1f} s  CPU {cpu:6.1f} s  "
                  f"({per_pair:.0f} us CPU per pair after start-up){'' if rc == 0 else f'  exit {rc}'}")


if __name__ == "__main__":
    main()
