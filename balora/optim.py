"""Optimizers by name: torch's Adam, AdamW and SGD, plus sign descent.

Sign descent (p <- p - lr * sign(grad)) is what the paper's synthetic figure calls
"Adam" (Adam with beta1 = beta2 = 0 and eps = 0); keeping it separate from torch's Adam
lets a comparison show that the two behave very differently under balancing.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.optim import Optimizer

from balora.errors import InputError


class SignDescent(Optimizer):
    """p <- p * (1 - lr * weight_decay) - lr * sign(grad). Stateless; sign(0) = 0.

    weight_decay is decoupled (as in AdamW) so it does not change the update's sign.
    """

    def __init__(self, params: Iterable, lr: float = 1e-2, weight_decay: float = 0.0):
        if lr < 0:
            raise ValueError(f"SignDescent: lr must be >= 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"SignDescent: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group.get("weight_decay", 0.0)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(torch.sign(p.grad), alpha=-lr)
        return loss


# name -> optimizer class. A new optimizer is one entry; every class takes (params, lr=..., weight_decay=...).
OPTIMIZERS: dict[str, type[Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,  # plain: no momentum, so the conservation law of D holds
    "sign": SignDescent,
}


def optimizer_class(name: str) -> type[Optimizer]:
    """The optimizer class registered as `name`; InputError listing the choices otherwise."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise InputError(f"--optimizer: unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}") from None


def make_optimizer(name: str, params: Iterable, lr: float, weight_decay: float = 0.0, **kwargs) -> Optimizer:
    """optimizer_class(name)(params, lr=lr, weight_decay=weight_decay, **kwargs).

    weight_decay defaults to 0 for every optimizer (torch's AdamW would use 0.01) so that all
    arms of a comparison, including LoRA+ whose helper sets it per group, share it.
    """
    return optimizer_class(name)(params, lr=lr, weight_decay=weight_decay, **kwargs)
