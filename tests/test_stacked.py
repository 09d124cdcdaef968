"""The per-step pass (balora.stacked): a constant number of ops whatever the number of modules, no
host reads on the Gram path, blocks that never mix (shared shapes, dtypes, reused workspace),
partial QR fallback inside one block, and ParamWriter following a moved parameter. Results are
checked against float64 numpy products and Grams of the factors before and after."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import balora.stacked
import balora.workspace
from balora.balance import balance_and_write, balance_pairs
from balora.pairs import FactorPair
from balora.stack_writes import ParamWriter


@pytest.mark.parametrize("method", ["nearest", "svd"])
def test_ops_per_pass_do_not_grow_with_the_number_of_modules(method, make_live_pairs, dispatched_ops):
    counts = []
    for n in (2, 6):
        pairs = make_live_pairs([(4, 24, 16)] * n + [(4, 16, 40)] * n)
        balance_and_write(pairs, method, check=False, stack=True)  # warm: as every step after the first
        with dispatched_ops() as ops:
            summary = balance_and_write(pairs, method, check=False, stack=True)  # what a GPU runs
        assert summary.balanced == 2 * n and summary.qr_path == 0
        assert "aten._local_scalar_dense.default" not in ops.names  # no .item()/bool() on the Gram path
        counts.append(len(ops.names))
    assert counts[0] == counts[1]


def test_blocks_with_shared_shapes_or_dtypes_never_mix(np_product_error, np_rel_imbalance, make_live_pairs):
    """Same A shape with different B shapes, and the same shapes in two dtypes, are separate blocks
    with separate workspace buffers: every pair keeps its own product, balanced, pass after pass."""
    shapes = [(4, 32, 20), (4, 32, 20), (4, 32, 48), (4, 32, 48), (8, 32, 20)]
    pairs = make_live_pairs(shapes, seed=1) + make_live_pairs(shapes[:2], seed=2, dtype=torch.float64)
    for p in pairs:
        p.module += f"-{p.A.dtype}"
    before = [(p.A.clone(), p.B.clone()) for p in pairs]
    for _ in range(3):  # the second and third passes reuse the workspace
        summary = balance_and_write(pairs, "nearest", check=True, stack=True)
        assert summary.balanced == len(pairs) and summary.max_rel_error < 1e-5
    for p, (A0, B0) in zip(pairs, before):
        A1, B1 = p.write.params  # the parameters themselves
        assert A1.dtype == A0.dtype and B1.dtype == B0.dtype
        assert np_product_error(A0, B0, A1, B1) < 1e-5, p.name
        assert np_rel_imbalance(A1, B1) < 1e-5, p.name


def test_bf16_factors_are_upcast_in_the_stack_and_written_back_in_bf16(np_product_error, np_rel_imbalance, make_live_pairs):
    pairs = make_live_pairs([(4, 64, 48)] * 3, seed=3, dtype=torch.bfloat16)
    before = [(p.A.clone(), p.B.clone()) for p in pairs]
    balance_and_write(pairs, "nearest", check=False)
    for p, (A0, B0) in zip(pairs, before):
        A1, B1 = p.write.params
        assert A1.dtype == B1.dtype == torch.bfloat16
        assert np_product_error(A0, B0, A1, B1) < 3e-2 and np_rel_imbalance(A1, B1) < 2e-2


def test_one_ill_conditioned_pair_in_a_block_alone_takes_the_qr_path(np_product_error, np_rel_imbalance, make_live_pairs):
    pairs = make_live_pairs([(4, 40, 30)] * 4, seed=4)
    g = torch.Generator().manual_seed(5)
    U, _ = torch.linalg.qr(torch.randn(40, 4, generator=g, dtype=torch.float64))
    pairs[2].A.copy_((U * torch.tensor([1.0, 1e-1, 1e-2, 1e-4], dtype=torch.float64)).mT.float())  # cond 1e4
    before = [(p.A.clone(), p.B.clone()) for p in pairs]
    new, summary = balance_pairs(pairs, "nearest", check=True, stack=True)
    assert summary.qr_path == 1 and summary.balanced == 4
    for i, (A0, B0) in enumerate(before):
        A1, B1 = new[i]
        assert np_product_error(A0, B0, A1, B1) < 1e-4 and np_rel_imbalance(A1, B1) < 1e-5


def test_param_writer_writes_where_the_parameter_is_now(np_rel_imbalance, np_product_error, make_live_pairs):
    (pair,) = make_live_pairs([(4, 24, 16)], seed=6)
    A_p, B_p = pair.write.params
    assert pair.write.targets() == (A_p, B_p)  # a 2-D parameter is its own target: no view op per pass
    conv = nn.Parameter(torch.randn(4, 3, 2, 2))
    writer = ParamWriter(conv, nn.Parameter(torch.randn(5, 4, 1, 1)))
    first = writer.targets()
    assert first[0].shape == (4, 12) and first[1].shape == (5, 4) and writer.targets() is first  # cached
    conv.data = conv.data.clone()  # what model.to(...) or load_state_dict(assign=True) can do
    moved = writer.targets()
    assert moved[0].data_ptr() == conv.data_ptr() != first[0].data_ptr()
    pairs = [FactorPair("c", "default", "conv2d", moved[0], moved[1], 1.0, write=writer)]
    before = (conv.detach().reshape(4, 12).clone(), writer.params[1].detach().reshape(5, 4).clone())
    balance_and_write(pairs, "nearest", check=False)
    A1, B1 = conv.detach().reshape(4, 12), writer.params[1].detach().reshape(5, 4)
    assert not torch.equal(A1, before[0])  # written into the moved parameter, balanced, same product
    assert np_rel_imbalance(A1, B1) < 1e-5 and np_product_error(*before, A1, B1) < 1e-5


def test_workspace_is_per_thread_and_can_be_freed(make_live_pairs):
    pairs = make_live_pairs([(4, 24, 16)] * 2, seed=7)
    balance_and_write(pairs, "nearest", check=False, stack=True)
    assert balora.workspace._local.buffers  # kept for the next pass
    balora.workspace.free_workspace()
    assert not getattr(balora.workspace._local, "buffers", None)
    new, _ = balance_pairs(pairs, "nearest", check=False, stack=True)  # handed-out results never live in the workspace
    kept = getattr(balora.workspace._local, "buffers", {})
    assert all(new[0][0].untyped_storage().data_ptr() != b.untyped_storage().data_ptr() for b in kept.values())


@pytest.mark.parametrize("method", ["nearest", "svd"])
def test_stacked_and_pair_by_pair_passes_write_the_same_factors(method, np_rel_imbalance, np_product_error, make_live_pairs):
    """The CPU's default (pair by pair, cache-friendly) and the GPU's (stacked) are the same maths."""
    shapes = [(4, 32, 20)] * 3 + [(8, 48, 24)] * 2
    stacked, single = make_live_pairs(shapes, seed=8), make_live_pairs(shapes, seed=8)
    before = [(p.A.clone(), p.B.clone()) for p in stacked]
    s1 = balance_and_write(stacked, method, check=False, stack=True)
    s2 = balance_and_write(single, method, check=False, stack=False)  # the one-thread CPU default
    assert s1.balanced == s2.balanced == len(shapes) and s1.qr_path == s2.qr_path == 0
    for p, q, (A0, B0) in zip(stacked, single, before):
        for a, b in zip(p.write.params, q.write.params):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        A1, B1 = q.write.params
        assert np_rel_imbalance(A1, B1) < 1e-5 and np_product_error(A0, B0, A1, B1) < 1e-5
    new, summary = balance_pairs(single, method, check=True, stack=False)  # checked: measured per pair
    assert summary.max_rel_error < 1e-5 and all(A.dtype == torch.float32 for A, _ in new.values())


def test_the_default_strategy_follows_device_and_threads(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert not balora.stacked.use_stacks(cpu, torch.float32, torch.float32, None)
    assert balora.stacked.use_stacks(cpu, torch.float16, torch.float32, False)  # fp16: always (overflow check)
    assert balora.stacked.use_stacks(torch.device("cuda"), torch.float32, torch.float32, None)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert balora.stacked.use_stacks(cpu, torch.float32, torch.float32, None)
    assert not balora.stacked.use_stacks(cpu, torch.float32, torch.float32, False)


def test_r_x_r_maths_run_on_cuda_when_rank_and_pairs_make_it_pay():
    on, cuda, top = balora.stacked.maths_on_device, torch.device("cuda", 0), balora.stacked.DEVICE_MATHS_MAX_R
    assert on(cuda, 16, 112) and on(torch.device("cuda"), top, 28) and on(cuda, 8, 64)  # pairs x r >= 512
    assert not on(cuda, 8, 56) and not on(cuda, 16, 28)  # little work: the host's maths are quicker
    assert not on(cuda, top + 1, 196)  # torch solves one matrix at a time there
    assert not on(torch.device("cpu"), 16, 112) and not on(torch.device("mps"), 16, 112)  # MPS has no float64


@pytest.mark.parametrize("method", ["nearest", "svd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_maths_where_the_grams_are_write_what_host_maths_write(method, dtype, monkeypatch, np_rel_imbalance,
                                                               np_product_error, make_live_pairs):
    """The branch a CUDA device takes (its limits sent to the device, its maps left there, its flags
    read there), run on the CPU for ranks <= 8 while rank 16 keeps the host branch: the same bits as
    the host maths, and an ill-conditioned pair still goes to the QR path."""
    shapes = [(4, 32, 20)] * 3 + [(8, 48, 24)] * 2 + [(16, 40, 40)] * 2
    default, device = make_live_pairs(shapes, seed=9, dtype=dtype), make_live_pairs(shapes, seed=9, dtype=dtype)
    U, _ = torch.linalg.qr(torch.randn(32, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    for pairs in (default, device):  # pair 1: cond(A) = 1e4, so the Gram path hands it to the QR path
        pairs[1].A.copy_((U * torch.tensor([1.0, 1e-1, 1e-2, 1e-4], dtype=torch.float64)).mT.to(dtype))
    before = [(p.A.float().clone(), p.B.float().clone()) for p in default]
    s1 = balance_and_write(default, method, check=False, stack=True)
    sent = []
    real_send = balora.stacked.to_device_at_once
    monkeypatch.setattr(balora.stacked, "maths_on_device", lambda device, r, pairs: r <= 8)
    monkeypatch.setattr(balora.stacked, "to_device_at_once", lambda ts, d: sent.append(d) or real_send(ts, d))
    s2 = balance_and_write(device, method, check=False, stack=True)
    assert len(sent) == 2  # the limits of ranks 4 and 8: those ranks took the device branch
    assert (s1.balanced, s1.qr_path) == (s2.balanced, s2.qr_path)
    assert s1.qr_path == (dtype == torch.float32)  # bf16's looser tolerance accepts the Gram path there
    for p, q, (A0, B0) in zip(default, device, before):
        for a, b in zip(p.write.params, q.write.params):
            assert torch.equal(a, b)
        A1, B1 = q.write.params
        if dtype == torch.float32:
            assert np_rel_imbalance(A1, B1) < 1e-5 and np_product_error(A0, B0, A1, B1) < 1e-5


def test_an_infinite_threshold_keeps_the_r_x_r_maths_on_the_host(monkeypatch):
    """The README's way back to one sync per pass: DEVICE_MATHS_MIN_WORK is read at each call."""
    monkeypatch.setattr(balora.stacked, "DEVICE_MATHS_MIN_WORK", float("inf"))
    assert not balora.stacked.maths_on_device(torch.device("cuda"), 16, 10_000)


