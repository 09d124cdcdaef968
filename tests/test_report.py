"""balora.report: the layer report's columns and dtypes, and every value recomputed by float64
numpy from the parameters themselves, with the scaling recomputed from the LoRA config."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from balora.imbalance import RANK_RTOL
from balora.report import REPORT_COLUMNS, layer_report, summarize, to_frame

PREFIX = "base_model.model."


def _np_row(A, B, s):
    """The report's numbers for one pair, from float64 numpy on the formed matrices."""
    r = A.shape[0]

    def padded(M):
        sv = np.linalg.svd(M, compute_uv=False)
        return np.concatenate([sv[:r], np.zeros(max(0, r - sv.size))])

    BtB, AAt = B.T @ B, A @ A.T
    sigma, sA, sB = padded(s * B @ A), padded(A), padded(B)
    p = sigma / sigma.sum()
    return {
        "norm_A": np.linalg.norm(A), "norm_B": np.linalg.norm(B),
        "imbalance": np.linalg.norm(BtB - AAt),
        "rel_imbalance": np.linalg.norm(BtB - AAt) / (np.linalg.norm(BtB) + np.linalg.norm(AAt)),
        "cond_A": sA[0] / sA[-1], "cond_B": sB[0] / sB[-1], "cond_dW": sigma[0] / sigma[-1],
        "eff_rank": float(np.exp(-(p * np.log(p)).sum())),
        "rank": int((sigma > RANK_RTOL * sigma[0]).sum()),
        "sigma_max": sigma[0], "sigma": sigma, "sigma_A": sA, "sigma_B": sB,
    }


def _expected_scaling(cfg: LoraConfig, module: str) -> tuple[int, float]:
    """(r, s) for a module from the config alone: patterns override, rsLoRA divides by sqrt(r)."""
    r = cfg.rank_pattern.get(module, cfg.r)
    alpha = cfg.alpha_pattern.get(module, cfg.lora_alpha)
    return r, alpha / (math.sqrt(r) if cfg.use_rslora else r)


def _check_against_numpy(report, model, cfg, lora_factors, rtol=1e-5):
    factors = lora_factors(model)
    assert len(report) == len(factors)
    for row in report.to_dict("records"):
        A, B = factors[(PREFIX + row["module"], row["adapter"])]
        r, s = _expected_scaling(cfg, row["module"])
        assert row["r"] == r == A.shape[0]
        assert row["scaling"] == pytest.approx(s, rel=1e-12)
        assert (row["out_features"], row["in_features"]) == (B.shape[0], A.shape[1])
        assert row["status"] == "ok"
        ref = _np_row(A, B, s)
        for col in ("norm_A", "norm_B", "imbalance", "rel_imbalance", "eff_rank", "sigma_max"):
            assert row[col] == pytest.approx(ref[col], rel=rtol), col
        for col in ("cond_A", "cond_B", "cond_dW"):
            assert row[col] == pytest.approx(ref[col], rel=100 * rtol), col
        assert row["rank"] == ref["rank"]
        for col in ("sigma", "sigma_A", "sigma_B"):
            assert isinstance(row[col], list) and len(row[col]) == r
            np.testing.assert_allclose(row[col], ref[col], rtol=0, atol=rtol * ref[col][0], err_msg=col)


def _assert_schema(df):
    assert list(df.columns) == list(REPORT_COLUMNS)
    for col, dtype in REPORT_COLUMNS.items():
        assert str(df[col].dtype) == str(pd.Series([], dtype=dtype).dtype), col


@pytest.mark.parametrize("variant", ["plain", "rslora_patterns", "dora"])
def test_tiny_net_report_vs_numpy(variant, make_tiny_net, tiny_net_targets, lora_factors):
    cfg = LoraConfig(r=3, lora_alpha=5, target_modules=tiny_net_targets, init_lora_weights=False)
    if variant == "rslora_patterns":
        cfg = LoraConfig(r=3, lora_alpha=5, target_modules=tiny_net_targets, init_lora_weights=False, use_rslora=True,
                         rank_pattern={"conv2d": 2, "lin": 1}, alpha_pattern={"emb": 9, "conv1x1": 2})
    elif variant == "dora":
        cfg = LoraConfig(r=3, lora_alpha=5, target_modules=tiny_net_targets, init_lora_weights=False, use_dora=True)
    model = get_peft_model(make_tiny_net(), cfg)
    report = layer_report(model)
    _assert_schema(report)
    assert dict(zip(report["module"], report["kind"])) == {
        "emb": "embedding", "lin": "linear", "conv1d": "conv1d", "conv2d": "conv2d", "conv1x1": "conv2d"}
    assert report["dora"].tolist() == [variant == "dora"] * 5
    assert set(report["dtype"]) == {"float32"} and set(report["adapter"]) == {"default"}
    _check_against_numpy(report, model, cfg, lora_factors)


