"""Adapters as published in the wild: diffusers' pytorch_lora_weights.safetensors (written by
diffusers itself) and LyCORIS files (written by the lycoris-lora package). Both packages are
optional test dependencies (`pip install -e ".[wild]"`); without them these tests skip.

The reference for every number is a float64 recomputation from the raw tensors in the file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import balora
from balora.errors import InputError


def _dw64(tensors, key_A, key_B, scaling):
    A = tensors[key_A].double().flatten(1).numpy()
    B = tensors[key_B].double().flatten(1).numpy()
    return scaling * B @ A


def _sigma_ref(tensors, key_A, key_B, scaling):
    return np.linalg.svd(_dw64(tensors, key_A, key_B, scaling), compute_uv=False)[: tensors[key_A].shape[0]]


# ---------------------------------------------------------------------------- diffusers
@pytest.fixture(scope="module")
def diffusers_lora(tmp_path_factory):
    """A tiny UNet and CLIP text encoder with PEFT LoRA, saved by diffusers' own
    save_lora_weights (with and without the adapter metadata that carries lora_alpha)."""
    loaders = pytest.importorskip("diffusers.loaders", reason="diffusers not installed (pip install -e '.[wild]')")
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2,
    )
    unet_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights="gaussian")
    unet.add_adapter(unet_cfg)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=8, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1))
    te_cfg = LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    te = inject_adapter_in_model(te_cfg, te)
    with torch.no_grad():  # a trained-looking B (PEFT's init leaves it zero)
        for model in (unet, te):
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
    root = tmp_path_factory.mktemp("diffusers")
    saver = loaders.StableDiffusionLoraLoaderMixin.save_lora_weights
    saver(root / "with_meta", unet_lora_layers=get_peft_model_state_dict(unet),
          text_encoder_lora_layers=get_peft_model_state_dict(te),
          unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=te_cfg.to_dict())
    saver(root / "no_meta", unet_lora_layers=get_peft_model_state_dict(unet))
    return root


def test_a_component_diffusers_does_not_list_gets_its_own_config(tmp_path):
    """A pipeline's own component (MiniMax-H3's `transformer_ref`, saved by diffusers 0.42 as
    "transformer_ref.<field>" in lora_adapter_metadata): its fields were read as unprefixed ones, so it
    took the defaults (scaling 1 where diffusers loads 32 / 8 = 4), or a false mismatch error."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    weights, meta = {}, {}
    for name, r, alpha in (("transformer", 4, 16), ("transformer_ref", 8, 32)):
        torch.manual_seed(0)
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["0", "1"], init_lora_weights=False)
        model = inject_adapter_in_model(cfg, torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)))
        weights.update({f"{name}.{k}": v for k, v in get_peft_model_state_dict(model).items()})
        meta.update({f"{name}.{k}": v for k, v in cfg.to_dict().items()})
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(weights, str(path), metadata={"lora_adapter_metadata": json.dumps(meta, default=list)})
    df = balora.inspect(path).set_index("module")
    assert df.loc["transformer.0", "scaling"] == 4.0 and df.loc["transformer_ref.0", "scaling"] == 4.0
    assert (df.loc["transformer_ref.0", "r"], df.loc["transformer.1", "r"]) == (8, 4)


def test_diffusers_file_with_metadata(diffusers_lora):
    path = diffusers_lora / "with_meta" / "pytorch_lora_weights.safetensors"
    tensors = load_file(path)
    df = balora.inspect(path)
    n_pairs = sum(k.endswith("lora_A.weight") for k in tensors)
    assert len(df) == n_pairs == 32 + 2
    assert df.attrs["sources"][0]["reader"] == "diffusers"
    unet = df[df.module.str.startswith("unet.")]
    te = df[df.module.str.startswith("text_encoder.")]
    assert len(unet) == 32 and len(te) == 2
    assert np.allclose(unet.scaling, 8 / 4) and np.allclose(te.scaling, 3 / 2)  # from each prefix's metadata
    for row in df.iloc[[0, 5, -1]].itertuples():
        ref = _sigma_ref(tensors, f"{row.module}.lora_A.weight", f"{row.module}.lora_B.weight", row.scaling)
        np.testing.assert_allclose(row.sigma, ref, rtol=1e-5)
    # The folder diffusers wrote is an adapter too.
    assert len(balora.inspect(diffusers_lora / "with_meta")) == len(df)


def test_diffusers_file_without_metadata_has_unknown_scaling(diffusers_lora):
    df = balora.inspect(diffusers_lora / "no_meta")
    assert len(df) == 32 and df.scaling.isna().all()
    notes = " ".join(df.attrs["sources"][0]["notes"])
    assert "scaling unknown" in notes


