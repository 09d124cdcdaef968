"""How long `balora.inspect` takes on a 7B-sized adapter, and how much memory it needs, on CPU.

    python benchmarks/bench_inspect.py                # fp16 factors, as PEFT saves a fp16 run
    python benchmarks/bench_inspect.py --dtype bf16   # or bf16
    python benchmarks/bench_inspect.py --balance      # also time balance_file on the same adapter
    python benchmarks/bench_inspect.py --threads 1    # torch threads in the measuring process

No model is needed, or downloaded: the script writes, into a temporary folder, a PEFT adapter
folder with the shapes of a Llama-2-7B LoRA (hidden 4096, intermediate 11008, 32 layers,
r=16 on q, k, v, o, gate, up and down: 224 pairs, 40M parameters) filled with random factors
(as after some training: both factors nonzero, imbalanced). It then measures in a fresh
Python process, so the memory figure is not polluted by having built the file:

  baseline   peak RSS after importing balora and inspecting a tiny adapter (libraries loaded)
  inspect    wall-clock of balora.inspect(folder), run --repeats times (first, then median)
  peak       peak RSS (resource.getrusage ru_maxrss) after inspecting; peak - baseline is the
             memory inspect itself needed, compared with the size of the weights file

The machine may be shared: the load average is printed with the figures. On an
oversubscribed machine, torch's OpenMP threads wait on each other; --threads 1 shows
what the work itself costs there.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from cli_args import positive_int  # beside this file

HIDDEN, INTERMEDIATE, LAYERS, R, ALPHA = 4096, 11008, 32, 16, 32
MODULES = {  # name: (in_features, out_features)
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (HIDDEN, INTERMEDIATE), "mlp.up_proj": (HIDDEN, INTERMEDIATE),
    "mlp.down_proj": (INTERMEDIATE, HIDDEN),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def write_adapter(folder: Path, dtype: torch.dtype, r: int = R, layers: int = LAYERS, modules=MODULES) -> Path:
    """A PEFT adapter folder with random factors of the given shapes."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(layers):
        for name, (n_in, n_out) in modules.items():
            key = f"base_model.model.model.layers.{i}.{name}"
            # Kaiming-like A and a B grown by training: imbalanced, both nonzero.
            tensors[f"{key}.lora_A.weight"] = (torch.randn(r, n_in, generator=g) / n_in**0.5).to(dtype)
            tensors[f"{key}.lora_B.weight"] = (0.02 * torch.randn(n_out, r, generator=g)).to(dtype)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": ALPHA, "use_rslora": False,
              "target_modules": sorted(n.split(".")[-1] for n in modules), "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(folder: Path, tiny: Path, repeats: int, balance: bool, threads: int | None) -> dict:
    """Runs in the child process: everything here is what inspect itself costs."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    import balora

    import_s = time.perf_counter() - t0
    balora.inspect(tiny)  # loads LAPACK, pandas paths, safetensors: not the adapter's cost
    baseline = peak_rss_mib()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        df = balora.inspect(folder)
        times.append(time.perf_counter() - t0)
    peak = peak_rss_mib()
    result = {"threads": torch.get_num_threads(), "import_s": import_s, "times_s": times, "baseline_mib": baseline, "peak_mib": peak,
              "rows": len(df), "rel_imbalance_median": float(df["rel_imbalance"].median()),
              "ok": int((df["status"] == "ok").sum())}
    if balance:
        with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
            t0 = time.perf_counter()
            summary = balora.balance_file(folder, Path(tmp) / "balanced")
            result["balance_s"] = time.perf_counter() - t0
            result["balance_peak_mib"] = peak_rss_mib()
            result["balance_max_rel_error"] = summary.max_rel_error
            result["balance_max_rel_imbalance_after"] = summary.max_rel_imbalance_after
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=DTYPES, default="fp16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--balance", action="store_true", help="also time balance_file (writes a copy in the temp dir)")
    ap.add_argument("--threads", type=positive_int, help="torch threads for the measurement (default: torch's)")
    ap.add_argument("--measure", nargs=2, metavar=("FOLDER", "TINY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeats < 1:  # the child's t[0] failed, and its traceback was hidden behind CalledProcessError
        ap.error("--repeats must be at least 1")
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), Path(args.measure[1]), args.repeats, args.balance,
                                 args.threads)))
        return

    with tempfile.TemporaryDirectory(prefix="bench_inspect_") as tmp:
        t0 = time.perf_counter()
        folder = write_adapter(Path(tmp) / "llama2-7b-lora-r16", DTYPES[args.dtype])
        build_s = time.perf_counter() - t0
        tiny = write_adapter(Path(tmp) / "tiny", DTYPES[args.dtype], r=4, layers=1,
                             modules={"self_attn.q_proj": (64, 64), "mlp.down_proj": (128, 64)})
        size_mib = (folder / "adapter_model.safetensors").stat().st_size / 2**20
        cmd = [sys.executable, __file__, "--measure", str(folder), str(tiny), "--repeats", str(args.repeats)]
        cmd += ["--balance"] if args.balance else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        load_before = os.getloadavg()
        child = subprocess.run(cmd, capture_output=True, text=True)
        load_after = os.getloadavg()
    if child.returncode != 0:  # say why: check=True showed only the command line, the child's error was lost
        raise SystemExit(f"bench_inspect: the measuring process failed (exit {child.returncode}):\n{child.stderr[-2000:]}")
    res = json.loads(child.stdout.strip().splitlines()[-1])
    threads = res["threads"]

    t = res["times_s"]
    used = res["peak_mib"] - res["baseline_mib"]
    print(f"adapter: Llama-2-7B shapes, {LAYERS} layers x {len(MODULES)} modules, r={R}, {args.dtype}: "
          f"{res['rows']} pairs ({res['ok']} ok), file {size_mib:.1f} MiB (built in {build_s:.1f} s)")
    print(f"balora.inspect: first {t[0]:.2f} s, median of {len(t)} {statistics.median(t):.2f} s "
          f"(import balora {res['import_s']:.1f} s, not included)")
    print(f"peak RSS: {res['peak_mib']:.0f} MiB total, baseline {res['baseline_mib']:.0f} MiB after imports; "
          f"inspect added {used:.0f} MiB = {used / size_mib:.2f} x the file size")
    if args.balance:
        print(f"balora.balance_file: {res['balance_s']:.2f} s, peak RSS {res['balance_peak_mib']:.0f} MiB, "
              f"max dW change {res['balance_max_rel_error']:.1e}, "
              f"max rel_imbalance after {res['balance_max_rel_imbalance_after']:.1e}")
    print(f"load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, "
          f"after {tuple(round(x, 2) for x in load_after)}; {os.cpu_count()} CPUs; torch {torch.__version__}, "
          f"{threads} thread(s)")


if __name__ == "__main__":
    main()
