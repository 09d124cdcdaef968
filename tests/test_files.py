"""Adapters on disk: readers, balora.inspect and balora.balance_file, against independent references.

References: factors read back with safetensors' own load_file (not balora's lazy reader),
spectra and imbalance recomputed in float64 numpy from them, scalings taken from PEFT's own
live layers, dW from PEFT's get_delta_weight and merged weights from PEFT's merge_and_unload.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import balora
from balora.adapters import peft_config, reading
from balora.errors import InputError
from balora.inspection import balance_file

warnings.filterwarnings("ignore", category=UserWarning)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]
NUMERIC = ["norm_A", "norm_B", "imbalance", "rel_imbalance", "cond_A", "cond_B", "cond_dW", "eff_rank", "sigma_max"]


# ---- builders shared with the CLI tests ------------------------------------------------------


def make_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=16,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def token_batch():
    g = torch.Generator().manual_seed(7)
    start = torch.randint(0, 64, (4, 1), generator=g)
    return (start + torch.arange(12)) % 64  # (4, 12): counting mod 64


def train_llama_adapter(out_dir: Path, steps: int = 4, safe_serialization: bool = True):
    """Two adapters trained a few AdamW steps and saved by PEFT's save_pretrained:
    "default" (all linear layers + embeddings, rank_pattern and alpha_pattern) and
    "dora" (DoRA + rsLoRA on q/v, saved in the subfolder dora/)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                    rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 16}))
    model.add_adapter("dora", LoraConfig(r=4, lora_alpha=6, use_rslora=True, use_dora=True,
                                         target_modules=["q_proj", "v_proj"]))
    batch = token_batch()
    for adapter in ("default", "dora"):
        model.set_adapter(adapter)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(steps):
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
    model.save_pretrained(out_dir, selected_adapters=["default", "dora"], safe_serialization=safe_serialization)
    return model


KOHYA_MODULES = {  # name: (lora_down shape, lora_up shape, alpha or None)
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((4, 24), (24, 4), 2.0),
    "lora_te_text_model_encoder_layers_1_self_attn_q_proj": ((4, 24), (24, 4), 2.0),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2": ((4, 40), (16, 4), 4.0),
    "lora_unet_down_blocks_0_resnets_0_conv1": ((4, 6, 3, 3), (8, 4, 1, 1), 1.0),
    "lora_unet_up_blocks_0_attentions_0_proj_out": ((2, 16), (16, 2), None),
}
KOHYA_METADATA = {
    "ss_network_dim": "4", "ss_network_alpha": "2", "ss_base_model_version": "sd_v1", "ss_output_name": "tiny",
    "ss_tag_frequency": json.dumps({"set": {f"tag{i}": i for i in range(200)}}),
}


def write_kohya(path: Path, dtype=torch.float16, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (down, up, alpha) in KOHYA_MODULES.items():
        tensors[f"{name}.lora_down.weight"] = (0.3 * torch.randn(down, generator=g)).to(dtype)
        tensors[f"{name}.lora_up.weight"] = (0.05 * torch.randn(up, generator=g)).to(dtype)
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    save_file(tensors, str(path), metadata=KOHYA_METADATA)
    return path


# ---- independent float64 reference ------------------------------------------------------------


def reference_stats(A: np.ndarray, B: np.ndarray, s: float) -> dict:
    """Float64 numpy: every number of a layer report row, from A (r, in), B (out, r), dW = s B A."""
    r = A.shape[0]

    def svals(M):
        sv = np.linalg.svd(M, compute_uv=False)[:r]
        return np.pad(sv, (0, r - len(sv)))

    def cond(sv):
        return math.nan if sv[0] == 0 else (math.inf if sv[-1] == 0 else sv[0] / sv[-1])

    sigma, sigma_A, sigma_B = svals(s * B @ A), svals(A), svals(B)
    BtB, AAt = B.T @ B, A @ A.T
    imb = np.linalg.norm(BtB - AAt)
    p = sigma / sigma.sum()
    return {
        "norm_A": np.linalg.norm(A), "norm_B": np.linalg.norm(B), "imbalance": imb,
        "rel_imbalance": imb / (np.linalg.norm(BtB) + np.linalg.norm(AAt)),
        "cond_A": cond(sigma_A), "cond_B": cond(sigma_B), "cond_dW": cond(sigma),
        "eff_rank": float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())), "sigma_max": sigma[0], "sigma": sigma,
    }


