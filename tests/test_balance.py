"""balance_ on live PEFT models. References are PEFT's own: get_delta_weight per layer and adapter,
merge_and_unload weights and model outputs before vs after; balance is measured by numpy on the
parameters. Then the pitfalls: zero init, rank-deficient products, half precision, NaN/Inf,
failing decompositions, and a transformers LM trained with AdamW."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

import balora.balance
from balora import BalanceError, balance_, layer_report
from balora.balance import balance_pairs

METHODS = ("nearest", "svd")
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc", "wte"]


def _merged(model):
    """PEFT's merged weights of a copy of the model (the model itself keeps its adapters)."""
    with torch.no_grad():
        merged = copy.deepcopy(model).merge_and_unload()
    return {k: v.detach().double().clone() for k, v in merged.state_dict().items()}


def _assert_close_rel(before, after, rtol, what):
    for key in before:
        err = (after[key] - before[key]).norm().item()
        assert err <= rtol * before[key].norm().item(), f"{what} {key} changed by {err:.2e}"


def _tiny_net_model(make_tiny_net, targets, variant):
    cfg = dict(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    if variant == "dora":
        cfg["use_dora"] = True
    elif variant == "rslora_patterns":
        cfg.update(r=3, use_rslora=True, rank_pattern={"conv2d": 2, "lin": 1}, alpha_pattern={"emb": 7})
    return get_peft_model(make_tiny_net(), LoraConfig(**cfg))


@pytest.fixture
def build(make_tiny_net, tiny_net_targets, tiny_net_inputs, make_gpt2, lm_batch):
    """build(variant) -> (model in eval mode, a function returning its output on a fixed batch)."""

    def make(variant):
        if variant == "gpt2":
            model = get_peft_model(make_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=GPT2_TARGETS,
                                                           fan_in_fan_out=True, init_lora_weights=False))
            run = lambda: model(lm_batch).logits  # noqa: E731
        else:
            model = _tiny_net_model(make_tiny_net, tiny_net_targets, variant)
            run = lambda: model(*tiny_net_inputs)  # noqa: E731
        model.eval()  # dropout off: outputs must be comparable
        return model, run

    return make


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("variant", ["plain", "dora", "rslora_patterns", "gpt2"])
def test_balance_keeps_every_peft_quantity(np_rel_imbalance, variant, method, build, peft_deltas, assert_deltas_close, lora_factors):
    model, run = build(variant)
    with torch.no_grad():
        out_before = run().double()
    deltas_before, merged_before = peft_deltas(model), _merged(model)
    before_factors = lora_factors(model)
    assert min(np_rel_imbalance(A, B) for A, B in before_factors.values()) > 0.05, "test needs imbalanced inputs"

    summary = balance_(model, method=method)

    assert summary.balanced == len(before_factors) and not summary.skipped and not summary.rank_deficient
    assert summary.max_rel_error < 1e-5 and summary.max_rel_imbalance < 1e-5
    assert_deltas_close(deltas_before, peft_deltas(model), rtol=1e-5)
    _assert_close_rel(merged_before, _merged(model), 1e-5, "merged weight")
    with torch.no_grad():
        out_after = run().double()
    assert (out_after - out_before).norm() <= 1e-5 * out_before.norm()
    for key, (A, B) in lora_factors(model).items():
        assert np_rel_imbalance(A, B) < 1e-5, key
        assert np.abs(A - before_factors[key][0]).max() > 1e-3, f"{key} was not changed at all"
    report = layer_report(model)
    assert len(report) == len(before_factors) and float(report["rel_imbalance"].max()) < 1e-5


def test_two_adapters(np_rel_imbalance, make_tiny_net, tiny_net_targets, peft_deltas, assert_deltas_close, lora_factors, snapshot):
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets, init_lora_weights=False),
                           adapter_name="first")
    model.add_adapter("x", LoraConfig(r=3, lora_alpha=5, target_modules=["lin", "conv2d"], init_lora_weights=False))
    deltas = peft_deltas(model)

    # adapter="x": only x moves; "first" stays bit-identical.
    before = snapshot(model)
    summary = balance_(model, adapter="x")
    assert summary.balanced == 2
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".x." in k or k.endswith(".x") for k in changed), changed
    for key, (A, B) in lora_factors(model).items():
        assert (np_rel_imbalance(A, B) < 1e-5) == (key[1] == "x"), key

    # adapter=None: both.
    summary = balance_(model)
    assert summary.balanced == 5 + 2
    assert all(np_rel_imbalance(A, B) < 1e-5 for A, B in lora_factors(model).values())
    assert_deltas_close(deltas, peft_deltas(model), rtol=1e-5)
    with pytest.raises(ValueError, match="no LoRA layers with adapter 'nope'"):
        balance_(model, adapter="nope")


