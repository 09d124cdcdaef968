"""benchmarks/gpu_check.py without CUDA: it says so in one line and exits 0; --smoke runs its code on the CPU."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run the real check")
def test_gpu_check_without_cuda_says_so_and_exits_0():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout and done.stdout.count("\n") == 1


def test_gpu_check_smoke_runs_every_part_on_the_cpu():
    """--smoke runs the GPU check's code at tiny shapes on the CPU (the compare part is left out:
    it trains a model); the ops table it prints must be flat, and the FSDP2 pass must write what
    the one-process pass writes."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--skip-compare"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    for what in ("forward+backward", "fused AdamW step", "balance nearest", "balance svd", "ops per pass",
                 "the pass by rank"):
        assert what in out, what
    assert out.count("(target <= 1.2: MET)") == 2, out[-1500:]
    # part 6: the FSDP2 pass on a one-rank gloo mesh, both layouts, against the one-process pass
    diffs = [float(x) for x in re.findall(r"max \|difference\| / max \|one-process factor\| = (\S+);", out)]
    assert len(diffs) == 2 and max(diffs) <= 1e-5, out[-1500:]
    assert "FAILED" not in out, out[-1500:]
