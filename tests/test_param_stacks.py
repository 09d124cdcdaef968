"""Re-homed parameters (balora.param_stacks): the first writing pass makes the LoRA parameters of
one shape slices of one stack, later passes read and write that stack in place, and nothing a user
does with the parameters changes: training with an optimizer, torch.compile, PEFT's save and reload,
moving the model, tied or borrowed storage. Checked against float64 numpy products and Grams, PEFT's own
delta weights, and the same training done pair by pair without re-homing."""

from __future__ import annotations


import pytest
import safetensors.torch
import torch
from torch import nn

import balora
from balora.adapters.live import model_pairs
from balora.adapters.pair_cache import PairCache
from balora.balance import balance_and_write
from balora.pairs import FactorPair
from balora.param_stacks import is_rehomed, stack_of
from balora.stack_writes import ParamWriter


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _owns_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_first_write_makes_each_shape_one_stack_with_the_same_parameters(np_product_error, np_rel_imbalance, make_live_pairs):
    pairs = make_live_pairs([(4, 24, 16)] * 3 + [(4, 16, 40)] * 2, seed=1)
    params = [p.write.params for p in pairs]
    ids = [tuple(map(id, ps)) for ps in params]
    before = [(A.detach().clone(), B.detach().clone()) for A, B in params]
    summary = balance_and_write(pairs, "nearest", check=False, stack=True)
    assert summary.balanced == 5
    assert [tuple(map(id, p.write.params)) for p in pairs] == ids  # the same Parameter objects
    for block in (params[:3], params[3:]):
        for factor in (0, 1):
            ts = [ps[factor] for ps in block]
            assert len({_storage(t) for t in ts}) == 1 and not _owns_storage(ts[0])  # one stack
            step = ts[0].numel() * ts[0].element_size()
            assert [t.data_ptr() - ts[0].data_ptr() for t in ts] == [g * step for g in range(len(ts))]
    assert _storage(params[0][0]) != _storage(params[3][0]) != _storage(params[0][1])
    for (A1, B1), (A0, B0), p in zip(params, before, pairs):
        assert np_product_error(A0, B0, A1, B1) < 1e-5 and np_rel_imbalance(A1, B1) < 1e-5
        assert p.A.data_ptr() == A1.data_ptr() and p.B.data_ptr() == B1.data_ptr()  # pairs follow


def test_later_passes_balance_the_stacks_in_place(np_product_error, np_rel_imbalance, make_live_pairs, dispatched_ops):
    """No stacking copy and no per-pair write once re-homed: the stacks are read and written as
    they are, and what an optimizer wrote into the parameters in between is what gets balanced."""
    pairs = make_live_pairs([(4, 24, 16)] * 4 + [(8, 32, 48)] * 3, seed=2)
    balance_and_write(pairs, "nearest", check=False, stack=True)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        with torch.no_grad():  # an optimizer step, in place
            for p in pairs:
                for t in p.write.params:
                    t.add_(0.05 * torch.randn(t.shape, generator=g))
        ptrs = [tuple(t.data_ptr() for t in p.write.params) for p in pairs]
        before = [tuple(t.detach().clone() for t in p.write.params) for p in pairs]
        with dispatched_ops() as ops:
            summary = balance_and_write(pairs, "nearest", check=False, stack=True)
        assert summary.balanced == 7 and summary.qr_path == 0
        assert not {"aten.stack.default", "aten._foreach_copy_.default"} & set(ops.names)  # (cat: of r x r Grams)
        assert ops.names.count("aten.copy_.default") == 4  # one per stack: A and B of two shapes
        assert [tuple(t.data_ptr() for t in p.write.params) for p in pairs] == ptrs
        for p, (A0, B0) in zip(pairs, before):
            A1, B1 = p.write.params
            assert np_product_error(A0, B0, A1, B1) < 1e-5 and np_rel_imbalance(A1, B1) < 1e-5