def _loss(model, inputs, target):
    return (model(*inputs) - target).square().mean()


def test_peft_default_init_is_left_alone_and_training_starts(np_rel_imbalance, make_tiny_net, tiny_net_targets, tiny_net_inputs,
                                                             snapshot, assert_bit_identical, lora_factors):
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, lora_alpha=4, target_modules=tiny_net_targets))
    before = snapshot(model)
    summary = balance_(model)
    assert summary.balanced == 0 and len(summary.skipped) == 5
    assert all("zero product" in why for why in summary.skipped.values())
    assert_bit_identical(before, snapshot(model))

    # A reachable target: the same base net with a random (nonzero) adapter of the same rank.
    teacher = get_peft_model(make_tiny_net(), LoraConfig(r=2, lora_alpha=4, target_modules=tiny_net_targets,
                                                         init_lora_weights=False))
    with torch.no_grad():
        target = teacher(*tiny_net_inputs)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for step in range(6):
        loss = (model(*tiny_net_inputs) - target).square().mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        summary = balance_(model)
        # Adam's first step from B = 0 can leave a product of rank < r (skipped by default);
        # after that every pair has a full-rank product and is balanced.
        assert all("rank-deficient" in why for why in summary.skipped.values()), summary
        if step > 0:
            assert summary.balanced == 5, summary
            assert all(np_rel_imbalance(A, B) < 1e-5 for A, B in lora_factors(model).values())
    assert losses[-1] < 0.5 * losses[0], losses


def _make_rank_deficient(model, module="lin"):
    """Overwrite one layer's B with a rank-1 matrix: rank(B A) = 1 < r."""
    layer = dict(model.named_modules())[f"base_model.model.{module}"]
    B = layer.lora_B["default"].weight
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        B.copy_(torch.randn(B.shape[0], 1, generator=g) @ torch.randn(1, B.shape[1], generator=g))
    return f"{module}[default]"


@pytest.fixture
def four_rank_model(make_tiny_net, tiny_net_targets):
    return get_peft_model(make_tiny_net(), LoraConfig(r=3, target_modules=tiny_net_targets, init_lora_weights=False))


def test_rank_deficient_skip(np_rel_imbalance, four_rank_model, snapshot, assert_bit_identical, lora_factors):
    model = four_rank_model
    name = _make_rank_deficient(model)
    before = snapshot(model)
    summary = balance_(model)  # default policy: skip
    assert summary.rank_deficient == {name: 1}
    assert "rank-deficient" in summary.skipped[name] and "2 dead direction" in summary.skipped[name]
    assert summary.balanced == 4
    after = snapshot(model)
    lin_keys = [k for k in before if ".lin.lora_" in k]
    assert lin_keys
    assert_bit_identical({k: before[k] for k in lin_keys}, {k: after[k] for k in lin_keys})
    for key, (A, B) in lora_factors(model).items():
        assert (np_rel_imbalance(A, B) < 1e-5) == (key[0] != "base_model.model.lin"), key


def test_rank_deficient_balance(np_rel_imbalance, four_rank_model, peft_deltas, assert_deltas_close, lora_factors):
    model = four_rank_model
    name = _make_rank_deficient(model)
    deltas = peft_deltas(model)
    summary = balance_(model, on_rank_deficient="balance")
    assert summary.rank_deficient == {name: 1} and name not in summary.skipped and summary.balanced == 5
    assert_deltas_close(deltas, peft_deltas(model), rtol=1e-5)
    assert all(np_rel_imbalance(A, B) < 1e-5 for A, B in lora_factors(model).values())


def test_rank_deficient_bf16_pair_still_reported_once_balanced(four_rank_model):
    # A bf16 pair balanced to its rounding is left as it is, but a numerically rank-deficient one must
    # still be reported and follow the policy (identity maps had hidden it at full rank). Balanced in
    # fp32, then the last direction of A and of B scaled by 1e-4 (still balanced: both Grams scale the
    # same way; the product's last singular value 1e-8 of the first), then stored in bf16.
    model = four_rank_model
    balance_(model)
    layer = dict(model.named_modules())["base_model.model.lin"]
    with torch.no_grad():
        layer.lora_A["default"].weight[-1] *= 1e-4
        layer.lora_B["default"].weight[:, -1] *= 1e-4
    model.to(torch.bfloat16)
    summary = balance_(model)
    assert summary.rank_deficient == {"lin[default]": 2} and "lin[default]" in summary.skipped
    with pytest.raises(BalanceError, match=re.escape("lin[default]")):
        balance_(model, on_rank_deficient="raise")


