"""QLoRA: LoRA on a bitsandbytes 4-bit (NF4) or 8-bit base model, on CPU. The walker finds the
pairs of PEFT's bnb LoRA layers, balancing keeps every layer's output and the model's logits,
layer_report measures them, and BalanceCallback balances them inside a Trainer; the quantized
base weights are never touched. FSDP2 over a 4-bit base model (FSDP-QLoRA) runs on 2 gloo ranks,
in a hand-written loop and in the Trainer.

The quantized models are made from a tiny random Llama saved to a temporary folder and loaded
back with a BitsAndBytesConfig: transformers' own quantizing load, nothing downloaded.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import balora
from balora.adapters.live import iter_lora_pairs, model_pairs
from balora.balance import balance_and_write
from balora.param_stacks import is_rehomed
from gathered import base_bytes

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: pip install -e '.[qlora]'")

VOCAB, SEQ, N_BLOCKS = 64, 12, 2
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
N_PAIRS = N_BLOCKS * len(TARGETS)
QUANT = {  # name -> (its BitsAndBytesConfig, the bitsandbytes layer it puts in place of nn.Linear)
    "nf4": (lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
            "Linear4bit"),
    "int8": (lambda: BitsAndBytesConfig(load_in_8bit=True), "Linear8bitLt"),
}
# The quantized base matmul rounds on the way: bitsandbytes' CPU NF4 kernel returns bf16-rounded
# values (8 significant bits), LLM.int8 quantizes each activation row to int8 (steps of max|x| / 127).
# A layer output that balancing moves at fp32 rounding level can flip one such rounding in a later
# layer, so a few logits move by up to one step per quantized block; the rest agree at fp32 level.
LOGITS_MAX_RTOL = {"nf4": N_BLOCKS * 2.0**-8, "int8": N_BLOCKS / 127}
LOGITS_MEDIAN_RTOL = 1e-6
# One layer on the same input: the base output is bit-identical and the LoRA branch s B A x changes
# only by fp32 rounding of r-term products (about r * 2^-24); 1e-5 of the branch is far above that.
LAYER_RTOL = 1e-5


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=N_BLOCKS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _quantized_lora(path, quant: str, random_B: bool = True, prepare: bool = False):
    """prepare: PEFT's prepare_model_for_kbit_training first, as QLoRA recipes do."""
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=QUANT[quant][0](), device_map="cpu",
                                             dtype=torch.float32)
    if prepare:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    torch.manual_seed(1)
    # init_lora_weights=False: B is random, so every pair is really moved by balancing.
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=not random_B))


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _rel_imbalance_np(A: torch.Tensor, B: torch.Tensor) -> float:
    A, B = A.detach().double().numpy(), B.detach().double().numpy()
    BtB, AAt = B.T @ B, A @ A.T
    return float(np.linalg.norm(BtB - AAt) / (np.linalg.norm(BtB) + np.linalg.norm(AAt)))


@pytest.fixture(params=list(QUANT))
def quant(request):
    return request.param


def test_walker_finds_the_quantized_lora_layers(saved_llama, quant):
    model = _quantized_lora(saved_llama, quant)
    pairs = iter_lora_pairs(model)
    assert len(pairs) == N_PAIRS and not any(p.skip_reason for p in pairs)
    for p in pairs:
        layer = _lora_layers(model)[f"base_model.model.{p.module}"]
        assert type(layer.get_base_layer()).__name__ == QUANT[quant][1]
        assert p.kind == "linear" and p.r == 4 and p.A.dtype == torch.float32
        assert (p.out_features, p.in_features) == (layer.out_features, layer.in_features)
        assert p.A.data_ptr() == layer.lora_A["default"].weight.data_ptr(), "A must view the parameter"


