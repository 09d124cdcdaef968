"""Sharded factors. DeepSpeed ZeRO-3 and FSDP1 flat parameters: balora must refuse with a message
that names the module and FSDP2 as the supported path, and write nothing (balancing a shard as if
it were the whole matrix would silently change dW). FSDP2 (DTensor parameters): balanced whole.

The refused shards are fakes with the properties balora can see: a ZeRO-3 partitioned parameter is
an empty tensor carrying `ds_id` (and `ds_shape`); an FSDP1 flat parameter, or an original parameter
outside summon_full_params, has the wrong shape (1-D, empty, or a slice); FSDP1 itself needs an
accelerator, so its wrapper is a stand-in with its class name. FSDP2 is real, on a one-process gloo
group here (tests/test_fsdp2.py runs two processes).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch import nn

import balora
from balora.adapters.live import iter_lora_pairs

R = 2


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.lin = nn.Linear(12, 10)
        self.conv = nn.Conv2d(3, 6, 3)

    def forward(self, x):
        return self.lin(self.emb(x))


@pytest.fixture
def model():
    torch.manual_seed(0)
    # init_lora_weights=False: B is random, so every pair would really be projected.
    return get_peft_model(Tiny(), LoraConfig(r=R, lora_alpha=4, target_modules=["emb", "lin", "conv"], init_lora_weights=False))


def _layer(model, name):
    return dict(model.named_modules())[f"base_model.model.{name}"]


def _zero3(full: torch.Tensor) -> nn.Parameter:
    """What a ZeRO-3 partitioned parameter looks like outside a gathered context."""
    p = nn.Parameter(torch.empty(0, dtype=full.dtype))
    p.ds_id, p.ds_shape, p.ds_numel = 7, full.shape, full.numel()
    return p


def _lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _assert_refused(model, module: str, words: tuple[str, ...]):
    before = _lora_state(model)
    with pytest.raises(RuntimeError) as err:
        iter_lora_pairs(model)
    msg = str(err.value)
    assert module in msg, f"the message must name the module: {msg}"
    assert any(w in msg for w in words), msg
    assert "FSDP2" in msg and "fully_shard" in msg, f"the message must name the supported path: {msg}"
    assert "\n" not in msg, "one line"
    with pytest.raises(RuntimeError):
        balora.balance_(model)
    after = _lora_state(model)
    for n, t in before.items():
        if after[n].shape == t.shape:
            assert torch.equal(after[n], t), f"{n} was written although balancing was refused"


def test_unsharded_model_is_balanced(model):
    """The fake model itself is fine: every pair is balanced, so the refusals below are about sharding."""
    summary = balora.balance_(model)
    assert summary.balanced == 3 and not summary.skipped


@pytest.mark.parametrize("which", ["lora_A", "lora_B"])
def test_zero3_linear_refused(model, which):
    layer = _layer(model, "lin")
    sub = getattr(layer, which)["default"]
    sub.weight = _zero3(sub.weight)
    _assert_refused(model, "lin[default]", ("ZeRO-3",))


@pytest.mark.parametrize(
    "shard",
    [
        pytest.param(lambda w: w.detach().flatten(), id="fsdp-flat-1d"),
        pytest.param(lambda w: torch.empty(0), id="fsdp-use_orig_params-resharded"),
        pytest.param(lambda w: w.detach()[: w.shape[0] // 2].clone(), id="row-shard"),
        pytest.param(lambda w: w.detach()[:, : w.shape[1] // 2].clone(), id="column-shard"),
    ],
)
@pytest.mark.parametrize("which", ["lora_A", "lora_B"])
def test_fsdp_like_linear_refused(model, which, shard):
    sub = getattr(_layer(model, "lin"), which)["default"]
    sub.weight = nn.Parameter(shard(sub.weight))
    _assert_refused(model, "lin[default]", ("flattened", "sharded"))


def test_fsdp1_wrapper_refused(model):
    class FullyShardedDataParallel(nn.Module):  # FSDP1's class name; the real one needs an accelerator
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    _assert_refused(FullyShardedDataParallel(model), "FullyShardedDataParallel", ("FSDP1",))


def test_deepspeed_engine_and_optimizers_refused(model):
    # ZeRO-1/2 keep plain parameters, so the engine (by class name: deepspeed is not installed here)
    # and DeepSpeed's optimizers in a wrapper chain are what tell: its fp32 master weights overwrite
    # the model after each step, and balancing would be undone.
    class DeepSpeedEngine(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    _assert_refused(DeepSpeedEngine(model), "DeepSpeedEngine", ("DeepSpeed",))

    class DeepSpeedZeroOptimizer:  # ZeRO-1/2's optimizer, holding the torch one
        def __init__(self, inner):
            self.optimizer = inner

    class Wrapper:  # accelerate's AcceleratedOptimizer around it: no step hooks of its own
        def __init__(self, inner):
            self.optimizer = inner

    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(RuntimeError, match=r"DeepSpeedZeroOptimizer: DeepSpeed keeps fp32 master weights.*fully_shard"):
        balora.balance_after_step(Wrapper(DeepSpeedZeroOptimizer(torch_opt)), model)
    assert not torch_opt._optimizer_step_post_hooks  # nothing registered


# Embedding and conv factors: their expected shapes come from the layer, not the parameter.


def test_zero3_embedding_A_refused(model):
    layer = _layer(model, "emb")
    layer.lora_embedding_A["default"] = _zero3(layer.lora_embedding_A["default"])
    _assert_refused(model, "emb[default]", ("ZeRO-3",))


def test_fsdp_flat_embedding_A_refused(model):
    layer = _layer(model, "emb")
    layer.lora_embedding_A["default"] = nn.Parameter(layer.lora_embedding_A["default"].detach().flatten())
    _assert_refused(model, "emb[default]", ("flattened", "sharded"))


def test_sharded_embedding_B_refused(model):
    layer = _layer(model, "emb")
    B = layer.lora_embedding_B["default"]
    layer.lora_embedding_B["default"] = nn.Parameter(B.detach()[: B.shape[0] // 2].clone())
    _assert_refused(model, "emb[default]", ("flattened", "sharded"))


def test_zero3_conv_refused(model):
    sub = _layer(model, "conv").lora_A["default"]
    sub.weight = _zero3(sub.weight)
    _assert_refused(model, "conv[default]", ("ZeRO-3",))


def test_fsdp_flat_conv_refused(model):
    sub = _layer(model, "conv").lora_B["default"]
    sub.weight = nn.Parameter(sub.weight.detach().flatten())
    _assert_refused(model, "conv[default]", ("flattened", "sharded"))


# FSDP2 in one process: the same code path as on many ranks (gather, balance whole, write the shard).


@pytest.fixture
def mesh():
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _fully_shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=mesh)
    assert all(type(p).__name__ == "DTensor" for n, p in model.named_parameters() if "lora_" in n)
    return model


def _whole(model):
    return {n: p.detach().full_tensor() for n, p in model.named_parameters() if "lora_" in n}


def test_fsdp2_balances_like_the_unsharded_model(model, mesh):
    torch.manual_seed(0)
    plain = get_peft_model(Tiny(), LoraConfig(r=R, lora_alpha=4, target_modules=["emb", "lin", "conv"],
                                              init_lora_weights=False))
    sharded = _fully_shard(model, mesh)
    want, got = balora.balance_(plain), balora.balance_(sharded)
    assert got.balanced == want.balanced == 3 and not got.skipped
    assert got.max_rel_imbalance < 1e-6
    expected = _lora_state(plain)
    for n, t in _whole(sharded).items():
        assert torch.equal(t, expected[n]), f"{n}: the sharded model was balanced differently"
    report, ref = balora.layer_report(sharded), balora.layer_report(plain)
    assert report.drop(columns=["sigma", "sigma_A", "sigma_B"]).equals(ref.drop(columns=["sigma", "sigma_A", "sigma_B"]))


def test_pair_cache_regathers_every_step_and_rewalks_new_parameters(model, mesh):
    from balora.adapters.pair_cache import PairCache
    from balora.balance import balance_and_write
    from balora.imbalance import rel_imbalance
    sharded, cache = _fully_shard(model, mesh), PairCache()
    lin = _layer(sharded, "lin")
    for _ in range(2):  # the cached walk must see this step's values, not the ones gathered when it walked
        with torch.no_grad():
            lin.lora_A["default"].weight.to_local().mul_(3.0)
        balance_and_write(cache.get(sharded), check=False)
        whole = _whole(sharded)
        A, B = whole["base_model.model.lin.lora_A.default.weight"], whole["base_model.model.lin.lora_B.default.weight"]
        assert float(rel_imbalance(A.double()[None], B.double()[None])[0]) < 1e-6
    walked = cache._pairs
    # model.double() gives every shard new storage (FSDP2 resets its sharded parameters): the cached
    # pairs are stale, so the cache must walk again and write into the new shards.
    sharded.double()
    with torch.no_grad():
        lin.lora_A["default"].weight.to_local().mul_(3.0)
    balance_and_write(cache.get(sharded), check=False)
    assert cache._pairs is not walked
    whole = _whole(sharded)
    A, B = whole["base_model.model.lin.lora_A.default.weight"], whole["base_model.model.lin.lora_B.default.weight"]
    assert A.dtype == torch.float64
    assert float(rel_imbalance(A[None], B[None])[0]) < 1e-12, "the new shards were not balanced"


def _gram_layout(model, mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    fully_shard(model, mesh=mesh, shard_placement_fn=balora.lora_shard_placement(model))
    A = _layer(model, "lin").lora_A["default"].weight
    assert tuple(A.placements) == (Shard(1),), "lora_shard_placement must shard A by columns"
    return model


def test_balance_step_from_all_reduced_grams_matches_the_unsharded_model(model, mesh):
    from balora.adapters.pair_cache import PairCache
    from balora.distributed import last_comm
    from balora.policy import BalancePolicy
    from balora.sharded_step import balance_step

    torch.manual_seed(0)
    plain = get_peft_model(Tiny(), LoraConfig(r=R, lora_alpha=4, target_modules=["emb", "lin", "conv"],
                                              init_lora_weights=False))
    sharded = _gram_layout(model, mesh)
    balora.balance_(plain)
    summary = balance_step(PairCache().get(sharded, gather=False), BalancePolicy(check=False))
    assert summary.balanced == 3 and not summary.skipped
    comm = last_comm()
    assert comm.bytes_reduced == 2 * 2 * R * R * 8, "emb and lin: two r x r float64 Grams each, all-reduced"
    expected = _lora_state(plain)
    for n, t in _whole(sharded).items():
        torch.testing.assert_close(t, expected[n], rtol=1e-5, atol=1e-6, msg=n)


def test_balance_step_writes_nothing_when_a_policy_raises(model, mesh):
    from balora.adapters.pair_cache import PairCache
    from balora.balance import BalanceError
    from balora.policy import BalancePolicy
    from balora.sharded_step import balance_step

    sharded = _gram_layout(model, mesh)
    with torch.no_grad():
        _layer(sharded, "conv").lora_B["default"].weight.to_local()[0, 0] = float("nan")  # a gathered pair
    before = _whole(sharded)
    with pytest.raises(BalanceError, match="conv"):
        balance_step(PairCache().get(sharded, gather=False), BalancePolicy(check=False))
    for n, t in _whole(sharded).items():
        assert torch.equal(t.nan_to_num(nan=7.0), before[n].nan_to_num(nan=7.0)), f"{n} was written although balancing raised"


def test_balance_step_refuses_grams_in_the_fp32_subnormal_range(model, mesh):
    """A of ~1e-21 with B of ~1e-3 in fp32 (neither rescaled: B is in range): their local Grams are
    in fp32's subnormal range, rounded in absolute terms, then all-reduced in float64. balance_step
    must judge them by fp32's floor, not float64's, and gather the pair for the QR path; judged by
    float64's floor they were accepted and came back far from balanced."""
    from balora.adapters.pair_cache import PairCache
    from balora.distributed import last_comm
    from balora.policy import BalancePolicy
    from balora.sharded_step import balance_step

    sharded = _gram_layout(model, mesh)
    lin = _layer(sharded, "lin")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        lin.lora_A["default"].weight.to_local().copy_(torch.randn(R, 12, generator=gen) * 1e-21)
        lin.lora_B["default"].weight.to_local().copy_(torch.randn(10, R, generator=gen) * 1e-3)
    before = _whole(sharded)
    key = "base_model.model.lin.lora_{}.default.weight"
    A0, B0 = (before[key.format(f)].double().numpy() for f in "AB")
    assert np.abs(A0 @ A0.T).max() < torch.finfo(torch.float32).tiny, "the fp32 Gram of A must be subnormal"
    summary = balance_step(PairCache().get(sharded, gather=False), BalancePolicy(check=False))
    assert summary.balanced == 3 and not summary.skipped
    gathered = {n: t.numel() * t.element_size() for n, t in before.items() if ".conv." in n or ".lin." in n}
    assert last_comm().bytes_sent == sum(gathered.values()), "conv, and the subnormal pair, must be gathered whole"
    whole = _whole(sharded)
    A1, B1 = (whole[key.format(f)].double().numpy() for f in "AB")
    G_A, G_B = A1 @ A1.T, B1.T @ B1
    assert np.linalg.norm(G_A - G_B) / np.linalg.norm(G_A) < 1e-5
    np.testing.assert_allclose(B1 @ A1, B0 @ A0, rtol=0, atol=1e-5 * np.abs(B0 @ A0).max())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_balance_step_on_fsdp2_default_rows_gathers_only_A(model, mesh, dtype, threads):
    """FSDP2's default layout (A by rows, r split over the ranks): balance_step gathers the A
    factors, all-reduces only B's r x r Grams, and balances like the unsharded model (bf16 factors:
    to the rounding of writing them in bf16), pair by pair (one thread) or stacked (two). conv is
    gathered whole (its factors are not 2-D)."""
    from balora.adapters.pair_cache import PairCache
    from balora.distributed import last_comm
    from balora.policy import BalancePolicy
    from balora.sharded_step import balance_step

    torch.manual_seed(0)
    plain = get_peft_model(Tiny(), LoraConfig(r=R, lora_alpha=4, target_modules=["emb", "lin", "conv"],
                                              init_lora_weights=False)).to(dtype)
    sharded = _fully_shard(model.to(dtype), mesh)
    before = _whole(sharded)
    for n, t in _lora_state(plain).items():
        assert torch.equal(before[n], t), f"{n}: the two models must start equal"
    balora.balance_(plain, check=False)
    before_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        summary = balance_step(PairCache().get(sharded, gather=False), BalancePolicy(check=False))
    finally:
        torch.set_num_threads(before_threads)
    assert summary.balanced == 3 and not summary.skipped and summary.qr_path == 0
    comm, size = last_comm(), torch.finfo(dtype).bits // 8
    # emb's A (r, 20) and lin's A (r, 12) in one all_gather, conv's pair (A (r, 27), B (6, r)) in another;
    # one world-1 process receives nothing from others, so count what it sent.
    assert comm.collectives == 3
    assert comm.bytes_sent == (R * 20 + R * 12 + R * 27 + 6 * R) * size
    assert comm.bytes_reduced == 2 * R * R * 8, "the B Grams of emb and lin, in float64"
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    expected = _lora_state(plain)
    for n, t in _whole(sharded).items():
        assert t.dtype == dtype
        torch.testing.assert_close(t.float(), expected[n].float(), **tol, msg=n)


