"""Balancing and diagnostics inside training loops: a transformers callback and an optimizer hook."""

from __future__ import annotations

import numbers
import warnings

import torch
from torch import nn
from transformers import TrainerCallback

from balora.adapters.live import peft_configs, require_model
from balora.adapters.pair_cache import PairCache
from balora.balance import BalanceSummary
from balora.distributed import DEEPSPEED_OPTIMIZERS, DEEPSPEED_WHY, FSDP2_HINT
from balora.policy import BalancePolicy
from balora.report import layer_report, summarize
from balora.sharded_step import balance_step
from balora.timing import model_device, synced_clock


def _warn_4bit_repacking(model) -> None:
    """Warn when an eval would stop training: on a CPU with AVX512-BF16, bitsandbytes' Linear4bit repacks its
    weight for inference at its first eval-mode, no-grad forward, into a kernel with no backward; after
    that no LoRA factor below it gets a gradient, and balancing factors that no longer train hides nothing."""
    if isinstance(model, nn.Module) and any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules()):
        warnings.warn("balora: this model's bitsandbytes 4-bit layers stop training after the first evaluation on "
                      "this CPU (bitsandbytes repacks them for inference, with no backward); call "
                      "balora.tasks.model_setup.keep_4bit_trainable(model) before training", stacklevel=2)


