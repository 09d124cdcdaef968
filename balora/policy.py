"""BalancePolicy: how to balance, checked once where the user says it.

Every entry point (`balance_`, `balance_pairs`, the `balora balance` command, `BalanceCallback`,
`balance_after_step`, the comparison arms) turns its options into one BalancePolicy when it is
called or constructed; the per-step path then receives the policy and never re-checks it. A bad
option raises PolicyError, which is both a ValueError and a balora.errors.InputError, so the CLI
prints one line (exit code 2) and library callers can catch either.
"""

from __future__ import annotations

from dataclasses import dataclass

from balora.errors import InputError

METHODS = ("nearest", "svd")  # the two gauges: see balora.projection
RANK_DEFICIENT_POLICIES = ("skip", "balance", "raise")
NONFINITE_POLICIES = ("raise", "skip")


class PolicyError(InputError):
    """A balancing option that does not exist (method, on_rank_deficient, on_nonfinite, check)."""


def check_method(method: object) -> str:
    """`method` if it names a gauge, else PolicyError: the one message for a bad method anywhere."""
    if method not in METHODS:
        raise PolicyError(f"unknown balancing method {method!r}; use one of {', '.join(METHODS)}")
    return method  # type: ignore[return-value]


@dataclass(frozen=True)
class BalancePolicy:
    """What one balancing pass does; validated on construction, immutable afterwards."""

    # "nearest": the balanced pair closest to the current one, so Adam's moments keep
    # referring to the same directions; "svd": the paper's gauge.
    method: str = "nearest"
    # A rank-deficient product leaves dead directions: by default leave it alone and report it.
    on_rank_deficient: str = "skip"
    # NaN/Inf factors mean the run already diverged: by default stop before writing anything.
    on_nonfinite: str = "raise"
    # Also measure the change of dW and the balance reached (a few r x r products per pair in
    # float64); training loops turn it off.
    check: bool = True

    def __post_init__(self) -> None:
        check_method(self.method)
        if self.on_rank_deficient not in RANK_DEFICIENT_POLICIES:
            raise PolicyError(f"on_rank_deficient must be one of {', '.join(RANK_DEFICIENT_POLICIES)}, "
                              f"got {self.on_rank_deficient!r}")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise PolicyError(f"on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {self.on_nonfinite!r}")
        if not isinstance(self.check, bool):
            raise PolicyError(f"check must be True or False, got {self.check!r}")


def as_policy(method: str | BalancePolicy = "nearest", on_rank_deficient: str = "skip", on_nonfinite: str = "raise",
              check: bool = True) -> BalancePolicy:
    """A BalancePolicy as given (already validated), or one built (and validated) from the options."""
    if isinstance(method, BalancePolicy):
        return method
    return BalancePolicy(method, on_rank_deficient, on_nonfinite, check)
