"""PEFT's LoRA variants as its own tests build them (tests/test_custom_models.py: a small MLP, BD-LoRA,
VeLoRA, r larger than a layer): which ones balora balances, which it lists with a reason, and that
balancing keeps PEFT's own dW and the model's output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from balora import balance_, layer_report
from balora.adapters.live import iter_lora_pairs
from balora.balance import BalanceError

bd_config = pytest.importorskip("peft.tuners.lora.config")


class MLP(nn.Module):
    """lin0 (8 -> 8), lin1 (8 -> 4), lin2 (4 -> 2): lin2 is smaller than the rank used below."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(8, 8)
        self.lin1 = nn.Linear(8, 4)
        self.lin2 = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return get_peft_model(MLP(), cfg)


def _x():
    return torch.randn(16, 8, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("which", ["a", "b"])
def test_bdlora_is_skipped_with_its_own_reason(which, snapshot, assert_bit_identical):
    BdLoraConfig = getattr(bd_config, "BdLoraConfig", None)
    if BdLoraConfig is None:
        pytest.skip("this PEFT has no BD-LoRA")
    bd = BdLoraConfig(**{f"target_modules_bd_{which}": ["lin0"]}, nblocks=2, match_strict=False)
    model = _model(LoraConfig(r=4, target_modules=["lin0", "lin1"], use_bdlora=bd, init_lora_weights=False))
    pairs = {p.module: p for p in iter_lora_pairs(model)}
    reason = pairs["lin0"].skip_reason
    assert reason is not None and "block-diagonal" in reason and f"lora_{which.upper()}" in reason
    assert "FSDP" not in reason and "shard" not in reason
    assert pairs["lin1"].skip_reason is None  # a dense pair next to it is still balanced

    before = snapshot(model)
    summary = balance_(model)
    assert summary.balanced == 1 and set(summary.skipped) == {"lin0[default]"}
    assert "block-diagonal" in summary.skipped["lin0[default]"]
    after = snapshot(model)
    bd_keys = [k for k in before if ".lin0." in k]
    assert bd_keys
    assert_bit_identical({k: before[k] for k in bd_keys}, {k: after[k] for k in bd_keys})
    assert list(layer_report(model)["module"]) == ["lin1"]


@pytest.mark.parametrize("train", [True, False])
def test_velora_is_balanced_and_keeps_its_output(train, peft_deltas, assert_deltas_close):
    VeloraConfig = getattr(bd_config, "VeloraConfig", None)
    if VeloraConfig is None:
        pytest.skip("this PEFT has no VeLoRA")
    model = _model(LoraConfig(r=4, target_modules=["lin0", "lin1"], velora_config=VeloraConfig(num_groups=2),
                              init_lora_weights=False))
    assert {p.skip_reason for p in iter_lora_pairs(model)} == {None}
    model.train(train)
    x = _x()
    with torch.enable_grad():  # VeLoRA's own forward (VeloraFunction) runs in training with grad enabled
        y0 = model(x).detach().double()
    deltas = peft_deltas(model)
    summary = balance_(model)
    assert summary.balanced == 2 and not summary.skipped
    with torch.enable_grad():
        y1 = model(x).detach().double()
    assert_deltas_close(deltas, peft_deltas(model), rtol=1e-5)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5 * y0.abs().max().item())
    report = layer_report(model)
    assert report["rel_imbalance"].max() < 1e-5


def _wide_rank_model():
    # r = 4 > min(in=4, out=2) on lin2: the product has rank at most 2.
    return _model(LoraConfig(r=4, target_modules=["lin1", "lin2"], init_lora_weights=False))


def test_rank_larger_than_layer_skip_reports_it(snapshot, assert_bit_identical):
    model = _wide_rank_model()
    before = snapshot(model)
    summary = balance_(model, on_rank_deficient="skip")
    assert summary.rank_deficient == {"lin2[default]": 2}
    assert "rank-deficient" in summary.skipped["lin2[default]"] and summary.balanced == 1
    lin2 = {k: v for k, v in before.items() if ".lin2." in k}
    assert_bit_identical(lin2, {k: v for k, v in snapshot(model).items() if ".lin2." in k})


def test_rank_larger_than_layer_raise_names_the_module(snapshot, assert_bit_identical):
    model = _wide_rank_model()
    before = snapshot(model)
    with pytest.raises(BalanceError, match=r"lin2\[default\] \(rank 2 < r=4\)"):
        balance_(model, on_rank_deficient="raise")
    assert_bit_identical(before, snapshot(model))


