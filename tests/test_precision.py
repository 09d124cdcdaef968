"""Precision risk of storing LoRA factors in fp16/bf16 (balora.precision and the report's columns),
against float64 numpy on the formed matrices: numpy casts to float16 itself and forms dW; bf16,
which numpy lacks, is cast by torch and everything after the cast is numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from balora import balance_, layer_report
from balora.pairs import FactorPair
from balora.precision import HALF_DTYPES, balanced_for_storage, cast_dw_error, storage_risk
from balora.report import PRECISION_COLUMNS, PRECISION_LOSS, REPORT_COLUMNS, pair_rows, precision_summary, to_frame


def _spread_factors(seed, r=4, n_in=24, n_out=20):
    """fp32 factors whose entries span fp16's whole range and beyond: some underflow, some overflow."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n_in, generator=g, dtype=torch.float64) * torch.logspace(-9, 5.5, n_in, dtype=torch.float64)
    B = torch.randn(n_out, r, generator=g, dtype=torch.float64) * torch.logspace(-7, 2, n_out, dtype=torch.float64)[:, None]
    return A.float(), B.float()


def _np_cast(X: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """X stored in dtype, back as float64 numpy (numpy's own float16 cast; torch's for bf16)."""
    if dtype == torch.float16:
        with np.errstate(over="ignore"):  # overflowing to inf is what is being measured
            return X.double().numpy().astype(np.float16).astype(np.float64)
    return X.to(dtype).double().numpy()


def _np_risk(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype):
    a, b = A.double().numpy(), B.double().numpy()
    a_c, b_c = _np_cast(A, dtype), _np_cast(B, dtype)
    tiny = float(torch.finfo(dtype).tiny)
    entries = np.concatenate([a.ravel(), b.ravel()])
    cast = np.concatenate([a_c.ravel(), b_c.ravel()])
    under = np.mean((entries != 0) & (np.abs(entries) < tiny))
    over = np.mean(np.isinf(cast) & np.isfinite(entries))
    with np.errstate(invalid="ignore", over="ignore"):
        dW, dW_c = b @ a, b_c @ a_c
        err = np.linalg.norm(dW_c - dW) / np.linalg.norm(dW) if np.isfinite(dW_c).all() else np.inf
    return under, over, err


@pytest.mark.parametrize("name", list(HALF_DTYPES))
def test_storage_risk_vs_numpy(name):
    dtype = HALF_DTYPES[name]
    pairs = [_spread_factors(s) for s in range(3)] + [(torch.randn(4, 24) * 1e-3, torch.randn(20, 4) * 1e-4)]
    A = torch.stack([p[0] for p in pairs])
    B = torch.stack([p[1] for p in pairs])
    risk = storage_risk(A, B, (dtype,))[dtype]
    for g, (a, b) in enumerate(pairs):
        under, over, err = _np_risk(a, b, dtype)
        assert float(risk.underflow[g]) == pytest.approx(under, abs=1e-12)
        assert float(risk.overflow[g]) == pytest.approx(over, abs=1e-12)
        assert float(risk.dW_error[g]) == pytest.approx(err, rel=1e-4)
    if name == "fp16":  # the spread factors hit both ends of fp16's range
        assert (risk.underflow[:3] > 0).all() and (risk.overflow[:3] > 0).all() and torch.isinf(risk.dW_error[:3]).all()
        assert 0 < float(risk.dW_error[3]) < 1e-2 and float(risk.underflow[3]) > 0


def test_cast_error_of_an_imbalanced_pair_and_its_balanced_twin():
    """B ~1e-6 and A ~1e3: fp16 keeps B in its subnormals, a few bits each; the balanced pair survives."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(1, 8, 64, generator=g) * 1e4 / 8
    B = torch.randn(1, 48, 8, generator=g) * 1e-5 / 8
    A_bal, B_bal = balanced_for_storage(A, B)
    a, b, a_bal, b_bal = (t[0].double().numpy() for t in (A, B, A_bal, B_bal))
    # The balanced pair has the same product and equal Grams (float64 numpy).
    np.testing.assert_allclose(b_bal @ a_bal, b @ a, rtol=0, atol=1e-6 * np.abs(b @ a).max())
    np.testing.assert_allclose(b_bal.T @ b_bal, a_bal @ a_bal.T, rtol=0, atol=1e-5 * np.abs(a_bal @ a_bal.T).max())
    as_is = float(cast_dw_error(A, B, A.half(), B.half())[0])
    balanced = float(cast_dw_error(A_bal, B_bal, A_bal.half(), B_bal.half())[0])
    assert as_is == pytest.approx(_np_risk(A[0], B[0], torch.float16)[2], rel=1e-4)
    assert as_is > 1e-2 > balanced
    assert balanced == pytest.approx(_np_risk(A_bal[0], B_bal[0], torch.float16)[2], rel=1e-4)


def _imbalanced_model(scale=1e-5):
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16)),
                           LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    with torch.no_grad():
        layer = model.base_model.model[0]  # only the first layer is made imbalanced
        layer.lora_A["default"].weight.mul_(1 / scale)
        layer.lora_B["default"].weight.normal_().mul_(0.1 * scale)
        model.base_model.model[2].lora_B["default"].weight.normal_().mul_(0.1)
    return model


def test_report_columns_and_balancing_as_predicted(lora_factors):
    model = _imbalanced_model()
    report = layer_report(model).set_index("module")
    assert PRECISION_COLUMNS == [c for c in REPORT_COLUMNS if c.startswith(("fp16_", "bf16_"))]
    assert len(PRECISION_COLUMNS) == 12 and all(REPORT_COLUMNS[c] == "float64" for c in PRECISION_COLUMNS)
    factors = lora_factors(model)
    for module, row in report.iterrows():
        A, B = (torch.from_numpy(x).float() for x in factors[("base_model.model." + module, "default")])
        for name, dtype in HALF_DTYPES.items():
            under, over, err = _np_risk(A, B, dtype)
            assert row[f"{name}_underflow"] == pytest.approx(under, abs=1e-12)
            assert row[f"{name}_overflow"] == pytest.approx(over, abs=1e-12)
            assert row[f"{name}_dW_error"] == pytest.approx(err, rel=1e-4)
    assert report.loc["0", "fp16_dW_error"] > PRECISION_LOSS > report.loc["0", "fp16_dW_error_balanced"]
    assert report.loc["2", "fp16_dW_error"] < PRECISION_LOSS
    line = precision_summary(report.reset_index())
    assert "1 layer(s)" in line and "0[default]" in line and "fixes all" in line

    # What the report predicted for the balanced pair is what balance_ gives.
    balance_(model)
    after = layer_report(model).set_index("module")
    for name in HALF_DTYPES:
        np.testing.assert_allclose(after[f"{name}_dW_error"], report[f"{name}_dW_error_balanced"], rtol=0.2)
        np.testing.assert_allclose(after[f"{name}_underflow"], report[f"{name}_underflow_balanced"], atol=0.02)
    assert "no layer" in precision_summary(after.reset_index())


def test_precision_off_leaves_nan_and_empty_summary():
    A, B = _spread_factors(0)
    row = pair_rows([FactorPair("m", "default", "linear", A, B, 1.0)])[0]  # the training-time default
    assert all(np.isnan(row[c]) for c in PRECISION_COLUMNS) and row["status"] == "ok"
    assert precision_summary(to_frame([row])) == "" and precision_summary(to_frame([])) == ""


def test_inspect_cli_says_which_layers_fp16_loses(tmp_path, capsys):
    from safetensors.torch import save_file

    from balora.cli import main

    g = torch.Generator().manual_seed(0)
    sd = {}
    for i, c in enumerate([1.0, 1e-5, 1.0]):  # layer 1: B ~1e-7, A ~1e4, the same size of dW as the others
        sd[f"base_model.model.layers.{i}.proj.lora_A.weight"] = torch.randn(8, 64, generator=g) * 0.1 / c
        sd[f"base_model.model.layers.{i}.proj.lora_B.weight"] = torch.randn(48, 8, generator=g) * 0.01 * c
    save_file(sd, str(tmp_path / "adapter_model.safetensors"))
    assert main(["inspect", str(tmp_path / "adapter_model.safetensors")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "fp16: 1 layer(s) lose more than 0.01 of dW (layers.1.proj[default]); balancing fixes all" in out


def _saved_adapter(tmp_path, scale=1e-5):
    model = _imbalanced_model(scale)
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def _np_pairs(path):
    from safetensors.torch import load_file

    sd = load_file(str(path / "adapter_model.safetensors"))
    pairs = {k.removesuffix(".lora_A.weight"): (sd[k], sd[k.replace("lora_A", "lora_B")]) for k in sd if "lora_A" in k}
    return sd, pairs


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_balance_file_in_half_precision_reports_the_written_error(tmp_path, dtype):
    from balora import balance_file

    _, src = _saved_adapter(tmp_path)
    summary = balance_file(src, tmp_path / "out", dtype=dtype)
    sd_in, before = _np_pairs(src)
    sd_out, after = _np_pairs(tmp_path / "out")
    assert {t.dtype for t in sd_out.values()} == {getattr(torch, dtype)} and sd_out.keys() == sd_in.keys()
    changes = summary.changes.set_index("module")
    errors = {}
    for key, (A0, B0) in before.items():
        A1, B1 = after[key]
        dW0 = B0.double().numpy() @ A0.double().numpy()
        dW1 = B1.double().numpy() @ A1.double().numpy()  # the written file's dW, formed in float64
        err = np.linalg.norm(dW1 - dW0) / np.linalg.norm(dW0)
        module = key.removeprefix("base_model.model.")
        assert changes.loc[module, "dW_rel_change"] == pytest.approx(err, rel=1e-3), module
        errors[module] = err
        # What the cast alone would have done to the unbalanced pair (formed in float64 too).
        as_is = _np_risk(A0, B0, getattr(torch, dtype))[2]
        if module == "0" and dtype == "float16":
            assert as_is > PRECISION_LOSS > err  # balancing first is what saves the imbalanced layer
    assert summary.dtype == dtype and summary.max_rel_error == pytest.approx(max(errors.values()))
    assert f"in {dtype}" in str(summary) and "the cast to" in str(summary)


def test_balance_cli_dtype_and_overflow_is_refused(tmp_path, capsys):
    from safetensors.torch import save_file

    from balora.cli import main

    _, src = _saved_adapter(tmp_path)
    assert main(["balance", str(src), str(tmp_path / "out"), "--dtype", "float16"]) == 0
    assert "the cast to float16 included" in " ".join(capsys.readouterr().out.split())

    g = torch.Generator().manual_seed(0)
    huge = {"base_model.model.m.lora_A.weight": torch.randn(4, 16, generator=g) * 1e5,
            "base_model.model.m.lora_B.weight": torch.randn(12, 4, generator=g) * 1e5}  # |dW| ~ 1e10: no fp16 pair
    save_file(huge, str(tmp_path / "huge.safetensors"))
    assert main(["balance", str(tmp_path / "huge.safetensors"), str(tmp_path / "h16.safetensors"), "--dtype", "float16"]) == 2
    assert "overflow float16" in capsys.readouterr().err and not (tmp_path / "h16.safetensors").exists()
    assert main(["balance", str(tmp_path / "huge.safetensors"), str(tmp_path / "hb.safetensors"), "--dtype", "bfloat16"]) == 0


def test_balance_dtype_refuses_other_tensors_that_overflow(tmp_path, capsys):
    """--dtype float16 casts every floating tensor; one beyond fp16's range that is not a factor (DoRA's
    magnitude, a modules_to_save weight) was written as inf, though a copy that would overflow is refused."""
    from safetensors.torch import load_file, save_file

    from balora.cli import main

    g = torch.Generator().manual_seed(0)
    src = {"base_model.model.m.lora_A.weight": torch.randn(4, 16, generator=g),
           "base_model.model.m.lora_B.weight": torch.randn(12, 4, generator=g) * 1e-2,
           "base_model.model.head.modules_to_save.default.weight": torch.randn(3, 4, generator=g) * 1e5}
    save_file(src, str(tmp_path / "in.safetensors"))
    big = float(src["base_model.model.head.modules_to_save.default.weight"].abs().max())
    assert big > torch.finfo(torch.float16).max  # the cast makes it inf
    assert main(["balance", str(tmp_path / "in.safetensors"), str(tmp_path / "h16.safetensors"), "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert "modules_to_save.default.weight" in err and "overflow float16" in err
    assert not (tmp_path / "h16.safetensors").exists()
    assert main(["balance", str(tmp_path / "in.safetensors"), str(tmp_path / "hb.safetensors"), "--dtype", "bfloat16"]) == 0
    assert all(t.isfinite().all() for t in load_file(str(tmp_path / "hb.safetensors")).values())


def test_balanced_for_storage_of_factors_whose_fp32_grams_are_subnormal(np_product_error, np_rel_imbalance):
    """What `balora balance` writes, for A of ~1e-21 with B of ~1e-3 (neither rescaled: the larger
    factor is in range). Their fp32 Grams are in fp32's subnormal range; upcast to float64 before
    the Gram path, they once passed its float64 floor and came back with rel_imbalance up to 5e-2."""
    from balora.precision import balanced_for_storage

    gen = torch.Generator().manual_seed(15)
    A = torch.stack([torch.randn(8, 512, generator=gen) * s for s in (1e-21, 3e-22, 1e-22, 3e-23)])
    B = torch.stack([torch.randn(512, 8, generator=gen) * 1e-3 for _ in range(4)])
    A1, B1 = balanced_for_storage(A, B)
    assert A1.dtype == B1.dtype == torch.float32
    for g in range(4):
        assert np_rel_imbalance(A1[g], B1[g]) < 1e-6 and np_product_error(A[g], B[g], A1[g], B1[g]) < 1e-6


def test_balance_in_half_precision_keeps_kohya_alpha_exact(tmp_path):
    """kohya's `.alpha` sets dW's scale (alpha / r): cast to fp16 with the factors, alpha 0.1 moved dW by
    2.4e-4 that the reported change left out, and alpha 7e4 became inf in a file written without a word.
    The alphas stay as stored; the reported change is that of the whole dW = alpha / r * up @ down."""
    from safetensors.torch import load_file, save_file

    from balora import balance_file

    g = torch.Generator().manual_seed(3)
    sd = {}
    for name, alpha in (("lora_unet_a", 0.1), ("lora_unet_b", 7e4)):
        sd[f"{name}.lora_down.weight"] = torch.randn(4, 16, generator=g) * 0.1  # (r, in)
        sd[f"{name}.lora_up.weight"] = torch.randn(12, 4, generator=g) * 0.1 * (1e-5 if alpha > 1 else 1)  # (out, r)
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(tmp_path / "k.safetensors"))
    summary = balance_file(tmp_path / "k.safetensors", tmp_path / "k16.safetensors", dtype="float16")
    out = load_file(str(tmp_path / "k16.safetensors"))
    changes = summary.changes.set_index("module")
    for name in ("lora_unet_a", "lora_unet_b"):
        assert out[f"{name}.alpha"].dtype == torch.float32 and out[f"{name}.alpha"] == sd[f"{name}.alpha"]
        assert out[f"{name}.lora_down.weight"].dtype == torch.float16

        def dW(t):
            return (t[f"{name}.alpha"].double().numpy() / 4) * (t[f"{name}.lora_up.weight"].double().numpy()
                                                                  @ t[f"{name}.lora_down.weight"].double().numpy())

        err = np.linalg.norm(dW(out) - dW(sd)) / np.linalg.norm(dW(sd))
        assert np.isfinite(err) and changes.loc[name, "dW_rel_change"] == pytest.approx(err, rel=1e-3), name


def test_balance_bf16_file_to_float16_rounds_once(tmp_path):
    """A bf16 adapter written in fp16 (`--dtype float16`): the balanced factors were rounded to bf16 (the
    stored dtype) and then cast to fp16, so dW moved by bf16's rounding (2.4e-3 on an 8B-shaped
    adapter) where fp16 keeps 8x less, and where the plain cast of the unbalanced bf16 pair is exact.
    Bound: the SVD-balanced pair formed in float64 numpy and rounded once to fp16 by numpy."""
    from safetensors.torch import load_file, save_file

    from balora import balance_file

    g = torch.Generator().manual_seed(4)
    sd = {}
    for i in range(3):
        sd[f"base_model.model.layers.{i}.proj.lora_A.weight"] = (torch.randn(8, 96, generator=g) / 10).bfloat16()
        sd[f"base_model.model.layers.{i}.proj.lora_B.weight"] = (torch.randn(64, 8, generator=g) / 300).bfloat16()
    save_file(sd, str(tmp_path / "bf16.safetensors"))
    balance_file(tmp_path / "bf16.safetensors", tmp_path / "f16.safetensors", dtype="float16")
    out = load_file(str(tmp_path / "f16.safetensors"))
    for i in range(3):
        a, b = (sd[f"base_model.model.layers.{i}.proj.lora_{f}.weight"].double().numpy() for f in "AB")
        a1, b1 = (out[f"base_model.model.layers.{i}.proj.lora_{f}.weight"].double().numpy() for f in "AB")
        dW = b @ a
        U, S, Vt = np.linalg.svd(dW, full_matrices=False)
        b_ref, a_ref = U[:, :8] * np.sqrt(S[:8]), np.sqrt(S[:8])[:, None] * Vt[:8]  # balanced: B'^T B' = A' A'^T
        once = b_ref.astype(np.float16).astype(np.float64) @ a_ref.astype(np.float16).astype(np.float64)
        ref = np.linalg.norm(once - dW) / np.linalg.norm(dW)
        err = np.linalg.norm(b1 @ a1 - dW) / np.linalg.norm(dW)
        assert out[f"base_model.model.layers.{i}.proj.lora_A.weight"].dtype == torch.float16
        assert err < 3 * ref, (i, err, ref)


@pytest.mark.parametrize("given", ["adapter/folder", torch.nn.Linear(2, 2)])
def test_precision_summary_of_something_other_than_a_report_is_one_line(given):
    # precision_summary(model) raised "argument of type 'Linear' is not iterable", of a path
    # "'str' object has no attribute 'iloc'".
    with pytest.raises(TypeError, match=rf"^precision_summary: expects a layer report .*got {type(given).__name__}"):
        precision_summary(given)


@pytest.mark.parametrize("name", list(HALF_DTYPES))
def test_dW_error_of_a_product_far_smaller_than_its_factors(name):
    """B's two columns equal, A's rows a and -a + d c: B A = b (d c) is d times |B| |A|. ||B A||^2,
    the error's denominator, was a trace of fp32 Grams whose rounding (~1e-7 |B|^2 |A|^2) swamped
    it: the fp16 error read inf for d = 1e-4 and 1e-5 (numpy: 2.2 and 1.4), a value where one exists."""
    dtype = HALF_DTYPES[name]
    g = torch.Generator().manual_seed(6)
    pairs = []
    for d in (1e-2, 1e-3, 1e-4, 1e-5):
        a, c = torch.randn(1, 40, generator=g, dtype=torch.float64), torch.randn(1, 40, generator=g, dtype=torch.float64)
        b = torch.randn(50, 1, generator=g, dtype=torch.float64)
        pairs.append((torch.cat([a, -a + d * c]).float(), torch.cat([b, b], 1).float()))
    A, B = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    risk = storage_risk(A, B, (dtype,))[dtype]
    for i, (a, b) in enumerate(pairs):
        assert float(risk.dW_error[i]) == pytest.approx(_np_risk(a, b, dtype)[2], rel=1e-2), i


def test_the_command_said_to_fix_fp16_loss_fixes_a_rank_deficient_layer(tmp_path, capsys):
    """B ~1e-6 of rank 2 < r = 4, A ~1e3: fp16 loses 1.8% of dW, balancing fixes it. The summary named
    `balora balance IN OUT --dtype float16`, which leaves a rank-deficient pair unchanged (its default
    --on-rank-deficient skip): the copy it wrote still lost 1.8%. The command it names now fixes it."""
    from safetensors.torch import load_file, save_file

    from balora.cli import main

    g = torch.Generator().manual_seed(12)
    A = 1e3 * torch.randn(4, 40, generator=g)
    B = torch.cat([1e-6 * torch.randn(50, 2, generator=g), torch.zeros(50, 2)], 1)
    src = tmp_path / "lora.safetensors"
    save_file({"base_model.model.proj.lora_A.weight": A, "base_model.model.proj.lora_B.weight": B}, str(src))
    assert main(["inspect", str(src)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    said = out[out.index("(balora balance IN OUT"):].split(")")[0].removeprefix("(").split()
    dst = tmp_path / "out.safetensors"
    assert main([str(src) if w == "IN" else str(dst) if w == "OUT" else w for w in said[1:]]) == 0
    sd = load_file(str(dst))
    a, b = A.double().numpy(), B.double().numpy()
    a_c, b_c = (sd[f"base_model.model.proj.lora_{k}.weight"].double().numpy() for k in "AB")
    assert _np_risk(A, B, torch.float16)[2] > 1e-2  # as stored, fp16 loses it
    kept = np.linalg.norm(b_c @ a_c - b @ a) / np.linalg.norm(b @ a)
    assert kept < 1e-2, kept  # the copy the summary asked for keeps dW