def test_rank_deficient_raise(four_rank_model, snapshot, assert_bit_identical):
    model = four_rank_model
    _make_rank_deficient(model)
    before = snapshot(model)
    with pytest.raises(BalanceError, match=r"lin\[default\] \(rank 1 < r=3\)"):
        balance_(model, on_rank_deficient="raise")
    assert_bit_identical(before, snapshot(model))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_adapters_are_balanced(np_rel_imbalance, dtype, make_tiny_net, tiny_net_targets, peft_deltas, lora_factors):
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets,
                                                       init_lora_weights=False)).to(dtype)
    # The reference: the same factors in fp32, balanced, then rounded to the adapter dtype.
    ref_model = copy.deepcopy(model).float()
    balance_(ref_model)
    deltas = peft_deltas(model)
    summary = balance_(model)
    assert summary.balanced == 5 and not summary.skipped, "half precision must be balanced, never skipped"
    unit_roundoff = torch.finfo(dtype).eps / 2
    assert summary.max_rel_error < 8 * unit_roundoff
    ref = dict(ref_model.named_parameters())
    for name, param in model.named_parameters():
        assert param.dtype == dtype
        if "lora_" in name:
            assert torch.equal(param, ref[name].to(dtype)), f"{name}: not fp32 balancing rounded to {dtype}"
    after = peft_deltas(model)
    for key, dW in deltas.items():
        assert (after[key] - dW).norm() <= 8 * unit_roundoff * dW.norm(), key
    for key, (A, B) in lora_factors(model).items():
        assert np_rel_imbalance(A, B) < 8 * unit_roundoff, key


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pairs_already_balanced_are_left_bit_for_bit(np_rel_imbalance, method, dtype, make_tiny_net,
                                                                     tiny_net_targets, snapshot, assert_bit_identical,
                                                                     lora_factors):
    # A pass over a pair balanced to within its storage rounding would only re-round it, and pass
    # after pass dW would random-walk (by ~2e-2 over 100 bf16 "svd" passes before this rule).
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets,
                                                       init_lora_weights=False)).to(dtype)
    balance_(model, method=method)
    once = snapshot(model)
    for check in (False, True, False):
        summary = balance_(model, method=method, check=check)
        assert summary.balanced == 5 and not summary.skipped
    assert_bit_identical(once, snapshot(model))
    # An imbalance well above the rounding is still balanced: B * 2, A / 2 (exact in binary).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if re.search(r"lora_(embedding_)?B", name):
                param.mul_(2)
            elif re.search(r"lora_(embedding_)?A", name):
                param.div_(2)
    assert all(np_rel_imbalance(A, B) > 0.5 for A, B in lora_factors(model).values())
    balance_(model, method=method)
    unit_roundoff = torch.finfo(dtype).eps / 2
    for key, (A, B) in lora_factors(model).items():
        assert np_rel_imbalance(A, B) < 8 * unit_roundoff, key


@pytest.mark.parametrize("threads", [1, 2])  # pair by pair (one thread) and stacked
def test_bf16_summary_measures_the_factors_as_written(threads, np_rel_imbalance, np_product_error, make_tiny_net,
                                                      tiny_net_targets, lora_factors):
    # The summary says "after casting back": on one thread a bf16 pass reported its fp32 result
    # (~1e-7) while the written pairs had moved dW by ~2e-3.
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets,
                                                       init_lora_weights=False)).to(torch.bfloat16)
    before = lora_factors(model)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        summary = balance_(model)
    finally:
        torch.set_num_threads(previous)
    after = lora_factors(model)
    error = max(np_product_error(*before[k], *after[k]) for k in before)
    imbalance = max(np_rel_imbalance(*after[k]) for k in after)
    assert summary.max_rel_error == pytest.approx(error, rel=1e-3)
    assert summary.max_rel_imbalance == pytest.approx(imbalance, rel=1e-3)


def test_float64_summary_measures_in_float64(np_rel_imbalance, make_tiny_net, tiny_net_targets, lora_factors):
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets,
                                                       init_lora_weights=False)).to(torch.float64)
    summary = balance_(model)
    true = max(np_rel_imbalance(A, B) for A, B in lora_factors(model).values())
    assert true < 1e-13 and summary.max_rel_imbalance < 1e-13  # was measured after a cast to fp32: ~1e-8


