"""Arms of a comparison: how the LoRA factors are optimized. A new arm is one function plus one entry.

Every arm gets the same model (same initial adapter weights), the same data order and the
same optimizer name, learning rate and weight decay; an arm only decides how the optimizer
is built from them and whether (and in which gauge) the factors are balanced after each step.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn
from torch.optim import Optimizer

from balora.errors import InputError
from balora.optim import make_optimizer, optimizer_class
from balora.policy import BalancePolicy

# (model, optimizer name, lr, options) -> optimizer. `options` holds weight_decay and the arm's own keys.
OptimizerFactory = Callable[[nn.Module, str, float, dict], Optimizer]


@dataclass(frozen=True)
class Arm:
    name: str
    help: str
    make_optimizer: OptimizerFactory
    method: str | None = None  # balancing gauge after every step ("nearest" | "svd"); None: no balancing
    defaults: dict[str, Any] = field(default_factory=dict)  # the arm's own options (overridable: --set KEY=VALUE)
    unavailable: Callable[[], str | None] = lambda: None  # why the arm cannot run in this environment, or None
    # What balancing does after every step, built (and validated) once from `method`. In a training loop:
    # rank-deficient products are left alone (their dead directions are reported by the layer report),
    # non-finite factors stop the cell (it diverged), and nothing is re-measured (check=False).
    policy: BalancePolicy | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.method is not None:
            policy = BalancePolicy(self.method, on_rank_deficient="skip", on_nonfinite="raise", check=False)
            object.__setattr__(self, "policy", policy)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _plain(model: nn.Module, optimizer: str, lr: float, options: dict) -> Optimizer:
    return make_optimizer(optimizer, trainable_parameters(model), lr, weight_decay=options["weight_decay"])


def _loraplus(model: nn.Module, optimizer: str, lr: float, options: dict) -> Optimizer:
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model,
        optimizer_class(optimizer),
        lr=lr,
        loraplus_lr_ratio=options["loraplus_lr_ratio"],
        loraplus_weight_decay=options["weight_decay"],
        # Embedding adapters (lora_embedding_A/B) are one group of their own in LoRA+'s code and PEFT's, at a
        # fixed 1e-6 by default: LoRA+'s ratio is derived for linear layers, whose A sees dense inputs. Both
        # embedding factors train at the arm's lr here, so on linear layers B's ratio is the only difference.
        loraplus_lr_embedding=lr,
    )


def _riemannian(model: nn.Module, optimizer: str, lr: float, options: dict) -> Optimizer:
    from peft.optimizers import create_riemannian_optimizer

    return create_riemannian_optimizer(
        model, optimizer_class(optimizer), lr=lr, reg=options["riemannian_reg"], weight_decay=options["weight_decay"]
    )


def _riemannian_missing() -> str | None:
    import peft
    import peft.optimizers

    if hasattr(peft.optimizers, "create_riemannian_optimizer"):
        return None
    return (
        f"the installed PEFT {peft.__version__} has no peft.optimizers.create_riemannian_optimizer; "
        "upgrade peft to run the riemannian arm"
    )


ARMS: dict[str, Arm] = {
    "lora": Arm("lora", "plain LoRA: the optimizer on A and B, nothing else", _plain),
    "balora": Arm("balora", "LoRA balanced after every step, nearest gauge (keeps Adam's moments aligned)",
                  _plain, method="nearest"),
    "balora-svd": Arm("balora-svd", "LoRA balanced after every step, the paper's SVD gauge", _plain, method="svd"),
    "loraplus": Arm("loraplus", "LoRA+ (PEFT's create_loraplus_optimizer): lr of B = ratio x lr of A (embedding adapters: lr for both)", _loraplus,
                    defaults={"loraplus_lr_ratio": 16.0}),  # 2^4, the LoRA+ paper's and PEFT docs' example
    "riemannian": Arm("riemannian", "PEFT's Riemannian-preconditioned optimizer (r x r preconditioners)",
                      _riemannian, defaults={"riemannian_reg": 1e-2},  # PEFT's default damping
                      unavailable=_riemannian_missing),
}


def get_arm(name: str) -> Arm:
    try:
        return ARMS[name]
    except KeyError:
        raise InputError(f"--arms: unknown arm {name!r}; available: {', '.join(ARMS)}") from None


def resolve_arms(spec: str | list[str] | tuple[str, ...]) -> list[Arm]:
    """"lora,balora" or ["lora", "balora"] -> the Arms, validated and de-duplicated, in the order given."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if not names:
        raise InputError(f"--arms: no arm given; available: {', '.join(ARMS)}")
    if len(set(names)) != len(names):
        raise InputError(f"--arms: {','.join(names)} names an arm twice; list each arm once")
    return [get_arm(n) for n in names]


def parse_arms(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """The names of resolve_arms(spec)."""
    return [arm.name for arm in resolve_arms(spec)]


# The smallest value of each arm option and whether it is allowed itself: a ratio <= 0 would train B by gradient
# ascent (or not at all), a negative damping can make the r x r matrix singular or indefinite.
OPTION_FLOORS: dict[str, tuple[float, bool]] = {"loraplus_lr_ratio": (0.0, False), "riemannian_reg": (0.0, True)}


def arm_options(names: list[str], overrides: dict[str, Any], weight_decay: float) -> dict[str, Any]:
    """The options every named arm reads: weight_decay plus each arm's defaults, overridden by `overrides`.

    An override of an option that no named arm reads is an InputError: it would be dropped without a word.
    """
    read = {key for n in names for key in ARMS[n].defaults}
    for key in overrides:
        owners = [a.name for a in ARMS.values() if key in a.defaults]
        if owners and key not in read:
            raise InputError(f"--set {key}: an option of the {'/'.join(owners)} arm, which is not in --arms "
                             f"{','.join(names)}; add the arm or drop the option")
    options: dict[str, Any] = {"weight_decay": float(weight_decay)}
    for n in names:
        for key, default in ARMS[n].defaults.items():
            value = overrides.get(key, default)
            options[key] = _number_option(key, value) if isinstance(default, float) else type(default)(value)
    return options


def _number_option(key: str, value: Any) -> float:
    """A float option of an arm, checked against OPTION_FLOORS."""
    floor, floor_ok = OPTION_FLOORS.get(key, (-math.inf, True))
    number = value if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    if not (math.isfinite(number) and (number > floor or (floor_ok and number == floor))):
        bound = f"{'>=' if floor_ok else '>'} {floor:g}"
        raise InputError(f"--set {key}={value}: must be a finite number {bound}")
    return float(number)