def test_older_diffusers_naming_lora_down_up(tmp_path):
    # diffusers' pre-PEFT layout: <module>.lora.down.weight / .lora.up.weight, optional .alpha
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(3):
        m = f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn{i}.to_q"
        tensors[f"{m}.lora.down.weight"] = torch.randn(4, 16, generator=g)
        tensors[f"{m}.lora.up.weight"] = torch.randn(8, 4, generator=g)
        tensors[f"{m}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(tensors, path)
    df = balora.inspect(path)
    assert len(df) == 3 and np.allclose(df.scaling, 2.0 / 4)
    row = df.iloc[0]
    np.testing.assert_allclose(row.sigma, _sigma_ref(tensors, f"{row.module}.lora.down.weight",
                                                     f"{row.module}.lora.up.weight", 0.5), rtol=1e-5)


def test_first_diffusers_naming_attention_processors(tmp_path):
    """diffusers' first LoRA files (train_text_to_image_lora.py, 2023): the UNet's attention processors
    as `<attn>.processor.to_q_lora.down.weight`, the text encoder's as `<proj>.lora_linear_layer.down.weight`,
    no alphas. diffusers still loads them (state_dict_utils: DIFFUSERS_OLD), each pair at scaling 1."""
    loaders = pytest.importorskip("diffusers.loaders", reason="diffusers not installed (pip install -e '.[wild]')")
    from diffusers import UNet2DConditionModel

    g = torch.Generator().manual_seed(2)
    pairs = {}
    for p in ("to_q", "to_k", "to_v", "to_out"):
        pairs[f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.{p}_lora"] = (4, 8, 8)
    pairs["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer"] = (2, 8, 8)
    tensors = {}
    for stem, (r, n_in, n_out) in pairs.items():
        tensors[f"{stem}.down.weight"] = torch.randn(r, n_in, generator=g)
        tensors[f"{stem}.up.weight"] = torch.randn(n_out, r, generator=g)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(tensors, path)

    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2,
    )
    state, alphas = loaders.StableDiffusionLoraLoaderMixin.lora_state_dict(str(path))
    loaders.StableDiffusionLoraLoaderMixin.load_lora_into_unet(
        {k: v for k, v in state.items() if k.startswith("unet.")}, network_alphas=alphas, unet=unet)
    loaded = [float(m.scaling["default_0"]) for m in unet.modules() if isinstance(getattr(m, "scaling", None), dict)
              and m.scaling]
    assert loaded == [1.0] * 4  # what diffusers does with these files

    df = balora.inspect(path)
    assert len(df) == len(pairs) and np.allclose(df.scaling, 1.0)
    for row, stem in zip(df.itertuples(), sorted(pairs)):
        np.testing.assert_allclose(row.sigma, _sigma_ref(tensors, f"{stem}.down.weight", f"{stem}.up.weight", 1.0),
                                   rtol=1e-5)
    out = tmp_path / "balanced.safetensors"
    assert balora.balance_file(path, out).balanced == len(pairs)
    after = load_file(out)
    assert after.keys() == tensors.keys()
    for stem in pairs:
        ref = _dw64(tensors, f"{stem}.down.weight", f"{stem}.up.weight", 1.0)
        np.testing.assert_allclose(_dw64(after, f"{stem}.down.weight", f"{stem}.up.weight", 1.0), ref,
                                   atol=1e-5 * np.abs(ref).max())


def test_diffusers_folder_with_a_folder_named_like_its_weights(tmp_path):
    (tmp_path / "pytorch_lora_weights.safetensors").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        balora.inspect(tmp_path)


def test_balance_diffusers_file_keeps_keys_metadata_and_dw(diffusers_lora, tmp_path):
    src = diffusers_lora / "with_meta" / "pytorch_lora_weights.safetensors"
    out = tmp_path / "balanced.safetensors"
    summary = balora.balance_file(src, out)
    assert summary.balanced == 34
    before, after = load_file(src), load_file(out)
    assert before.keys() == after.keys()
    with safe_open(src, "pt") as f, safe_open(out, "pt") as g:
        assert f.metadata() == g.metadata()
    for key in [k for k in before if k.endswith("lora_A.weight")][:6]:
        kB = key.replace("lora_A", "lora_B")
        ref = _dw64(before, key, kB, 1.0)
        np.testing.assert_allclose(_dw64(after, key, kB, 1.0), ref, atol=1e-5 * np.abs(ref).max())
        A, B = after[key].double(), after[kB].double()
        np.testing.assert_allclose((B.T @ B).numpy(), (A @ A.T).numpy(), atol=1e-5 * float((A @ A.T).norm()))


def _flux_loaded_scalings(path, single_layers: int) -> dict[str, float]:
    """{module: scaling} of a Flux-style LoRA file as diffusers' own loader sets them on a tiny Flux transformer."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import FluxLoraLoaderMixin

    flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=0, num_single_layers=single_layers,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=16, axes_dims_rope=[2, 2, 4])
    state, alphas = FluxLoraLoaderMixin.lora_state_dict(str(path), return_alphas=True)
    FluxLoraLoaderMixin.load_lora_into_transformer(state, network_alphas=alphas, transformer=flux)
    return {f"transformer.{n}": float(next(iter(m.scaling.values()))) for n, m in flux.named_modules()
            if isinstance(getattr(m, "scaling", None), dict) and m.scaling}


def test_diffusers_file_with_alpha_keys_takes_its_scaling_from_them(tmp_path):
    """Flux LoRAs such as TheLastBen/Jon_Snow_Flux_LoRA: PEFT names under `transformer.`, no metadata,
    one `<module>.alpha` per pair. diffusers reads those as network_alphas: scaling alpha / r."""
    pytest.importorskip("diffusers", reason="diffusers not installed (pip install -e '.[wild]')")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for j, (r, alpha) in enumerate([(4, 4.0), (4, 8.0), (8, 2.0)]):
        for part in ("to_q", "to_k"):
            m = f"transformer.single_transformer_blocks.{j}.attn.{part}"
            tensors[f"{m}.lora_A.weight"] = torch.randn(r, 16, generator=g)
            tensors[f"{m}.lora_B.weight"] = torch.randn(16, r, generator=g)
            tensors[f"{m}.alpha"] = torch.tensor(alpha)
    path = tmp_path / "flux_lora.safetensors"
    save_file(tensors, path)
    loaded = _flux_loaded_scalings(path, single_layers=3)

    df = balora.inspect(path).set_index("module")
    assert set(df.index) == set(loaded)
    for module, s in loaded.items():
        assert df.loc[module, "scaling"] == pytest.approx(s, rel=1e-12), module
        ref = _sigma_ref(tensors, f"{module}.lora_A.weight", f"{module}.lora_B.weight", s)
        np.testing.assert_allclose(df.loc[module, "sigma"], ref, rtol=1e-5)
    assert "scaling unknown" not in " ".join(balora.inspect(path).attrs["sources"][0]["notes"])


def test_diffusers_alpha_keys_read_as_scaling_are_not_listed_as_other_tensors(tmp_path):
    """The `.alpha` keys that give a Flux-style file its scaling were counted in the note "N other tensor(s)
    are not LoRA factors", as if they were left unread; kohya's alphas never are. A tensor read as nothing is."""
    g = torch.Generator().manual_seed(0)
    tensors = {"transformer.proj_out.bias": torch.randn(16, generator=g)}  # not part of any pair
    for j in range(3):
        m = f"transformer.single_transformer_blocks.{j}.attn.to_q"
        tensors[f"{m}.lora_A.weight"] = torch.randn(4, 16, generator=g)
        tensors[f"{m}.lora_B.weight"] = torch.randn(16, 4, generator=g)
        tensors[f"{m}.alpha"] = torch.tensor(2.0 * (j + 1))
    path = tmp_path / "flux_lora.safetensors"
    save_file(tensors, path)
    df = balora.inspect(path)
    assert sorted(df.scaling) == [2.0 * (j + 1) / 4 for j in range(3)]
    (source,) = df.attrs["sources"]
    assert source["other_tensors"] == 1
    assert "1 other tensor(s) are not LoRA factors" in source["notes"]


# ---------------------------------------------------------------------------- LyCORIS
@pytest.fixture(scope="module")
def lycoris_files(tmp_path_factory):
    """LoCon (linear + 3x3 conv), LoHa and LoKr files written by lycoris-lora's own saver."""
    lycoris = pytest.importorskip("lycoris", reason="lycoris-lora not installed (pip install -e '.[wild]')")
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj_in = nn.Linear(16, 32)
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.proj_out = nn.Linear(32, 16)

    root = tmp_path_factory.mktemp("lycoris")
    lycoris.LycorisNetwork.apply_preset({"target_name": ["proj_in", "proj_out", "conv"]})
    for algo in ("locon", "loha", "lokr"):
        torch.manual_seed(0)
        net = lycoris.create_lycoris(Net(), 1.0, linear_dim=4, linear_alpha=2, algo=algo)
        net.apply_to()
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        net.save_weights(str(root / f"{algo}.safetensors"), torch.float32, {"ss_network_module": "lycoris.kohya"})
    return root


def test_locon_is_read_like_kohya(lycoris_files):
    path = lycoris_files / "locon.safetensors"
    tensors = load_file(path)
    df = balora.inspect(path).set_index("module")
    assert set(df.index) == {"lycoris_proj_in", "lycoris_conv", "lycoris_proj_out"}
    assert df.loc["lycoris_conv", "kind"] == "conv2d" and df.loc["lycoris_proj_in", "kind"] == "linear"
    assert (df.status == "ok").all()
    for m in df.index:
        s = float(tensors[f"{m}.alpha"]) / tensors[f"{m}.lora_down.weight"].shape[0]
        assert df.loc[m, "scaling"] == pytest.approx(s)
        np.testing.assert_allclose(df.loc[m, "sigma"], _sigma_ref(tensors, f"{m}.lora_down.weight",
                                                                  f"{m}.lora_up.weight", s), rtol=1e-5)


@pytest.mark.parametrize("algo, word", [("loha", "LoHa"), ("lokr", "LoKr")])
def test_non_product_lycoris_modules_are_listed_as_skipped(lycoris_files, algo, word):
    df = balora.inspect(lycoris_files / f"{algo}.safetensors")
    assert set(df.module) == {"lycoris_proj_in", "lycoris_conv", "lycoris_proj_out"}
    assert df.status.str.startswith("skipped:").all() and df.status.str.contains(word).all()
    assert df.imbalance.isna().all()  # never misread as a B @ A pair


def test_mixed_file_balances_locon_and_copies_loha_unchanged(lycoris_files, tmp_path):
    locon, loha = load_file(lycoris_files / "locon.safetensors"), load_file(lycoris_files / "loha.safetensors")
    mixed = {k: v for k, v in locon.items() if k.startswith("lycoris_proj_in.")}
    mixed |= {k: v for k, v in loha.items() if not k.startswith("lycoris_proj_in.")}
    src, out = tmp_path / "mixed.safetensors", tmp_path / "mixed_balanced.safetensors"
    save_file(mixed, src, metadata={"ss_network_module": "lycoris.kohya"})
    df = balora.inspect(src).set_index("module")
    assert df.loc["lycoris_proj_in", "status"] == "ok"
    assert df.loc["lycoris_conv", "status"].startswith("skipped:")
    summary = balora.balance_file(src, out)
    assert summary.balanced == 1 and len(summary.skipped) == 2
    after = load_file(out)
    for k in mixed:
        if not k.startswith("lycoris_proj_in."):
            assert torch.equal(after[k], mixed[k]), k
    ref = _dw64(mixed, "lycoris_proj_in.lora_down.weight", "lycoris_proj_in.lora_up.weight", 1.0)
    got = _dw64(after, "lycoris_proj_in.lora_down.weight", "lycoris_proj_in.lora_up.weight", 1.0)
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())