def test_collective_buffers_go_to_the_mesh_device():
    """FSDP2's CPUOffloadPolicy keeps shards on the CPU under a CUDA mesh: balora's collective
    buffers must go where the mesh's group runs (a stand-in mesh on "meta" here: no GPU)."""
    from types import SimpleNamespace

    from balora.distributed import on_mesh_device

    t = torch.arange(6.0)
    assert on_mesh_device(t, SimpleNamespace(device_type="cpu")) is t
    moved = on_mesh_device(t, SimpleNamespace(device_type="meta"))
    assert moved.device.type == "meta" and moved.shape == t.shape and moved.dtype == t.dtype


def test_training_hooks_leave_frozen_dtensor_factors_alone_and_do_not_gather_them(model, mesh, np_rel_imbalance):
    """FSDP2: requires_grad is on the DTensor parameter. A frozen lora_A (a Gram-path pair) and a frozen
    conv pair (gathered whole when balanced) stay bit-identical under BalanceCallback, and the pass
    gathers only the trained pair's A."""
    from transformers import TrainerControl, TrainerState

    from balora.distributed import last_comm

    for name, p in model.named_parameters():
        if "lin.lora_A" in name or "conv.lora_" in name:
            p.requires_grad_(False)
    sharded = _fully_shard(model, mesh)
    frozen = {n for n, p in sharded.named_parameters() if "lora_" in n and not p.requires_grad}
    assert len(frozen) == 3, "fully_shard keeps requires_grad on the DTensor parameters"
    before = _whole(sharded)
    cb = balora.BalanceCallback()
    with pytest.warns(UserWarning, match="2 LoRA pair"):
        cb.on_optimizer_step(None, TrainerState(global_step=0), TrainerControl(), model=sharded)
    assert set(cb.last_summary.skipped) == {"lin[default]", "conv[default]"} and cb.last_summary.balanced == 1
    after = _whole(sharded)
    for n in frozen | {"base_model.model.lin.lora_B.default.weight"}:
        assert torch.equal(after[n], before[n]), f"{n} was rewritten"
    A, B = after["base_model.model.emb.lora_embedding_A.default"], after["base_model.model.emb.lora_embedding_B.default"]
    assert np_rel_imbalance(A, B) < 1e-5
    assert last_comm().bytes_sent == R * 20 * 4, "only emb's A (r, 20) is gathered, none of the frozen factors"