class BalanceCallback(TrainerCallback):
    """Balance every LoRA pair right after each optimizer step, and log diagnostics.

        trainer = Trainer(model=peft_model, ..., callbacks=[BalanceCallback()])

    every: balance every `every` optimizer steps.
    start_step: first optimizer step (1-based) after which balancing happens.
    method: "nearest" (default; keeps Adam's moments pointing the same way) or "svd" (the paper's).
    balance: False to only log diagnostics (plain LoRA with balora's measurements).
    log_layers: also log per-layer rel_imbalance as balora/rel_imbalance/<module>[<adapter>].
    skip_frozen: leave alone every pair with a factor whose requires_grad is False (LoRA-FA's
    fixed A, an adapter loaded with is_trainable=False or inactive), listed in last_summary.skipped
    and warned about once; False balances them too, as balance_ does.
    A step that the Trainer's GradScaler skips (fp16, inf/NaN gradients) changed no factor and gets no pass.
    Diagnostics are added to the Trainer's logs on every logging step, so `report_to`
    integrations (TensorBoard, W&B) show them when this callback runs before them:
    use `BalanceCallback(...).attach(trainer)` to put it first. The metrics `trainer.evaluate()` returns
    are left without them (hyperparameter_search's default objective sums those metrics).
    """

    def __init__(
        self,
        every: int = 1,
        start_step: int = 1,
        method: str = "nearest",
        adapter: str | None = None,
        *,
        balance: bool = True,
        on_rank_deficient: str = "skip",
        on_nonfinite: str = "raise",
        log_diagnostics: bool = True,
        log_layers: bool = False,
        skip_frozen: bool = True,
    ):
        _check_every("BalanceCallback", every)
        _check_every("BalanceCallback", start_step, "start_step")  # 1.5 never balanced; "2" raised mid-step
        self.every, self.start_step, self.method, self.adapter = every, start_step, method, adapter
        self.balance, self.on_rank_deficient, self.on_nonfinite = balance, on_rank_deficient, on_nonfinite
        # Validated here, once; every step then reuses it (balora.policy.PolicyError if bad).
        self.policy = BalancePolicy(method, on_rank_deficient, on_nonfinite, check=False)
        self.log_diagnostics, self.log_layers = log_diagnostics, log_layers
        self.balance_seconds = 0.0  # time spent balancing in this train() call, for the logs
        self.last_summary: BalanceSummary | None = None
        self._pairs = PairCache(skip_frozen)  # the model is walked once, not after every step
        self._logged: tuple[dict, tuple[str, ...]] | None = None  # the last logs dict and the keys added to it
        self._scale_before: float | None = None  # a GradScaler's scale before a step due to balance

    def attach(self, trainer) -> "BalanceCallback":
        """Register this callback ahead of the Trainer's reporting integrations (moved there when the
        Trainer already has it, e.g. from callbacks=[...]: listed twice, it would balance twice a step)."""
        callbacks = trainer.callback_handler.callbacks
        callbacks[:] = [self] + [c for c in callbacks if c is not self]
        return self

    def on_train_begin(self, args, state, control, **kwargs):
        # A callback given to a second Trainer (a sweep) or trained again starts its count anew: it went
        # on from the earlier run's total, in the logs and in a resumed RunRecorder's summary (counted twice).
        self.balance_seconds = 0.0
        # args.deepspeed (a config given to the Trainer), or args.deepspeed_plugin, which TrainingArguments
        # sets instead under `accelerate launch` with a DeepSpeed config (ACCELERATE_USE_DEEPSPEED).
        if self.balance and (getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None)):
            # Every ZeRO stage keeps the fp32 master weights inside the optimizer and copies them
            # into the model after each step: balancing the model's parameters would be undone
            # at the next step (ZeRO-3 also shards them). Refuse rather than pretend.
            raise RuntimeError(
                "BalanceCallback: DeepSpeed keeps its own copy of the weights in the optimizer, which would undo "
                f"balancing at the next step, so it is not supported; {FSDP2_HINT} (or use DDP), or pass "
                "balance=False for diagnostics only."
            )
        _check_adapter("BalanceCallback", kwargs.get("model"), self.adapter)
        if self.balance or self.log_diagnostics:
            _refuse_unsupported(kwargs.get("model"), self.adapter)
        if str(getattr(args, "eval_strategy", "no")) not in ("no", "IntervalStrategy.NO"):
            _warn_4bit_repacking(kwargs.get("model"))

    def _due(self, state) -> bool:
        step = state.global_step + 1  # global_step is incremented after on_optimizer_step
        return self.balance and step >= self.start_step and (step - self.start_step) % self.every == 0

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # fp16 on a GPU: accelerate's GradScaler skips steps with inf/NaN gradients, and the Trainer still calls
        # on_optimizer_step. Its update() lowers the scale exactly on those steps: remember the scale before.
        scaler = getattr(optimizer, "scaler", None)
        self._scale_before = scaler.get_scale() if scaler is not None and self._due(state) else None

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or not self._due(state):
            return
        before, self._scale_before = self._scale_before, None
        if before is not None and optimizer.scaler.get_scale() < before:
            return  # the scaler skipped this step (a fused optimizer's too): the factors did not change
        device = model_device(model)
        t0 = synced_clock(device)  # on a GPU, after the optimizer step's kernels: theirs are not balancing's
        pairs = self._pairs.get(model, self.adapter, gather=False)  # FSDP2: balance_step gathers what it needs
        self.last_summary = balance_step(pairs, self.policy)
        self.last_summary.seconds = synced_clock(device) - t0  # with the (usually cached) walk
        self.balance_seconds += self.last_summary.seconds

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not self.log_diagnostics or logs is None or model is None:
            return
        report = layer_report(model, self.adapter, precision=False)  # logs use none of the fp16/bf16 columns
        extra = summarize(report)
        extra["balora/balance_seconds"] = self.balance_seconds
        if self.balance and self._pairs.skip_frozen:  # the aggregates cover them too: say how many there are
            self._pairs.get(model, self.adapter, gather=False)  # walked afresh if the model changed
            if self._pairs.frozen:
                extra["balora/frozen_pairs"] = self._pairs.frozen
        if self.log_layers:
            for module, adapter, value in zip(report["module"], report["adapter"], report["rel_imbalance"]):
                extra[f"balora/rel_imbalance/{module}[{adapter}]"] = float(value)
        logs.update(extra)
        self._logged = (logs, tuple(extra))
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # evaluate() logs its metrics dict, then returns it: the diagnostics added for the integrations came
        # back with it, and hyperparameter_search's default objective (the sum of the metrics other than
        # eval_loss, when there are any) summed them. Every on_log has run by now; log_history has its copy.
        logged, self._logged = self._logged, None
        if logged is not None and logged[0] is metrics:
            for key in logged[1]:
                metrics.pop(key, None)


