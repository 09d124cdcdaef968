"""The training hooks leave LoRA factors the user froze as they are: LoRA-FA's fixed A (lora_A with
requires_grad=False, only lora_B trained) and an adapter that is not trained (loaded with
is_trainable=False, or frozen by hand) would otherwise be rewritten after every optimizer step.
balance_(model), called explicitly (often on inference models, where nothing requires grad),
still balances every pair."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from balora import BalanceCallback, balance_, balance_after_step

TARGETS = ["q_proj", "v_proj", "up_proj"]


@pytest.fixture
def lora_llama(make_llama):
    """Tiny Llama with random (nonzero) LoRA init: every pair clearly imbalanced from the start."""

    def make(seed=0):
        return get_peft_model(make_llama(seed=seed), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                 init_lora_weights=False))

    return make


def _freeze(model, part: str) -> dict[str, torch.Tensor]:
    """requires_grad=False on every LoRA parameter whose name holds `part`; their values, cloned."""
    frozen = {}
    for name, p in model.named_parameters():
        if "lora_" in name and part in name:
            p.requires_grad_(False)
            frozen[name] = p.detach().clone()
    assert frozen
    return frozen


def _assert_unchanged(model, frozen):
    params = dict(model.named_parameters())
    changed = [n for n, v in frozen.items() if not torch.equal(params[n].detach(), v)]
    assert not changed, f"frozen factors rewritten: {changed}"


def _pair_names(model, adapter):
    """module[adapter] of every LoRA layer, from PEFT's parameter names (not balora's walker)."""
    prefix = "base_model.model."
    return {n[len(prefix):].split(".lora_A.")[0] + f"[{adapter}]" for n, _ in model.named_parameters()
            if f".lora_A.{adapter}." in n}


def _frozen_warnings(caught):
    return [w for w in caught if "frozen factor" in str(w.message)]


def test_balance_after_step_leaves_lora_fa_s_fixed_A_alone(lora_llama, lm_batch):
    """LoRA-FA: only B trains. Nothing may be balanced, so the hooked run is bit-identical to one without the hook."""
    hooked, plain = lora_llama(), lora_llama()
    frozen = _freeze(hooked, "lora_A")
    _freeze(plain, "lora_A")
    runs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for model in (hooked, plain):
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            handle = balance_after_step(opt, model) if model is hooked else None
            for _ in range(3):
                model(input_ids=lm_batch, labels=lm_batch).loss.backward()
                opt.step()
                opt.zero_grad()
                _assert_unchanged(model, frozen)
            runs.append(handle)
    _assert_unchanged(hooked, frozen)
    plain_params = dict(plain.named_parameters())
    for name, p in hooked.named_parameters():
        assert torch.equal(p.detach(), plain_params[name].detach()), name
    summary = runs[0].last_summary
    assert summary.balanced == 0 and set(summary.skipped) == _pair_names(hooked, "default")
    assert all("frozen lora_A (requires_grad=False)" in why for why in summary.skipped.values())
    assert len(_frozen_warnings(caught)) == 1, "warned once, not after every step"


class _CheckAtStepEnd(TrainerCallback):
    """Registered after BalanceCallback: the frozen adapter untouched, the trained one balanced (float64
    numpy) with the dW the optimizer made (PEFT's own delta weights)."""

    def __init__(self, recorder, frozen, checks):
        self.recorder, self.frozen, self.checks, self.steps = recorder, frozen, checks, 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        peft_deltas, assert_close, lora_factors, rel = self.checks
        _assert_unchanged(model, self.frozen)
        assert_close(self.recorder.deltas, peft_deltas(model), rtol=1e-5)
        trained = [ab for (_, adapter), ab in lora_factors(model).items() if adapter == "default"]
        assert trained and max(rel(A, B) for A, B in trained) < 1e-5
        self.steps += 1


def test_trainer_leaves_a_frozen_second_adapter_alone(lora_llama, lm_batch, tmp_path, peft_deltas,
                                                      assert_deltas_close, lora_factors, np_rel_imbalance,
                                                      dw_after_optimizer):
    model = lora_llama()
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    frozen = _freeze(model, ".other.")  # as is_trainable=False loads it (PEFT also leaves inactive adapters so)
    assert max(np_rel_imbalance(A, B) for A, B in lora_factors(model).values()) > 0.05
    recorder = dw_after_optimizer
    checker = _CheckAtStepEnd(recorder, frozen, (peft_deltas, assert_deltas_close, lora_factors, np_rel_imbalance))
    balancer = BalanceCallback()
    data = [{"input_ids": ids, "labels": ids} for ids in torch.cat([lm_batch, lm_batch.flip(1)])]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             lr_scheduler_type="constant", report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True, seed=0, data_seed=0, logging_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[recorder, balancer, checker])
        trainer.train()
    assert checker.steps == 3
    # The logged aggregates cover the frozen pairs too; the logs say how many there are.
    logged = [h for h in trainer.state.log_history if "balora/rel_imbalance_max" in h]
    assert logged and all(h["balora/frozen_pairs"] == len(_pair_names(model, "other")) for h in logged)
    summary = balancer.last_summary
    assert set(summary.skipped) == _pair_names(model, "other")
    assert summary.balanced == len(_pair_names(model, "default"))
    assert all("frozen lora_A and lora_B (requires_grad=False)" in why for why in summary.skipped.values())
    assert len(_frozen_warnings(caught)) == 1


