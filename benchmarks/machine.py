"""The CPU a benchmark ran on, in one line.

Ratios such as `balance_` against one AdamW step depend on the CPU model, not only on the core
count: MKL runs its AVX2 kernels on AMD CPUs and its AVX-512 ones on Intel's, and an AdamW step is
bound by memory bandwidth while the Grams are bound by arithmetic. The same code measured 0.81x on
the AMD EPYC (Zen 5) VM of the first seventeen sessions and 0.56x on an Intel Xeon VM
(docs/BENCHMARKS.md), so every recorded figure must say which CPU it came from.
"""

from __future__ import annotations

import platform
import re

import torch


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the first processor's block
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _blas() -> str:
    """BLAS torch was built with, and MKL's version when it is MKL (from torch's build summary)."""
    found = re.search(r"Math Kernel Library Version ([\w.]+)", torch.__config__.show())
    return f"MKL {found.group(1)}" if found else "BLAS " + torch.__config__.show().split("BLAS_INFO=")[-1].split(",")[0]


def cpu_line() -> str:
    """e.g. 'CPU: Intel(R) Xeon(R) Processor (GenuineIntel family 6 model 207), torch CPU capability
    AVX512, MKL 2024.2'. A VM often hides the marketing name ('Intel(R) Xeon(R) Processor'), so the
    vendor, family and model numbers are printed too: they identify the generation."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine()
    ids = " ".join(x for x in (info.get("vendor_id"),
                               f"family {info['cpu family']}" if "cpu family" in info else "",
                               f"model {info['model']}" if "model" in info else "") if x)
    capability = torch.backends.cpu.get_cpu_capability()
    return f"CPU: {name}" + (f" ({ids})" if ids else "") + f", torch CPU capability {capability}, {_blas()}"


if __name__ == "__main__":
    print(cpu_line())