@pytest.mark.parametrize("n_in,n_out", [(4, 2), (3, 8), (2, 3)])  # r = 4 above out, above in, above both
def test_rank_larger_than_layer_balance_keeps_dw_and_balances(n_in, n_out, peft_deltas, assert_deltas_close):
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(n_in, n_out)), LoraConfig(r=4, target_modules=["0"],
                                                                           init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model[0].lora_B["default"].weight.normal_()
    deltas = peft_deltas(model)
    summary = balance_(model, on_rank_deficient="balance")
    rank = min(n_in, n_out)
    assert summary.balanced == 1 and summary.rank_deficient == {"0[default]": rank} and not summary.skipped
    assert_deltas_close(deltas, peft_deltas(model), rtol=1e-5)
    layer = model.base_model.model[0]
    A = layer.lora_A["default"].weight.detach().double().numpy()  # (4, in)
    B = layer.lora_B["default"].weight.detach().double().numpy()  # (out, 4)
    BtB, AAt = B.T @ B, A @ A.T
    # Balanced in float64: B^T B = A A^T (both of rank min(in, out)), relative to their size.
    assert abs(BtB - AAt).max() <= 1e-5 * abs(AAt).max()
    assert np.linalg.matrix_rank(BtB, tol=1e-5 * abs(BtB).max()) == rank


def test_velora_trains_with_balancing_after_each_step():
    """VeLoRA's own backward (compressed activations) with balance_after_step: every step ends balanced."""
    from balora import balance_after_step

    VeloraConfig = getattr(bd_config, "VeloraConfig", None)
    if VeloraConfig is None:
        pytest.skip("this PEFT has no VeLoRA")
    model = _model(LoraConfig(r=4, target_modules=["lin0", "lin1"], velora_config=VeloraConfig(num_groups=2)))
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    handle = balance_after_step(opt, model)
    x, y = _x(), torch.randn(16, 2, generator=torch.Generator().manual_seed(5))
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        # After the first step B != 0 (PEFT's init has B = 0, left alone), every pair is balanced.
        if len(losses) > 1:
            assert layer_report(model)["rel_imbalance"].max() < 1e-4
    handle.remove()
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def _combined_delta(balance_inputs: bool, combination_type: str) -> torch.Tensor:
    """PEFT's add_weighted_adapter of two random r=4 adapters on the MLP, weights 0.5 / 0.5, with or
    without balancing the inputs first: lin0's combined dW in float64."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["lin0"], init_lora_weights=False)
    model = _model(cfg)
    model.add_adapter("other", cfg)
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_" in name:  # imbalanced on purpose: B large, A small
            p.data = torch.randn(p.shape, generator=g) * (3.0 if "lora_B" in name else 0.3)
    if balance_inputs:
        for adapter in ("default", "other"):
            balance_(model, adapter=adapter)
    kw = {"svd_rank": 4} if combination_type.endswith("svd") else {}
    if combination_type not in ("linear", "cat", "svd"):
        kw["density"] = 0.5  # ties, dare_*, magnitude_prune: keep half the entries
    torch.manual_seed(5)  # dare_* drop entries at random: the same draws with and without balancing
    model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "both", combination_type=combination_type, **kw)
    return model.base_model.model.lin0.get_delta_weight("both").double()


@pytest.mark.parametrize("combination_type", ["cat", "svd", "ties_svd", "dare_linear_svd", "magnitude_prune_svd"])
def test_combining_balanced_adapters_by_their_products_gives_the_same_dw(combination_type):
    # "cat" and the *_svd types combine the products s B A, which balancing keeps: the README tells users to prefer them.
    before, after = _combined_delta(False, combination_type), _combined_delta(True, combination_type)
    assert torch.linalg.norm(after - before) <= 1e-5 * torch.linalg.norm(before)


@pytest.mark.parametrize("combination_type", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_combining_adapters_factor_by_factor_depends_on_the_gauge(combination_type):
    # These combine A with A and B with B: the README warns that balancing the inputs changes the result.
    before, after = _combined_delta(False, combination_type), _combined_delta(True, combination_type)
    assert torch.linalg.norm(after - before) > 1e-2 * torch.linalg.norm(before)


def test_orthogonal_init_whose_product_is_zero_is_left_alone_then_balanced_after_a_step(
        make_llama, snapshot, assert_bit_identical, lora_factors, np_rel_imbalance, np_product_error):
    """PEFT's init_lora_weights="orthogonal" gives nonzero A and B (rank r/2 each) whose product is zero up
    to fp32 rounding (B A = 0 exactly in real arithmetic). Balancing that rounding noise shrank both
    factors ~2,500x (0.8 -> 3e-4, a saddle training hardly leaves) and was reported as a 41% change of dW.
    Such a product is zero, left alone like PEFT's B = 0 init; once a step makes it real, it is balanced."""
    model = get_peft_model(make_llama(n_layer=1), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights="orthogonal"))
    factors = lora_factors(model)
    for A, B in factors.values():  # the premise, in float64: nonzero factors, a product at fp32 rounding
        assert np.linalg.norm(B @ A) < 1e-6 * np.linalg.norm(B) * np.linalg.norm(A) and np.linalg.norm(A) > 0.1
    before = snapshot(model)
    summary = balance_(model)
    assert summary.balanced == 0 and len(summary.skipped) == 2
    assert all("zero product" in why for why in summary.skipped.values())
    assert_bit_identical(before, snapshot(model))

    ids = torch.arange(12)[None] % 64
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    stepped = lora_factors(model)
    summary = balance_(model)
    assert summary.balanced == 2 and not summary.skipped
    for key, (A, B) in lora_factors(model).items():
        A0, B0 = stepped[key]
        assert np_product_error(A0, B0, A, B) < 1e-5 and np_rel_imbalance(A, B) < 1e-5
        # The product a step made is ~1e-3 of |B||A|: its balanced factors are not the collapsed 3e-4.
        assert np.linalg.norm(A) > 0.01