@pytest.mark.parametrize("method", ["nearest", "svd"])
def test_the_rule_sees_all_pairs_of_a_rank_and_one_group_mixes_dtypes(method, monkeypatch, make_live_pairs,
                                                                     np_rel_imbalance, np_product_error):
    """maths_on_device is asked once per rank and device with that rank's pairs of every block
    (two shapes and two dtypes of rank 8: 3 + 2 pairs), as the README's pairs x r rule says; the
    rank-8 group then runs its bf16 and fp32 members in one device call, each with its own limits
    (the fp32 pairs, off balance by less than bf16's rounding, must still be balanced), and writes
    what the host maths write."""
    shapes = [(8, 48, 24)] * 3, [(8, 40, 40)] * 2 + [(4, 32, 20)] * 3
    dtypes = torch.bfloat16, torch.float32

    def make():
        pairs = [p for s, dtype, seed in zip(shapes, dtypes, (2, 3)) for p in make_live_pairs(s, seed=seed, dtype=dtype)]
        for p in pairs[3:5]:  # fp32, imbalanced by 1e-4: below bf16's rounding, so only their own limits balance them
            U, S, Vh = torch.linalg.svd(p.B.double() @ p.A.double(), full_matrices=False)
            p.A.copy_(S[:8, None].sqrt() * Vh[:8] / 1.0001)
            p.B.copy_(U[:, :8] * S[:8].sqrt() * 1.0001)
        return pairs

    default, device = make(), make()
    before = [(p.A.float().clone(), p.B.float().clone()) for p in device]
    s1 = balance_and_write(default, method, check=False, stack=True)
    asked = []
    monkeypatch.setattr(balora.stacked, "maths_on_device", lambda device, r, pairs: asked.append((device.type, r, pairs)) or r == 8)
    s2 = balance_and_write(device, method, check=False, stack=True)
    ranks = [r for s in shapes for r, _, _ in s]
    assert sorted(asked) == sorted(("cpu", r, ranks.count(r)) for r in set(ranks))
    assert (s1.balanced, s1.qr_path) == (s2.balanced, s2.qr_path) == (len(ranks), 0)
    for p, q, (A0, B0) in zip(default, device, before):
        for a, b in zip(p.write.params, q.write.params):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{p.name}: the device group wrote other factors"
        A1, B1 = q.write.params
        tol = 1e-5 if A1.dtype == torch.float32 else 1e-2
        assert np_rel_imbalance(A1, B1) < tol and np_product_error(A0, B0, A1, B1) < tol
