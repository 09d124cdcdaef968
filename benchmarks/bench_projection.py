"""What balancing costs, measured side by side in one run at the adapter shapes of real models.

    python benchmarks/bench_projection.py --quick      # 1B-like, r=16, fp32: the headline ratios (~1 min)
    python benchmarks/bench_projection.py              # 1B- and 3B-like, r in {8, 16, 64}, fp32 and bf16
    python benchmarks/bench_projection.py --profile    # where balance_pairs spends its time (1B-like, r=16)
    python benchmarks/bench_projection.py --ops        # ops per balancing pass for 8, 16, 28 blocks (seconds)

No model weights are needed: balancing only ever sees the adapter tensors, so the script
builds random LoRA factors of the real shapes (a Llama-3.2-1B-like stack: hidden 2048,
intermediate 8192, 16 layers, grouped-query k/v of width 512; a 3B-like one: 3072 / 8192 /
28 layers / 1024) as nn.Parameters with random gradients. In each repetition, in rotating
order, it times:

  copy            copying every adapter parameter once: the memory-traffic floor
  adamw           one torch.optim.AdamW step over the same parameters, torch's default
                  implementation (on CPU that is the single-tensor for-loop; foreach and
                  fused are timed too, for reference)
  balora nearest  balora.balance.balance_pairs(check=False) + writing back, what
  balora svd      BalanceCallback does after every step (both gauges). Well-conditioned
                  pairs take the Gram path (r x r Grams, one product per factor); the
                  header line says how many fell back to the QR path
  QR path         balora.projection.balanced_factors (CholeskyQR2 + r x r SVDs) on
                  pre-stacked groups, the fallback, maths only (no stacking or writing)
  paper loop      the paper's projection written the straightforward way: per module, an SVD
                  of each factor and one of the r x r core, in a Python loop (fp32 upcast)

and prints medians and ratios, the ops dispatched per balancing pass as the number of
transformer blocks grows (each op is a kernel launch on a GPU; the count should not grow),
plus the diagnostics (layer_report's rows from the factors)
against an SVD of the formed dW for one transformer block. With CUDA it does the same on
the GPU and compares balancing with one training step of a randomly initialised 1B-like
Llama (bf16, LoRA r=16), when transformers can build it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from balora.balance import balance_and_write, balance_pairs
from balora.pairs import FactorPair, group_by_shape
from balora.projection import balanced_factors, product_rel_error
from balora.imbalance import rel_imbalance
from balora.stack_writes import ParamWriter
from opcount import count_ops
from balora.report import pair_rows
from cli_args import positive_int  # beside this file
from machine import cpu_line  # beside this file


@dataclass(frozen=True)
class ModelShape:
    """The LoRA-relevant shapes of a Llama-style decoder."""

    key: str  # how --models names it
    name: str
    hidden: int
    intermediate: int
    layers: int
    kv_dim: int  # num_key_value_heads * head_dim: the width of k_proj / v_proj outputs
    heads: int
    kv_heads: int
    vocab: int

    def llama_config(self, max_positions: int = 2048):
        """transformers' LlamaConfig of this shape (tied embeddings)."""
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, max_position_embeddings=max_positions,
                           tie_word_embeddings=True)


MODELS = {
    "1B": ModelShape("1B", "Llama-3.2-1B-like", 2048, 8192, 16, 512, 32, 8, 128256),
    "3B": ModelShape("3B", "Llama-3.2-3B-like", 3072, 8192, 28, 1024, 24, 8, 128256),
    "tiny": ModelShape("tiny", "tiny (smoke test)", 256, 1024, 2, 64, 8, 2, 1000),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_shapes(m: ModelShape) -> list[tuple[str, int, int]]:
    """(module name, in_features, out_features) of every LoRA-targeted Linear, in model order."""
    h, i, kv = m.hidden, m.intermediate, m.kv_dim
    per_layer = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (h, kv),
        "self_attn.v_proj": (h, kv),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (h, i),
        "mlp.up_proj": (h, i),
        "mlp.down_proj": (i, h),
    }
    return [(f"model.layers.{l}.{n}", fi, fo) for l in range(m.layers) for n, (fi, fo) in per_layer.items()]