def balance_after_step(
    optimizer: torch.optim.Optimizer, model: nn.Module, method: str = "nearest", every: int = 1,
    steps_taken: int = 0, **kwargs
):
    """Hand-written loops: balance `model` after every `every`-th `optimizer.step()`.

        handle = balora.balance_after_step(optimizer, model)   # one line, before the loop
        ...
        handle.remove()                                        # to stop balancing

    Keyword arguments as for balance_ (adapter, on_rank_deficient, on_nonfinite, check), and
    skip_frozen (default True): pairs with a factor whose requires_grad is False are left alone, as
    BalanceCallback does (listed in last_summary.skipped, warned about once). The returned
    handle's `last_summary` is the latest pass's BalanceSummary (None before the first), as on
    BalanceCallback: with check=True, its max_rel_error and max_rel_imbalance are that pass's.
    A wrapper that keeps the real optimizer in `.optimizer` (accelerate's AcceleratedOptimizer) is
    hooked through it: the hook then runs only when that optimizer steps (with gradient
    accumulation, on sync steps; with a GradScaler, not on the steps it skips, a fused optimizer's included).
    steps_taken: optimizer steps run before this call, when a loop resumes: with every=k the passes
    stay after steps k, 2k, ... of the whole run (counted from 0, step 4 resumed with every=3 would
    balance after 7, 10, ...). With several optimizers, hook the one stepped last: hooked earlier,
    the pass runs between the steps, and the later optimizers apply gradients of the factors as they
    were before it.
    """
    _check_every("balance_after_step", every)
    if isinstance(steps_taken, bool) or not isinstance(steps_taken, numbers.Integral) or steps_taken < 0:
        raise ValueError(f"balance_after_step: steps_taken must be a whole number >= 0; got {steps_taken!r}")
    optimizer = _hookable(optimizer)
    require_model("balance_after_step", model)
    unknown = set(kwargs) - {"adapter", "on_rank_deficient", "on_nonfinite", "check", "skip_frozen"}
    if unknown:
        raise TypeError(f"balance_after_step: unknown option(s) {', '.join(sorted(unknown))}")
    adapter, skip_frozen = kwargs.pop("adapter", None), kwargs.pop("skip_frozen", True)
    _check_adapter("balance_after_step", model, adapter)
    _refuse_unsupported(model, adapter)
    policy = BalancePolicy(method, **{"check": False, **kwargs})  # validated once, here
    cache = PairCache(skip_frozen)  # the model is walked once, not after every step
    count = {"steps": int(steps_taken)}

    def hook(opt, args, kw):
        if _scaler_skipped(opt):
            return
        count["steps"] += 1
        if count["steps"] % every == 0:
            handle.last_summary = balance_step(cache.get(model, adapter, gather=False), policy)

    handle = optimizer.register_step_post_hook(hook)
    handle.last_summary = None  # else check=True would measure every pass and show it nowhere
    return handle


def _check_adapter(who: str, model, adapter: str | None) -> None:
    """Refuse an adapter name the model lacks before training: else it is refused only from inside the
    first optimizer step, after that step has changed the weights."""
    names = peft_configs(model) if model is not None else {}  # also under (Distributed)DataParallel
    if adapter is not None and names and adapter not in names:
        raise ValueError(f"{who}: the model has no adapter {adapter!r}; it has {', '.join(map(repr, names))}")


def _refuse_unsupported(model, adapter: str | None) -> None:
    """Refuse FSDP1, a DeepSpeed engine or ZeRO-3 parameters before training: the walk that finds them
    (no communication, FSDP2's shards stay shards) ran only inside the first balancing step, after that
    optimizer step, or after start_step - 1 steps of training. A model sharded later is refused then."""
    from balora.adapters.live import _walk_pairs

    if isinstance(model, nn.Module):
        _walk_pairs(model, adapter)


def _scaler_skipped(optimizer) -> bool:
    """Whether a GradScaler skipped the step that just ran. A fused optimizer (`_step_supports_amp_scaling`)
    is stepped even on inf/NaN gradients and skips the update itself, reading the `found_inf` that
    GradScaler.step sets on it for the duration of the step; other optimizers are not stepped at all."""
    found_inf = getattr(optimizer, "found_inf", None)
    return isinstance(found_inf, torch.Tensor) and bool(found_inf.item())


def _check_every(who: str, every, name: str = "every") -> None:
    # 1.5 was taken as it came: balanced at steps 1, 4, 7, ... (step % 1.5 == 0), no step count a user means
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise ValueError(f"{who}: {name} must be >= 1, a whole number of optimizer steps; got {every!r}")


def _hookable(optimizer):
    """The torch optimizer whose step hooks fire: `optimizer`, or the one it wraps."""
    seen = optimizer
    while True:
        if type(seen).__name__ in DEEPSPEED_OPTIMIZERS:
            raise RuntimeError(f"balance_after_step: {type(seen).__name__}: {DEEPSPEED_WHY}; {FSDP2_HINT}")
        if hasattr(seen, "_optimizer_step_post_hooks"):  # set by torch.optim.Optimizer.__init__
            return seen
        inner = getattr(seen, "optimizer", None)
        if inner is None or inner is seen:
            raise TypeError(f"balance_after_step: {type(optimizer).__name__} has no step hooks and wraps no "
                            "torch.optim.Optimizer in .optimizer; pass the torch optimizer that takes the steps")
        seen = inner
