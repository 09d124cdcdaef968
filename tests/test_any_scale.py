"""Factors at any finite scale (entries from 1e-30 to 1e30): the diagnostics never raise, match float64
numpy on the formed matrices wherever the true value fits in float64 and say so in the row where it
does not; balance_ either balances (dW kept, pair balanced, checked in float64) or raises BalanceError
naming the module."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn

import balora
from balora import balance_, layer_report
from balora.balance import BalanceError
from balora.pairs import FactorPair
from balora.report import pair_rows

EXPONENTS = (-30, -20, -10, 0, 10, 20, 30)


def _np_values(A, B, s):
    """Float64 numpy from the formed products (fits for entries up to ~1e75)."""
    BtB, AAt = B.T @ B, A @ A.T
    sigma = np.linalg.svd(s * B @ A, compute_uv=False)
    return {
        "norm_A": np.linalg.norm(A), "norm_B": np.linalg.norm(B),
        "imbalance": np.linalg.norm(BtB - AAt),
        "rel_imbalance": np.linalg.norm(BtB - AAt) / (np.linalg.norm(BtB) + np.linalg.norm(AAt)),
        "sigma_max": sigma[0], "cond_dW": sigma[0] / sigma[min(A.shape) - 1],
    }


def _pairs(dtype):
    g = torch.Generator().manual_seed(0)
    pairs = []
    for ea, eb in itertools.product(EXPONENTS, (-30, 0, 30)):
        A = torch.randn(4, 12, generator=g, dtype=torch.float64) * 10.0**ea
        B = torch.randn(10, 4, generator=g, dtype=torch.float64) * 10.0**eb
        pairs.append(FactorPair(f"m{ea}_{eb}", "default", "linear", A.to(dtype), B.to(dtype), 2.0))
    # One pair whose entries themselves span 1e-30 .. 1e30.
    spread = torch.logspace(-30, 30, 12, dtype=torch.float64)
    A = torch.randn(4, 12, generator=g, dtype=torch.float64) * spread
    B = torch.randn(10, 4, generator=g, dtype=torch.float64) * spread[:10, None]
    pairs.append(FactorPair("spread", "default", "linear", A.to(dtype), B.to(dtype), 0.5))
    return pairs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_report_at_any_scale_vs_numpy(dtype):
    pairs = _pairs(dtype)
    rows = pair_rows(pairs, precision=True)  # one batched call for every scale: no pair can spoil the others
    for p, row in zip(pairs, rows):
        assert row["status"] == "ok" and row["note"] == "", (p.module, row["status"])
        ref = _np_values(p.A.double().numpy(), p.B.double().numpy(), p.scaling)
        for col in ("norm_A", "norm_B", "imbalance", "rel_imbalance", "sigma_max"):
            assert row[col] == pytest.approx(ref[col], rel=1e-9), (p.module, col)
        if p.module != "spread":  # its smallest singular value is below float64's resolution of the largest
            assert row["cond_dW"] == pytest.approx(ref["cond_dW"], rel=1e-6), p.module
        for col in ("fp16_dW_error", "bf16_dW_error", "fp16_dW_error_balanced", "bf16_dW_error_balanced"):
            assert row[col] >= 0 or np.isnan(row[col]), (p.module, col)  # inf allowed: the cast overflowed
    by_name = {r["module"]: r for r in rows}
    assert by_name["m30_0"]["fp16_overflow"] > 0 and np.isinf(by_name["m30_0"]["fp16_dW_error"])
    assert by_name["m-30_0"]["fp16_underflow"] > 0
    # |A| |B| ~ 1: the balanced pair (entries ~1) survives fp16 whatever the split was.
    for name in ("m30_-30", "m0_0", "m-30_30"):
        assert by_name[name]["fp16_dW_error_balanced"] < 1e-2 and by_name[name]["fp16_underflow_balanced"] < 0.05, name
    assert np.isinf(by_name["m30_-30"]["fp16_dW_error"]) and np.isinf(by_name["m-30_30"]["fp16_dW_error"])  # as is


def test_values_beyond_float64_are_nan_with_a_note():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(4, 12, generator=g, dtype=torch.float64) * 1e200
    B = torch.randn(10, 4, generator=g, dtype=torch.float64) * 1e200
    (row,) = pair_rows([FactorPair("huge", "default", "linear", A, B, 1.0)], precision=True)
    assert row["status"] == "partial" and "imbalance" in row["note"] and "float64" in row["note"]
    assert np.isnan(row["imbalance"]) and np.isnan(row["sigma_max"]) and all(np.isnan(row["sigma"]))
    # Scale-free values are still exact: numpy on the factors divided by 1e200 (rel_imbalance and
    # cond do not change when both factors are scaled by one number).
    ref = _np_values(A.numpy() / 1e200, B.numpy() / 1e200, 1.0)
    assert row["rel_imbalance"] == pytest.approx(ref["rel_imbalance"], rel=1e-9)
    assert row["cond_dW"] == pytest.approx(ref["cond_dW"], rel=1e-6)
    assert row["norm_A"] == pytest.approx(1e200 * np.linalg.norm(A.numpy() / 1e200), rel=1e-12)  # ~1e201 fits
    assert row["fp16_overflow"] == 1 and np.isinf(row["fp16_dW_error"])


def _one_lora_linear(r):
    """A PEFT model of one Linear(12, 10) with LoRA rank r (random A and B), and its LoRA layer."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(12, 10)), LoraConfig(r=r, target_modules=["0"],
                                                                      init_lora_weights=False))
    return model, model.base_model.model[0]