def _saved_and_balanced(model, tmp_path, dense):
    """Save `model` (every LoRA factor drawn at random, imbalanced) with PEFT, inspect it, balance it to
    tmp_path / "out". Returns (inspect's frame, {module: PEFT's get_delta_weight in float64} for the `dense` ones,
    the original and balanced weights as read by safetensors, the two files loaded by PEFT)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    import balora

    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 if "lora_B" in name else 0.2))
    model.save_pretrained(tmp_path / "in")
    df = balora.inspect(tmp_path / "in")
    with torch.no_grad():
        deltas = {m: model.base_model.model.get_submodule(m).get_delta_weight("default").double() for m in dense}
    balora.balance_file(tmp_path / "in", tmp_path / "out")
    files = [load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("in", "out")]
    loaded = []
    for d in ("in", "out"):
        torch.manual_seed(0)  # the base weights _model's MLP has
        loaded.append(PeftModel.from_pretrained(MLP(), tmp_path / d).eval())
    return df, deltas, files, loaded


def _file_dW(files, row):
    sd = files[0]
    A, B = (sd[f"base_model.model.{row['module']}.lora_{f}.weight"].double() for f in "AB")
    return row["scaling"] * B @ A


def test_velora_adapter_file_is_balanced_like_the_live_model(tmp_path):
    """VeLoRA's forward is exactly x A^T B^T (README): live models balance it, but a saved VeLoRA adapter
    had every pair skipped by inspect and balance ("LoRA variant (velora_config) is not a plain s B @ A")."""
    VeloraConfig = getattr(bd_config, "VeloraConfig", None)
    if VeloraConfig is None:
        pytest.skip("this PEFT has no VeLoRA")
    model = _model(LoraConfig(r=2, lora_alpha=6, target_modules=["lin0", "lin1"], velora_config=VeloraConfig(num_groups=2)))
    df, deltas, files, loaded = _saved_and_balanced(model, tmp_path, ["lin0", "lin1"])
    assert list(df["module"]) == ["lin0", "lin1"] and (df["status"] == "ok").all()
    for _, row in df.iterrows():  # s B A from the file against PEFT's own dW
        assert torch.linalg.norm(_file_dW(files, row) - deltas[row["module"]]) <= 1e-6 * torch.linalg.norm(
            deltas[row["module"]])
    assert any(not torch.equal(files[0][k], files[1][k]) for k in files[0] if "lora_B" in k)  # balanced
    for k in files[0]:
        if ".lora_A." not in k and ".lora_B." not in k:  # lora_velora_embed and the rest: the same bytes
            assert torch.equal(files[0][k], files[1][k]), k
    with torch.no_grad():
        y0, y1 = (m(_x()).double() for m in loaded)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5 * y0.abs().max().item())


@pytest.mark.parametrize("which", ["a", "b"])
def test_bdlora_adapter_file_skips_block_diagonal_pairs_and_balances_dense_ones(which, tmp_path):
    """A saved BD-LoRA adapter had every pair skipped (its dense pairs too, which live models balance), and one
    with a block-diagonal lora_B, stored as (out, r / nblocks), was refused whole as "shapes do not chain"."""
    BdLoraConfig = getattr(bd_config, "BdLoraConfig", None)
    if BdLoraConfig is None:
        pytest.skip("this PEFT has no BD-LoRA")
    bd = BdLoraConfig(**{f"target_modules_bd_{which}": ["lin0"]}, nblocks=2, match_strict=False)
    model = _model(LoraConfig(r=4, lora_alpha=6, target_modules=["lin0", "lin1"], use_bdlora=bd))
    live = {p.module: p.skip_reason for p in iter_lora_pairs(model)}
    df, deltas, files, loaded = _saved_and_balanced(model, tmp_path, ["lin1"])  # PEFT has no dW for a BD lora_B
    status = dict(zip(df["module"], df["status"]))
    assert status == {"lin0": f"skipped: {live['lin0']}", "lin1": "ok"}  # the live walker's words
    assert f"lora_{which.upper()} is block-diagonal (2 blocks)" in status["lin0"]
    row = df.set_index("module").loc["lin1"].to_dict() | {"module": "lin1"}
    assert torch.linalg.norm(_file_dW(files, row) - deltas["lin1"]) <= 1e-6 * torch.linalg.norm(deltas["lin1"])
    for k in files[0]:  # lin0's block-diagonal pair and every non-factor tensor: the same bytes
        if ".lin1.lora_" not in k:
            assert torch.equal(files[0][k], files[1][k]), k
    assert not torch.equal(files[0]["base_model.model.lin1.lora_B.weight"], files[1]["base_model.model.lin1.lora_B.weight"])
    with torch.no_grad():
        y0, y1 = (m(_x()).double() for m in loaded)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5 * y0.abs().max().item())