@dataclass
class Adapter:
    """LoRA factors of one model as trainable parameters, plus FactorPairs viewing them."""

    params: list[nn.Parameter]  # A0, B0, A1, B1, ...
    pairs: list[FactorPair]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)


def make_adapter(m: ModelShape, r: int, dtype: torch.dtype, device: str, seed: int = 0) -> Adapter:
    """Factors as after some training: A from PEFT's init scale, B small and nonzero, both full
    rank and far from balanced; gradients random. The product is never zero, so every pair is
    really projected (a zero product is skipped and would flatter balora)."""
    g = torch.Generator().manual_seed(seed)
    params, pairs = [], []
    for name, n_in, n_out in module_shapes(m):
        A = torch.randn(r, n_in, generator=g) / n_in**0.5  # (r, in)
        B = torch.randn(n_out, r, generator=g) * 1e-3  # (out, r)
        A_p = nn.Parameter(A.to(device=device, dtype=dtype))
        B_p = nn.Parameter(B.to(device=device, dtype=dtype))
        for p in (A_p, B_p):
            p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device=device, dtype=dtype)
        params += [A_p, B_p]
        pairs.append(FactorPair(name, "default", "linear", A_p.detach(), B_p.detach(), 2.0, write=ParamWriter(A_p, B_p)))
    return Adapter(params, pairs)


# ---------------------------------------------------------------------------------------------
# What is timed


