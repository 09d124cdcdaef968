"""The paper's synthetic problem: LoRA on a frozen random linear layer, regressing to a random target.

    loss = 1/2 ||(W0 + dW) - T||_F^2,    dW = s B A,  A (r, in), B (out, r),  B = 0 at the start

evaluated as a full-batch regression on the identity input (the layer's output on I is
its weight, transposed), so by Eckart-Young the best rank-r loss is exactly
1/2 sum_{i>r} sigma_i(T - W0)^2 and `excess_loss = loss - best_loss` says how far from
the optimum an arm is. With depth > 1 the model is a stack of frozen layers, each with
LoRA; the product replaces W0. The reference loss is then the paper's,
1/2 sum_{i > depth r} sigma_i(T - W0_prod)^2: a lower bound (the stack can change its
product by a matrix of rank <= depth r at most), not always attained; a reachable target
(T = prod(W0_i + rank-r perturbation)) has best loss 0.

Two initialisations (`init`):
- "peft": W0 and T entries N(0, std^2 / fan_in), A PEFT's Kaiming-uniform times init_scale.
  Plain LoRA starts nearly balanced here, so balancing helps little.
- "paper": the paper's official code (vcastin/balora, synthetic/): W0, T and A entries
  N(0, 1) (times std, init_scale), not divided by sqrt(fan_in); B = 0; with alpha = r the
  scaling is 1. A starts far larger than the target's scale: the regime the paper shows.

`shared_problem` keeps W0 and T the same for every seed (drawn from `problem_seed`), so
seeds vary only the LoRA initialisation, as the paper's trajectories do; "auto" means true
under init=paper and false under init=peft (each seed a new problem).
"""

from __future__ import annotations

import itertools
import math
import numbers

import torch
from torch import nn

from balora.compare_config import MAX_SEED
from balora.errors import InputError
from balora.tasks import Problem, TaskSpec, target_fraction

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
TARGETS = ("random", "reachable")
INITS = ("peft", "paper")
# The paper's LoRA init is drawn from its own stream, apart from the problem's: seeds sharing a problem
# differ only here, and a seed's A is never a copy of the first entries of its W0.
LORA_STREAM = 1_000_003

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
    # "peft": PEFT's init, O(1) singular values; "paper": the paper's code, entries N(0, 1) (module docstring)
    "init": "peft",
    # init=peft: entries of W0 and T are N(0, std^2 / fan_in), 1 gives O(1) singular values;
    # init=paper: N(0, std^2).
    "std": 1.0,
    # Multiplies A's init: PEFT's kaiming-uniform (std 1/sqrt(3 in)) under init=peft, N(0, 1) under
    # init=paper; B = 0 either way. A large scale makes the (conserved, under gradient flow) imbalance
    # B^T B - A A^T = -A0 A0^T large next to the target's singular values: the regime where balancing
    # helps (docs/BENCHMARKS.md, section 2).
    "init_scale": 1.0,
    "shared_problem": "auto",  # true: one W0, T for every seed; false: a new problem per seed; auto: true iff paper
    "problem_seed": 0,  # the seed W0 and T are drawn from when the problem is shared
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


def shared(cfg: dict) -> bool:
    """Whether every seed shares one W0 and T: the shared_problem option, "auto" = true under init=paper."""
    value = cfg.get("shared_problem", False)  # runs stored before the option existed: one problem per seed
    return cfg.get("init", "peft") == "paper" if value == "auto" else bool(value)