def peft_file_factors(weights: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{module: (A, B)} float64 from a PEFT-named weights file, read with safetensors/torch directly."""
    sd = load_file(str(weights)) if weights.suffix == ".safetensors" else torch.load(weights, weights_only=True)
    out = {}
    for key, A in sd.items():
        for a, b in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if key.endswith(a):
                stem = key[: -len(a)]
                B = sd[stem + b]
                out[stem.removeprefix("base_model.model.")] = (
                    A.double().reshape(A.shape[0], -1).numpy(), B.double().reshape(B.shape[0], -1).numpy())
    return out


def assert_row_matches(row, ref: dict, rtol: float, where: str) -> None:
    for col in NUMERIC:
        got, want = float(row[col]), float(ref[col])
        if math.isinf(want) or math.isnan(want):
            assert got == want or (math.isnan(want) and math.isnan(got)), f"{where} {col}: {got} vs {want}"
        else:
            assert got == pytest.approx(want, rel=rtol, abs=1e-7), f"{where} {col}: {got} vs {want}"
    np.testing.assert_allclose(row["sigma"], ref["sigma"], rtol=rtol, atol=1e-7 * max(ref["sigma"][0], 1e-30),
                               err_msg=where)


def live_scalings(model) -> dict[tuple[str, str], float]:
    """(module, adapter) -> scaling as PEFT itself set it on the live layers."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            for adapter, s in layer.scaling.items():
                out[(name.removeprefix("base_model.model."), adapter)] = float(s)
    return out


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(adapter folder saved by PEFT, the live PeftModel it came from)."""
    out = tmp_path_factory.mktemp("peft") / "adapter"
    model = train_llama_adapter(out)
    return out, model


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    """A real transformers Trainer output folder: 2 steps, a checkpoint after each."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    out = tmp_path_factory.mktemp("trainer") / "run"
    model = get_peft_model(make_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ids = token_batch()
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(out), max_steps=2, save_steps=1, save_strategy="steps",
                             per_device_train_batch_size=2, learning_rate=1e-2, report_to="none", use_cpu=True,
                             disable_tqdm=True, logging_strategy="no", seed=0)
    Trainer(model=model, args=args, train_dataset=data).train()
    return out


# ---- PEFT folder ---------------------------------------------------------------------------------


def test_peft_folder_matches_float64_reference(trained):
    folder, model = trained
    df = balora.inspect(folder)
    assert list(df.columns) == list(balora.INSPECT_COLUMNS)
    scalings = live_scalings(model)
    expected = {(m, a) for m, a in scalings}
    assert set(zip(df["module"], df["adapter"])) == expected
    assert (df["checkpoint"] == "").all() and df["step"].isna().all()
    assert (df["status"] == "ok").all()

    factors = {"default": peft_file_factors(folder / "adapter_model.safetensors"),
               "dora": peft_file_factors(folder / "dora" / "adapter_model.safetensors")}
    for _, row in df.iterrows():
        A, B = factors[row["adapter"]][row["module"]]
        s = scalings[(row["module"], row["adapter"])]
        assert row["scaling"] == pytest.approx(s, rel=1e-12)
        assert row["r"] == A.shape[0]
        assert_row_matches(row, reference_stats(A, B, s), 2e-4, f"{row['module']}[{row['adapter']}]")
    emb = df[df["module"] == "model.embed_tokens"].iloc[0]
    assert emb["kind"] == "embedding"
    assert set(df.loc[df["adapter"] == "dora", "dora"]) == {True}
    assert set(df.loc[df["adapter"] == "default", "dora"]) == {False}
    assert set(df.loc[df["module"].str.endswith("down_proj"), "r"]) == {2}  # rank_pattern


def test_same_numbers_as_layer_report_of_live_model(trained):
    folder, model = trained
    files_df = balora.inspect(folder).set_index(["module", "adapter"]).sort_index()
    live_df = balora.layer_report(model).set_index(["module", "adapter"]).sort_index()
    assert files_df.index.equals(live_df.index)
    for col in ["kind", "r", "dora", "out_features", "in_features", "rank"]:
        assert (files_df[col] == live_df[col]).all(), col
    for col in NUMERIC + ["scaling"]:
        np.testing.assert_allclose(files_df[col], live_df[col], rtol=1e-5, err_msg=col)


def test_inspect_one_adapter_and_weights_file(trained):
    folder, _ = trained
    dora = balora.inspect(folder, adapter="dora")
    assert set(dora["adapter"]) == {"dora"} and len(dora) == 4
    with pytest.raises(InputError, match="no adapter named 'nope'; found: default, dora"):
        balora.inspect(folder, adapter="nope")
    # The weights file itself, next to its config: same numbers as the folder, scaling known.
    only = balora.inspect(folder / "adapter_model.safetensors")
    whole = balora.inspect(folder, adapter="default")
    np.testing.assert_array_equal(only["rel_imbalance"], whole["rel_imbalance"])
    np.testing.assert_array_equal(only["scaling"], whole["scaling"])


def test_bin_folder_reads_like_safetensors(trained, tmp_path):
    folder, _ = trained
    bin_dir = tmp_path / "bin"
    shutil.copytree(folder, bin_dir)
    for d in (bin_dir, bin_dir / "dora"):
        sd = load_file(str(d / "adapter_model.safetensors"))
        (d / "adapter_model.safetensors").unlink()
        torch.save(sd, d / "adapter_model.bin")
    a, b = balora.inspect(folder), balora.inspect(bin_dir)
    np.testing.assert_array_equal(a["imbalance"], b["imbalance"])
    assert b["source"].str.endswith("adapter_model.bin").all()


def test_balance_peft_folder_round_trips_through_peft(trained, tmp_path, peft_deltas, assert_deltas_close):
    from peft import PeftModel

    folder, _ = trained
    (folder / "tokenizer_config.json").write_text('{"x": 1}')
    out = tmp_path / "balanced"
    summary = balance_file(folder, out)
    assert summary.balanced == len(balora.inspect(folder)) and not summary.skipped
    assert summary.max_rel_error <= 1e-5 and summary.max_rel_imbalance_after < 1e-4

    # Same files; configs and everything else verbatim; same keys, dtypes, shapes, metadata.
    rel = lambda root: sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())  # noqa: E731
    assert rel(out) == rel(folder)
    for name in rel(folder):
        if not name.endswith(".safetensors"):
            assert (out / name).read_bytes() == (folder / name).read_bytes(), name
    for sub in ("", "dora/"):
        with safe_open(str(folder / f"{sub}adapter_model.safetensors"), "pt") as f0, \
                safe_open(str(out / f"{sub}adapter_model.safetensors"), "pt") as f1:
            assert f0.metadata() == f1.metadata()
            assert sorted(f0.keys()) == sorted(f1.keys())
            for k in f0.keys():
                t0, t1 = f0.get_tensor(k), f1.get_tensor(k)
                assert (t0.dtype, t0.shape) == (t1.dtype, t1.shape), k
                if "lora_A" not in k and "lora_B" not in k and "lora_embedding" not in k:
                    assert torch.equal(t0, t1), f"{k} should be copied unchanged (DoRA magnitude, embeddings)"

    def load(path):
        m = PeftModel.from_pretrained(make_llama(), path)
        m.load_adapter(path / "dora", adapter_name="dora")
        return m

    orig, bal = load(folder), load(out)
    assert_deltas_close(peft_deltas(orig), peft_deltas(bal), rtol=1e-5)
    base = make_llama().state_dict()
    for adapter in ("default", "dora"):
        m0 = load(folder).merge_and_unload(adapter_names=[adapter]).state_dict()
        m1 = load(out).merge_and_unload(adapter_names=[adapter]).state_dict()
        assert m0.keys() == m1.keys()
        for k in m0:
            dW = (m0[k].double() - base[k].double()).norm()
            assert (m1[k].double() - m0[k].double()).norm() <= 1e-5 * dW + 1e-6 * m0[k].double().norm(), k

    after = balora.inspect(out)
    assert (after["rel_imbalance"] < 1e-4).all(), after.loc[after["rel_imbalance"] >= 1e-4, ["module", "rel_imbalance"]]
    before = balora.inspect(folder)
    np.testing.assert_allclose(after["sigma_max"], before["sigma_max"], rtol=1e-5)  # same dW, same spectrum