def test_a_model_built_on_the_meta_device_is_sharded_block_by_block_and_balanced_once_loaded(mesh):
    """FSDP2's recipe for large models: build on the meta device, fully_shard module by module with
    lora_shard_placement called inline (the README's form, so each call walks a model that already
    holds meta shards), then to_empty and load. The meta factors hold no data: walking them must not
    gather them (it raised 'Cannot copy out of meta tensor'), and balance_ before loading must skip
    every pair with the reason it gives for an unsharded meta model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    def build():
        torch.manual_seed(0)
        return get_peft_model(Tiny(), LoraConfig(r=R, lora_alpha=4, target_modules=["emb", "lin", "conv"],
                                                 init_lora_weights=False))

    with torch.device("meta"):
        unsharded, model = build(), build()
    fully_shard(_layer(model, "lin"), mesh=mesh, shard_placement_fn=balora.lora_shard_placement(model, mesh))
    fully_shard(model, mesh=mesh, shard_placement_fn=balora.lora_shard_placement(model, mesh))
    assert tuple(_layer(model, "lin").lora_A["default"].weight.placements) == (Shard(1),)
    assert tuple(_layer(model, "emb").lora_embedding_A["default"].placements) == (Shard(1),)
    summary, want = balora.balance_(model), balora.balance_(unsharded)
    assert summary.balanced == 0 and summary.skipped == want.skipped and len(want.skipped) == 3
    assert balora.layer_report(model).empty

    plain = build()
    model.to_empty(device="cpu")
    set_model_state_dict(model, plain.state_dict(), options=StateDictOptions(full_state_dict=True))
    assert balora.balance_(model).balanced == 3
    balora.balance_(plain)
    expected = _lora_state(plain)
    for n, t in _whole(model).items():
        torch.testing.assert_close(t, expected[n], rtol=1e-5, atol=1e-6, msg=n)


def test_torch_save_of_a_sharded_state_dict_gets_a_one_line_error_saying_what_to_save(model, mesh, tmp_path, capsys):
    """torch.save(model.state_dict()) under FSDP2 writes this rank's DTensor shards. `balora inspect` said
    torch's 'Weights only load failed ... Re-running torch.load with weights_only set to False will likely
    succeed': neither possible from the command line nor what the file needs (it is one rank's part of the
    adapter). It must say what it is and what to save instead, as for a .distcp checkpoint."""
    from balora.cli import main

    import subprocess
    import sys

    path = tmp_path / "rank0.pt"
    torch.save(_fully_shard(model, mesh).state_dict(), path)
    rc = main(["inspect", str(path)])  # here torch.distributed.tensor is imported: torch.load rebuilds the DTensors
    in_process = (rc, capsys.readouterr().err)
    # A fresh `balora inspect` has not imported it: torch.load(weights_only=True) refuses the DTensors.
    proc = subprocess.run([sys.executable, "-m", "balora.cli", "inspect", str(path)], capture_output=True, text=True)
    for rc, err in (in_process, (proc.returncode, proc.stderr)):
        assert rc == 2 and "Traceback" not in err, err
        message = err.strip().splitlines()[-1].removeprefix("balora inspect: error: ")
        assert message.startswith(f"{path}: ") and "DTensor" in message and "full_state_dict=True" in message, message
        assert "weights_only" not in message, message


def test_lora_shard_placement_called_per_block_gathers_nothing(model, mesh, monkeypatch):
    """fully_shard(block, shard_placement_fn=balora.lora_shard_placement(model, mesh)) block by block, as the
    README writes it: each call walked the model gathering every factor already sharded, so the setup moved
    a quadratic number of bytes in the number of blocks (~190 MB per rank for a 1B-like adapter)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    import balora.distributed

    fully_shard(_layer(model, "lin"), mesh=mesh, shard_placement_fn=balora.lora_shard_placement(model, mesh))

    def no_gather(params):
        raise AssertionError("lora_shard_placement gathered a sharded factor")

    monkeypatch.setattr(balora.distributed, "gather_full", no_gather)
    placement = balora.lora_shard_placement(model, mesh)  # the next block's call
    assert placement(_layer(model, "lin").lora_A["default"].weight) == Shard(1)  # a sharded A is still found
    assert placement(_layer(model, "lin").lora_B["default"].weight) is None
    fully_shard(_layer(model, "conv"), mesh=mesh, shard_placement_fn=placement)