def test_a_block_partly_on_the_qr_path_is_written_pair_by_pair(np_product_error, np_rel_imbalance, make_live_pairs):
    pairs = make_live_pairs([(4, 40, 30)] * 4, seed=4)
    balance_and_write(pairs, "nearest", check=False, stack=True)  # re-homed
    U, _ = torch.linalg.qr(torch.randn(40, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    with torch.no_grad():
        pairs[2].write.params[0].copy_((U * torch.tensor([1.0, 1e-1, 1e-2, 1e-4], dtype=torch.float64)).mT.float())
    before = [tuple(t.detach().clone() for t in p.write.params) for p in pairs]
    summary = balance_and_write(pairs, "nearest", check=False, stack=True)
    assert summary.qr_path == 1 and summary.balanced == 4
    for p, (A0, B0) in zip(pairs, before):
        A1, B1 = p.write.params
        assert np_product_error(A0, B0, A1, B1) < 1e-4 and np_rel_imbalance(A1, B1) < 1e-5


def test_borrowed_or_tied_storage_is_never_rehomed(np_product_error, np_rel_imbalance):
    """A parameter that views a larger tensor, or one shared by two pairs, keeps its storage; the
    pass copies as before, and the rest of the larger tensor is untouched."""
    g = torch.Generator().manual_seed(6)
    big = torch.randn(3, 4, 24, generator=g) / 5
    borrowed = [nn.Parameter(big[i]) for i in range(2)]  # (4, 24) views of `big`
    pairs = [FactorPair(f"m{i}", "default", "linear", A.detach(), B.detach(), 1.0, write=ParamWriter(A, B))
             for i, (A, B) in enumerate((a, nn.Parameter(torch.randn(16, 4, generator=g))) for a in borrowed)]
    rest = big[2].clone()
    before = [tuple(t.detach().clone() for t in p.write.params) for p in pairs]
    balance_and_write(pairs, "nearest", check=False, stack=True)
    assert all(_storage(A) == _storage(big) for A in borrowed) and torch.equal(big[2], rest)
    for p, (A0, B0) in zip(pairs, before):
        A1, B1 = p.write.params
        assert np_product_error(A0, B0, A1, B1) < 1e-5 and np_rel_imbalance(A1, B1) < 1e-5

    shared = nn.Parameter(torch.randn(16, 4, generator=g))  # one B in two pairs (a tied weight)
    tied = [FactorPair(f"t{i}", "default", "linear", A.detach(), shared.detach(), 1.0, write=ParamWriter(A, shared))
            for i, A in enumerate(nn.Parameter(torch.randn(4, 24, generator=g) / 5) for _ in range(2))]
    balance_and_write(tied, "nearest", check=False, stack=True)
    assert _owns_storage(shared) and all(p.write.params[1] is shared for p in tied)


def _train(model, batch, steps, stack, **adamw):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2, **adamw)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        balance_and_write(model_pairs(model), "nearest", check=False, stack=stack)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("adamw", [{}, {"foreach": True}, {"fused": True}], ids=["for-loop", "foreach", "fused"])
def test_training_on_rehomed_parameters_matches_training_without(make_llama, lm_batch, lora_factors, adamw):
    """AdamW keeps its state per Parameter object, so re-homing must not disturb it: 6 steps with
    stacks (re-homed) and pair by pair (never re-homed) give the same losses and factors, with each
    of torch's AdamW implementations (the Trainer's adamw_torch, foreach, adamw_torch_fused)."""
    from peft import LoraConfig, get_peft_model

    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"])
    models = [get_peft_model(make_llama(n_layer=2, seed=0), LoraConfig(**cfg)) for _ in range(2)]
    losses = [_train(m, lm_batch, 6, stack, **adamw) for m, stack in zip(models, (True, False))]
    stacked_A = [layer.lora_A["default"].weight for _, layer in models[0].named_modules()
                 if hasattr(layer, "lora_A") and "default" in getattr(layer, "lora_A", {})]
    assert not _owns_storage(stacked_A[0])  # the stacked run did re-home
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and losses[0][-1] < losses[0][0]
    ref = lora_factors(models[1])
    for key, (A, B) in lora_factors(models[0]).items():
        assert abs(A - ref[key][0]).max() < 1e-5 and abs(B - ref[key][1]).max() < 1e-5, key


def test_a_compiled_model_trains_the_same_on_rehomed_parameters_without_recompiling(make_llama, lm_batch):
    """torch.compile guards on a parameter's metadata, not on its storage: re-homing after the first
    step must neither make the compiled model recompile nor change what it computes (AOTAutograd,
    which lifts parameters into graph inputs that now alias one stack, with the eager backend)."""
    from peft import LoraConfig, get_peft_model

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    compiled_model = get_peft_model(make_llama(n_layer=2, seed=0), LoraConfig(**cfg))
    compiled = torch.compile(compiled_model, backend=counting_backend)
    opt = torch.optim.AdamW([p for p in compiled_model.parameters() if p.requires_grad], lr=3e-2)
    losses, graphs_after_first = [], None
    for _ in range(5):
        loss = compiled(input_ids=lm_batch, labels=lm_batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        balance_and_write(model_pairs(compiled_model), "nearest", check=False, stack=True)  # re-homes at step 1
        losses.append(loss.item())
        graphs_after_first = len(graphs) if graphs_after_first is None else graphs_after_first
    eager = _train(get_peft_model(make_llama(n_layer=2, seed=0), LoraConfig(**cfg)), lm_batch, 5, stack=False)
    torch._dynamo.reset()
    assert graphs_after_first > 0 and len(graphs) == graphs_after_first, "re-homing made the model recompile"
    assert any(is_rehomed(p) for p in compiled_model.parameters())
    assert losses == pytest.approx(eager, rel=1e-5) and losses[-1] < losses[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_a_reduce_overhead_compiled_model_trains_the_same_on_rehomed_parameters(make_llama, lm_batch):
    """torch.compile(mode="reduce-overhead") records CUDA graphs with the parameters' addresses;
    re-homing after the first step moves them, and the graphs must be recorded again, not replayed
    on the old storage: the losses and the final output are eager's (ran on an H200, torch 2.11)."""
    from peft import LoraConfig, get_peft_model

    def run(compile_it):
        model = get_peft_model(make_llama(n_layer=2, seed=0), LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)).cuda()
        forward = torch.compile(model, mode="reduce-overhead") if compile_it else model
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
        balora.balance_after_step(opt, model)
        batch, losses = lm_batch.cuda(), []
        for _ in range(6):
            loss = forward(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        with torch.no_grad():  # the same parameters through the graphs and eagerly
            ours, eager = forward(input_ids=batch).logits.float().clone(), model(input_ids=batch).logits.float()
        assert any(is_rehomed(p) for p in model.parameters())
        return losses, (ours - eager).abs().max().item()

    torch._dynamo.reset()
    eager_losses, _ = run(False)
    losses, stale = run(True)
    torch._dynamo.reset()
    assert losses == pytest.approx(eager_losses, rel=1e-4) and stale < 1e-4


def test_save_reload_and_move_after_rehoming(make_llama, peft_deltas, assert_deltas_close, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

    model = get_peft_model(make_llama(n_layer=2, seed=1), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                     init_lora_weights=False))
    for _ in range(2):  # re-homed, then a pass on the stacks (stack=True: the tests run torch on one thread)
        balance_and_write(model_pairs(model), "nearest", check=False, stack=True)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert not any(_owns_storage(p) for p in lora)  # two layers: stacks of two
    deltas = peft_deltas(model)
    model.save_pretrained(tmp_path / "adapter")  # safetensors
    reloaded = PeftModel.from_pretrained(make_llama(n_layer=2, seed=1), tmp_path / "adapter")
    assert_deltas_close(deltas, peft_deltas(reloaded), rtol=1e-7)
    state = {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}
    safetensors.torch.save_file(state, tmp_path / "plain.safetensors")  # slices of one stack: allowed
    loaded = safetensors.torch.load_file(tmp_path / "plain.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())

    model.to(torch.float64)  # new storage for every parameter: re-homed again on the next pass
    balance_and_write(model_pairs(model), "nearest", check=False, stack=True)
    assert_deltas_close(deltas, peft_deltas(model), rtol=1e-5)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert all(p.dtype == torch.float64 and not _owns_storage(p) for p in lora)


def test_saving_one_adapter_with_torch_save_writes_none_of_another(make_llama, tmp_path):
    """torch.save writes a view's whole storage. With two adapters of one shape re-homed into one stack,
    `save_pretrained(selected_adapters=["default"], safe_serialization=False)` (or torch.save of
    get_peft_model_state_dict for one adapter) wrote the other adapter's factors into the file as well."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(make_llama(n_layer=2, seed=1), config)
    model.add_adapter("other", config)
    balance_and_write(model_pairs(model), "nearest", check=False, stack=True)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert not any(_owns_storage(p) for p in lora.values())  # re-homed
    model.save_pretrained(tmp_path, selected_adapters=["default"], safe_serialization=False)
    state = torch.load(tmp_path / "adapter_model.bin")
    saved = sum(v.numel() for v in state.values())
    stored = sum(s.nbytes() for s in {v.untyped_storage().data_ptr(): v.untyped_storage() for v in state.values()}.values())
    assert stored == saved * 4, "the file holds more than the adapter's own factors (fp32)"
    own = sum(p.numel() for n, p in lora.items() if ".default." in n)
    assert saved == own


def _rehomed_llama(make_llama):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_llama(n_layer=2, seed=1), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                     init_lora_weights=False))
    for _ in range(2):  # re-homed, then a pass on the stacks
        balance_and_write(model_pairs(model), "nearest", check=False, stack=True)
    assert all(is_rehomed(p) for n, p in model.named_parameters() if "lora_" in n)
    return model


def test_moving_a_rehomed_model_under_swap_tensors(make_llama, peft_deltas, assert_deltas_close):
    """With torch.__future__.set_swap_module_params_on_conversion(True), model.to() and load_state_dict
    swap each parameter's contents (torch.utils.swap_tensors), which refuses a tensor that has weak
    references: re-homing kept one to every LoRA parameter, so after balancing both raised
    "_apply(): Couldn't swap Linear.weight" where the same model never balanced moved fine."""
    model = _rehomed_llama(make_llama)
    deltas = peft_deltas(model)
    state = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to(torch.float64)
        model.load_state_dict(state)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert_deltas_close(deltas, peft_deltas(model), rtol=1e-7)
    balance_and_write(model_pairs(model), "nearest", check=False, stack=True)  # re-homed in float64
    assert_deltas_close(deltas, peft_deltas(model), rtol=1e-5)
    assert all(p.dtype == torch.float64 and is_rehomed(p) for n, p in model.named_parameters() if "lora_" in n)


def test_moving_a_rehomed_model_frees_its_old_stacks(make_llama):
    """model.to(dtype or device) gives every parameter new storage; the old stacks (an adapter's worth
    of memory: on a GPU after model.cpu()) must go with them, not stay alive as long as the model."""
    import gc
    import weakref

    model = _rehomed_llama(make_llama)
    old = {_storage(p): weakref.ref(p.untyped_storage()) for n, p in model.named_parameters() if "lora_" in n}
    assert len(old) == 4  # one stack per factor and shape (q_proj 32 -> 32, v_proj 32 -> 16), two layers each
    model.to(torch.float64)
    gc.collect()
    assert not [ptr for ptr, ref in old.items() if ref() is not None], "the old stacks are still alive"


def test_freezing_layers_one_by_one_leaves_no_stale_stacks(make_llama, lm_batch, np_rel_imbalance):
    """The training hooks skip frozen pairs, so freezing a layer mid-training hands the next pass a block
    without it. Re-homing the rest into a new stack left the old one alive for the frozen layer alone,
    with stale copies of every other layer: freezing 7 of 8 layers one by one held 4.5x the adapter's
    memory, and torch.save of the adapter's state dict wrote all of it. A stack is now left only whole."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    model = get_peft_model(make_llama(n_layer=8, seed=4), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                     init_lora_weights=False))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the hooks stack (and re-home) on a CPU with more than one thread
    try:
        handle = balora.balance_after_step(opt, model)
        for layer in range(-1, 7):  # a step, then freeze layer 0, a step, then layer 1, ...
            if layer >= 0:
                for name, p in model.base_model.model.model.layers[layer].named_parameters():
                    if "lora_" in name:
                        p.requires_grad_(False)
            model(input_ids=lm_batch, labels=lm_batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    assert handle.last_summary.balanced == 2 and len(handle.last_summary.skipped) == 14
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert any(is_rehomed(p) for p in lora.values())
    held = {_storage(p): p.untyped_storage().nbytes() for p in lora.values()}
    assert sum(held.values()) == sum(p.numel() * p.element_size() for p in lora.values()), "stale stacks held"
    state = get_peft_model_state_dict(model)
    saved = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in state.values()}
    assert sum(saved.values()) == sum(v.numel() * v.element_size() for v in state.values())
    last = model.base_model.model.model.layers[7].self_attn.q_proj
    assert np_rel_imbalance(last.lora_A["default"].weight, last.lora_B["default"].weight) < 1e-5


def test_the_pair_cache_stays_valid_across_rehoming(make_llama):
    """Re-homing points the cached pairs at the new storage, so BalanceCallback never re-walks."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_llama(n_layer=2, seed=2), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                     init_lora_weights=False))
    cache = PairCache()
    pairs = cache.get(model)
    balance_and_write(pairs, "nearest", check=False, stack=True)
    assert not _owns_storage(pairs[0].write.params[0])  # re-homed
    assert cache.get(model) is pairs  # still viewing: no new walk


def test_a_pass_under_inference_mode_leaves_storage_alone_and_training_works(np_product_error, np_rel_imbalance, make_live_pairs):
    """Balancing under torch.inference_mode() copies as before: a stack made there would be an
    inference tensor, and the next forward with autograd would refuse it."""
    pairs = make_live_pairs([(4, 24, 16)] * 3, seed=7)
    before = [tuple(t.detach().clone() for t in p.write.params) for p in pairs]
    with torch.inference_mode():
        summary = balance_and_write(pairs, "nearest", check=False, stack=True)
    assert summary.balanced == 3
    for p, (A0, B0) in zip(pairs, before):
        A1, B1 = p.write.params
        assert _owns_storage(A1) and _owns_storage(B1) and not A1.is_inference()
        assert np_product_error(A0, B0, A1, B1) < 1e-5 and np_rel_imbalance(A1, B1) < 1e-5
        (B1 @ A1).sum().backward()  # autograd still takes them
        assert A1.grad is not None


def test_conv_and_embedding_parameters_are_rehomed_too(make_tiny_net, tiny_net_targets, tiny_net_inputs, peft_deltas,
                                                       assert_deltas_close):
    """4-D conv factors (viewed flat in the stack) and embedding factors (bare Parameters): PEFT's
    own delta weights unchanged over two passes, the model's output too."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets, init_lora_weights=False))
    before, out_before = peft_deltas(model), model(*tiny_net_inputs)
    for _ in range(2):
        summary = balance_and_write(model_pairs(model), "nearest", check=False, stack=True)
        assert summary.balanced == len(before)
    assert_deltas_close(before, peft_deltas(model), rtol=1e-5)
    torch.testing.assert_close(model(*tiny_net_inputs), out_before, rtol=1e-4, atol=1e-5)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert any(p.dim() == 4 for p in lora.values())
    # one layer per shape here: stacks of one, found by the registry rather than by their storage
    assert all(stack_of([p]) is not None and is_rehomed(p) for p in lora.values()), [n for n, p in lora.items()
                                                                                     if not is_rehomed(p)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacks_written_in_pieces_on_the_cpu_get_the_one_piece_result(np_product_error, np_rel_imbalance,
                                                                      make_live_pairs, dispatched_ops, monkeypatch, dtype):
    """On the CPU a re-homed stack is formed and copied back in CPU_PIECES pieces (rows of B,
    columns of A; the last piece shorter here): every pair ends where forming the stack in one piece
    (as on a GPU) puts it, to the BLAS kernel's rounding, balanced, and each piece is one copy."""
    import balora.stack_writes as stack_writes

    shapes = [(4, 41, 29)] * 3 + [(8, 64, 50)] * 2
    pieced, whole = make_live_pairs(shapes, seed=9, dtype=dtype), make_live_pairs(shapes, seed=9, dtype=dtype)
    for pairs in (pieced, whole):
        balance_and_write(pairs, "nearest", check=False, stack=True)  # re-homed
    g = torch.Generator().manual_seed(10)
    with torch.no_grad():  # an optimizer step, the same on both
        for p, q in zip(pieced, whole):
            for s, t in zip(p.write.params, q.write.params):
                step = (0.05 * torch.randn(s.shape, generator=g)).to(dtype)
                s.add_(step)
                t.add_(step)
    before = [tuple(t.detach().clone() for t in p.write.params) for p in pieced]
    monkeypatch.setattr(stack_writes, "CPU_PIECE_MIN_BYTES", 0)
    monkeypatch.setattr(stack_writes, "CPU_PIECES", 1)
    balance_and_write(whole, "nearest", check=False, stack=True)
    monkeypatch.setattr(stack_writes, "CPU_PIECES", 3)
    with dispatched_ops() as ops:
        summary = balance_and_write(pieced, "nearest", check=False, stack=True)
    assert summary.balanced == 5 and summary.qr_path == 0
    upcasts = 2 * 2 if dtype == torch.bfloat16 else 0  # bf16 stacks are upcast to fp32 first
    assert ops.names.count("aten.copy_.default") == 4 * 3 + upcasts
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    ulps = 4 * torch.finfo(dtype).eps  # a product over r terms, summed in another order by another kernel
    for p, q, (A0, B0) in zip(pieced, whole, before):
        A1, B1 = p.write.params
        for new, ref in ((A1, q.write.params[0]), (B1, q.write.params[1])):
            torch.testing.assert_close(new, ref, rtol=ulps, atol=ulps * float(ref.abs().max()))
        assert np_product_error(A0, B0, A1, B1) < tol and np_rel_imbalance(A1, B1) < tol
