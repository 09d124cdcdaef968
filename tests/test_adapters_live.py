"""balora.adapters.live: the pairs it finds in a PEFT model are PEFT's own dW (get_delta_weight),
for every layer kind, with the right names, kinds, scalings and flags, and `write` puts factors back."""

from __future__ import annotations

import math

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from torch import nn

import balora
from balora import balance_
from balora.adapters.live import iter_lora_pairs


def _pair_delta(pair):
    """s B A in the layout of PEFT's get_delta_weight for that kind."""
    d = pair.scaling * pair.B.double() @ pair.A.double()  # (out, in)
    if pair.kind in ("hf_conv1d", "embedding"):
        return d.T  # PEFT stores these transposed: Conv1D weight (in, out), embedding dW (num_emb, dim)
    return d


def _check_pairs_are_peft_deltas(model, pairs, peft_deltas):
    ref = peft_deltas(model)
    by_name = {(p.module, p.adapter): p for p in pairs}
    assert len(by_name) == len(ref)
    for (name, adapter), dW in ref.items():
        pair = by_name[(name.removeprefix("base_model.model."), adapter)]
        got = _pair_delta(pair).reshape(dW.shape)
        torch.testing.assert_close(got, dW, rtol=1e-6, atol=1e-6 * dW.abs().max().item())


def test_every_kind_of_tiny_net(make_tiny_net, tiny_net_targets, peft_deltas):
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, lora_alpha=6, target_modules=tiny_net_targets,
                                                       init_lora_weights=False))
    pairs = iter_lora_pairs(model)
    got = {p.module: (p.kind, tuple(p.A.shape), tuple(p.B.shape)) for p in pairs}
    assert got == {
        "emb": ("embedding", (2, 20), (12, 2)),
        "lin": ("linear", (2, 12), (10, 2)),
        "conv1d": ("conv1d", (2, 3 * 3), (8, 2)),
        "conv2d": ("conv2d", (2, 3 * 3 * 3), (8, 2)),
        "conv1x1": ("conv2d", (2, 8), (6, 2)),
    }
    for p in pairs:
        assert p.adapter == "default" and p.scaling == 3.0 and not p.dora and p.skip_reason is None
        assert p.r == 2 and p.name == f"{p.module}[default]"
    _check_pairs_are_peft_deltas(model, pairs, peft_deltas)


def test_gpt2_conv1d_fan_in_fan_out(make_gpt2, peft_deltas):
    model = get_peft_model(make_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                                   fan_in_fan_out=True, init_lora_weights=False))
    pairs = iter_lora_pairs(model)
    assert {p.kind for p in pairs} == {"hf_conv1d"}
    shapes = {p.module: (p.in_features, p.out_features) for p in pairs}
    assert shapes["transformer.h.0.attn.c_attn"] == (32, 96)
    assert shapes["transformer.h.0.mlp.c_proj"] == (128, 32)
    _check_pairs_are_peft_deltas(model, pairs, peft_deltas)


def test_dora_rslora_and_patterns(make_tiny_net):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["lin", "conv2d", "emb"], use_rslora=True, use_dora=True,
                     rank_pattern={"conv2d": 2}, alpha_pattern={"emb": 3}, init_lora_weights=False)
    pairs = {p.module: p for p in iter_lora_pairs(get_peft_model(make_tiny_net(), cfg))}
    assert all(p.dora for p in pairs.values())
    assert pairs["lin"].scaling == pytest.approx(8 / math.sqrt(4))
    assert pairs["conv2d"].r == 2 and pairs["conv2d"].scaling == pytest.approx(8 / math.sqrt(2))
    assert pairs["emb"].scaling == pytest.approx(3 / math.sqrt(4))


def test_adapter_filter_and_names(make_tiny_net):
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=["lin", "emb"]), adapter_name="first")
    model.add_adapter("x", LoraConfig(r=3, target_modules=["lin"]))
    everything = {(p.module, p.adapter) for p in iter_lora_pairs(model)}
    assert everything == {("lin", "first"), ("emb", "first"), ("lin", "x")}
    assert {(p.module, p.adapter, p.r) for p in iter_lora_pairs(model, "x")} == {("lin", "x", 3)}
    assert iter_lora_pairs(model, "nope") == []


