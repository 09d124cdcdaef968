"""The paper's synthetic problem: LoRA on a frozen random linear layer, regressing to a random target.

    loss = 1/2 ||(W0 + dW) - T||_F^2,    dW = s B A,  A (r, in), B (out, r),  PEFT init B = 0

evaluated as a full-batch regression on the identity input (the layer's output on I is
its weight, transposed), so by Eckart-Young the best rank-r loss is exactly
1/2 sum_{i>r} sigma_i(T - W0)^2 and `excess_loss = loss - best_loss` says how far from
the optimum an arm is. With depth > 1 the model is a stack of frozen layers, each with
LoRA; the product replaces W0, and the best loss is known only for a reachable target
(T = prod(W0_i + rank-r perturbation), best loss 0).

Each seed draws its own W0, T and LoRA init, so medians over seeds are over problems.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from balora.errors import InputError
from balora.tasks import Problem, TaskSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
TARGETS = ("random", "reachable")

DEFAULTS = {
    "arms": "lora,balora,balora-svd",
    "steps": 100,  # the paper's synthetic figure
    "seeds": 8,  # seeds 0..7: the problems are tiny, medians need several
    "optimizer": "adam",
    # Near the best of a 4-point grid per optimizer on the default sizes (sgd diverges at 1.0).
    "lr": {"adam": 3e-2, "adamw": 3e-2, "sgd": 0.3, "sign": 1e-2},
    "alpha": None,  # None: alpha = rank, so the LoRA scaling s = alpha / r is 1
    "rank": 4,
    # 20 x 20 matrices: one thread is fastest, and on a busy machine extra threads make each op
    # wait for the others (measured ~500x slower per matmul on 2 shared cores).
    "threads": 1,
    "eval_every": 0,  # no separate eval set: the training loss is the full-batch loss
    "layers_every": 5,
    "spectra_every": 10,
    "in_features": 20,
    "out_features": 20,
    "depth": 1,  # frozen linear layers in the stack, each with LoRA (hidden width = out_features)
    "target": "random",  # "random": full-rank random T; "reachable": T = prod(W0_i + rank-r perturbation)
    "std": 1.0,  # entries of W0 and T are N(0, std^2 / fan_in): 1 gives O(1) singular values
    # Multiplies PEFT's A init; 1 = PEFT's default (kaiming-uniform, std 1/sqrt(3 in), B = 0). A large
    # scale makes the (conserved, under gradient flow) imbalance B^T B - A A^T = -A0 A0^T large next to
    # the target's singular values: the regime where balancing helps (docs/BENCHMARKS.md, section 2).
    "init_scale": 1.0,
    "target_fraction": 0.01,  # target loss = best + fraction * (initial - best): 99% of the excess removed
}


class FrozenStack(nn.Module):
    """x -> x W_1^T ... W_depth^T with bias-free linear layers named layers.0, layers.1, ..."""

    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype) for w in weights])
        with torch.no_grad():
            for layer, w in zip(self.layers, weights):
                layer.weight.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, in) -> (N, out)
        return self.layers(x)


def problem_tensors(cfg: dict, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The frozen weights W0_i (out_i, in_i) and the target T (out, in) of a seed, in float64.

    Entries are N(0, std^2 / fan_in): with std = 1 every layer, and T, has O(1) singular values.
    """
    std = float(cfg["std"])
    n_in, n_out, depth, rank = int(cfg["in_features"]), int(cfg["out_features"]), int(cfg["depth"]), int(cfg["rank"])
    dims = [n_in] + [n_out] * depth
    gen = torch.Generator().manual_seed(int(seed))
    W0s = [torch.randn(dims[i + 1], dims[i], generator=gen, dtype=torch.float64) * std / math.sqrt(dims[i])
           for i in range(depth)]
    if cfg["target"] == "random":
        T = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64) * std / math.sqrt(n_in)
    else:
        T = torch.eye(n_in, dtype=torch.float64)
        for W in W0s:
            P = torch.randn(W.shape[0], rank, generator=gen, dtype=torch.float64) @ torch.randn(
                rank, W.shape[1], generator=gen, dtype=torch.float64
            ) / math.sqrt(rank * W.shape[1])  # (out_i, in_i), rank r, entries of the size of W0's
            T = (W + P) @ T
    return W0s, T


def best_rank_r_loss(W0s: list[torch.Tensor], T: torch.Tensor, rank: int, target: str) -> float | None:
    """1/2 sum_{i>r} sigma_i(T - W0)^2 (Eckart-Young) for one layer; 0 for a reachable target; else None."""
    if target == "reachable":
        return 0.0
    if len(W0s) > 1:
        return None  # best rank-r per layer of a product of layers has no closed form
    sigma = torch.linalg.svdvals(T - W0s[0])
    return float(0.5 * (sigma[rank:] ** 2).sum())


def _check(cfg: dict) -> None:
    for key in ("in_features", "out_features", "depth", "rank"):
        if int(cfg[key]) < 1:
            raise InputError(f"--set {key}={cfg[key]}: must be a positive integer")
    if int(cfg["rank"]) > min(int(cfg["in_features"]), int(cfg["out_features"])):
        raise InputError(f"--rank {cfg['rank']}: must be <= min(in_features, out_features) of the synthetic layer")
    if cfg["target"] not in TARGETS:
        raise InputError(f"--set target={cfg['target']}: use one of {', '.join(TARGETS)}")
    scale = cfg.get("init_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise InputError(f"--set init_scale={scale}: must be a positive finite number (1 = PEFT's init)")
    if cfg["dtype"] not in DTYPES:
        raise InputError(f"--dtype {cfg['dtype']}: the synthetic task supports {', '.join(DTYPES)}")


def build(cfg: dict, seed: int, alpha: float, device: torch.device) -> Problem:
    from peft import LoraConfig, get_peft_model

    _check(cfg)
    rank, dtype = int(cfg["rank"]), DTYPES[cfg["dtype"]]
    W0s, T = problem_tensors(cfg, seed)
    base = FrozenStack([W.to(dtype) for W in W0s])
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=[f"layers.{i}" for i in range(len(W0s))])
    # The LoRA init (A random, B = 0) is drawn from the global RNG: seed it, and leave the caller's RNG as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = get_peft_model(base, lora)
    scale = float(cfg.get("init_scale", 1.0))  # runs stored before the option existed have no key
    if scale != 1.0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_A." in name:
                    p.mul_(scale)
    model.to(device)

    X = torch.eye(T.shape[1], dtype=dtype, device=device)  # (in, in): the output on I is W^T
    Y = T.mT.to(dtype=dtype, device=device)  # (in, out)

    def loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((m(x).to(Y.dtype) - Y) ** 2).sum()

    W_prod = torch.eye(T.shape[1], dtype=torch.float64)
    for W in W0s:
        W_prod = W @ W_prod
    initial = float(0.5 * ((W_prod - T) ** 2).sum())  # B = 0: dW = 0
    best = best_rank_r_loss(W0s, T, rank, cfg["target"])
    floor = best if best is not None else 0.0
    return Problem(
        model=model,
        batches=lambda: itertools.repeat(X),
        loss=loss,
        best_loss=best,
        target_loss=floor + float(cfg["target_fraction"]) * (initial - floor),
        info={
            "problem": "1/2 ||W0 + dW - T||_F^2 on the identity input",
            "in_features": int(cfg["in_features"]),
            "out_features": int(cfg["out_features"]),
            "depth": len(W0s),
            "target": cfg["target"],
        },
    )


TASK = TaskSpec(name="synthetic", build=build, defaults=DEFAULTS)