def _scaled_model(ea, eb):
    model, layer = _one_lora_linear(4)
    with torch.no_grad():
        layer.lora_A["default"].weight.mul_(10.0**ea)
        layer.lora_B["default"].weight.normal_().mul_(10.0**eb)
    return model, layer


@pytest.mark.parametrize("ea,eb", list(itertools.product(EXPONENTS, (-30, -10, 0, 10, 30))))
def test_balance_at_any_scale_balances(ea, eb):
    # Every one of these fp32 pairs has a balanced pair inside fp32's range (entries ~ sqrt(|A| |B|)).
    model, layer = _scaled_model(ea, eb)
    A0 = layer.lora_A["default"].weight.detach().double().clone()
    B0 = layer.lora_B["default"].weight.detach().double().clone()
    assert layer_report(model)["status"].tolist() == ["ok"]  # the live report never raises either
    summary = balance_(model)
    assert summary.balanced == 1, summary.skipped
    A = layer.lora_A["default"].weight.detach().double().numpy()
    B = layer.lora_B["default"].weight.detach().double().numpy()
    a0, b0 = A0.numpy(), B0.numpy()
    assert np.linalg.norm(B @ A - b0 @ a0) <= 2e-5 * np.linalg.norm(b0 @ a0)
    assert np.linalg.norm(B.T @ B - A @ A.T) <= 1e-4 * (np.linalg.norm(B.T @ B) + np.linalg.norm(A @ A.T))


def test_what_cannot_be_balanced_raises_naming_the_module(snapshot, assert_bit_identical):
    # fp16, r = 1: A spread (12 entries of +-6e4), B concentrated (one entry 6e4). The product's
    # singular value is 6e4 * 6e4 * sqrt(12) ~ 1.2e10, so the balanced B' = sqrt(1.2e10) e_1 ~ 1.1e5
    # exceeds fp16's max (65504): no balanced pair exists in the factors' dtype.
    model, layer = _one_lora_linear(1)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor([[6e4, -6e4] * 6]))
        B = torch.ones(10, 1)
        B[0, 0] = 6e4
        layer.lora_B["default"].weight.copy_(B)
    model = model.half()
    before = snapshot(model)
    with pytest.raises(BalanceError, match=r"0\[default\] would exceed the range of their dtype"):
        balance_(model)
    assert_bit_identical(before, snapshot(model))  # never inf written into the fp16 parameters
    summary = balance_(model, on_nonfinite="skip")
    assert summary.balanced == 0 and "exceed the range" in summary.skipped["0[default]"]
    assert_bit_identical(before, snapshot(model))
    assert layer_report(model)["status"].tolist() == ["ok"]


def test_inspect_a_file_with_huge_factors(tmp_path):
    g = torch.Generator().manual_seed(2)
    sd = {}
    for i, (ea, eb) in enumerate([(20, 0), (-20, 0), (30, 30), (0, -30)]):
        sd[f"base_model.model.layers.{i}.proj.lora_A.weight"] = torch.randn(4, 16, generator=g) * 10.0**ea
        sd[f"base_model.model.layers.{i}.proj.lora_B.weight"] = torch.randn(12, 4, generator=g) * 10.0**eb
    path = tmp_path / "adapter_model.safetensors"
    save_file(sd, str(path))
    df = balora.inspect(path)
    assert len(df) == 4 and (df["status"] == "ok").all()
    for i, row in enumerate(df.itertuples()):
        a = sd[f"base_model.model.layers.{i}.proj.lora_A.weight"].double().numpy()
        b = sd[f"base_model.model.layers.{i}.proj.lora_B.weight"].double().numpy()
        ref = _np_values(a, b, 1.0)
        assert row.rel_imbalance == pytest.approx(ref["rel_imbalance"], rel=1e-9)
        assert row.imbalance == pytest.approx(ref["imbalance"], rel=1e-9)


def test_a_failing_decomposition_is_said_in_the_row(monkeypatch):
    """If torch's SVD fails (as it did on factors ~1e20 before), the row says so; nothing raises."""
    g = torch.Generator().manual_seed(4)
    pairs = [FactorPair(f"m{i}", "default", "linear", torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g),
                        1.0) for i in range(2)]

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svdvals", broken)
    rows = pair_rows(pairs, precision=True)
    for row in rows:
        assert row["status"].startswith("decomposition failed: linalg.svd") and row["note"]
        assert np.isnan(row["rel_imbalance"]) and row["sigma"] == [] and row["rank"] == 0
