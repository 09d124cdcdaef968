"""The pass's accelerator branches, run on the CPU. balora.stacked and balora.stack_writes take
other code on a GPU than on the host (the Grams reach the host in one flat copy, the r x r maps go
back in one pinned copy, re-homed stacks are written in one product instead of pieces, no workspace
buffers). CI has no GPU, so here the host is declared to be another CPU device object
(`cpu:0`, which tensors never report): every "not on the host" branch runs, with CPU tensors, and
must write exactly what the host's own path writes."""

from __future__ import annotations

import pytest
import torch

import balora.stack_writes as stack_writes
import balora.stacked as stacked
import balora.workspace as workspace
from balora.balance import balance_and_write
from balora.pairs import FactorPair


@pytest.fixture
def host_elsewhere(monkeypatch):
    """Make CPU tensors look like device tensors to the pass; count the device-only calls."""
    calls = {"maps sent": 0, "stack formed whole": 0}
    elsewhere = torch.device("cpu", 0)
    assert torch.zeros(1).device != elsewhere, "CPU tensors must not report cpu:0 for this test to mean anything"
    for module in (workspace, stacked, stack_writes):
        monkeypatch.setattr(module, "HOST", elsewhere)
    send, new_B = stacked.to_device_at_once, stacked.Block.new_B

    def counted_send(*args, **kwargs):
        calls["maps sent"] += 1
        return send(*args, **kwargs)

    def counted_new_B(self, *args, **kwargs):
        calls["stack formed whole"] += 1
        return new_B(self, *args, **kwargs)

    monkeypatch.setattr(stacked, "to_device_at_once", counted_send)
    monkeypatch.setattr(stacked.Block, "new_B", counted_new_B)
    return calls


# Two shapes of three small pairs, and one of four whose stacks (1 MiB each) the host writes in pieces.
SHAPES = [(4, 32, 20)] * 3 + [(8, 48, 24)] * 3 + [(16, 4096, 64)] * 4


@pytest.mark.parametrize("method", ["nearest", "svd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_device_branches_write_what_the_host_path_writes(host_elsewhere, make_live_pairs, np_rel_imbalance, method, dtype):
    host, device = make_live_pairs(SHAPES, seed=3, dtype=dtype), make_live_pairs(SHAPES, seed=3, dtype=dtype)
    for _ in range(2):  # the first pass re-homes the parameters into stacks, the second uses them
        with pytest.MonkeyPatch.context() as mp:  # this pass on the host's own path
            for module in (workspace, stacked, stack_writes):
                mp.setattr(module, "HOST", torch.device("cpu"))
            on_host = balance_and_write(host, method, check=False, stack=True)
        on_device = balance_and_write(device, method, check=False, stack=True)
        assert on_host.balanced == on_device.balanced == len(SHAPES) and on_device.qr_path == 0
    assert host_elsewhere["maps sent"] == 2, "one copy of the r x r maps to the device per pass"
    assert host_elsewhere["stack formed whole"] > 0, "re-homed stacks are formed in one product on a device"
    for p, q in zip(host, device):
        for a, b in zip(p.write.params, q.write.params):
            assert a.dtype == b.dtype == dtype
            assert torch.equal(a, b), f"{p.name}: the device branches wrote other factors than the host path"
        assert np_rel_imbalance(*q.write.params) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("method", ["nearest", "svd"])
def test_r_x_r_maths_on_the_device_write_what_the_host_path_writes(host_elsewhere, make_live_pairs, monkeypatch, method):
    """A CUDA device keeps the r x r maths where the Grams are (stacked.maths_on_device): here ranks
    4 and 8 do, rank 16 goes to the host. Each pass sends the two device groups' limits and the host
    group's maps (three copies), keeps the device groups' maps where they are, and writes what the
    host's own path writes."""
    on_cuda = stacked.maths_on_device
    monkeypatch.setattr(stacked, "maths_on_device", lambda device, r, pairs: r <= 8)
    host, device = make_live_pairs(SHAPES, seed=4), make_live_pairs(SHAPES, seed=4)
    for _ in range(2):
        with pytest.MonkeyPatch.context() as mp:
            for module in (workspace, stacked, stack_writes):
                mp.setattr(module, "HOST", torch.device("cpu"))
            mp.setattr(stacked, "maths_on_device", on_cuda)  # the real rule: never on a CPU
            on_host = balance_and_write(host, method, check=False, stack=True)
        on_device = balance_and_write(device, method, check=False, stack=True)
        assert on_host.balanced == on_device.balanced == len(SHAPES) and on_device.qr_path == 0
    assert host_elsewhere["maps sent"] == 2 * 3
    for p, q in zip(host, device):
        for a, b in zip(p.write.params, q.write.params):
            assert torch.equal(a, b), f"{p.name}: the device's r x r maths wrote other factors than the host path"


def test_grams_left_on_another_device_are_solved_on_the_host(host_elsewhere, monkeypatch, np_rel_imbalance,
                                                              np_product_error):
    """gram_maps' `reduce` may return Grams away from the factors' device (FSDP2 sums them where
    its mesh runs). Those are never solved where they landed: the rank-4 block here declares its
    factors on `cpu:1` while its Grams report `cpu`, so its maths run on the host and its maps are
    sent to cpu:1; the rank-8 block's Grams stay where its factors are and are solved there."""
    g = torch.Generator().manual_seed(6)
    shapes = [(4, 32, 20)] * 3 + [(8, 48, 24)] * 3
    factors = [(torch.randn(r, n_in, generator=g) / n_in**0.5, torch.randn(n_out, r, generator=g) * 0.3)
               for r, n_in, n_out in shapes]
    pairs = [FactorPair(f"m{i}", "default", "linear", A, B, 1.0) for i, (A, B) in enumerate(factors)]
    blocks = stacked.stack_blocks(pairs, stack=True)
    asked, sent, real_send = [], [], stacked.to_device_at_once
    monkeypatch.setattr(stacked, "maths_on_device", lambda device, r, n: asked.append(r) or True)
    monkeypatch.setattr(stacked, "to_device_at_once", lambda ts, device: sent.append(device) or real_send(ts, device))
    on_cpu = stacked.Block.device.fget
    monkeypatch.setattr(stacked.Block, "device", property(lambda b: torch.device("cpu", 1) if b.r == 4 else on_cpu(b)))
    stacked.gram_maps(blocks, "nearest", reduce=lambda grams: [t.double() for t in grams])
    assert asked == [8], "only Grams on their factors' device may be solved there"
    assert sent == [torch.device("cpu"), torch.device("cpu", 1)], "rank 8's limits to its device, rank 4's maps to cpu:1"
    for b in blocks:
        assert b.accurate == [True] * 3
        for m, k in enumerate(b.members):
            A0, B0 = factors[k]
            A1, B1 = b.Y[m] @ A0, B0 @ b.X[m]
            assert np_rel_imbalance(A1, B1) < 1e-5 and np_product_error(A0, B0, A1, B1) < 1e-5