@pytest.mark.parametrize("wrap", [nn.DataParallel, torch.compile], ids=["DataParallel", "compile"])
def test_a_wrapped_peft_model_reports_the_peft_module_names(wrap, make_tiny_net, tiny_net_targets):
    """A hand-written DDP loop (or accelerate's prepare) holds DistributedDataParallel(peft_model),
    whose names start with `module.` as DataParallel's do; torch.compile adds `_orig_mod.`. The module
    column must still be the saved adapter's names, as for the bare PEFT model."""
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets))
    want = [(p.module, p.adapter) for p in iter_lora_pairs(model)]
    assert [(p.module, p.adapter) for p in iter_lora_pairs(wrap(model))] == want
    assert list(balora.layer_report(wrap(model))["module"]) == [m for m, _ in want]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_puts_factors_back_in_place(dtype, make_tiny_net, tiny_net_targets):
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets,
                                                       init_lora_weights=False)).to(dtype)
    params_before = {n: p for n, p in model.named_parameters()}
    for p in iter_lora_pairs(model):
        p.write(torch.full(p.A.shape, 2.0), torch.full(p.B.shape, -3.0))  # fp32 in, cast on the way
    for name, param in model.named_parameters():
        assert param is params_before[name], "write must copy into the parameter, not replace it"
        assert param.dtype == dtype
        if "lora_A" in name or "lora_embedding_A" in name:
            assert torch.all(param == 2.0), name
        elif "lora_B" in name or "lora_embedding_B" in name:
            assert torch.all(param == -3.0), name
    # The pairs read afterwards see the written values (they are views of the parameters).
    assert all(torch.all(p.A == 2.0) for p in iter_lora_pairs(model))


def test_adalora_is_listed_with_a_reason_and_left_alone(make_gpt2, snapshot, assert_bit_identical):
    model = get_peft_model(make_gpt2(), AdaLoraConfig(init_r=4, target_r=2, target_modules=["c_attn"], total_step=10,
                                                      fan_in_fan_out=True, init_lora_weights=False))
    pairs = iter_lora_pairs(model)
    assert [p.module for p in pairs] == ["transformer.h.0.attn.c_attn"]
    assert "AdaLoRA" in pairs[0].skip_reason
    before = snapshot(model)
    summary = balance_(model)
    assert summary.balanced == 0 and "AdaLoRA" in summary.skipped["transformer.h.0.attn.c_attn[default]"]
    assert_bit_identical(before, snapshot(model))


class _Experts(nn.Module):
    """A stacked-experts weight (E, in, out), the shape PEFT's target_parameters is made for."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 8, 6))

    def forward(self, x):
        return torch.einsum("eio,bi->beo", self.weight, x)


class _MoE(nn.Module):
    def __init__(self, experts: nn.Module | None = None):
        super().__init__()
        self.experts = _Experts() if experts is None else experts

    def forward(self, x):
        return self.experts(x)


def test_stacked_experts_are_not_balanced_as_one_product(snapshot, assert_bit_identical):
    torch.manual_seed(0)
    model = get_peft_model(_MoE(), LoraConfig(r=2, target_parameters=["experts.weight"], target_modules=[],
                                              init_lora_weights=False))
    pairs = iter_lora_pairs(model)
    assert len(pairs) == 1 and "experts" in pairs[0].skip_reason
    before = snapshot(model)
    summary = balance_(model)
    assert summary.balanced == 0 and len(summary.skipped) == 1
    assert_bit_identical(before, snapshot(model))


def test_stacked_experts_in_a_saved_adapter_are_listed_skipped_and_the_rest_balanced(tmp_path):
    # The file holds r x E rows of lora_A for the experts: once refused whole as a config mismatch.
    class Net(_MoE):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=2, target_parameters=["experts.weight"], target_modules=["proj"],
                                             init_lora_weights=False))
    model.save_pretrained(tmp_path / "moe")
    df = balora.inspect(tmp_path / "moe").set_index("module")
    assert "LoRA on 3 stacked experts" in df.loc["experts", "note"] + df.loc["experts", "status"]
    assert df.loc["proj", "status"] == "ok"
    summary = balora.balance_file(tmp_path / "moe", tmp_path / "out")
    assert summary.balanced == 1 and "LoRA on 3 stacked experts" in next(iter(summary.skipped.values()))


@pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups > 1")
def test_grouped_conv_is_skipped():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, groups=2)

        def forward(self, x):
            return self.conv(x)

    model = get_peft_model(Grouped(), LoraConfig(r=2, target_modules=["conv"], init_lora_weights=False))
    (pair,) = iter_lora_pairs(model)
    assert pair.kind == "conv2d" and "grouped conv" in pair.skip_reason


def test_an_embedding_with_max_norm_is_skipped_and_its_output_kept(snapshot, assert_bit_identical):
    """PEFT's LoRA Embedding looks A's columns up with the base layer's max_norm, which renormalises
    the ones longer than it (in place): the output is not x -> s B A[:, x], and balancing, which
    lengthens the short factor's columns, changed it by 27% while dW stayed. Such a pair is skipped."""

    class MaxNormEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8, max_norm=1.0)

        def forward(self, ids):
            return self.emb(ids)

    torch.manual_seed(0)
    model = get_peft_model(MaxNormEmbedding(), LoraConfig(r=3, lora_alpha=3, target_modules=["emb"],
                                                          init_lora_weights=False))
    layer = model.base_model.model.emb
    with torch.no_grad():  # A's columns well inside max_norm, B large: imbalanced, as after a few steps
        layer.lora_embedding_A["default"].mul_(0.2)
        layer.lora_embedding_B["default"].mul_(5)
    ids = torch.arange(20)[None]
    with torch.no_grad():
        before_out = model(ids).double()
    before = snapshot(model)
    summary = balance_(model)
    (pair,) = iter_lora_pairs(model)
    assert summary.balanced == 0 and "max_norm" in pair.skip_reason
    assert_bit_identical(before, snapshot(model))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).double(), before_out, rtol=0, atol=0)