def test_gpt2_report(make_gpt2, lora_factors):
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc", "wte"], fan_in_fan_out=True,
                     init_lora_weights=False)
    model = get_peft_model(make_gpt2(n_layer=2), cfg)
    report = layer_report(model)
    assert report["module"].tolist() == ["transformer.wte"] + [
        f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")]
    assert report.set_index("module").loc["transformer.h.0.attn.c_attn", "in_features"] == 32
    assert report.set_index("module").loc["transformer.h.0.attn.c_attn", "out_features"] == 96
    _check_against_numpy(report, model, cfg, lora_factors)


def test_half_precision_rows(make_tiny_net, tiny_net_targets, lora_factors):
    cfg = LoraConfig(r=2, target_modules=tiny_net_targets, init_lora_weights=False)
    model = get_peft_model(make_tiny_net(), cfg).to(torch.bfloat16)
    report = layer_report(model)
    assert set(report["dtype"]) == {"bfloat16"}
    # The numbers are of the bf16 values themselves, computed in fp32.
    _check_against_numpy(report, model, cfg, lora_factors)


def test_zero_products_and_empty_reports(make_tiny_net, tiny_net_targets):
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets))  # PEFT init
    report = layer_report(model)
    assert (report["rel_imbalance"] == 1).all(), "B = 0 (or A = 0 for embeddings) is the worst imbalance"
    assert (report["rank"] == 0).all() and (report["sigma_max"] == 0).all() and report["cond_dW"].isna().all()
    assert (report["status"] == "ok").all()

    for empty in (layer_report(make_tiny_net()), to_frame([])):
        assert empty.empty
        _assert_schema(empty)
    with pytest.raises(ValueError, match="adapter 'nope'"):  # a typo is not an empty model (balance_ refuses it too)
        layer_report(model, adapter="nope")
    assert summarize(to_frame([])) == {}


def test_nonfinite_row_does_not_spoil_its_batch(make_tiny_net, lora_factors):
    cfg = LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False)
    model = get_peft_model(make_tiny_net(), cfg)
    model.add_adapter("twin", LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
    clean = layer_report(model)
    with torch.no_grad():
        model.base_model.model.lin.lora_B["twin"].weight[3, 1] = float("inf")
    report = layer_report(model).set_index("adapter")
    bad = report.loc["twin"]
    assert "non-finite" in bad["status"]
    assert math.isnan(bad["rel_imbalance"]) and math.isnan(bad["sigma_max"]) and bad["sigma"] == [] and bad["rank"] == 0
    good = report.loc["default"]
    ref = clean.set_index("adapter").loc["default"]
    assert good["status"] == "ok"
    for col in ("imbalance", "rel_imbalance", "cond_dW", "eff_rank", "sigma_max"):
        assert good[col] == pytest.approx(ref[col], rel=1e-6), col


@pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups > 1")
def test_adapter_filter_and_skipped_pairs(make_tiny_net):
    class WithGrouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)
            self.grouped = nn.Conv2d(4, 8, 3, groups=2)

    model = get_peft_model(WithGrouped(), LoraConfig(r=2, target_modules=["lin", "grouped"], init_lora_weights=False))
    model.add_adapter("x", LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
    report = layer_report(model)
    # The grouped conv has no plain B @ A: left out of the report (balance_ says why).
    assert sorted(zip(report["module"], report["adapter"])) == [("lin", "default"), ("lin", "x")]
    assert layer_report(model, adapter="x")["adapter"].tolist() == ["x"]


def test_summarize_matches_pandas(make_gpt2):
    model = get_peft_model(make_gpt2(n_layer=2), LoraConfig(r=4, target_modules=["c_attn", "c_proj"],
                                                           fan_in_fan_out=True, init_lora_weights=False))
    report = layer_report(model)
    s = summarize(report)
    assert s == {
        "balora/rel_imbalance_mean": pytest.approx(report["rel_imbalance"].to_numpy().mean()),
        "balora/rel_imbalance_max": pytest.approx(report["rel_imbalance"].to_numpy().max()),
        "balora/imbalance_max": pytest.approx(report["imbalance"].to_numpy().max()),
        "balora/cond_dW_median": pytest.approx(float(np.median(report["cond_dW"].to_numpy()))),
        "balora/eff_rank_mean": pytest.approx(report["eff_rank"].to_numpy().mean()),
        "balora/sigma_max": pytest.approx(max(max(sig) for sig in report["sigma"])),
    }
    assert all(isinstance(v, float) for v in s.values())
