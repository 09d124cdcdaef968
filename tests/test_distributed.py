"""DDP: under torchrun with 2 CPU processes (gloo) and the Trainer, BalanceCallback keeps every
replica's LoRA factors identical, bit for bit, and balanced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from balora.imbalance import rel_imbalance

SCRIPT = Path(__file__).with_name("ddp_train_script.py")

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)



def _pairs(factors: dict[str, torch.Tensor]):
    """(name, A, B) for every LoRA pair in a saved state dict."""
    for name, A in sorted(factors.items()):
        if ".lora_A." in name:
            yield name, A, factors[name.replace(".lora_A.", ".lora_B.")]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, torchrun) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    torchrun(SCRIPT, out)
    return out


def test_ranks_really_ran_distributed(ddp_run):
    infos = [json.loads((ddp_run / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, info in enumerate(infos):
        assert info["rank"] == r
        assert info["world_size"] == 2 and info["distributed"] and info["backend"] == "gloo"
        assert info["global_step"] == 6
        assert info["balance_calls"] == 6, "BalanceCallback must balance after every optimizer step on every rank"
        assert info["rehomed"], "with two threads the stacked pass re-homes the LoRA parameters"


def test_replicas_identical_bit_for_bit(ddp_run):
    f0 = load_file(ddp_run / "rank0.safetensors")
    f1 = load_file(ddp_run / "rank1.safetensors")
    assert f0.keys() == f1.keys() and len(f0) == 2 * 2 * 3  # 2 layers x 3 targets x (A, B)
    for name in f0:
        assert torch.equal(f0[name], f1[name]), f"{name} differs between the two replicas"


def test_replicas_balanced_and_trained(ddp_run):
    factors = load_file(ddp_run / "rank0.safetensors")
    for name, A, B in _pairs(factors):
        assert B.abs().max() > 1e-3, f"{name}: B stayed at PEFT's zero init: training did not happen"
        imb = float(rel_imbalance(A.double()[None], B.double()[None])[0])
        assert imb < 1e-5, f"{name}: rel_imbalance {imb:.2e} after the last balancing step"