def test_truncated_lycoris_module_is_a_one_line_error(tmp_path):
    # A LoHa module missing one of its four factors is damaged, not silently dropped.
    save_file({"m.hada_w1_a": torch.ones(4, 2), "m.hada_w1_b": torch.ones(2, 4), "m.hada_w2_a": torch.ones(4, 2)},
              tmp_path / "bad.safetensors")
    with pytest.raises(InputError) as err:
        balora.inspect(tmp_path / "bad.safetensors")
    assert "\n" not in str(err.value) and "hada_w2_b" in str(err.value)


def test_diffusers_metadata_is_json_checked(tmp_path):
    tensors = {"unet.a.to_q.lora_A.weight": torch.ones(2, 4), "unet.a.to_q.lora_B.weight": torch.ones(3, 2)}
    save_file(tensors, tmp_path / "pytorch_lora_weights.safetensors", metadata={"lora_adapter_metadata": "{not json"})
    with pytest.raises(InputError) as err:
        balora.inspect(tmp_path / "pytorch_lora_weights.safetensors")
    assert "lora_adapter_metadata" in str(err.value) and "\n" not in str(err.value)
    ok = {"unet.r": 2, "unet.lora_alpha": 6}
    save_file(tensors, tmp_path / "ok.safetensors", metadata={"lora_adapter_metadata": json.dumps(ok)})
    assert balora.inspect(tmp_path / "ok.safetensors").scaling.tolist() == [3.0]


