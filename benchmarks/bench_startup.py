"""Whole-process start times of the `balora` command: what a user waits for at a shell prompt.

    python benchmarks/bench_startup.py [--repeat 5]

Times `balora --help`, `balora inspect --help` and `balora inspect` of a small PEFT adapter
folder (written here: 7 LoRA modules of one Llama-style layer, r=8, fp32) as separate
processes, each `--repeat` times, and prints min / median / max wall-clock seconds with the
load average (the machine may be shared), next to `python -c "import torch, pandas"`, the floor
of any command that reads tensors. Also lists which heavy libraries each command imports.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from cli_args import positive_int  # beside this file

HEAVY = ("torch", "pandas", "transformers", "peft", "streamlit", "plotly", "numpy", "safetensors")


def write_adapter(folder: Path, hidden: int = 64, inter: int = 128, r: int = 8) -> Path:
    """A PEFT adapter folder with the 7 LoRA modules of one Llama decoder layer."""
    import torch
    from safetensors.torch import save_file

    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter), "mlp.down_proj": (inter, hidden)}
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (n_in, n_out) in shapes.items():
        key = f"base_model.model.model.layers.0.{name}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(r, n_in, generator=g) / n_in ** 0.5  # (r, in)
        tensors[f"{key}.lora_B.weight"] = 0.01 * torch.randn(n_out, r, generator=g)  # (out, r)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 16,
              "target_modules": sorted({n.split(".")[-1] for n in shapes})}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def balora_exe() -> list[str]:
    """The installed `balora` console script (what a user types), else `python -m balora.cli`."""
    exe = shutil.which("balora")
    return [exe] if exe else [sys.executable, "-m", "balora.cli"]


def time_command(cmd: list[str], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        out.append(time.perf_counter() - t0)
    return out


def heavy_imports(args: list[str]) -> list[str]:
    """Top-level heavy packages imported by `balora ARGS` (python -X importtime)."""
    code = f"import sys; sys.argv = ['balora', *{args!r}]; import balora.cli as c\ntry:\n c.main(sys.argv[1:])\nexcept SystemExit:\n pass"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True)
    names = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return [h for h in HEAVY if h in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=positive_int, default=5)
    args = parser.parse_args()
    exe = balora_exe()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = write_adapter(Path(tmp) / "adapter")
        cases = [("--help",), ("inspect", "--help"), ("inspect", str(adapter))]
        print(f"command: {' '.join(exe)}; {args.repeat} runs each; load average before: {os.getloadavg()[0]:.2f}")
        print(f"{'command':<32} {'min s':>7} {'median s':>9} {'max s':>7}  heavy imports")
        for case in cases:
            times = time_command(exe + list(case), args.repeat)
            shown = "balora " + " ".join("ADAPTER" if c == str(adapter) else c for c in case)
            heavy = ", ".join(heavy_imports(list(case))) or "none"
            print(f"{shown:<32} {min(times):>7.2f} {statistics.median(times):>9.2f} {max(times):>7.2f}  {heavy}")
        # The floor of any command that reads tensors, measured the same way.
        times = time_command([sys.executable, "-c", "import torch, pandas"], args.repeat)
        label = 'python -c "import torch, pandas"'
        print(f"{label:<32} {min(times):>7.2f} {statistics.median(times):>9.2f} "
              f"{max(times):>7.2f}  (reference)")
        print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