@pytest.mark.parametrize("shard", ["wrapped-block", "flat-parameter"])
def test_training_hooks_refuse_fsdp1_before_training_starts(model, shard):
    """FSDP1 under a training hook: auto-wrapping puts FullyShardedDataParallel around blocks inside the
    model the Trainer hands its callbacks; without a wrapper inside, the factors are flat views. Both were
    refused only from inside the first balancing step: after that optimizer step had run, and with
    start_step=1000 after 999 steps of training. They must be refused when the hook is registered and
    when training begins, with nothing registered."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    class FullyShardedDataParallel(nn.Module):  # FSDP1's class name; the real one needs an accelerator
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    tiny = model.base_model.model
    if shard == "wrapped-block":
        tiny.lin = FullyShardedDataParallel(tiny.lin)
    else:
        sub = _layer(model, "lin").lora_A["default"]
        sub.weight = nn.Parameter(sub.weight.detach().flatten())
    words = "FSDP1" if shard == "wrapped-block" else "flattened or sharded"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(RuntimeError, match=words) as err:
        balora.balance_after_step(opt, model)
    assert "fully_shard" in str(err.value) and "\n" not in str(err.value)
    assert not opt._optimizer_step_post_hooks, "nothing registered"
    for callback in (balora.BalanceCallback(start_step=1000), balora.BalanceCallback(balance=False)):
        with pytest.raises(RuntimeError, match=words):
            callback.on_train_begin(SimpleNamespace(), TrainerState(), TrainerControl(), model=model)
