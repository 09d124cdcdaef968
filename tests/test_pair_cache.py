"""PairCache: the training hooks walk the model once, and walk again exactly when the pairs
they hold could be stale (another dtype or device, a new adapter, another model)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainerControl, TrainerState

import balora.adapters.live as live
from balora import BalanceCallback, balance_after_step
from balora.adapters.live import PairCache
from balora.balance import balance_and_write


@pytest.fixture
def counted_walks(monkeypatch):
    walks = []
    real = live.iter_lora_pairs

    def counting(model, adapter=None):
        walks.append(adapter)
        return real(model, adapter)

    monkeypatch.setattr(live, "iter_lora_pairs", counting)
    return walks


@pytest.fixture
def lora_tiny(make_tiny_net, tiny_net_targets):
    def make(seed=0):
        return get_peft_model(make_tiny_net(seed), LoraConfig(r=2, target_modules=tiny_net_targets,
                                                              init_lora_weights=False))
    return make


def _unbalance(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_embedding_A" in name:
                p.mul_(1.5)


def test_walks_once_while_nothing_changes(np_rel_imbalance, lora_tiny, counted_walks, lora_factors):
    model, cache = lora_tiny(), PairCache()
    for _ in range(4):
        _unbalance(model)
        summary = balance_and_write(cache.get(model), check=False)
        assert summary.balanced > 0
        assert all(np_rel_imbalance(A, B) < 1e-5 for A, B in lora_factors(model).values())
    assert len(counted_walks) == 1


def test_walks_again_after_a_dtype_change_and_writes_into_the_new_parameters(np_rel_imbalance, lora_tiny, counted_walks,
                                                                              lora_factors, tiny_net_inputs):
    model, cache = lora_tiny(), PairCache()
    balance_and_write(cache.get(model), check=False)
    model.double()  # new storage for every parameter: the cached views would write into freed tensors
    _unbalance(model)
    ids, x1, x2 = tiny_net_inputs
    inputs = (ids, x1.double(), x2.double())
    before = model(*inputs).detach()
    balance_and_write(cache.get(model), check=False)
    assert len(counted_walks) == 2
    assert all(np_rel_imbalance(A, B) < 1e-10 for A, B in lora_factors(model).values())
    torch.testing.assert_close(model(*inputs), before, rtol=1e-9, atol=1e-9)


def test_walks_again_for_a_new_adapter_or_another_model(lora_tiny, counted_walks, tiny_net_targets):
    model, cache = lora_tiny(), PairCache()
    first = cache.get(model)
    model.add_adapter("second", LoraConfig(r=3, target_modules=tiny_net_targets, init_lora_weights=False))
    second = cache.get(model)
    assert {p.adapter for p in first} == {"default"} and {p.adapter for p in second} == {"default", "second"}
    assert cache.get(model, "second") and cache.get(lora_tiny(1))
    assert len(counted_walks) == 4
    with pytest.raises(ValueError, match="no LoRA layers with adapter 'missing'"):
        cache.get(model, "missing")


def test_training_hooks_walk_once(np_rel_imbalance, lora_tiny, counted_walks, tiny_net_inputs, lora_factors):
    model = lora_tiny()
    cb = BalanceCallback()
    for step in range(3):
        _unbalance(model)
        cb.on_optimizer_step(None, TrainerState(global_step=step), TrainerControl(), model=model)
        assert all(np_rel_imbalance(A, B) < 1e-5 for A, B in lora_factors(model).values())
    assert len(counted_walks) == 1

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    handle = balance_after_step(opt, model)
    for _ in range(3):
        opt.zero_grad()
        model(*tiny_net_inputs).square().mean().backward()
        opt.step()
        assert all(np_rel_imbalance(A, B) < 1e-5 for A, B in lora_factors(model).values())
    handle.remove()
    assert len(counted_walks) == 2


def test_balance_after_step_rejects_unknown_options(lora_tiny):
    model = lora_tiny()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(TypeError, match="on_nan"):
        balance_after_step(opt, model, on_nan="skip")
