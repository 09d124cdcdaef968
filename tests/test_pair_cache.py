"""PairCache: the training hooks and balance_ walk the model once, and walk again exactly when
the pairs they hold could be stale (another dtype or device, a new adapter, another model, a
module or parameter put in another's place)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from peft import LoraConfig, get_peft_model
from transformers import TrainerControl, TrainerState

import balora.adapters.live as live
from balora import BalanceCallback, balance_after_step
from balora import balance_
from balora.adapters.pair_cache import PairCache, forget
from balora.balance import balance_and_write


@pytest.fixture
def counted_walks(monkeypatch):
    walks = []
    real = live._walk_pairs

    def counting(model, adapter=None, parents=None):
        walks.append(adapter)
        return real(model, adapter, parents)

    monkeypatch.setattr(live, "_walk_pairs", counting)
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


def test_balance_of_a_wrapped_model_sees_an_adapter_added_since(np_rel_imbalance, lora_tiny, tiny_net_targets,
                                                                lora_factors, peft_deltas, assert_deltas_close):
    # DataParallel (as DDP) holds the PeftModel in .module: its peft_config was not read through the
    # wrapper, so balance_ kept its first walk and left the new adapter's pairs out.
    model = lora_tiny()
    wrapped = nn.DataParallel(model)
    balance_(wrapped)
    model.add_adapter("second", LoraConfig(r=3, target_modules=tiny_net_targets, init_lora_weights=False))
    _unbalance(model)
    before = peft_deltas(model)
    assert max(np_rel_imbalance(A, B) for A, B in lora_factors(model).values()) > 1e-2
    balance_(wrapped)
    assert {adapter for _, adapter in lora_factors(model)} == {"default", "second"}
    assert all(np_rel_imbalance(A, B) < 1e-5 for A, B in lora_factors(model).values())
    assert_deltas_close(peft_deltas(model), before, rtol=1e-5)


def test_walks_again_when_parameters_are_replaced_and_balances_the_new_ones(np_rel_imbalance, lora_tiny,
                                                                             counted_walks, lora_factors):
    # load_state_dict(assign=True) puts new Parameter objects in the layers (as fully_shard does):
    # the cached pairs would go on balancing tensors the model no longer uses.
    model, cache = lora_tiny(), PairCache()
    balance_and_write(cache.get(model), check=False)
    lora_state = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    model.load_state_dict(lora_state, strict=False, assign=True)
    _unbalance(model)
    assert max(np_rel_imbalance(A, B) for A, B in lora_factors(model).values()) > 1e-2
    balance_and_write(cache.get(model), check=False)
    assert len(counted_walks) == 2
    assert all(np_rel_imbalance(A, B) < 1e-5 for A, B in lora_factors(model).values())


def test_walks_again_when_a_module_is_replaced_or_the_lora_layers_removed(lora_tiny, counted_walks):
    model, cache = lora_tiny(), PairCache()
    n = len(cache.get(model))
    layer = next(m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    old = layer.lora_A["default"]
    layer.lora_A["default"] = nn.Linear(old.in_features, old.out_features, bias=False)
    fresh = cache.get(model)
    assert len(counted_walks) == 2 and len(fresh) == n
    assert any(p.extra["params"][0] is layer.lora_A["default"].weight for p in fresh)
    model.merge_and_unload()  # the LoRA layers leave the tree; peft_config still names the adapter
    assert cache.get(model) == [] and len(counted_walks) == 3


def test_a_model_without_lora_layers_is_walked_again(make_tiny_net, counted_walks):
    # An empty walk leaves no link to check: a LoRA layer put in by hand (no peft_config) must be found.
    from peft.tuners.lora import Linear as LoraLinear

    model = make_tiny_net()
    assert balance_(model).balanced == 0
    config = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False)
    model.lin = LoraLinear(model.lin, "default", config, r=2, lora_alpha=2, init_lora_weights=False)
    assert not hasattr(model, "peft_config")
    assert balance_(model).balanced == 1 and len(counted_walks) == 2


def test_balance_keeps_its_walk_while_the_model_lives(np_rel_imbalance, lora_tiny, counted_walks, lora_factors):
    model = lora_tiny()
    for _ in range(3):
        _unbalance(model)
        assert balance_(model, check=False).balanced > 0
        assert all(np_rel_imbalance(A, B) < 1e-5 for A, B in lora_factors(model).values())
    assert len(counted_walks) == 1
    model.double()
    _unbalance(model)
    balance_(model, check=False)
    assert all(np_rel_imbalance(A, B) < 1e-10 for A, B in lora_factors(model).values())
    forget(model)
    balance_(model, check=False)
    assert len(counted_walks) == 3
    for _ in range(2):  # one kept walk per adapter name asked for
        balance_(model, "default", check=False)
        balance_(model, check=False)
    assert counted_walks[3:] == ["default"]
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None  # the cache holds the model's modules weakly


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
    # registering walks once to refuse FSDP1 / DeepSpeed before any training step (no pairs kept from it)
    assert len(counted_walks) == 2
    for _ in range(3):
        opt.zero_grad()
        model(*tiny_net_inputs).square().mean().backward()
        opt.step()
        assert all(np_rel_imbalance(A, B) < 1e-5 for A, B in lora_factors(model).values())
    handle.remove()
    assert len(counted_walks) == 3  # the steps' pairs: walked at the first step, kept for the others


def test_balance_after_step_rejects_unknown_options(lora_tiny):
    model = lora_tiny()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(TypeError, match="on_nan"):
        balance_after_step(opt, model, on_nan="skip")


def test_a_tied_pair_whose_owner_is_skipped_is_left_alone_too():
    """ensure_weight_tying with an embedding that has max_norm: the embedding pair is skipped (PEFT renormalises
    A's columns in its forward), and the tied lm_head pair, whose factors are the same tensors, was balanced,
    rewriting the skipped embedding's factors after all and changing the model's output."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=16, tie_word_embeddings=True)
    base = LlamaForCausalLM(cfg)
    base.model.embed_tokens.max_norm = 1.0
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["embed_tokens", "lm_head"], ensure_weight_tying=True))
    emb, head = model.base_model.model.model.embed_tokens, model.base_model.model.lm_head
    assert head.lora_A["default"].weight.data_ptr() == emb.lora_embedding_B["default"].data_ptr()  # PEFT's tie
    before = [p.detach().clone() for n, p in model.named_parameters() if "lora_" in n]
    summary = balance_(model)
    assert summary.balanced == 0
    assert "max_norm" in summary.skipped["model.embed_tokens[default]"]
    assert "left alone" in summary.skipped["lm_head[default]"]
    after = [p.detach() for n, p in model.named_parameters() if "lora_" in n]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_tied_pairs_are_all_left_alone_when_a_later_one_is_skipped():
    """The walk meets tied pairs in module order; the skipped one may come second (a head before its embedding)."""
    from balora.adapters.pair_cache import _skip_tied
    from balora.pairs import FactorPair

    A, B = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(8, 4))
    head = FactorPair("head", "default", "linear", B.detach().T, A.detach().T, 1.0, extra={"params": (B, A)})
    emb = FactorPair("emb", "default", "embedding", A.detach(), B.detach(), 1.0, skip_reason="Embedding with max_norm",
                     extra={"params": (A, B)})
    other = FactorPair("q", "default", "linear", torch.randn(4, 8), torch.randn(8, 4), 1.0,
                       extra={"params": (nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(8, 4)))})
    _skip_tied([head, emb, other])
    assert "left alone" in head.skip_reason and "emb" in head.skip_reason
    assert emb.skip_reason == "Embedding with max_norm" and other.skip_reason is None
