"""balora: Balanced LoRA for PEFT models.

Balance LoRA factor pairs onto B^T B = A A^T without changing dW (BaLoRA, arXiv 2605.31484),
measure per-layer imbalance, spectra and conditioning, and compare training runs.
"""

from balora.balance import BalanceError, BalanceSummary, balance_
from balora.callbacks import BalanceCallback, balance_after_step
from balora.imbalance import factor_stats, imbalance, rel_imbalance, singular_values
from balora.projection import balanced_factors
from balora.report import REPORT_COLUMNS, layer_report
from balora.inspect import INSPECT_COLUMNS, balance_file, inspect
from balora.recorder import RunRecorder
from balora.runner import arm_summary, compare
from balora.store import Run, list_runs, load_run

__version__ = "0.1.0"

__all__ = [
    "Run",
    "RunRecorder",
    "arm_summary",
    "compare",
    "list_runs",
    "load_run",
    "BalanceCallback",
    "BalanceError",
    "BalanceSummary",
    "INSPECT_COLUMNS",
    "REPORT_COLUMNS",
    "balance_",
    "balance_after_step",
    "balance_file",
    "balanced_factors",
    "factor_stats",
    "imbalance",
    "inspect",
    "layer_report",
    "rel_imbalance",
    "singular_values",
]
