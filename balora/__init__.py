"""balora: Balanced LoRA for PEFT models.

Balance LoRA factor pairs onto B^T B = A A^T without changing dW (BaLoRA, arXiv 2605.31484),
measure per-layer imbalance, spectra and conditioning, and compare training runs.

The public names below are imported on first use, so `import balora` (and `balora inspect`)
does not pay for importing transformers and PEFT until something needs them.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # core maths and balancing
    "BalanceError": "balora.balance",
    "BalanceSummary": "balora.balance",
    "BalancePolicy": "balora.policy",
    "PolicyError": "balora.policy",
    "balance_": "balora.balance",
    "balance_pairs": "balora.balance",
    "balanced_factors": "balora.projection",
    "gram_transforms": "balora.projection",
    "factor_stats": "balora.imbalance",
    "imbalance": "balora.imbalance",
    "rel_imbalance": "balora.imbalance",
    "singular_values": "balora.imbalance",
    "REPORT_COLUMNS": "balora.report",
    "PRECISION_COLUMNS": "balora.report",
    "layer_report": "balora.report",
    "precision_summary": "balora.report",
    "storage_risk": "balora.precision",
    # training loops
    "BalanceCallback": "balora.callbacks",
    "balance_after_step": "balora.callbacks",
    "RunRecorder": "balora.recorder",
    "lora_shard_placement": "balora.sharded_step",
    # adapter files
    "INSPECT_COLUMNS": "balora.inspection",
    "inspect": "balora.inspection",
    "balance_file": "balora.inspection",
    # comparisons and the run store
    "compare": "balora.runner",
    "arm_summary": "balora.records",
    "Run": "balora.store",
    "RunError": "balora.store",
    "list_runs": "balora.store",
    "load_run": "balora.store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'balora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """`balora.imbalance` is a public function and the name of the module defining it. Importing
    that module (any report or balancing pass does) makes Python bind the module here, after which
    `balora.imbalance(A, B)` raised "'module' object is not callable": keep the public object."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