def problem_tensors(cfg: dict, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The frozen weights W0_i (out_i, in_i) and the target T (out, in) of a seed, in float64.

    Entries are N(0, std^2 / fan_in) under init=peft (every layer, and T, has O(1) singular values)
    and N(0, std^2) under init=paper. A shared problem is drawn from problem_seed, whatever the seed.
    """
    std, paper = float(cfg["std"]), cfg.get("init", "peft") == "paper"
    n_in, n_out, depth, rank = int(cfg["in_features"]), int(cfg["out_features"]), int(cfg["depth"]), int(cfg["rank"])
    dims = [n_in] + [n_out] * depth
    gen = torch.Generator().manual_seed(int(cfg.get("problem_seed", 0)) if shared(cfg) else int(seed))

    def entries(rows: int, cols: int) -> torch.Tensor:  # (rows, cols)
        x = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * std
        return x if paper else x / math.sqrt(cols)

    W0s = [entries(dims[i + 1], dims[i]) for i in range(depth)]
    if cfg["target"] == "random":
        T = entries(n_out, n_in)
    else:
        T = torch.eye(n_in, dtype=torch.float64)
        for W in W0s:
            # (out_i, in_i), rank r, entries of the size of W0's
            P = torch.randn(W.shape[0], rank, generator=gen, dtype=torch.float64) @ torch.randn(
                rank, W.shape[1], generator=gen, dtype=torch.float64
            ) / math.sqrt(rank * (1 if paper else W.shape[1]))
            T = (W + (P * std if paper else P)) @ T
    return W0s, T


def product(W0s: list[torch.Tensor]) -> torch.Tensor:
    """W0_depth ... W0_1 (out, in): the stack's frozen map."""
    W_prod = torch.eye(W0s[0].shape[1], dtype=W0s[0].dtype)
    for W in W0s:
        W_prod = W @ W_prod
    return W_prod


def best_rank_r_loss(W0s: list[torch.Tensor], T: torch.Tensor, rank: int, target: str) -> float:
    """The reference loss: 0 for a reachable target, else 1/2 sum_{i > depth r} sigma_i(T - W0_prod)^2.

    One layer: Eckart-Young, the best rank-r loss exactly. depth layers: the paper's reference (L = depth),
    a lower bound, since (W_L + B_L A_L) ... (W_1 + B_1 A_1) - W0_prod has rank <= depth r.
    """
    if target == "reachable":
        return 0.0
    sigma = torch.linalg.svdvals(T - product(W0s))
    return float(0.5 * (sigma[len(W0s) * rank:] ** 2).sum())


def _check(cfg: dict) -> None:
    for key in ("in_features", "out_features", "depth", "rank"):
        v = cfg[key]  # int() would cut 2.5 to 2 and raise a bare ValueError on "abc"
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise InputError(f"--set {key}={v}: must be a positive integer")
    if int(cfg["rank"]) > min(int(cfg["in_features"]), int(cfg["out_features"])):
        raise InputError(f"--rank {cfg['rank']}: must be <= min(in_features, out_features) of the synthetic layer")
    if cfg["target"] not in TARGETS:
        raise InputError(f"--set target={cfg['target']}: use one of {', '.join(TARGETS)}")
    if cfg.get("init", "peft") not in INITS:
        raise InputError(f"--set init={cfg['init']}: use peft (PEFT's init) or paper (the paper's code: N(0, 1))")
    if cfg.get("shared_problem", False) not in ("auto", True, False):
        raise InputError(f"--set shared_problem={cfg['shared_problem']}: use true, false or auto")
    problem_seed = cfg.get("problem_seed", 0)
    # Bounded as --seeds are: past 2^64 torch's generator raised a bare "Overflow when unpacking long long".
    if isinstance(problem_seed, bool) or not isinstance(problem_seed, int) or not 0 <= problem_seed <= MAX_SEED:
        raise InputError(f"--set problem_seed={problem_seed}: must be an integer from 0 to {MAX_SEED}")
    for key in ("init_scale", "std"):
        v = cfg.get(key, 1.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise InputError(f"--set {key}={v}: must be a positive finite number (1 = the init's own scale)")
    if cfg["dtype"] not in DTYPES:
        raise InputError(f"--dtype {cfg['dtype']}: the synthetic task supports {', '.join(DTYPES)}")
    target_fraction(cfg)


def init_lora(model: nn.Module, cfg: dict, seed: int) -> None:
    """Set the LoRA A factors (found by type, balora.adapters) to the configured init; B stays 0.

    init=peft: PEFT's own A times init_scale; init=paper: entries N(0, init_scale^2) from the seed's
    LoRA stream, layer after layer.
    """
    from balora.adapters.live import iter_lora_pairs

    scale = float(cfg.get("init_scale", 1.0))  # runs stored before the option existed have no key
    paper = cfg.get("init", "peft") == "paper"
    if scale == 1.0 and not paper:
        return
    gen = torch.Generator().manual_seed(LORA_STREAM + int(seed))
    for pair in iter_lora_pairs(model):
        A = pair.A.detach()  # (r, in)
        if paper:
            A = torch.randn(A.shape, generator=gen, dtype=torch.float64)
        pair.write((A * scale).to(pair.A.dtype), pair.B)


def _fit_advice(cfg: dict, initial: float, trained: float) -> str:
    """What to change when the problem does not fit the dtype. With depth > 1 its scale is that of a product
    of depth layers (std^depth, times sqrt(in)^depth under init=paper): at std=1, "a std nearer 1" was no help."""
    big = not (math.isfinite(initial) and math.isfinite(trained)) or trained > initial
    depth = int(cfg["depth"])
    if depth == 1:
        return "use a std nearer 1"
    return (f"its {depth} layers multiply to {'overflow' if big else 'underflow'} it: use "
            f"fewer layers (--set depth) or a std {'below' if big else 'above'} 1")


def build(cfg: dict, seed: int, alpha: float, device: torch.device) -> Problem:
    from peft import LoraConfig, get_peft_model

    _check(cfg)
    rank, dtype = int(cfg["rank"]), DTYPES[cfg["dtype"]]
    W0s, T = problem_tensors(cfg, seed)
    # The problem is the one trained: in bf16 its frozen weights are rounded, and the reference and
    # initial losses below are of those (else the "best" loss was of another problem, and beaten).
    W0s = [W.to(dtype).to(torch.float64) for W in W0s]
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=[f"layers.{i}" for i in range(len(W0s))])
    # PEFT's LoRA init (A random, B = 0) is drawn from the global RNG: seed it, and leave the caller's RNG as it was.
    # The frozen layers are made in the fork too: nn.Linear draws an init (overwritten) from the global RNG.
    with torch.random.fork_rng(devices=[]):
        base = FrozenStack([W.to(dtype) for W in W0s])
        torch.manual_seed(int(seed))
        model = get_peft_model(base, lora)
    init_lora(model, cfg, seed)
    model.to(device)

    X = torch.eye(T.shape[1], dtype=dtype, device=device)  # (in, in): the output on I is W^T
    # The target and the loss's sum in fp32 at least: in bf16 the target itself was rounded and the
    # sum moved in steps of 1/16 near 10, so recorded losses fell below the best rank-r loss.
    loss_dtype = torch.promote_types(dtype, torch.float32)
    Y = T.mT.to(dtype=loss_dtype, device=device)  # (in, out)

    def loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((m(x).to(loss_dtype) - Y) ** 2).sum()

    initial = float(0.5 * ((product(W0s) - T) ** 2).sum())  # B = 0: dW = 0
    with torch.no_grad():
        trained = float(loss(model, X))  # the same loss as the cells will see it, in the run's dtype
    # A std far from 1 overflows the dtype (the weights rounded to inf: "_LinAlgError" in the SVD below) or
    # underflows it (a problem of zeros, "completed" at loss 0 in one step): refused before the run is written.
    if not (math.isfinite(initial) and initial > 0 and math.isclose(trained, initial, rel_tol=0.1)):
        raise InputError(f"--set std={cfg['std']}: the problem does not fit {cfg['dtype']} (initial loss {initial:g}, "
                         f"{trained:g} in {cfg['dtype']}); {_fit_advice(cfg, initial, trained)}")
    best = best_rank_r_loss(W0s, T, rank, cfg["target"])
    return Problem(
        model=model,
        batches=lambda: itertools.repeat(X),
        loss=loss,
        best_loss=best,
        target_loss=best + target_fraction(cfg) * (initial - best),
        info={
            "problem": "1/2 ||W0 + dW - T||_F^2 on the identity input",
            "in_features": int(cfg["in_features"]),
            "out_features": int(cfg["out_features"]),
            "depth": len(W0s),
            "target": cfg["target"],
            "init": cfg.get("init", "peft"),
            "shared_problem": shared(cfg),
            "problem_seed": int(cfg.get("problem_seed", 0)) if shared(cfg) else None,
            "best_loss": "exact (Eckart-Young)" if len(W0s) == 1 and cfg["target"] == "random" else
            "0 (reachable target)" if cfg["target"] == "reachable" else
            f"the paper's reference 1/2 sum_(i > {len(W0s)} r) sigma_i(T - W0_prod)^2 (a lower bound)",
        },
    )


TASK = TaskSpec(name="synthetic", build=build, defaults=DEFAULTS)