def test_lycoris_full_difference_modules_are_listed_as_skipped(tmp_path):
    """LyCORIS "full" modules store dW itself (`.diff`, `.diff_b`): listed as skipped like LoHa, never
    refused as a file without LoRA keys, and copied unchanged beside balanced LoCon pairs."""
    g = torch.Generator().manual_seed(0)
    tensors = {"lycoris_a.diff": torch.randn(6, 5, generator=g), "lycoris_a.diff_b": torch.randn(6, generator=g),
               "lycoris_b.lora_down.weight": torch.randn(2, 5, generator=g),
               "lycoris_b.lora_up.weight": torch.randn(6, 2, generator=g) * 0.01, "lycoris_b.alpha": torch.tensor(1.0)}
    save_file({k: v for k, v in tensors.items() if k.startswith("lycoris_a")}, tmp_path / "full.safetensors")
    df = balora.inspect(tmp_path / "full.safetensors")
    assert list(df.module) == ["lycoris_a"] and df.status[0].startswith("skipped:") and "full" in df.status[0].lower()
    save_file(tensors, tmp_path / "mixed.safetensors")
    df = balora.inspect(tmp_path / "mixed.safetensors").set_index("module")
    assert df.loc["lycoris_b", "status"] == "ok" and df.loc["lycoris_a", "status"].startswith("skipped:")
    out = tmp_path / "mixed_balanced.safetensors"
    assert balora.balance_file(tmp_path / "mixed.safetensors", out).balanced == 1
    after = load_file(out)
    assert torch.equal(after["lycoris_a.diff"], tensors["lycoris_a.diff"])
    ref = _dw64(tensors, "lycoris_b.lora_down.weight", "lycoris_b.lora_up.weight", 1.0)
    np.testing.assert_allclose(_dw64(after, "lycoris_b.lora_down.weight", "lycoris_b.lora_up.weight", 1.0), ref,
                               atol=1e-5 * np.abs(ref).max())