def paper_projection(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's projection for one module, the straightforward way: three SVDs.

    A (r, in), B (out, r) in PEFT naming (the paper's A is PEFT's B). With B = U_B S_B Vh_B,
    A = U_A S_A Vh_A and the core C = S_B Vh_B U_A S_A = U S Vh, B A = U_B C Vh_A, so
    B' = U_B U S^1/2 and A' = S^1/2 Vh Vh_A have the same product and B'^T B' = S = A' A'^T.
    Upcast to fp32 (the SVD needs it; the reference code would skip bf16 modules instead).
    """
    U_B, S_B, Vh_B = torch.linalg.svd(B.float(), full_matrices=False)  # (out, r), (r,), (r, r)
    U_A, S_A, Vh_A = torch.linalg.svd(A.float(), full_matrices=False)  # (r, r), (r,), (r, in)
    core = (S_B[:, None] * Vh_B) @ (U_A * S_A[None, :])  # (r, r)
    U, S, Vh = torch.linalg.svd(core)
    sq = S.sqrt()
    return (sq[:, None] * Vh) @ Vh_A, U_B @ (U * sq[None, :])


def run_paper_loop(ad: Adapter) -> None:
    with torch.no_grad():
        for p in ad.pairs:
            A_new, B_new = paper_projection(p.A, p.B)
            p.write(A_new, B_new)


def run_balora(ad: Adapter, method: str) -> int:
    """balance_pairs + writing back; returns how many pairs took the QR path."""
    summary = balance_and_write(ad.pairs, method, check=False)
    if summary.balanced != len(ad.pairs):  # every pair must really be projected for a fair timing
        raise RuntimeError(f"balora balanced only {summary.balanced} of {len(ad.pairs)} pairs: {summary}")
    return summary.qr_path


def stacked_groups(ad: Adapter) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (torch.stack([ad.pairs[i].A for i in idx]), torch.stack([ad.pairs[i].B for i in idx]))
        for idx in group_by_shape(ad.pairs).values()
    ]


def run_maths_only(groups, method: str = "nearest") -> None:
    for A, B in groups:
        balanced_factors(A, B, method)


def run_copy(dst: list[torch.Tensor], src: list[nn.Parameter]) -> None:
    with torch.no_grad():
        for d, s in zip(dst, src):
            d.copy_(s)


def _adamw_default(params) -> str:
    """Which implementation torch.optim.AdamW(foreach=None, fused=None) picks for these params."""
    from torch.optim.optimizer import _default_to_fused_or_foreach

    fused, foreach = _default_to_fused_or_foreach(list(params), differentiable=False, use_fused=False)
    return "fused" if fused else "foreach" if foreach else "single-tensor (for-loop)"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, callable], reps: int, device: str, no_warmup=()) -> dict[str, list[float]]:
    """Run every function once untimed (except those in no_warmup: calls that take seconds need
    none), then `reps` rounds of all of them in rotating order (so no method always runs right
    after the same neighbour). Seconds per call."""
    names = list(fns)
    for n in names:
        if n not in no_warmup:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for n in order:
            _sync(device)
            t0 = time.perf_counter()
            fns[n]()
            _sync(device)
            times[n].append(time.perf_counter() - t0)
    return times


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def _iqr(xs: list[float]) -> float:
    if len(xs) < 4:
        return max(xs) - min(xs)
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


def paired(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of num/den within the same round: both ran back to back, so a load
    spike from other processes mostly cancels (a ratio of medians would not)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------------------------------------
# Checks that the timed implementations do the same work


def check_equivalence(ad: Adapter) -> str:
    """The paper loop and both balora gauges give the same product, balanced, on one block."""
    pairs = ad.pairs[:7]

    def worst(new: list[tuple[torch.Tensor, torch.Tensor]]) -> str:
        err = imb = 0.0
        for p, (A1, B1) in zip(pairs, new):
            A0, B0, A1, B1 = (t.double()[None] for t in (p.A, p.B, A1, B1))
            err = max(err, float(product_rel_error(A0, B0, A1, B1)[0]))
            imb = max(imb, float(rel_imbalance(A1, B1)[0]))
        return f"max |dW'-dW|/|dW| {err:.1e}, max rel_imbalance {imb:.1e}"

    # Cast back to the factors' dtype, as writing into the parameters does (bf16 rounding shows).
    paper = [tuple(t.to(p.A.dtype) for t in paper_projection(p.A, p.B)) for p in pairs]
    lines = [f"paper loop: {worst(paper)}"]
    for method in ("nearest", "svd"):
        new, _ = balance_pairs(pairs, method, check=False)
        lines.append(f"balora {method}: {worst([new[i] for i in range(len(pairs))])}")
    return "; ".join(lines)


# ---------------------------------------------------------------------------------------------
# The benchmark


def bench_config(m: ModelShape, r: int, dtype: torch.dtype, device: str, reps: int, baseline: bool) -> dict:
    ad = make_adapter(m, r, dtype, device)
    n_mod = len(ad.pairs)
    dname = str(dtype).removeprefix("torch.")
    print(f"\n== {m.name}, r={r}, {dname}, {device}: {n_mod} LoRA pairs, {ad.numel / 1e6:.2f}M adapter params "
          f"({ad.nbytes / 2**20:.0f} MiB); {_load()} ==")
    print("   " + check_equivalence(ad))
    qr = {method: run_balora(ad, method) for method in ("nearest", "svd")}
    print(f"   pairs on the QR path (the rest took the Gram path): nearest {qr['nearest']}, svd {qr['svd']} "
          f"of {n_mod}")
    print(f"   adamw = torch.optim.AdamW with torch's defaults, which here run the {_adamw_default(ad.params)} implementation")
    dst = [torch.empty_like(p) for p in ad.params]
    opt_default = torch.optim.AdamW(ad.params, lr=1e-5)
    opt_foreach = torch.optim.AdamW(ad.params, lr=1e-5, foreach=True)
    fns = {
        "copy": lambda: run_copy(dst, ad.params),
        "adamw": opt_default.step,
        "adamw foreach": opt_foreach.step,
    }
    if device == "cpu" or device.startswith("cuda"):
        opt_fused = torch.optim.AdamW(ad.params, lr=1e-5, fused=True)
        fns["adamw fused"] = opt_fused.step
    groups = stacked_groups(ad)
    fns["balora nearest"] = lambda: run_balora(ad, "nearest")
    fns["balora svd"] = lambda: run_balora(ad, "svd")
    fns["QR path nearest"] = lambda: run_maths_only(groups, "nearest")
    if baseline:
        fns["paper loop"] = lambda: run_paper_loop(ad)
    times = time_interleaved(fns, reps, device)
    med = {n: _med(t) for n, t in times.items()}
    print(f"   {'what':<22}{'median ms':>11}{'IQR ms':>9}{'x AdamW':>9}{'x copy':>8}   (ratios: paired medians)")
    for n, t in times.items():
        print(f"   {n:<22}{med[n] * 1e3:>11.1f}{_iqr(t) * 1e3:>9.1f}{paired(times, n, 'adamw'):>9.2f}"
              f"{paired(times, n, 'copy'):>8.1f}")
    ratios = {"nearest/adamw": paired(times, "balora nearest", "adamw"), "svd/adamw": paired(times, "balora svd", "adamw"),
              "nearest/copy": paired(times, "balora nearest", "copy")}
    if baseline:
        ratios["paper/nearest"] = paired(times, "paper loop", "balora nearest")
        ratios["paper/svd"] = paired(times, "paper loop", "balora svd")
    row = {"ratios": ratios, "noisy": _noisy(times, ("adamw", "balora nearest", "balora svd")),
        "model": m.key,
        "r": r, "dtype": dname, "device": device, "pairs": n_mod, "params_M": ad.numel / 1e6,
        "med": med, "load": os.getloadavg()[0],
    }
    del opt_default, opt_foreach, fns, groups, ad, dst
    return row


def bench_diagnostics(m: ModelShape, r: int, device: str, reps: int, modules: tuple[str, ...]) -> dict:
    """layer_report's rows from the factors, against forming dW and taking its singular values,
    for the modules of one transformer block (layer 0)."""
    ad = make_adapter(m, r, torch.float32, device)
    block = [p for p in ad.pairs if p.module.startswith("model.layers.0.") and p.module.split(".")[-1] in modules]
    print(f"\n== diagnostics, {m.name}, r={r}, fp32, {device}: block 0 ({', '.join(p.module.split('.')[-1] for p in block)}); "
          f"{_load()} ==")

    def svd_of_dW():
        for p in block:
            torch.linalg.svdvals(p.scaling * p.B @ p.A)  # (out, in): what a naive report computes

    fns = {"from factors (block)": lambda: pair_rows(block), "SVD of formed dW (block)": svd_of_dW,
           "from factors (all layers)": lambda: pair_rows(ad.pairs)}
    times = time_interleaved(fns, reps, device, no_warmup=("SVD of formed dW (block)",))
    med = {n: _med(t) for n, t in times.items()}
    print(f"   {'what':<28}{'median ms':>11}{'IQR ms':>9}")
    for n, t in times.items():
        print(f"   {n:<28}{med[n] * 1e3:>11.1f}{_iqr(t) * 1e3:>9.1f}")
    ratio = paired(times, "SVD of formed dW (block)", "from factors (block)")
    # Only the timed modules are extrapolated: the block holds some of a layer's modules (q, k with
    # --quick), so this is not the whole model's cost from dW, which is larger.
    per_layer = med["SVD of formed dW (block)"] * m.layers
    print(f"   forming dW / from factors, same block: {ratio:.0f}x; whole model ({len(ad.pairs)} modules) from "
          f"factors {med['from factors (all layers)'] * 1e3:.0f} ms; forming dW of the {len(block)} modules above "
          f"in all {m.layers} layers ~{per_layer:.1f} s (extrapolated)")
    return {"ratio": ratio, "med": med, "model": m.key}


def training_step_comparison(m: ModelShape, r: int, device: str, batch: int, seq: int, reps: int) -> None:
    """One forward/backward/AdamW step of a randomly initialised Llama of shape m with LoRA r on
    TARGETS, against what BalanceCallback does after each step (cached pairs, balance, write) and
    against balance_ (which also walks the model)."""
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForCausalLM
    except ImportError as e:
        print(f"\n(training-step comparison skipped: {e})")
        return
    import balora

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    cfg = m.llama_config(max(2048, seq))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, m.vocab, (batch, seq), device=device)

    def train_step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step()  # first step: B becomes nonzero, so balancing really projects
    from balora.adapters.pair_cache import PairCache

    cache = PairCache()  # what BalanceCallback does after every step: walked once, then cached
    fns = {"training step": train_step,
           "callback nearest": lambda: balance_and_write(cache.get(model), "nearest", check=False),
           "callback svd": lambda: balance_and_write(cache.get(model), "svd", check=False),
           "balance_ (+ walk)": lambda: balora.balance_(model, method="nearest", check=False)}
    times = time_interleaved(fns, reps, device)
    med = {n: _med(t) for n, t in times.items()}
    print(f"\n== training step, {m.name} (random init), LoRA r={r}, {str(dtype).removeprefix('torch.')}, {device}, "
          f"batch {batch} x {seq} tokens; {_load()} ==")
    for n, t in times.items():
        share = f"{100 * paired(times, n, 'training step'):.2f}% of a step" if n != "training step" else ""
        print(f"   {n:<20}{med[n] * 1e3:>11.1f} ms  {share}")
    del model, opt


def peft_llama_shell(m: ModelShape, r: int):
    """A PeftModel of a Llama shaped like m, base weights on the meta device (no memory, never run),
    LoRA r on TARGETS as real CPU fp32 parameters: A from PEFT's init scale, B small and nonzero
    (as after some training), random gradients. What balance_(model) walks and balances."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = get_peft_model(LlamaForCausalLM(m.llama_config()), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS)))
    g = torch.Generator().manual_seed(0)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and (".lora_A." in name or ".lora_B." in name):
            out_f, in_f = mod.weight.shape
            scale = 1e-3 if ".lora_B." in name else in_f**-0.5
            mod.weight = nn.Parameter(torch.randn(out_f, in_f, generator=g) * scale)
            mod.weight.grad = torch.randn(out_f, in_f, generator=g) * 1e-3
    return model


def bench_balance_model(m: ModelShape, r: int, reps: int) -> dict:
    """The issue's measure: balora.balance_(model, check=False) (the model's pairs from balance_'s
    own cache, checked for staleness, then one pass) against one torch.optim.AdamW step over the
    same LoRA parameters, side by side, on the CPU; plus what BalanceCallback and balance_after_step
    run each step (their PairCache, then the pass) and a fresh walk, which the caches save."""
    import balora
    from balora.adapters.pair_cache import PairCache

    torch.set_grad_enabled(True)  # AdamW needs no grad mode, but the PEFT shell is built with it on
    model = peft_llama_shell(m, r)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    cache = PairCache()
    fns = {"adamw": opt.step, "balance_(model)": lambda: balora.balance_(model, check=False),
           "cached pass": lambda: balance_and_write(cache.get(model), "nearest", check=False),
           "fresh walk": lambda: balora.adapters.live.model_pairs(model)}
    times = time_interleaved(fns, reps, "cpu")
    torch.set_grad_enabled(False)
    n = sum(p.numel() for p in params)
    print(f"\n== balance_(model) vs AdamW, {m.name} PEFT model (meta base weights), LoRA r={r} on {len(TARGETS)} "
          f"projections, {len(params)} tensors, {n / 1e6:.2f}M params, fp32 cpu, {reps} rounds; {_load()} ==")
    for name, t in times.items():
        print(f"   {name:<18}{_med(t) * 1e3:>9.1f} ms  IQR {_iqr(t) * 1e3:>5.1f}  {paired(times, name, 'adamw'):>6.2f}x AdamW")
    del model, opt, cache
    return {"balance_/adamw": paired(times, "balance_(model)", "adamw"), "pass/adamw": paired(times, "cached pass", "adamw"),
            "noisy": _noisy(times, ("adamw", "balance_(model)"))}


# A timing whose interquartile range exceeds this share of its median is too noisy to judge a target by
# (another process took the cores: one run printed 0.33x "MET" with AdamW's IQR above its median).
NOISY_IQR = 0.25


def _noisy(times: dict[str, list[float]], names: tuple[str, ...]) -> bool:
    return any(_iqr(times[n]) > NOISY_IQR * _med(times[n]) for n in names)


def _verdict(ok: bool, noisy: bool) -> str:
    return f"UNRELIABLE (timings too noisy: IQR > {NOISY_IQR:.0%} of the median; rerun on idle cores)" if noisy else (
        "MET" if ok else "NOT MET")


OP_COUNT_BLOCKS = (8, 16, 28)


def op_count_table(m: ModelShape, r: int, device: str) -> dict:
    """Ops dispatched by one balancing pass (balance_and_write, check=False) of an adapter shaped
    like m with 8, 16 and 28 transformer blocks; the pass is warmed up first, as in training.
    "stacked" is the pass a GPU (or a CPU with more than one thread) runs; "pair by pair" is the
    one-thread CPU default (balora.stacked.use_stacks), shown for comparison."""
    print(f"\n== ops per balancing pass, {m.name} shapes, r={r}, fp32, {device} (TorchDispatchMode count; "
          f"'kernels' leaves out view-only ops; 'host reads': .item()/copies of {device} tensors to the CPU, each a "
          "sync on a GPU, where the stacked pass makes one; '.item() calls' on any device) ==")
    print(f"   {'blocks':>6}{'pairs':>7}{'stacked nearest':>17}{'kernels':>9}{'stacked svd':>13}{'kernels':>9}"
          f"{'host reads':>12}{'.item() calls':>14}{'first step (B = 0)':>20}{'pair by pair':>14}")
    rows = {}
    for blocks in OP_COUNT_BLOCKS:
        ad = make_adapter(dataclasses.replace(m, layers=blocks), r, torch.float32, device)
        counts = {}
        for method in ("nearest", "svd"):
            balance_and_write(ad.pairs, method, check=False, stack=True)  # warm: the workspace exists from now on
            counts[method] = count_ops(lambda: balance_and_write(ad.pairs, method, check=False, stack=True))
        single = count_ops(lambda: balance_and_write(ad.pairs, "nearest", check=False, stack=False))
        for p in ad.pairs:  # PEFT's init: every product is zero, every pair goes to the QR path
            p.B.zero_()
        first = count_ops(lambda: balance_and_write(ad.pairs, "nearest", check=False, stack=True))
        reads = max(c.host_reads for c in counts.values())
        items = max(c.scalar_reads for c in counts.values())
        rows[blocks] = {"nearest": counts["nearest"].total, "svd": counts["svd"].total, "first": first.total,
                        "pair by pair": single.total}
        print(f"   {blocks:>6}{len(ad.pairs):>7}{counts['nearest'].total:>17}{counts['nearest'].kernels:>9}"
              f"{counts['svd'].total:>13}{counts['svd'].kernels:>9}{reads:>12}{items:>14}{first.total:>20}"
              f"{single.total:>14}")
        del ad
    lo, hi = OP_COUNT_BLOCKS[0], OP_COUNT_BLOCKS[-1]
    for method in ("nearest", "svd"):
        x = rows[hi][method] / rows[lo][method]
        print(f"   ops({hi} blocks) / ops({lo} blocks), stacked {method}: {x:.2f}  "
              f"(target <= 1.2: {'MET' if x <= 1.2 else 'NOT MET'})")
    return rows


def profile_balance(m: ModelShape, r: int, device: str) -> None:
    """Where balance_pairs spends its time: torch.profiler by op, then cProfile by Python function."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    ad = make_adapter(m, r, torch.float32, device)
    for method in ("nearest", "svd"):
        run_balora(ad, method)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with profile(activities=acts) as prof:
            for _ in range(3):
                run_balora(ad, method)
        print(f"\n== torch.profiler, balance_pairs + write, {method}, {m.name} r={r} fp32 {device}, 3 calls; {_load()} ==")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40))
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(3):
        run_balora(ad, "nearest")
    pr.disable()
    print(f"\n== cProfile, balance_pairs + write, nearest, 3 calls (cumulative) ==")
    pstats.Stats(pr, stream=sys.stdout).sort_stats("cumulative").print_stats(18)


def print_summary(rows: list[dict], diag: dict | None, baseline: bool, whole: dict | None = None) -> None:
    print(f"\n== summary (each ratio: median over rounds of the two times measured back to back; {_load()}) ==")
    head = f"{'model':<8}{'r':>4} {'dtype':<9}{'device':<7}{'AdamW ms':>9}{'nearest/AdamW':>14}{'svd/AdamW':>10}"
    head += f"{'nearest/copy':>13}{'paper/nearest':>14}{'paper/svd':>10}" if baseline else f"{'nearest/copy':>13}"
    print(head)
    for row in rows:
        q = row["ratios"]
        line = (f"{row['model']:<8}{row['r']:>4} {row['dtype']:<9}{row['device']:<7}{row['med']['adamw'] * 1e3:>9.1f}"
                f"{q['nearest/adamw']:>14.2f}{q['svd/adamw']:>10.2f}{q['nearest/copy']:>13.1f}")
        if baseline:
            line += f"{q['paper/nearest']:>14.1f}{q['paper/svd']:>10.1f}"
        print(line)
    target = [x for x in rows if x["model"] == "1B" and x["r"] == 16 and x["dtype"] == "float32" and x["device"] == "cpu"]
    if target:
        q = target[0]["ratios"]
        print("\ntargets (1B-like, r=16, fp32, CPU; AdamW = torch's default implementation):")
        for method in ("nearest", "svd"):
            x = q[f"{method}/adamw"]
            print(f"   balora {method} <= 0.7x one AdamW step:                 {x:.2f}x  {_verdict(x <= 0.7, target[0]['noisy'])}")
        if whole is not None:
            x = whole["balance_/adamw"]
            print(f"   balance_(model, check=False) <= 0.7x one AdamW step:  {x:.2f}x  {_verdict(x <= 0.7, whole['noisy'])}")
        if baseline:
            for method in ("nearest", "svd"):
                x = q[f"paper/{method}"]
                print(f"   balora {method} >= 4x faster than the paper loop:       {x:.1f}x  {'MET' if x >= 4 else 'NOT MET'}")
    if diag is not None and diag["model"] == "1B":
        x = diag["ratio"]
        print(f"   diagnostics from factors >= 20x faster than forming dW:  {x:.0f}x  {'MET' if x >= 20 else 'NOT MET'}")


DTYPES = ("float32", "bfloat16", "float16")


def _comma_list(flag: str, text: str, allowed) -> list[str]:
    """A comma list of allowed names, or a one-line exit naming them (a typo used to end in a traceback)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or any(x not in allowed for x in items):
        raise SystemExit(f"bench_projection: {flag} {text}: expected a comma list of {', '.join(allowed)}")
    return items


def _devices(flag: str | None) -> list[str]:
    if flag is None:
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    devices = ["cpu", "cuda"] if flag == "both" else [flag]
    for d in devices:
        if d != "cpu" and not (d == "cuda" or d.startswith("cuda:")):
            raise SystemExit(f"bench_projection: --device {flag}: expected cpu, cuda or both")
        if d != "cpu" and not torch.cuda.is_available():
            raise SystemExit(f"bench_projection: --device {flag}: no CUDA device here (torch {torch.__version__})")
    return devices


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1B-like, r=16, fp32 only, fewer repetitions")
    ap.add_argument("--models", default="1B,3B", help="comma list of 1B, 3B, tiny")
    ap.add_argument("--ranks", default="8,16,64")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=positive_int, default=None, help="timed repetitions per method (default 7; --quick 5)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the paper's per-module loop")
    ap.add_argument("--no-diagnostics", action="store_true")
    ap.add_argument("--device", default=None, help="cpu, cuda or both (default: both when CUDA is available)")
    ap.add_argument("--train-step", action="store_true",
                    help="also compare with a full training step on CPU (slow; on CUDA it always runs)")
    ap.add_argument("--profile", action="store_true", help="profile balance_pairs at 1B-like r=16 fp32 and exit")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--ops", action="store_true", help="only the ops-per-pass table (8, 16, 28 blocks) and exit")
    args = ap.parse_args(argv)

    models = [MODELS[x] for x in _comma_list("--models", args.models, MODELS)]
    ranks = [int(x) for x in args.ranks.split(",") if x.strip().isdigit() and int(x) > 0]
    if len(ranks) != len(args.ranks.split(",")):
        raise SystemExit(f"bench_projection: --ranks {args.ranks}: expected a comma list of positive ranks, e.g. 8,16,64")
    dtypes = [getattr(torch, x) for x in _comma_list("--dtypes", args.dtypes, DTYPES)]
    reps = args.reps or 7
    if args.quick:
        models, ranks, dtypes, reps = [MODELS["1B"]], [16], [torch.float32], args.reps or 5
    devices = _devices(args.device)

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"bench_projection: {' '.join(sys.argv)}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no CUDA"))
    print(cpu_line())
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}; {_load()}")
    torch.set_grad_enabled(False)
    if args.profile:
        profile_balance(models[0], 16 if 16 in ranks else ranks[0], devices[-1])
        return 0
    op_count_table(MODELS["1B"], 16, devices[-1])
    if args.ops:
        return 0

    rows, diag, whole = [], None, None
    if "cpu" in devices and MODELS["1B"] in models and 16 in ranks and torch.float32 in dtypes:
        try:
            whole = bench_balance_model(MODELS["1B"], 16, max(reps, 9))
        except ImportError as e:
            print(f"\n(balance_(model) comparison skipped: {e})")
    for device in devices:
        for m in models:
            for r in ranks:
                for dt in dtypes:
                    rows.append(bench_config(m, r, dt, device, reps, not args.no_baseline))
        if not args.no_diagnostics:
            # One module of each shape family; an SVD of a formed 8192 x 2048 dW takes tens of seconds.
            mods = ("q_proj", "k_proj") if args.quick else ("q_proj", "k_proj", "down_proj")
            d = bench_diagnostics(models[0], 16 if 16 in ranks else ranks[0], device, 3, mods)
            diag = d if device == "cpu" else diag
        if device.startswith("cuda") or args.train_step:
            torch.set_grad_enabled(True)
            m = models[0]
            batch, seq = (4, 1024) if device.startswith("cuda") else (1, 64)
            try:
                training_step_comparison(m, 16, device, batch, seq, reps=5 if device.startswith("cuda") else 2)
            except (RuntimeError, ValueError) as e:  # e.g. out of memory: say so, keep the rest
                print(f"\n(training-step comparison on {device} failed: {type(e).__name__}: {e})")
            torch.set_grad_enabled(False)
    print_summary(rows, diag, not args.no_baseline, whole)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