@pytest.mark.parametrize("stacked", [False, True], ids=["default", "stacked"])
def test_balancing_keeps_every_layer_output_and_the_logits(saved_llama, quant, stacked):
    """stacked: the pass a GPU or a multi-threaded CPU runs, which re-homes the LoRA parameters
    (the tests run torch on one thread, where balance_ goes pair by pair)."""
    model = _quantized_lora(saved_llama, quant)
    layers = _lora_layers(model)
    inputs = {}

    def keep_input(name):
        def hook(module, args, output):  # returns None: the output is left as it is
            inputs.setdefault(name, args[0].detach())
        return hook

    hooks = [m.register_forward_hook(keep_input(n)) for n, m in layers.items()]
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        before = {n: m(inputs[n]) for n, m in layers.items()}
        branch = {n: before[n] - m.get_base_layer()(inputs[n]) for n, m in layers.items()}  # s B A x
    for h in hooks:
        h.remove()
    old_A = {n: m.lora_A["default"].weight.detach().clone() for n, m in layers.items()}
    base = base_bytes(model)

    summary = balance_and_write(model_pairs(model), "nearest", stack=True) if stacked else balora.balance_(model)

    assert summary.balanced == N_PAIRS and not summary.skipped
    assert all(is_rehomed(m.lora_A["default"].weight) == stacked for m in layers.values())
    assert base_bytes(model) == base, "balancing must never touch the quantized base weights"
    with torch.no_grad():
        for n, m in layers.items():
            scale = float(branch[n].abs().max())
            assert float((m(inputs[n]) - before[n]).abs().max()) <= LAYER_RTOL * scale, n
            assert _rel_imbalance_np(m.lora_A["default"].weight, m.lora_B["default"].weight) < 1e-5, n
            assert not torch.allclose(m.lora_A["default"].weight, old_A[n], rtol=1e-2), f"{n}: balancing moved nothing"
        scale = float(logits.abs().max())
        moved = (model(input_ids=ids).logits - logits).abs()
        assert float(moved.max()) <= LOGITS_MAX_RTOL[quant] * scale
        assert float(moved.median()) <= LOGITS_MEDIAN_RTOL * scale
        # Control: the new B with the old A (not a balanced pair) fails both bounds by far.
        for n, m in layers.items():
            m.lora_A["default"].weight.copy_(old_A[n])
        broken = (model(input_ids=ids).logits - logits).abs()
    assert float(broken.max()) > 3 * LOGITS_MAX_RTOL[quant] * scale
    assert float(broken.median()) > 1e3 * LOGITS_MEDIAN_RTOL * scale


def test_layer_report_on_the_quantized_model(saved_llama, quant):
    model = _quantized_lora(saved_llama, quant)
    report = balora.layer_report(model)
    assert len(report) == N_PAIRS and set(report["dtype"]) == {"float32"} and (report["status"] == "ok").all()
    layers = _lora_layers(model)
    for module, value in zip(report["module"], report["rel_imbalance"]):
        m = layers[f"base_model.model.{module}"]
        assert value == pytest.approx(_rel_imbalance_np(m.lora_A["default"].weight, m.lora_B["default"].weight), rel=1e-6)
    assert report["rel_imbalance"].min() > 0.05, "random B: the pairs start imbalanced"
    balora.balance_(model)
    assert balora.layer_report(model)["rel_imbalance"].max() < 1e-5


class _Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, VOCAB, (8, SEQ), generator=torch.Generator().manual_seed(4))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


# A Trainer as plain as can be, and one set up as QLoRA recipes set it up: PEFT's
# prepare_model_for_kbit_training (fp32 norms, input grads), gradient checkpointing, and the
# paged 8-bit AdamW of bitsandbytes (on CPU it is not paged, and it keeps 32-bit state for tensors
# under 4096 entries, as these are; balancing moves the factors, never the optimizer's state).
# name -> (TrainingArguments, the module the optimizer must come from)
TRAINER_SETUPS = {
    "plain": ({"optim": "adamw_torch"}, "torch.optim"),
    "qlora_recipe": ({"optim": "paged_adamw_8bit", "gradient_checkpointing": True}, "bitsandbytes.optim"),
}