def test_diffusers_file_with_alpha_keys_for_some_pairs_scales_the_others_as_diffusers_does(tmp_path):
    """A Flux-style file whose `.alpha` keys cover only some pairs: diffusers gives the pairs without one
    the most common alpha of the file's alphas (get_peft_kwargs' lora_alpha), so their scaling is
    that alpha over their own rank, not unknown."""
    pytest.importorskip("diffusers", reason="diffusers not installed (pip install -e '.[wild]')")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    # (rank, alpha or None): alpha 8 is the most common; two pairs have none, at ranks 4 and 8
    spec = [(4, 8.0, "to_q"), (4, 8.0, "to_k"), (8, 2.0, "to_v"), (4, None, "to_q"), (8, None, "to_k"), (4, 8.0, "to_v")]
    for j, (r, alpha, part) in enumerate(spec):
        m = f"transformer.single_transformer_blocks.{j // 3}.attn.{part}"
        tensors[f"{m}.lora_A.weight"] = torch.randn(r, 16, generator=g)
        tensors[f"{m}.lora_B.weight"] = torch.randn(16, r, generator=g)
        if alpha is not None:
            tensors[f"{m}.alpha"] = torch.tensor(alpha)
    path = tmp_path / "flux_lora.safetensors"
    save_file(tensors, path)
    loaded = _flux_loaded_scalings(path, single_layers=2)

    df = balora.inspect(path).set_index("module")
    assert set(df.index) == set(loaded)
    for module, s in loaded.items():
        assert df.loc[module, "scaling"] == pytest.approx(s, rel=1e-12), module
    assert "scaling unknown" not in " ".join(balora.inspect(path).attrs["sources"][0]["notes"])


def test_diffusers_file_whose_alphas_tie_leaves_the_others_unknown(tmp_path):
    """Two alphas equally common: diffusers' choice for the pairs without one follows the order it read
    the keys in, so balora does not guess: those pairs' scaling is unknown, and the note says so."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for j, alpha in enumerate([2.0, 8.0, None]):
        m = f"transformer.single_transformer_blocks.{j}.attn.to_q"
        tensors[f"{m}.lora_A.weight"] = torch.randn(4, 16, generator=g)
        tensors[f"{m}.lora_B.weight"] = torch.randn(16, 4, generator=g)
        if alpha is not None:
            tensors[f"{m}.alpha"] = torch.tensor(alpha)
    path = tmp_path / "flux_lora.safetensors"
    save_file(tensors, path)
    df = balora.inspect(path).set_index("module")
    assert df.scaling.to_dict() == pytest.approx({"transformer.single_transformer_blocks.0.attn.to_q": 0.5,
                                                  "transformer.single_transformer_blocks.1.attn.to_q": 2.0,
                                                  "transformer.single_transformer_blocks.2.attn.to_q": float("nan")},
                                                 nan_ok=True)
    notes = " ".join(balora.inspect(path).attrs["sources"][0]["notes"])
    assert "two alphas are equally common" in notes and "no lora_adapter_metadata" not in notes