def test_factors_on_the_meta_device_are_skipped_with_the_reason(make_tiny_net, tiny_net_targets):
    with torch.device("meta"):
        model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets))
    summary = balance_(model)
    assert summary.balanced == 0 and len(summary.skipped) == 5
    assert all("meta device (not loaded yet)" in why for why in summary.skipped.values())
    assert layer_report(model).empty


def test_layer_report_refuses_an_adapter_name_the_model_lacks(make_tiny_net, tiny_net_targets):
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets))
    assert len(layer_report(model, adapter="default")) == 5
    with pytest.raises(ValueError, match="no LoRA layers with adapter 'nope'"):
        layer_report(model, adapter="nope")


def test_a_model_without_lora_layers_warns(make_tiny_net):
    with pytest.warns(UserWarning, match="TinyNet has no PEFT LoRA layers, nothing to balance"):
        summary = balance_(make_tiny_net())
    assert summary.balanced == 0 and not summary.skipped


def test_layer_report_of_a_model_without_lora_layers_warns(make_tiny_net, tiny_net_targets):
    # After merge_and_unload (or on a plain module) the report was an empty frame and nothing more.
    merged = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets)).merge_and_unload()
    with pytest.warns(UserWarning, match="TinyNet has no PEFT LoRA layers, nothing to balance or report"):
        report = layer_report(merged)
    assert report.empty and list(report.columns) == list(layer_report(
        get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets))).columns)


def _poison(model, module="conv2d", value=float("nan")):
    layer = dict(model.named_modules())[f"base_model.model.{module}"]
    with torch.no_grad():
        layer.lora_A["default"].weight[0, 0, 0, 0] = value
    return f"{module}[default]"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_raises_and_writes_nothing(value, make_tiny_net, tiny_net_targets, snapshot, assert_bit_identical):
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets, init_lora_weights=False))
    name = _poison(model, value=value)
    before = snapshot(model)
    with pytest.raises(BalanceError, match=re.escape(name) + ".*on_nonfinite='skip'"):
        balance_(model)
    assert_bit_identical(before, snapshot(model))


def test_nonfinite_skip_only_that_module(np_rel_imbalance, make_tiny_net, tiny_net_targets, snapshot, assert_bit_identical, lora_factors):
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets, init_lora_weights=False))
    name = _poison(model)
    before = snapshot(model)
    summary = balance_(model, on_nonfinite="skip")
    assert summary.balanced == 4 and set(summary.skipped) == {name} and "non-finite" in summary.skipped[name]
    after = snapshot(model)
    conv_keys = [k for k in before if ".conv2d.lora_" in k]
    assert_bit_identical({k: before[k] for k in conv_keys}, {k: after[k] for k in conv_keys})
    for key, (A, B) in lora_factors(model).items():
        if key[0] != "base_model.model.conv2d":
            assert np_rel_imbalance(A, B) < 1e-5, key


