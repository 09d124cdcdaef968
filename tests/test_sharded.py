"""Sharded factors (DeepSpeed ZeRO-3, FSDP flat parameters, DTensor): balora must refuse with a
message that names the module and says what to do, and write nothing. Balancing a shard as if it
were the whole matrix would silently change dW.

The shards are fakes with the properties balora can see: a ZeRO-3 partitioned parameter is an
empty tensor carrying `ds_id` (and `ds_shape`); an FSDP flat parameter, or an original parameter
outside summon_full_params, has the wrong shape (1-D, empty, or a slice); a DTensor is real,
made on a one-process gloo group.
"""

from __future__ import annotations

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
    assert "Gather" in msg or "Balance outside" in msg, f"the message must say what to do: {msg}"
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


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed gloo unavailable")
def test_dtensor_refused(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sub = _layer(model, "lin").lora_B["default"]
        sub.weight = nn.Parameter(distribute_tensor(sub.weight.detach(), mesh, [Shard(0)]))
        assert type(sub.weight).__name__ == "DTensor"
        _assert_refused(model, "lin[default]", ("DTensor",))
    finally:
        dist.destroy_process_group()


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