@pytest.mark.parametrize("setup", list(TRAINER_SETUPS))
def test_balance_callback_in_a_trainer(saved_llama, quant, setup, tmp_path):
    model = _quantized_lora(saved_llama, quant, random_B=False,  # PEFT's B = 0 init, as in real QLoRA
                            prepare=setup == "qlora_recipe")
    base = base_bytes(model)
    extra, optimizer_module = TRAINER_SETUPS[setup]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=2,
                             max_steps=3, learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True,
                             **extra)
    callback = balora.BalanceCallback()
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[callback])
    trainer.train()
    used = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert type(used).__module__.startswith(optimizer_module), type(used)
    assert callback.last_summary is not None and callback.last_summary.balanced == N_PAIRS
    assert base_bytes(model) == base
    for m in _lora_layers(model).values():
        A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
        assert float(B.abs().max()) > 1e-3, "B stayed at its zero init: training did not happen"
        assert _rel_imbalance_np(A, B) < 1e-5
    logged = [h for h in trainer.state.log_history if "balora/rel_imbalance_max" in h]
    assert logged and logged[-1]["balora/rel_imbalance_max"] < 1e-5


def test_balance_after_step_leaves_a_frozen_lora_A_of_a_quantized_model_alone(saved_llama, quant):
    """LoRA-FA over a quantized base: lora_A frozen, only lora_B trained. The hook must not rewrite A:
    the hooked run is bit-identical to the same run without it."""
    runs = []
    for hooked in (True, False):
        model = _quantized_lora(saved_llama, quant, prepare=True)
        for m in _lora_layers(model).values():
            m.lora_A["default"].weight.requires_grad_(False)
        A0 = {n: m.lora_A["default"].weight.detach().clone() for n, m in _lora_layers(model).items()}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        handle = balora.balance_after_step(opt, model) if hooked else None
        ids = torch.arange(2 * SEQ).reshape(2, SEQ) % VOCAB
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad()
        for n, m in _lora_layers(model).items():
            assert torch.equal(m.lora_A["default"].weight, A0[n]), f"{n}: the frozen lora_A was rewritten"
        runs.append({n: m.lora_B["default"].weight.detach().clone() for n, m in _lora_layers(model).items()})
        if hooked:
            summary = handle.last_summary
            assert len([w for w in caught if f"{N_PAIRS} LoRA pair(s) have a frozen factor" in str(w.message)]) == 1
    assert summary.balanced == 0 and len(summary.skipped) == N_PAIRS
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0]), "the hooked run's B differs from the plain run's"


# FSDP-QLoRA: FSDP2 shards a 4-bit base model (its packed weights stored as bf16) and the LoRA
# factors, on 2 gloo CPU ranks (tests/fsdp2_qlora_script.py).
FSDP2_QLORA_SCRIPT = Path(__file__).with_name("fsdp2_qlora_script.py")


@pytest.fixture(scope="module")
def fsdp2_qlora_run(tmp_path_factory, torchrun) -> Path:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out = tmp_path_factory.mktemp("fsdp2_qlora")
    torchrun(FSDP2_QLORA_SCRIPT, out)
    return out


@pytest.mark.slow
def test_fsdp2_over_a_4bit_base_model_balances_every_pass(fsdp2_qlora_run):
    """Each pass on the sharded QLoRA model keeps dW of every pair (float64, on the gathered
    factors) and balances it, on both ranks alike, without touching a byte of any rank's shard
    of the 4-bit base weights; both ranks end with the same factors and the same layer_report."""
    info = [json.loads((fsdp2_qlora_run / f"rank{r}.json").read_text()) for r in (0, 1)]
    for i in info:
        assert i["quantized"] == ["Linear4bit"] and i["sharded"] == ["DTensor"], i
        assert i["summaries"] == [[N_PAIRS, 0]] * len(i["losses"]), i["summaries"]
        assert max(i["dW"]) <= 1e-6, i["dW"]
        assert max(i["imbalance"]) <= 1e-6, i["imbalance"]
        assert i["base_kept"]
    assert info[0]["report"] == info[1]["report"]
    f0, f1 = (load_file(fsdp2_qlora_run / f"rank{r}.safetensors") for r in (0, 1))
    assert len(f0) == 2 * N_PAIRS and all(torch.equal(f0[n], f1[n]) for n in f0)