def test_balance_svd_gauge_and_bin_format(trained, tmp_path):
    folder, _ = trained
    src = tmp_path / "bin"
    shutil.copytree(folder, src)
    sd = load_file(str(src / "adapter_model.safetensors"))
    (src / "adapter_model.safetensors").unlink()
    torch.save(sd, src / "adapter_model.bin")
    out = tmp_path / "out"
    summary = balance_file(src, out, method="svd")
    assert summary.method == "svd" and summary.max_rel_error <= 1e-5
    written = torch.load(out / "adapter_model.bin", weights_only=True)  # a plain dict of tensors
    assert written.keys() == sd.keys()
    assert all(written[k].dtype == sd[k].dtype and written[k].shape == sd[k].shape for k in sd)
    assert not (out / "adapter_model.safetensors").exists()
    assert (balora.inspect(out)["rel_imbalance"] < 1e-4).all()


def test_tied_embedding_adapter_saved_as_bin_by_peft_is_read_and_balanced(tmp_path, peft_deltas):
    """PEFT's ensure_weight_tying on a tied-embedding model gives lm_head the embedding's LoRA factors
    transposed, and torch.save keeps them as transposed views of one storage: a file PEFT writes
    (safe_serialization=False) and loads, which inspect and balance refused as repeating stored values."""
    from peft import LoraConfig, PeftModel, get_peft_model

    def tied_llama():
        model = make_llama()
        model.config.tie_word_embeddings = True
        model.tie_weights()
        return model

    model = get_peft_model(tied_llama(), LoraConfig(r=4, lora_alpha=8, ensure_weight_tying=True,
                                                    target_modules=["q_proj", "embed_tokens", "lm_head"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(tmp_path / "in", safe_serialization=False)
    sd = torch.load(tmp_path / "in" / "adapter_model.bin", weights_only=True)
    lm_A, emb_B = sd["base_model.model.lm_head.lora_A.weight"], sd["base_model.model.model.embed_tokens.lora_embedding_B"]
    assert lm_A.untyped_storage().data_ptr() == emb_B.untyped_storage().data_ptr()  # the case: one storage, two views

    df = balora.inspect(tmp_path / "in")
    deltas = {m.removeprefix("base_model.model."): d for (m, _), d in peft_deltas(model).items()}
    assert set(df["module"]) == set(deltas) and (df["status"] == "ok").all()
    factors = peft_file_factors(tmp_path / "in" / "adapter_model.bin")
    for _, row in df.iterrows():  # dW = s B A against PEFT's own get_delta_weight, in float64
        A, B = factors[row["module"]]
        dW = row["scaling"] * B @ A
        ref = deltas[row["module"]].numpy()
        ref = ref.T if row["kind"] == "embedding" else ref
        assert np.linalg.norm(dW - ref) <= 1e-6 * np.linalg.norm(ref), row["module"]

    balance_file(tmp_path / "in", tmp_path / "out")
    out = torch.load(tmp_path / "out" / "adapter_model.bin", weights_only=True)
    assert out.keys() == sd.keys()
    for k in sd:
        if "lora_" not in k:
            assert torch.equal(out[k], sd[k]), k
    assert (balora.inspect(tmp_path / "out")["rel_imbalance"] < 1e-4).all()
    ids = token_batch()
    logits = []
    for folder in ("in", "out"):
        m = PeftModel.from_pretrained(tied_llama(), tmp_path / folder).eval()
        with torch.no_grad():
            logits.append(m(input_ids=ids).logits.double())
    assert (logits[1] - logits[0]).abs().max() <= 1e-5 * logits[0].abs().max()


# ---- Trainer output folder -------------------------------------------------------------------------


def test_trainer_folder_every_checkpoint_in_order(trainer_run):
    df = balora.inspect(trainer_run)
    assert list(dict.fromkeys(df["checkpoint"])) == ["checkpoint-1", "checkpoint-2"]
    assert list(dict.fromkeys(df["step"])) == [1, 2]
    for ckpt in ("checkpoint-1", "checkpoint-2"):
        part = df[df["checkpoint"] == ckpt]
        factors = peft_file_factors(trainer_run / ckpt / "adapter_model.safetensors")
        assert set(part["module"]) == set(factors) and len(part) == 4  # q, v in 2 layers
        for _, row in part.iterrows():
            A, B = factors[row["module"]]
            assert_row_matches(row, reference_stats(A, B, 8 / 4), 2e-4, f"{ckpt} {row['module']}")
    # Training moved the factors between checkpoints.
    assert not np.allclose(df.loc[df["step"] == 1, "norm_B"], df.loc[df["step"] == 2, "norm_B"])


def test_trainer_checkpoints_ordered_by_number(trainer_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(trainer_run / "checkpoint-1", run / "checkpoint-10")
    shutil.copytree(trainer_run / "checkpoint-2", run / "checkpoint-9")
    df = balora.inspect(run)
    assert list(dict.fromkeys(df["checkpoint"])) == ["checkpoint-9", "checkpoint-10"]
    first = balora.inspect(trainer_run / "checkpoint-1")
    np.testing.assert_array_equal(df.loc[df["step"] == 10, "imbalance"], first["imbalance"])


def test_trainer_folder_still_writing_its_newest_checkpoint(trainer_run, tmp_path):
    """A run still training may be writing its newest checkpoint: inspecting the folder then gave only an
    error. That checkpoint is left out with a note; a damaged older one is still an error."""
    run = tmp_path / "run"
    shutil.copytree(trainer_run, run)
    weights = run / "checkpoint-2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short, as while being written
    df = balora.inspect(run)
    assert list(dict.fromkeys(df["checkpoint"])) == ["checkpoint-1"]
    np.testing.assert_array_equal(df["imbalance"], balora.inspect(trainer_run / "checkpoint-1")["imbalance"])
    notes = df.attrs["sources"][0]["notes"]
    assert any(n.startswith("checkpoint-2 left out, unreadable") and "adapter_model.safetensors" in n for n in notes)
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-0")  # the damaged one is now an older one
    with pytest.raises(InputError, match="checkpoint-0"):
        balora.inspect(run)


def test_trainer_folders_final_adapter_keeps_every_adapter(trainer_run, tmp_path):
    # trainer.save_model(DIR) writes every adapter PEFT has: "default" at the top, the others in folders
    # named after them. The final one was read as "default" only.
    from peft import LoraConfig, get_peft_model

    run = tmp_path / "run"
    shutil.copytree(trainer_run / "checkpoint-2", run / "checkpoint-2")
    model = get_peft_model(make_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    model.save_pretrained(run)
    df = balora.inspect(run)
    final = df[df["checkpoint"] == "final"]
    assert final.groupby("adapter").size().to_dict() == {"default": 4, "other": 2}
    assert len(balora.inspect(run, adapter="other").query("checkpoint == 'final'")) == 2
    with pytest.raises(InputError, match=r"with 1 checkpoint\(s\) and a final adapter; .*adapter_model\.safetensors OUT"):
        balance_file(run, tmp_path / "out")  # the final adapter counted apart, and how to balance it


@pytest.mark.parametrize("safe", [True, False])
def test_trainer_folders_final_adapter_hint_writes_a_file_that_reads_back(trainer_run, tmp_path, safe):
    """The refusal's hint for the final adapter named adapter_model.safetensors (absent when the Trainer saved
    .bin) and an OUT without a suffix: followed, it wrote a weights file neither balora nor PEFT could read."""
    from peft import LoraConfig, get_peft_model

    run = tmp_path / "run"
    shutil.copytree(trainer_run / "checkpoint-2", run / "checkpoint-2")
    model = get_peft_model(make_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_() if "lora_B" in name else None  # a trained-looking B: the pairs get balanced
    model.save_pretrained(run, safe_serialization=safe)
    with pytest.raises(InputError) as e:
        balance_file(run, tmp_path / "out")
    src, out = re.search(r"the final adapter[^:]*: balora balance (\S+) OUT(\S*)\)", str(e.value)).groups()
    assert Path(src) == run / ("adapter_model.safetensors" if safe else "adapter_model.bin")
    summary = balance_file(src, tmp_path / f"balanced{out}")
    after = balora.inspect(tmp_path / f"balanced{out}")  # read back as the weights file it is
    assert summary.balanced == len(after) == 2


def test_balance_refuses_trainer_folder(trainer_run, tmp_path):
    with pytest.raises(InputError, match=r"Trainer output folder .* e\.g\. balora balance .*checkpoint-2 OUT"):
        balance_file(trainer_run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    summary = balance_file(trainer_run / "checkpoint-2", tmp_path / "ck")
    assert summary.balanced == 4
    assert any("optimizer.pt" in n for n in summary.notes)


# ---- kohya ------------------------------------------------------------------------------------------


def test_kohya_modules_scaling_and_numbers(tmp_path):
    path = write_kohya(tmp_path / "tiny_lora.safetensors")
    df = balora.inspect(path)
    assert set(df["module"]) == set(KOHYA_MODULES)
    assert df.attrs["sources"][0]["format"] == "kohya"
    assert df.attrs["sources"][0]["metadata"]["ss_network_dim"] == "4"
    sd = load_file(str(path))
    for _, row in df.iterrows():
        down, up = sd[f"{row['module']}.lora_down.weight"], sd[f"{row['module']}.lora_up.weight"]
        alpha = sd.get(f"{row['module']}.alpha")
        s = 1.0 if alpha is None else float(alpha) / down.shape[0]  # kohya: alpha defaults to r
        assert row["scaling"] == pytest.approx(s)
        assert row["dtype"] == "float16"
        A, B = down.double().reshape(down.shape[0], -1).numpy(), up.double().reshape(up.shape[0], -1).numpy()
        assert_row_matches(row, reference_stats(A, B, s), 1e-4, row["module"])
    conv = df[df["module"].str.endswith("conv1")].iloc[0]
    assert (conv["kind"], conv["in_features"], conv["out_features"]) == ("conv2d", 54, 8)


def test_kohya_alpha_zero_means_alpha_r(tmp_path):
    """kohya's networks/lora.py reads alpha 0 (like a missing alpha) as alpha = r: scaling 1, not 0."""
    path = tmp_path / "alpha0.safetensors"
    save_file({"lora_unet_b_proj.lora_down.weight": torch.randn(4, 16), "lora_unet_b_proj.lora_up.weight": torch.randn(16, 4),
               "lora_unet_b_proj.alpha": torch.tensor(0.0)}, str(path))
    df = balora.inspect(path)
    assert df["scaling"].tolist() == [1.0] and df["sigma_max"].iloc[0] > 0
    assert any("alpha 0: scaling 1" in n for n in df.attrs["sources"][0]["notes"])
    save_file({"lora_unet_b_proj.lora_down.weight": torch.randn(4, 16), "lora_unet_b_proj.lora_up.weight": torch.randn(16, 4),
               "lora_unet_b_proj.alpha": torch.tensor(float("nan"))}, str(path))
    with pytest.raises(InputError, match=r"alpha should be one finite number, got nan"):
        balora.inspect(path)


def test_kohya_balance_keeps_format(tmp_path):
    path = write_kohya(tmp_path / "tiny_lora.safetensors")
    out = tmp_path / "balanced.safetensors"
    summary = balance_file(path, out)
    assert summary.format == "kohya" and summary.balanced == len(KOHYA_MODULES)
    with safe_open(str(path), "pt") as f0, safe_open(str(out), "pt") as f1:
        assert f0.metadata() == f1.metadata() == KOHYA_METADATA
        assert sorted(f0.keys()) == sorted(f1.keys())
    a, b = load_file(str(path)), load_file(str(out))
    for name, (down, up, alpha) in KOHYA_MODULES.items():
        if alpha is not None:
            assert torch.equal(a[f"{name}.alpha"], b[f"{name}.alpha"])
        d0, u0 = a[f"{name}.lora_down.weight"].double(), a[f"{name}.lora_up.weight"].double()
        d1, u1 = b[f"{name}.lora_down.weight"], b[f"{name}.lora_up.weight"]
        assert d1.dtype == torch.float16 and tuple(d1.shape) == down and tuple(u1.shape) == up
        dW0 = u0.reshape(up[0], -1) @ d0.reshape(down[0], -1)
        dW1 = u1.double().reshape(up[0], -1) @ d1.double().reshape(down[0], -1)
        # fp16: rounding the balanced factors moves dW by up to ~eps * sqrt(r)
        assert (dW1 - dW0).norm() <= 1e-3 * math.sqrt(down[0]) * dW0.norm(), name
    assert (balora.inspect(out)["rel_imbalance"] < 5e-3).all()


def test_balance_expands_a_tilde_in_out_as_in_in(tmp_path, monkeypatch):
    # balance_file("~/lora.safetensors", "~/balanced.safetensors") (a Python call, the dashboard: no shell
    # expands ~) read IN from the home folder but refused OUT: "its folder ~ does not exist".
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    write_kohya(tmp_path / "tiny_lora.safetensors", dtype=torch.float32)
    balance_file("~/tiny_lora.safetensors", "~/balanced.safetensors")
    assert not (tmp_path / "~").exists()
    a, b = load_file(str(tmp_path / "tiny_lora.safetensors")), load_file(str(tmp_path / "balanced.safetensors"))
    for name, (down, up, _) in KOHYA_MODULES.items():
        dW0, dW1 = (t[f"{name}.lora_up.weight"].double().reshape(up[0], -1)
                    @ t[f"{name}.lora_down.weight"].double().reshape(down[0], -1) for t in (a, b))
        assert (dW1 - dW0).norm() <= 1e-5 * dW0.norm(), name
    with pytest.raises(InputError, match=r"no user 'no_such_user_balora'.*~/"):
        balance_file("~/tiny_lora.safetensors", "~no_such_user_balora/balanced.safetensors")


def test_a_balanced_copy_drops_the_hashes_of_the_original_tensors(tmp_path):
    # kohya's sd-scripts write sha256 hashes of the tensors into the metadata; tools identify files by
    # them, so a copy with other tensors must not carry the original's. Everything else is kept.
    path = write_kohya(tmp_path / "tiny_lora.safetensors")
    hashes = {"sshs_model_hash": "ab" * 32, "sshs_legacy_hash": "cd" * 4}
    save_file(load_file(str(path)), str(path), metadata={**KOHYA_METADATA, **hashes})
    out = tmp_path / "balanced.safetensors"
    summary = balance_file(path, out)
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == KOHYA_METADATA
    assert any("sshs_model_hash, sshs_legacy_hash left out" in n for n in summary.notes)


# ---- bare files, conv layers, half precision ----------------------------------------------------------


def test_bare_safetensors_scaling_unknown(trained, tmp_path):
    folder, _ = trained
    bare = tmp_path / "weights.safetensors"
    shutil.copy(folder / "adapter_model.safetensors", bare)
    df = balora.inspect(bare)
    assert df["scaling"].isna().all()
    assert any("scaling unknown" in n for n in df.attrs["sources"][0]["notes"])
    factors = peft_file_factors(bare)
    for _, row in df.iterrows():
        A, B = factors[row["module"]]
        assert_row_matches(row, reference_stats(A, B, 1.0), 2e-4, row["module"])  # sigma of the unscaled B A
    out = tmp_path / "out.safetensors"
    assert balance_file(bare, out).format == "bare"
    assert sorted(load_file(str(out))) == sorted(load_file(str(bare)))


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv1d(3, 8, 3)
        self.c2 = torch.nn.Conv2d(3, 8, 3)
        self.grouped = torch.nn.Conv2d(8, 8, 3, groups=2)
        self.emb = torch.nn.Embedding(20, 12)


def test_conv_kinds_grouped_conv_and_balance(tmp_path, assert_deltas_close):
    from peft import LoraConfig, PeftModel, get_peft_model

    def base():
        torch.manual_seed(0)
        return ConvNet()

    # init_lora_weights=False: random B as well as A, so every product is nonzero.
    model = get_peft_model(base(), LoraConfig(r=4, lora_alpha=4, target_modules=["c1", "c2", "grouped", "emb"],
                                              init_lora_weights=False))
    model.save_pretrained(tmp_path / "conv")
    df = balora.inspect(tmp_path / "conv").set_index("module")
    assert df.loc["c1", "kind"] == "conv1d" and df.loc["c2", "kind"] == "conv2d" and df.loc["emb", "kind"] == "embedding"
    assert df.loc["grouped", "status"].startswith("skipped: grouped conv (groups=2)")
    live = balora.layer_report(model).set_index("module")
    for module in ("c1", "c2", "emb"):
        for col in NUMERIC:
            assert df.loc[module, col] == pytest.approx(live.loc[module, col], rel=1e-5), (module, col)

    summary = balance_file(tmp_path / "conv", tmp_path / "out")
    assert summary.balanced == 3 and "grouped[default]" in summary.skipped
    a, b = load_file(str(tmp_path / "conv" / "adapter_model.safetensors")), load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a if ".grouped." in k)  # copied unchanged

    def deltas(path):
        from peft.tuners.lora import LoraLayer

        m = PeftModel.from_pretrained(base(), path)
        with torch.no_grad():  # PEFT cannot form the delta of a grouped conv itself
            return {n: layer.get_delta_weight("default").double() for n, layer in m.named_modules()
                    if isinstance(layer, LoraLayer) and not n.endswith("grouped")}

    assert_deltas_close(deltas(tmp_path / "conv"), deltas(tmp_path / "out"), rtol=1e-5)


class AttentionNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.lin = torch.nn.Linear(8, 8)


@pytest.mark.parametrize("patterns", [{"rank_pattern": {"mha": 1}}, {"alpha_pattern": {"mha": 16}},
                                      {"rank_pattern": {"out_proj": 1}}])
def test_attention_out_proj_takes_the_rank_and_alpha_of_its_attention_module(patterns, tmp_path, assert_deltas_close):
    """PEFT's LoRA on nn.MultiheadAttention also wraps its out_proj (saved as mha.base_layer.out_proj) with the
    r and alpha PEFT gave the attention module, whatever the patterns say about "out_proj" itself."""
    from peft import LoraConfig, PeftModel, get_peft_model

    def base():
        torch.manual_seed(0)
        return AttentionNet()

    model = get_peft_model(base(), LoraConfig(r=2, lora_alpha=4, target_modules=["mha", "lin"],
                                              init_lora_weights=False, **patterns))
    model.save_pretrained(tmp_path / "mha")
    df = balora.inspect(tmp_path / "mha").set_index("module")
    live = balora.layer_report(model).set_index("module")
    assert "mha.base_layer.out_proj" in df.index and set(df.index) == set(live.index)
    for (module, adapter), s in live_scalings(model).items():
        assert df.loc[module, "scaling"] == pytest.approx(s), module
        assert df.loc[module, "r"] == live.loc[module, "r"], module
        assert df.loc[module, "sigma_max"] == pytest.approx(live.loc[module, "sigma_max"], rel=1e-5), module

    assert balance_file(tmp_path / "mha", tmp_path / "out").balanced == 3

    def deltas(path):
        from peft.tuners.lora import LoraLayer

        m = PeftModel.from_pretrained(base(), path)
        with torch.no_grad():
            return {n: layer.get_delta_weight("default").double() for n, layer in m.named_modules()
                    if isinstance(layer, LoraLayer)}

    assert_deltas_close(deltas(tmp_path / "mha"), deltas(tmp_path / "out"), rtol=1e-5)


class TwoParameters(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(6, 8))
        self.w2 = torch.nn.Parameter(torch.randn(8, 6))


class ParameterNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = TwoParameters()
        self.lin = torch.nn.Linear(8, 8)


@pytest.mark.parametrize("patterns,unknown", [({"rank_pattern": {"w2": 1}, "alpha_pattern": {"p.w1": 16}}, set()),
                                              ({"rank_pattern": {"p.w1": 1, "lin": 3}}, set()),
                                              ({"alpha_pattern": {"w2": 6}}, {"p", "p.base_layer"})])
def test_target_parameters_take_the_patterns_of_their_parameter(patterns, unknown, tmp_path):
    """PEFT matches rank_pattern / alpha_pattern against "<module>.<parameter>" for target_parameters (saved as
    p and p.base_layer, one wrapper per parameter, in p's parameter order, which the file does not keep): the
    file's r and scaling are the ones PEFT gave each layer, told apart by r; same r and other alphas: unknown."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(ParameterNet(), LoraConfig(r=2, lora_alpha=4, target_parameters=["p.w1", "p.w2"],
                                                      target_modules=["lin"], init_lora_weights=False, **patterns))
    model.save_pretrained(tmp_path / "params")
    df = balora.inspect(tmp_path / "params").set_index("module")
    live = balora.layer_report(model).set_index("module")
    assert set(df.index) == set(live.index) == {"p", "p.base_layer", "lin"} and set(df["status"]) == {"ok"}
    for (module, adapter), s in live_scalings(model).items():
        if module in unknown:
            assert math.isnan(df.loc[module, "scaling"]), module
            continue
        assert df.loc[module, "scaling"] == pytest.approx(s), module
        assert df.loc[module, "sigma_max"] == pytest.approx(live.loc[module, "sigma_max"], rel=1e-5), module
    assert balance_file(tmp_path / "params", tmp_path / "out").balanced == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inspect_and_balance(tmp_path, dtype):
    g = torch.Generator().manual_seed(1)
    sd = {}
    for i in range(3):
        sd[f"base_model.model.layers.{i}.proj.lora_A.weight"] = torch.randn(8, 48, generator=g).to(dtype)
        sd[f"base_model.model.layers.{i}.proj.lora_B.weight"] = (0.01 * torch.randn(32, 8, generator=g)).to(dtype)
    path = tmp_path / "half.safetensors"
    save_file(sd, str(path))
    df = balora.inspect(path)
    assert (df["dtype"] == str(dtype).removeprefix("torch.")).all()
    for _, row in df.iterrows():
        key = f"base_model.model.{row['module']}"
        A, B = sd[f"{key}.lora_A.weight"].double().numpy(), sd[f"{key}.lora_B.weight"].double().numpy()
        assert_row_matches(row, reference_stats(A, B, 1.0), 1e-4, row["module"])
    out = tmp_path / "out.safetensors"
    summary = balance_file(path, out)
    eps = torch.finfo(dtype).eps
    assert summary.balanced == 3 and summary.max_rel_error <= eps * math.sqrt(8)
    written = load_file(str(out))
    assert all(written[k].dtype == dtype for k in written)
    assert (balora.inspect(out)["rel_imbalance"] < 4 * eps).all()


@pytest.mark.parametrize("scale", [1e45, 1e-45])
def test_float64_factors_outside_fp32_range_balance_and_report_in_float64(tmp_path, scale):
    """A float64 adapter was read into fp32 to judge it: entries of 1e45 became inf and the copy was
    refused as "non-finite values (NaN/Inf)" (which balora.inspect of the same file does not say), and
    entries of 1e-45 flushed to zero, so rel_imbalance_after said 0 whatever the written pair was."""
    g = torch.Generator().manual_seed(4)
    sd = {}
    for i in range(2):
        sd[f"base_model.model.layers.{i}.proj.lora_A.weight"] = torch.randn(4, 24, generator=g, dtype=torch.float64) * scale
        sd[f"base_model.model.layers.{i}.proj.lora_B.weight"] = torch.randn(16, 4, generator=g, dtype=torch.float64) * scale
    path, out = tmp_path / "wide.safetensors", tmp_path / "out.safetensors"
    save_file(sd, str(path))
    A0 = {k: (v / scale).numpy() for k, v in sd.items()}  # the reference at scale 1: the ratios do not depend on it
    assert (balora.inspect(path)["status"] == "ok").all()
    summary = balance_file(path, out)
    assert summary.balanced == 2
    written = {k: (v / scale).numpy() for k, v in load_file(str(out)).items()}
    changes = summary.changes.set_index("module")
    for i in range(2):
        key = f"base_model.model.layers.{i}.proj.lora_"
        A, B, A1, B1 = A0[key + "A.weight"], A0[key + "B.weight"], written[key + "A.weight"], written[key + "B.weight"]
        rel = np.linalg.norm(B1.T @ B1 - A1 @ A1.T) / (np.linalg.norm(B1.T @ B1) + np.linalg.norm(A1 @ A1.T))
        assert np.linalg.norm(B1 @ A1 - B @ A) / np.linalg.norm(B @ A) < 1e-12
        assert rel < 1e-12
        assert changes.loc[f"layers.{i}.proj", "rel_imbalance_after"] == pytest.approx(rel, abs=1e-12)


def test_nonfinite_module_reported_not_fatal_for_inspect(tmp_path):
    g = torch.Generator().manual_seed(2)
    sd = {}
    for i in range(3):
        sd[f"layers.{i}.lora_A.weight"] = torch.randn(4, 16, generator=g)
        sd[f"layers.{i}.lora_B.weight"] = torch.randn(16, 4, generator=g)
    sd["layers.1.lora_B.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(sd, str(path))
    df = balora.inspect(path).set_index("module")
    assert df.loc["layers.1", "status"].startswith("non-finite")
    assert (df.drop(index="layers.1")["status"] == "ok").all()
    with pytest.raises(InputError, match=r"nan\.safetensors: non-finite values \(NaN/Inf\) in layers\.1\[default\]"):
        balance_file(path, tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]  # nothing written, no temp left


# ---- reading machinery ----------------------------------------------------------------------------------


def test_chunks_bounded_and_same_numbers(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(3)
    sd = {}
    for i in range(12):
        sd[f"m.{i}.lora_A.weight"] = torch.randn(4, 64, generator=g)
        sd[f"m.{i}.lora_B.weight"] = torch.randn(32, 4, generator=g) * (i + 1)
    path = tmp_path / "many.safetensors"
    save_file(sd, str(path))
    (source,) = reading.read_adapters(path)
    per_pair = 4 * (4 * 64 + 32 * 4)
    sizes = [len(c) for c in reading.iter_pair_chunks(source, max_bytes=3 * per_pair)]
    assert sizes == [3, 3, 3, 3]
    big = balora.inspect(path)
    monkeypatch.setattr(reading, "CHUNK_BYTES", per_pair)  # one pair per chunk
    one = balora.inspect(path)
    np.testing.assert_allclose(one["imbalance"], big["imbalance"], rtol=1e-6)
    assert list(big["module"]) == [f"m.{i}" for i in range(12)]  # m.2 before m.10


@pytest.mark.parametrize("module", ["model.layers.0.mlp.down_proj", "model.layers.10.self_attn.q_proj",
                                    "q_proj", "model.layers.1.self_attn.q_proj_extra"])
def test_pattern_keys_follow_peft(module):
    from peft.utils.other import get_pattern_key

    patterns = ["down_proj", r"layers\.1.*q_proj", "q_proj", "model.layers.0.mlp.down_proj"]
    assert peft_config.get_pattern_key(patterns, module) == get_pattern_key(patterns, module)


def test_config_scaling_rslora_and_patterns():
    cfg = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "use_rslora": True,
           "rank_pattern": {"down_proj": 4}, "alpha_pattern": {"q_proj": 8}}
    assert peft_config.config_rank_scaling(cfg, "model.layers.0.mlp.down_proj") == (4, 32 / 2)
    assert peft_config.config_rank_scaling(cfg, "model.layers.0.self_attn.q_proj") == (16, 8 / 4)
    assert peft_config.config_rank_scaling(cfg, "model.layers.0.self_attn.k_proj") == (16, 32 / 4)


def test_destination_rules(trained, tmp_path):
    folder, _ = trained
    with pytest.raises(InputError, match="inside the input"):
        balance_file(folder, folder / "balanced")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(InputError, match="not an adapter folder, so --force will not delete anything"):
        balance_file(folder, out)  # not "pass --force": that would be refused too, as below
    assert (out / "keep.txt").read_text() == "old"
    with pytest.raises(InputError, match="not an adapter folder, so --force will not delete anything"):
        balance_file(folder, out, force=True)  # a folder of other things, named by mistake
    assert os.listdir(out) == ["keep.txt"]
    (out / "adapter_config.json").write_text("{}")  # an earlier copy of an adapter: replaced whole
    balance_file(folder, out, force=True)
    assert not (out / "keep.txt").exists() and json.loads((out / "adapter_config.json").read_text())
    with pytest.raises(InputError, match="does not exist"):
        balance_file(folder, tmp_path / "missing" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left behind


def test_each_tensor_file_is_parsed_once(tmp_path, monkeypatch):
    """Readers share the candidate's TensorFile: a bare file is not parsed again by each reader."""
    from balora.adapters import tensor_file

    opened = []
    real_init = tensor_file.TensorFile.__init__

    def counting_init(self, path, format=None):
        opened.append(Path(path).name)
        real_init(self, path, format)

    monkeypatch.setattr(tensor_file.TensorFile, "__init__", counting_init)
    g = torch.Generator().manual_seed(0)
    bare = tmp_path / "bare.safetensors"
    save_file({"m.lora_A.weight": torch.randn(2, 4, generator=g), "m.lora_B.weight": torch.randn(3, 2, generator=g)},
              str(bare))
    torch.save(load_file(str(bare)), tmp_path / "bare.bin")
    for name in ("bare.safetensors", "bare.bin"):
        opened.clear()
        (source,) = reading.read_adapters(tmp_path / name)
        assert source.reader == "bare" and opened == [name]
    # diffusers' folder in the older lora.down / lora.up naming goes on to kohya's reader, parsed once too.
    diffusers = tmp_path / "diffusers"
    diffusers.mkdir()
    save_file({"m.lora.down.weight": torch.randn(2, 4, generator=g),
               "m.lora.up.weight": torch.randn(3, 2, generator=g)}, str(diffusers / "pytorch_lora_weights.safetensors"))
    opened.clear()
    (source,) = reading.read_adapters(diffusers)
    assert source.reader == "kohya" and opened == ["pytorch_lora_weights.safetensors"]


def test_a_file_is_never_written_where_a_folder_was_named(trained, tmp_path):
    """`balora balance lora.safetensors balanced/` wrote a file named `balanced` (no extension, a name that
    tools listing *.safetensors skip): the trailing / said a folder. And a folder that is a file was said
    not to exist."""
    folder, _ = trained
    weights = folder / "adapter_model.safetensors"
    with pytest.raises(InputError, match="ends with /.*adapter_model.safetensors is a file"):
        balance_file(weights, f"{tmp_path / 'balanced'}/")
    (tmp_path / "plain").write_text("x")
    with pytest.raises(InputError, match="plain is not a folder"):
        balance_file(weights, tmp_path / "plain" / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]  # nothing written
    balance_file(folder, f"{tmp_path / 'copy'}/")  # a folder for a folder: the slash is what it means
    assert (tmp_path / "copy" / "adapter_model.safetensors").is_file()


def test_a_folder_of_one_lora_file_is_not_written_into(tmp_path):
    """A folder (a Hub repository) of one kohya file balanced to a file name is balanced as that file; a name
    inside the folder was accepted, though OUT may not be inside IN: the folder then held two .safetensors
    files and no longer read as an adapter."""
    folder = tmp_path / "style-lora"
    folder.mkdir()
    write_kohya(folder / "style.safetensors")
    before = sorted(os.listdir(folder))
    with pytest.raises(InputError, match="inside the input"):
        balance_file(folder, folder / "balanced.safetensors")
    assert sorted(os.listdir(folder)) == before
    assert len(balora.inspect(folder)) == len(KOHYA_MODULES)
    balance_file(folder, tmp_path / "balanced.safetensors")  # beside it, as before
    assert len(balora.inspect(tmp_path / "balanced.safetensors")) == len(KOHYA_MODULES)


@pytest.mark.parametrize("given, other", [(".safetensors", ".bin"), (".safetensors", ".pt"), (".bin", ".safetensors")])
def test_a_copy_is_never_named_for_the_other_weights_format(trained, tmp_path, given, other):
    """`balora balance lora.safetensors out.bin` wrote safetensors bytes under a .bin name, which torch.load,
    and balora inspect, then refused; `balance adapter_model.bin out.safetensors` failed with a temporary
    path and a safetensors parser error. Refused up front, naming what to call it."""
    folder, _ = trained
    src = tmp_path / f"adapter{given}"
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    save_file(tensors, str(src)) if given == ".safetensors" else torch.save(tensors, src)
    with pytest.raises(InputError) as err:
        balance_file(src, tmp_path / f"out{other}")
    msg = str(err.value)
    assert "\n" not in msg and f"out{other}" in msg and f"out{given}" in msg and ".balora-tmp" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]  # nothing written
    balance_file(src, tmp_path / f"out{given}")  # the name the message offers works and reads back
    assert len(balora.inspect(tmp_path / f"out{given}")) == len(balora.inspect(src))


@pytest.mark.parametrize("given", [".safetensors", ".bin"])
@pytest.mark.parametrize("name", ["balanced", "out.lora"])
def test_a_copy_of_a_file_without_a_weights_suffix_is_refused(trained, tmp_path, given, name):
    """`balora balance lora.safetensors balanced` wrote a file that balora inspect ("not a LoRA adapter"),
    PEFT and diffusers do not open: they choose the parser by the suffix. Refused, naming one that reads."""
    folder, _ = trained
    src = tmp_path / f"adapter{given}"
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    save_file(tensors, str(src)) if given == ".safetensors" else torch.save(tensors, src)
    with pytest.raises(InputError, match=rf"has no weights file suffix.*name it .*{re.escape(name + given)}$"):
        balance_file(src, tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]  # nothing written
    balance_file(src, tmp_path / (name + given))
    assert len(balora.inspect(tmp_path / (name + given))) == len(balora.inspect(src))