def test_unknown_variant_is_skipped(make_tiny_net):
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
    layer = model.base_model.model.lin

    class SomeOtherVariant:  # a LoRA variant whose dW is not B @ A
        pass

    layer.lora_variant["default"] = SomeOtherVariant()
    (pair,) = iter_lora_pairs(model)
    assert "SomeOtherVariant" in pair.skip_reason


def test_sharded_factor_is_refused_by_name(make_tiny_net):
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
    model.base_model.model.lin.lora_A["default"].weight.ds_id = 7  # how DeepSpeed ZeRO-3 marks a partition
    with pytest.raises(RuntimeError, match=r"lin\[default\].*sharded"):
        iter_lora_pairs(model)


def test_conv_subclass_kind():
    class MyConv(nn.Conv2d):  # e.g. diffusers' LoRACompatibleConv: PEFT wraps it as a Conv2d
        pass

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = MyConv(3, 5, 3)

    model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["conv"], init_lora_weights=False))
    (pair,) = iter_lora_pairs(model)
    assert pair.kind == "conv2d" and pair.skip_reason is None


class _TwoParamExperts(nn.Module):
    """Two stacked-expert weights in one module: PEFT nests one ParamWrapper per target parameter."""

    def __init__(self):
        super().__init__()
        self.up = nn.Parameter(torch.randn(3, 8, 6))
        self.down = nn.Parameter(torch.randn(3, 6, 8))

    def forward(self, x):
        return torch.einsum("eoi,beo->bi", self.down, torch.einsum("eio,bi->beo", self.up, x))


def test_stacked_experts_of_one_module_in_a_saved_adapter_share_their_expert_count(tmp_path):
    """Two expert weights of one module, r 3 and 2 (rank_pattern), E = 3: lora_A rows 9 and 6. Both 3 and 2
    divide 6, and the file was read as r 3 for 2 experts there (scaling alpha / 3, "2 stacked experts");
    the other wrapper's 9 rows allow E = 3 only, and one module's wrappers share E."""
    torch.manual_seed(0)
    model = get_peft_model(_MoE(_TwoParamExperts()), LoraConfig(
        r=2, lora_alpha=6, target_parameters=["experts.down", "experts.up"], target_modules=[],
        rank_pattern={"down": 3}, init_lora_weights=False))
    model.save_pretrained(tmp_path / "moe")
    df = balora.inspect(tmp_path / "moe").set_index("module")
    live = {}
    for name, layer in model.named_modules():
        if hasattr(layer, "num_experts") and hasattr(layer, "scaling"):
            live[name.removeprefix("base_model.model.")] = (layer.r["default"], layer.scaling["default"], layer.num_experts)
    assert set(df.index) == set(live) and len(live) == 2
    for module, (r, scaling, experts) in live.items():
        assert experts == 3 and df.loc[module, "r"] == r * experts  # the file's rows
        assert df.loc[module, "scaling"] == pytest.approx(scaling), module
        assert f"LoRA on {experts} stacked experts" in df.loc[module, "status"], module


def _lora_layer_names(model):
    from peft.tuners.lora import LoraLayer

    return [name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def test_the_walk_finds_every_lora_layer_in_named_modules_order(make_llama, make_gpt2, make_tiny_net, tiny_net_targets):
    """The walker's own traversal (it skips a LoRA layer's dicts, not its base layer) lists the same
    layers, in the same order, as named_modules: nested wrappers of two target_parameters included."""
    torch.manual_seed(0)
    nested = get_peft_model(_MoE(_TwoParamExperts()), LoraConfig(r=2, target_parameters=["experts.up", "experts.down"],
                                                target_modules=[], init_lora_weights=False))
    assert len(_lora_layer_names(nested)) == 2  # one wrapper inside the other's base_layer
    models = [nested,
              get_peft_model(make_llama(n_layer=2), LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"])),
              get_peft_model(make_gpt2(n_layer=2), LoraConfig(r=2, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
              get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets))]
    for model in models:
        names = list(dict.fromkeys(p.module for p in iter_lora_pairs(model)))
        assert names == _lora_layer_names(model) and names