@pytest.mark.slow
def test_fsdp2_qlora_run_follows_the_single_process_run(fsdp2_qlora_run):
    """Losses against the same steps in one process, unsharded. Not to fp32 rounding: the CPU NF4
    kernel rounds its outputs to bf16, so a difference at fp32 rounding (each rank's batch of 2
    against one of 4, the reduction order) flips a few of those roundings (the first step's gradients agree to 1.5e-7, the losses after it to 2.5e-3
    when this was written, with or without balancing)."""
    ref = json.loads((fsdp2_qlora_run / "reference.json").read_text())
    got = json.loads((fsdp2_qlora_run / "rank0.json").read_text())
    assert abs(got["losses"][0] - ref["losses"][0]) <= 1e-5 * ref["losses"][0]
    for loss, ref_loss in zip(got["losses"], ref["losses"], strict=True):
        assert abs(loss - ref_loss) <= 1e-2 * ref_loss, (got["losses"], ref["losses"])


# FSDP-QLoRA in the Trainer: accelerate's FSDP2 over the 4-bit model prepared as QLoRA recipes do,
# against the Trainer's DDP on the same 2 ranks (tests/fsdp2_trainer_script.py --qlora).
TRAINER_SCRIPT = Path(__file__).with_name("fsdp2_trainer_script.py")


@pytest.fixture(scope="module")
def trainer_qlora_runs(tmp_path_factory, torchrun, saved_llama) -> Path:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out = tmp_path_factory.mktemp("trainer_qlora")
    for engine in ((), ("--ddp",)):
        torchrun(TRAINER_SCRIPT, out, args=(*engine, "--qlora", str(saved_llama)))
    return out


@pytest.mark.slow
def test_fsdp_qlora_in_the_trainer_balances_and_follows_ddp(trainer_qlora_runs):
    """Every step balances every pair on both ranks, the ranks hold the same factors, and the run
    follows the Trainer's DDP run. Not to fp32 rounding: the NF4 kernel rounds its outputs to bf16,
    and a difference at fp32 rounding can flip one of those roundings (1.3e-7 seen between the
    factors when this was written, 1e-3 allowed)."""
    runs = {}
    for engine in ("fsdp2", "ddp"):
        f0, f1 = (load_file(trainer_qlora_runs / f"{engine}_qlora_rank{r}.safetensors") for r in (0, 1))
        info = json.loads((trainer_qlora_runs / f"{engine}_qlora_rank0.json").read_text())
        assert info["quantized"] == ["Linear4bit"] and info["balanced"] == N_PAIRS and info["qr_path"] == 0, info
        assert info["logged_rel_imbalance_max"] < 1e-5
        assert all(torch.equal(f0[n], f1[n]) for n in f0) and len(f0) == 2 * N_PAIRS
        for name, A in f0.items():
            if ".lora_A." in name:
                assert _rel_imbalance_np(A, f0[name.replace(".lora_A.", ".lora_B.")]) < 1e-5, name
        runs[engine] = f0, info
    (fsdp2, fsdp2_info), (ddp, ddp_info) = runs["fsdp2"], runs["ddp"]
    assert fsdp2_info["param_types"] == ["DTensor"] and "Params4bit" in ddp_info["param_types"]
    for loss, ref in zip(fsdp2_info["losses"], ddp_info["losses"], strict=True):
        assert abs(loss - ref) <= 1e-3 * ref
    for name in ddp:
        rel = float((fsdp2[name].double() - ddp[name].double()).norm() / ddp[name].double().norm())
        assert rel <= 1e-3, f"{name}: {rel:.1e}"


def test_the_callback_warns_of_bitsandbytes_cpu_repacking_when_the_trainer_evaluates(saved_llama, tmp_path):
    # On a CPU with AVX512-BF16 a Linear4bit's first eval-mode no-grad forward repacks it into a kernel with
    # no backward: a Trainer that evaluates between steps then trained nothing more, without a word.
    from balora.tasks.model_setup import keep_4bit_trainable

    model = _quantized_lora(saved_llama, "nf4", random_B=False)
    for m in model.modules():  # as bitsandbytes sets it on such a CPU, whatever this one is
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = True
    callback = balora.BalanceCallback()

    def begin(eval_strategy):
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", eval_strategy=eval_strategy,
                                 eval_steps=1)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            callback.on_train_begin(args, None, None, model=model)
        return [str(w.message) for w in seen if "balora" in str(w.message)]

    assert any("keep_4bit_trainable" in w for w in begin("steps"))
    assert not begin("no"), "no eval, no repacking"
    keep_4bit_trainable(model)
    assert not begin("steps")