def test_failed_decomposition_names_the_module(make_tiny_net, tiny_net_targets, snapshot, assert_bit_identical,
                                               monkeypatch):
    # Two layers of one shape, so they share a batched call and the culprit must be singled out.
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets, init_lora_weights=False))
    model.add_adapter("twin", LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
    marker = 1234.5
    with torch.no_grad():
        model.base_model.model.lin.lora_A["twin"].weight[0, 0] = marker
    real = balora.balance.balanced_factors

    def flaky(A, B, method="nearest", *args, **kwargs):
        if bool((A[:, 0, 0] == marker).any()):
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(A, B, method, *args, **kwargs)

    monkeypatch.setattr(balora.balance, "balanced_factors", flaky)
    before = snapshot(model)
    with pytest.raises(BalanceError, match=r"lin\[twin\]: the balancing decomposition failed"):
        balance_(model)
    assert_bit_identical(before, snapshot(model))


def test_failing_decomposition_gives_balance_error(make_tiny_net, tiny_net_targets, snapshot, assert_bit_identical,
                                         monkeypatch):
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("The algorithm failed to converge")

    # Every r x r decomposition either path uses (the Gram path's eigh, the QR path's SVD).
    monkeypatch.setattr(torch.linalg, "svd", broken)
    monkeypatch.setattr(torch.linalg, "eigh", broken)
    before = snapshot(model)
    with pytest.raises(BalanceError, match=r"lin\[default\]"):
        balance_(model)
    assert_bit_identical(before, snapshot(model))


def test_balance_pairs_policies_are_validated():
    for kwargs in ({"method": "qr"}, {"on_rank_deficient": "ignore"}, {"on_nonfinite": "zero"}):
        with pytest.raises(ValueError):
            balance_pairs([], **kwargs)
    out, summary = balance_pairs([])
    assert out == {} and summary.balanced == 0


def test_r_larger_than_layer_is_skipped(make_tiny_net, snapshot, assert_bit_identical):
    # conv1x1 has 8 -> 6 channels: r = 7 cannot give a rank-7 product, a rank-deficient case like any
    # other (under "skip", the default; the other policies: tests/test_peft_variants.py).
    model = get_peft_model(make_tiny_net(), LoraConfig(r=7, target_modules=["conv1x1"], init_lora_weights=False))
    before = snapshot(model)
    summary = balance_(model)
    assert "rank-deficient product (rank 6 < r=7)" in summary.skipped["conv1x1[default]"]
    assert summary.rank_deficient == {"conv1x1[default]": 6}
    assert_bit_identical(before, snapshot(model))


def test_llama_trained_with_adamw_then_balanced(make_llama, peft_deltas, assert_deltas_close):
    """The realistic case: a transformers LM, LoRA on every linear layer and the embedding,
    PEFT's default init, a few AdamW steps without balancing, then one balance_."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]
    model = get_peft_model(make_llama(n_layer=1), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (4, 12), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    report = layer_report(model)
    assert len(report) == 7 + 2
    assert float(report["rel_imbalance"].min()) > 0.1, "Adam from B = 0 leaves the layers imbalanced"
    deltas = peft_deltas(model)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()

    summary = balance_(model)

    assert summary.balanced == len(report) and not summary.skipped, summary
    report = layer_report(model)
    assert float(report["rel_imbalance"].max()) < 1e-4
    assert_deltas_close(deltas, peft_deltas(model), rtol=1e-5)
    with torch.no_grad():
        assert (model(input_ids=ids).logits.double() - logits).norm() <= 1e-5 * logits.norm()


def test_a_model_made_under_inference_mode_is_balanced_whole(np_rel_imbalance, make_tiny_net, tiny_net_targets,
                                                              peft_deltas, assert_deltas_close, lora_factors):
    # Built (or loaded) inside `with torch.inference_mode():`, then balanced outside it: torch writes an
    # inference tensor in place and only then refuses the version bump, so the first pair's A was
    # rewritten, its B not (dW moved by ~90%), and the error was torch's own.
    with torch.inference_mode():
        model = get_peft_model(make_tiny_net(), LoraConfig(r=2, lora_alpha=4, target_modules=tiny_net_targets,
                                                           init_lora_weights=False))
    before = peft_deltas(model)
    summary = balance_(model)
    assert summary.balanced == 5
    assert_deltas_close(before, peft_deltas(model))
    assert max(np_rel_imbalance(A, B) for A, B in lora_factors(model).values()) < 1e-5


@pytest.mark.parametrize("given, hint", [("path/to/adapter", "balora.balance_file"), ({}, "a state dict")])
def test_something_other_than_a_model_is_refused_in_one_line(make_tiny_net, tiny_net_targets, given, hint):
    # A path (an adapter on disk) or model.state_dict() failed deep inside: "cannot create weak reference
    # to 'str' object", "unhashable type: 'dict'", "'str' object has no attribute '_modules'".
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets))
    optimizer = torch.optim.Adam(model.parameters())
    calls = {"balance_": lambda: balance_(given), "layer_report": lambda: layer_report(given),
             "balance_after_step": lambda: balora.balance_after_step(optimizer, given)}
    for who, call in calls.items():
        with pytest.raises(TypeError, match=rf"^{who}: expects a PEFT model \(torch.nn.Module\); got "
                                            rf"{type(given).__name__}\b.*{re.escape(hint)}"):
            call()


def test_balance_pairs_of_a_model_is_refused_in_one_line(make_tiny_net, tiny_net_targets):
    # balance_pairs(model) raised "'PeftModel' object is not iterable": it takes the pairs, balance_ the model.
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets))
    with pytest.raises(TypeError, match=r"^balance_pairs: expects a list of FactorPair.*got PeftModel.*balora.balance_\(model\)"):
        balora.balance_pairs(model)
    with pytest.raises(TypeError, match=r"^balance_pairs: expects a list of FactorPair.*got Tensor"):
        balora.balance_pairs(torch.zeros(2, 2))
    # A path as text or a state dict iterated into strings: "'str' object has no attribute 'skip_reason'".
    for given in ("adapter_model.safetensors", model.state_dict()):
        with pytest.raises(TypeError, match=rf"^balance_pairs: expects a list of FactorPair.*got {type(given).__name__}"):
            balora.balance_pairs(given)