def test_freezing_or_unfreezing_between_passes_is_seen(lora_llama, lora_factors, np_rel_imbalance, np_product_error):
    """The skip decision is made once per walk; a requires_grad flipped since (requires_grad_, PEFT's
    set_adapter) makes the hook's cached pairs stale."""
    model, cb = lora_llama(), BalanceCallback()

    def hook_pass(step):
        cb.on_optimizer_step(None, TrainerState(global_step=step), TrainerControl(), model=model)
        return cb.last_summary

    assert hook_pass(0).balanced == 3 and not hook_pass(0).skipped
    with torch.no_grad():  # imbalanced again, as an optimizer step leaves the factors
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.mul_(1.5)
    frozen = _freeze(model, "q_proj")
    before = lora_factors(model)
    with pytest.warns(UserWarning, match="1 LoRA pair"):
        summary = hook_pass(1)
    assert set(summary.skipped) == {"model.layers.0.self_attn.q_proj[default]"} and summary.balanced == 2
    _assert_unchanged(model, frozen)
    after = lora_factors(model)
    for key, (A, B) in after.items():
        if "q_proj" not in key[0]:
            assert np_rel_imbalance(A, B) < 1e-5 and np_product_error(*before[key], A, B) < 1e-5
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(True)
    summary = hook_pass(2)
    assert summary.balanced == 3 and not summary.skipped
    q_proj = ("base_model.model.model.layers.0.self_attn.q_proj", "default")
    assert all(np_rel_imbalance(A, B) < 1e-5 for A, B in lora_factors(model).values())
    assert np_product_error(*before[q_proj], *lora_factors(model)[q_proj]) < 1e-5


def test_balance_and_skip_frozen_false_still_balance_frozen_factors(lora_llama, lora_factors, np_rel_imbalance,
                                                                    peft_deltas, assert_deltas_close):
    """balance_(model) is often called on inference models, where nothing requires grad: it balances
    everything; a hook given skip_frozen=False does too."""
    for how in ("balance_", "hook"):
        model = lora_llama()
        for p in model.parameters():
            p.requires_grad_(False)
        before = peft_deltas(model)
        if how == "balance_":
            summary = balance_(model)
        else:
            cb = BalanceCallback(skip_frozen=False)
            cb.on_optimizer_step(None, TrainerState(global_step=0), TrainerControl(), model=model)
            summary = cb.last_summary
        assert summary.balanced == 3 and not summary.skipped, how
        assert all(np_rel_imbalance(A, B) < 1e-5 for A, B in lora_factors(model).values())
        assert_deltas_close(before, peft_deltas(model), rtol=1e-5)
