"""BalanceCallback inside a real transformers Trainer.train() and balance_after_step in a hand-written
loop: after every optimizer step every layer is balanced and PEFT's dW is what the optimizer made it;
diagnostics reach the Trainer's logs; balance=False and handle.remove() really stop balancing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from balora import BalanceCallback, balance_after_step, layer_report

TARGETS = ["c_attn", "c_proj", "c_fc", "wte"]
DIAGNOSTIC_KEYS = {"balora/rel_imbalance_mean", "balora/rel_imbalance_max", "balora/imbalance_max",
                   "balora/cond_dW_median", "balora/eff_rank_mean", "balora/sigma_max", "balora/balance_seconds"}


@pytest.fixture
def lora_gpt2(make_gpt2):
    """Tiny GPT-2 with LoRA on every layer kind it has; random (nonzero) init so that every
    product has full rank from the first step and "balanced after every step" is exact."""

    def make(seed=0):
        model = make_gpt2(seed=seed)
        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, fan_in_fan_out=True,
                                                init_lora_weights=False))

    return make


@pytest.fixture
def train_data(lm_batch):
    return [{"input_ids": ids, "labels": ids} for ids in torch.cat([lm_batch, lm_batch.flip(1)])]  # 8 rows


def _trainer(model, data, tmp_path, callbacks=(), steps=3):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, report_to="none",
                             use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, data_seed=0)
    return Trainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks))


class _CheckAtStepEnd(TrainerCallback):
    """Registered after BalanceCallback: at each step end, every layer balanced, dW as the optimizer left it."""

    def __init__(self, recorder, peft_deltas, assert_deltas_close):
        self.recorder, self.peft_deltas, self.assert_close = recorder, peft_deltas, assert_deltas_close
        self.max_rel_imbalance = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        report = layer_report(model)
        self.max_rel_imbalance.append(float(report["rel_imbalance"].max()))
        self.assert_close(self.recorder.deltas, self.peft_deltas(model), rtol=1e-5)


class _LogSpy(TrainerCallback):
    """Stands in for a reporting integration (TensorBoard, W&B): what keys does it get?"""

    def __init__(self):
        self.keys = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.keys.append(set(logs))


def test_trainer_balances_after_every_step(lora_gpt2, train_data, tmp_path, peft_deltas, assert_deltas_close,
                                          dw_after_optimizer):
    model = lora_gpt2()
    assert float(layer_report(model)["rel_imbalance"].min()) > 0.05
    recorder = dw_after_optimizer
    checker = _CheckAtStepEnd(recorder, peft_deltas, assert_deltas_close)
    balancer = BalanceCallback(log_layers=True)
    trainer = _trainer(model, train_data, tmp_path, [recorder, balancer, checker])
    trainer.train()

    assert len(checker.max_rel_imbalance) == 3 and max(checker.max_rel_imbalance) < 1e-5
    # wte, c_attn, c_fc and both c_proj (attention and MLP).
    assert balancer.last_summary.balanced == 5 == len(layer_report(model)) and balancer.balance_seconds > 0
    step_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in step_logs] == [1, 2, 3]
    for h in step_logs:
        assert DIAGNOSTIC_KEYS <= set(h), set(h)
        assert h["balora/rel_imbalance_max"] < 1e-5
        assert "balora/rel_imbalance/transformer.h.0.attn.c_attn[default]" in h
        assert "balora/rel_imbalance/transformer.wte[default]" in h


def test_attach_puts_it_first_so_integrations_see_diagnostics(lora_gpt2, train_data, tmp_path):
    spy = _LogSpy()
    trainer = _trainer(lora_gpt2(), train_data, tmp_path, [spy], steps=2)
    cb = BalanceCallback().attach(trainer)
    assert trainer.callback_handler.callbacks[0] is cb
    trainer.train()
    assert len(spy.keys) >= 2 and all(DIAGNOSTIC_KEYS <= keys for keys in spy.keys[:2])


def test_attach_of_a_callback_already_given_to_the_trainer_moves_it(lora_gpt2, train_data, tmp_path, monkeypatch):
    """Trainer(callbacks=[cb]) then cb.attach(trainer): one callback, first, one pass per step (it was
    in the list twice: every pair balanced twice a step and the diagnostics computed twice a log)."""
    import balora.callbacks

    passes = []
    real_step = balora.callbacks.balance_step
    monkeypatch.setattr(balora.callbacks, "balance_step", lambda *a: passes.append(1) or real_step(*a))
    cb = BalanceCallback()
    trainer = _trainer(lora_gpt2(), train_data, tmp_path, [_LogSpy(), cb], steps=2)
    assert cb.attach(trainer) is cb and cb.attach(trainer) is cb
    assert trainer.callback_handler.callbacks[0] is cb
    assert sum(c is cb for c in trainer.callback_handler.callbacks) == 1
    trainer.train()
    assert len(passes) == trainer.state.global_step == 2



class _PassSeconds(TrainerCallback):
    """Registered after BalanceCallback: the seconds of each step's pass, as its last_summary says."""

    def __init__(self, balance):
        self.balance, self.seconds = balance, []

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.seconds.append(self.balance.last_summary.seconds)


def test_logged_balance_seconds_are_this_runs_when_the_callback_trains_again(lora_gpt2, train_data, tmp_path):
    """One BalanceCallback given to a second Trainer (a sweep) or trained again: the second run's logged
    balora/balance_seconds started from the first run's total (and a RunRecorder resumed in the same
    process added the time before the checkpoint twice to its summary)."""
    cb = BalanceCallback()
    _trainer(lora_gpt2(), train_data, tmp_path / "first", [cb], steps=3).train()
    assert cb.balance_seconds > 0
    passes = _PassSeconds(cb)
    second = _trainer(lora_gpt2(seed=1), train_data, tmp_path / "second", [cb, passes], steps=3)
    second.train()
    logged = [h["balora/balance_seconds"] for h in second.state.log_history if "loss" in h]
    assert logged == pytest.approx(np.cumsum(passes.seconds).tolist(), rel=1e-9)


def test_evaluate_returns_its_metrics_without_the_diagnostics(lora_gpt2, train_data, tmp_path):
    """evaluate() logs its metrics dict and returns it: the diagnostics added to it for the integrations
    came back in the metrics, and hyperparameter_search's default objective (eval_loss unless there are
    other metrics, then their sum) became the sum of the diagnostics (6.2 for an eval_loss of 4.2)."""
    from transformers.trainer_utils import default_compute_objective

    spy = _LogSpy()
    trainer = _trainer(lora_gpt2(), train_data, tmp_path, [spy], steps=2)
    trainer.eval_dataset = train_data[:4]
    BalanceCallback().attach(trainer)
    trainer.train()
    metrics = trainer.evaluate()
    assert not any(key.startswith("balora/") for key in metrics)
    assert default_compute_objective(metrics) == metrics["eval_loss"]
    # ...while the integrations and the log history still get them with the eval loss
    assert DIAGNOSTIC_KEYS <= spy.keys[-1] and "eval_loss" in spy.keys[-1]
    assert DIAGNOSTIC_KEYS <= set(trainer.state.log_history[-1]) and "eval_loss" in trainer.state.log_history[-1]

def test_balance_false_only_logs(lora_gpt2, train_data, tmp_path):
    plain = _trainer(lora_gpt2(), train_data, tmp_path / "plain", steps=2)
    plain.train()
    logging_only = BalanceCallback(balance=False)
    logged = _trainer(lora_gpt2(), train_data, tmp_path / "logged", [logging_only], steps=2)
    logged.train()
    # Training is untouched: bit for bit the weights of a run without the callback.
    for (name, p), (_, q) in zip(plain.model.named_parameters(), logged.model.named_parameters()):
        assert torch.equal(p, q), name
    step_logs = [h for h in logged.state.log_history if "loss" in h]
    assert all(DIAGNOSTIC_KEYS <= set(h) for h in step_logs)
    assert min(h["balora/rel_imbalance_max"] for h in step_logs) > 0.05
    assert logging_only.last_summary is None and all(h["balora/balance_seconds"] == 0 for h in step_logs)


def test_every_and_start_step(lora_gpt2):
    """The step arithmetic, driven the way Trainer drives it (global_step not yet incremented)."""
    model = lora_gpt2()
    cb = BalanceCallback(every=2, start_step=3)
    args, control = None, TrainerControl()
    balanced_after = []
    for global_step in range(8):
        with torch.no_grad():  # an "optimizer step" that unbalances every pair
            for name, p in model.named_parameters():
                if "lora_A" in name or "lora_embedding_A" in name:
                    p.mul_(1.5)
        cb.on_optimizer_step(args, TrainerState(global_step=global_step), control, model=model)
        balanced_after.append(float(layer_report(model)["rel_imbalance"].max()) < 1e-5)
    # Optimizer steps 1..8: balanced after 3, 5, 7.
    assert balanced_after == [False, False, True, False, True, False, True, False]
    for bad in (0, 1.5, True, "2"):  # 1.5 balanced at steps 1, 4, 7, ...; True was every=1
        with pytest.raises(ValueError, match="every must be >= 1, a whole number of optimizer steps"):
            BalanceCallback(every=bad)



def test_start_step_that_is_no_step_number_is_refused_up_front(lora_gpt2):
    """start_step=1.5 never balanced (no step is 1.5 past an integer), silently; "2" or None raised
    a TypeError from inside the first optimizer step, after it had changed the weights."""
    for bad in (1.5, True, "2", None, 0, -1):
        with pytest.raises(ValueError, match="start_step must be >= 1, a whole number of optimizer steps"):
            BalanceCallback(start_step=bad)
    model = lora_gpt2()  # a whole number of another integer type is a step number like any other
    cb = BalanceCallback(start_step=np.int64(2))
    cb.on_optimizer_step(None, TrainerState(global_step=1), TrainerControl(), model=model)
    assert float(layer_report(model)["rel_imbalance"].max()) < 1e-5

def test_balance_after_step_in_a_hand_written_loop(make_tiny_net, tiny_net_targets, tiny_net_inputs, peft_deltas,
                                                    assert_deltas_close):
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets, init_lora_weights=False))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    recorded = {}
    # Registered first, so it runs after optimizer.step() and before balora's hook.
    opt.register_step_post_hook(lambda o, a, k: recorded.update(deltas=peft_deltas(model)))
    handle = balance_after_step(opt, model)

    def step():
        loss = model(*tiny_net_inputs).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(layer_report(model)["rel_imbalance"].max())

    for _ in range(3):
        assert step() < 1e-5
        assert_deltas_close(recorded["deltas"], peft_deltas(model), rtol=1e-5)
    handle.remove()
    after_removal = [step() for _ in range(3)]
    assert after_removal[-1] > 1e-3, "Adam does not keep the balance: removed hook must mean drift"

    # every=2: balanced after every second step only.
    handle = balance_after_step(opt, model, every=2, method="svd")
    assert [step() < 1e-5 for _ in range(4)] == [False, True, False, True]
    handle.remove()
    # A loop resumed after 4 steps with every=3: balanced after steps 6 and 9 of the run, not 7 and 10.
    handle = balance_after_step(opt, model, every=3, steps_taken=4)
    assert [step() < 1e-5 for _ in range(5)] == [False, True, False, False, True]
    handle.remove()
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="every must be >= 1"):
            balance_after_step(opt, model, every=bad)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="steps_taken must be a whole number"):
            balance_after_step(opt, model, every=2, steps_taken=bad)


def test_balance_after_step_with_check_shows_the_pass_it_measured(make_tiny_net, tiny_net_targets, tiny_net_inputs,
                                                                   peft_deltas):
    """check=True in a hand-written loop: the handle's last_summary carries the pass's figures (they were
    measured and thrown away). Its max_rel_error is compared with PEFT's own dW before and after the pass."""
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets, init_lora_weights=False))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    recorded = {}
    opt.register_step_post_hook(lambda o, a, k: recorded.update(deltas=peft_deltas(model)))
    handle = balance_after_step(opt, model, check=True)
    assert handle.last_summary is None
    for _ in range(2):
        loss = model(*tiny_net_inputs).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        after = peft_deltas(model)
        moved = max(float((after[k] - d).norm() / d.norm()) for k, d in recorded["deltas"].items())
        summary = handle.last_summary
        assert summary.balanced == len(after)
        assert 0 < summary.max_rel_error < 1e-5 and moved < 1e-5
        assert summary.max_rel_imbalance == pytest.approx(float(layer_report(model)["rel_imbalance"].max()), rel=0.5, abs=1e-8)
    handle.remove()


@pytest.mark.parametrize("threads", [1, 2], ids=["pair_by_pair", "stacked"])
def test_balance_after_step_inside_autocast_keeps_dw(make_tiny_net, tiny_net_targets, tiny_net_inputs, peft_deltas,
                                                     assert_deltas_close, threads):
    """A loop whose whole body runs under torch.autocast (optimizer.step() included) runs balora's hook
    inside it too: the pass's fp32 Grams and products must not become bf16 ones (dW moved by ~4e-3
    and the pairs balanced only to ~3e-3 every step). threads=2: the stacked pass a GPU runs."""
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets, init_lora_weights=False))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    recorded = {}

    def record(o, a, k):  # PEFT's dW right after the step, formed at full precision (outside autocast)
        with torch.autocast("cpu", enabled=False):
            recorded.update(deltas=peft_deltas(model))

    opt.register_step_post_hook(record)
    balance_after_step(opt, model)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(*tiny_net_inputs).float().square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            assert float(layer_report(model)["rel_imbalance"].max()) < 1e-5
            assert_deltas_close(recorded["deltas"], peft_deltas(model), rtol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_balance_after_step_through_accelerate_with_gradient_accumulation(make_tiny_net, tiny_net_targets,
                                                                           tiny_net_inputs, monkeypatch):
    """accelerate's prepared optimizer hides torch's step hooks: balance_after_step hooks the optimizer it
    wraps, so balancing follows the real steps (every second micro-batch with accumulation 2)."""
    from accelerate import Accelerator
    from accelerate.state import GradientState

    import balora.callbacks

    # accelerate's gradient state is shared by the process: with accelerate 0.34 (the floor), the Trainer
    # of an earlier test here (test_balance_false_only_logs) left it stepping on every micro-batch.
    GradientState._reset_state()
    passes = []
    real_step = balora.callbacks.balance_step
    monkeypatch.setattr(balora.callbacks, "balance_step", lambda *a: passes.append(1) or real_step(*a))
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets, init_lora_weights=False))
    model, opt = acc.prepare(model, torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2))
    handle = balance_after_step(opt, model)
    balanced, count = [], []
    for _ in range(4):
        with acc.accumulate(model):
            acc.backward(model(*tiny_net_inputs).square().mean())
            opt.step()
            opt.zero_grad()
        balanced.append(float(layer_report(model)["rel_imbalance"].max()) < 1e-5)
        count.append(len(passes))
    # Micro-batches 1 and 3 take no step (the factors stay as they were: PEFT's random init, then balanced).
    assert count == [0, 1, 1, 2] and balanced == [False, True, True, True]
    handle.remove()
    with pytest.raises(TypeError, match="object has no step hooks.*pass the torch optimizer"):
        balance_after_step(object(), model)


def test_deepspeed_is_refused_at_train_begin():
    """Under DeepSpeed the optimizer's fp32 master weights overwrite the model's after each step:
    balancing would silently do nothing, so the callback refuses before training starts."""
    from types import SimpleNamespace

    args = SimpleNamespace(deepspeed="ds_config.json")
    with pytest.raises(RuntimeError, match="DeepSpeed keeps its own copy.*FSDP2"):
        BalanceCallback().on_train_begin(args, TrainerState(), TrainerControl())
    BalanceCallback(balance=False).on_train_begin(args, TrainerState(), TrainerControl())  # diagnostics only: fine
    BalanceCallback().on_train_begin(SimpleNamespace(deepspeed=None), TrainerState(), TrainerControl())


def test_deepspeed_from_accelerate_launch_is_refused_at_train_begin():
    """`accelerate launch` with a DeepSpeed config (ACCELERATE_USE_DEEPSPEED=true) leaves
    TrainingArguments.deepspeed None and sets its deepspeed_plugin instead (transformers'
    TrainingArguments.__post_init__): ZeRO-1/2 undo balancing all the same, so it is refused too."""
    from types import SimpleNamespace

    args = SimpleNamespace(deepspeed=None, deepspeed_plugin=SimpleNamespace(zero_stage=2))
    with pytest.raises(RuntimeError, match="DeepSpeed keeps its own copy.*FSDP2"):
        BalanceCallback().on_train_begin(args, TrainerState(), TrainerControl())
    BalanceCallback(balance=False).on_train_begin(args, TrainerState(), TrainerControl())  # diagnostics only: fine
    BalanceCallback().on_train_begin(SimpleNamespace(deepspeed=None, deepspeed_plugin=None), TrainerState(),
                                     TrainerControl())


def test_an_adapter_name_the_model_lacks_is_refused_at_train_begin(make_tiny_net, tiny_net_targets):
    """BalanceCallback(adapter="nope") was refused only at the first optimizer step, after a step of training."""
    from types import SimpleNamespace

    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets))
    args = SimpleNamespace(deepspeed=None, deepspeed_plugin=None)
    with pytest.raises(ValueError, match="BalanceCallback: the model has no adapter 'nope'; it has 'default'"):
        BalanceCallback(adapter="nope").on_train_begin(args, TrainerState(), TrainerControl(), model=model)
    BalanceCallback(adapter="default").on_train_begin(args, TrainerState(), TrainerControl(), model=model)


def test_balance_after_step_skips_the_steps_a_grad_scaler_skips_in_a_fused_optimizer(make_tiny_net, tiny_net_targets,
                                                                                      tiny_net_inputs, monkeypatch):
    """A fused optimizer (fused=True: torch's AdamW, Adam, SGD) is stepped by GradScaler.step even on inf/NaN
    gradients and skips the update itself: the hook ran anyway, so a skipped step balanced the model and
    counted towards `every`. Balancing must follow the optimizer's own step count (Adam's state["step"])."""
    import balora.callbacks

    passes = []
    real_step = balora.callbacks.balance_step
    monkeypatch.setattr(balora.callbacks, "balance_step", lambda *a: passes.append(1) or real_step(*a))
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets, init_lora_weights=False))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    balance_after_step(opt, model, every=2)
    for i in range(6):
        scaler.scale(model(*tiny_net_inputs).square().mean()).backward()
        if i in (1, 2):  # an overflow: the scaler skips these steps
            params[0].grad.view(-1)[0] = float("inf")
        before = [p.detach().clone() for p in params]
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        real_steps = int(opt.state[params[0]]["step"])
        assert len(passes) == real_steps // 2, f"micro-batch {i}: {len(passes)} passes after {real_steps} steps"
        if i in (1, 2):
            assert all(torch.equal(b, p) for b, p in zip(before, params)), "a skipped step changed the factors"


class _OverflowAt(TrainerCallback):
    """Registered before BalanceCallback: makes the gradients of the given optimizer steps (1-based) overflow,
    as fp16 training on a GPU does now and then, and records whether each step changed the factors."""

    def __init__(self, steps):
        self.steps, self.changed, self._before = set(steps), {}, None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        params = [p for p in model.parameters() if p.requires_grad]
        if state.global_step + 1 in self.steps:
            params[0].grad.view(-1)[0] = float("inf")
        self._before = [p.detach().clone() for p in params]

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        params = [p for p in model.parameters() if p.requires_grad]
        self.changed[state.global_step + 1] = not all(torch.equal(b, p) for b, p in zip(self._before, params))


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_trainer_steps_a_grad_scaler_skips_are_not_balanced(optim, lora_gpt2, train_data, tmp_path, monkeypatch):
    """fp16 on a GPU: accelerate's GradScaler skips steps with inf/NaN gradients (a fused optimizer skips them
    itself), and the Trainer still calls on_optimizer_step. Those steps left the factors as they were, so no pass
    runs for them. CPU has no fp16 scaler in accelerate: the test gives the Trainer's accelerator one."""
    import balora.callbacks

    passes = []
    real_step = balora.callbacks.balance_step
    monkeypatch.setattr(balora.callbacks, "balance_step", lambda *a: passes.append(1) or real_step(*a))
    overflow = _OverflowAt({2, 3})
    trainer = _trainer(lora_gpt2(), train_data, tmp_path, callbacks=[overflow, BalanceCallback()], steps=5)
    trainer.args.optim, trainer.args.max_grad_norm = optim, 0.0  # (clipping would see scaled gradients)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    trainer.train()
    assert overflow.changed == {1: True, 2: False, 3: False, 4: True, 5: True}  # the scaler did skip 2 and 3
    assert len(passes) == 3


def test_balance_after_step_refuses_an_adapter_name_the_model_lacks_before_training(make_tiny_net, tiny_net_targets,
                                                                                     tiny_net_inputs):
    """balance_after_step(..., adapter="nope") was refused only from inside the first optimizer.step(), after the
    step had changed the weights; the callback refuses it at train begin, the hook now when it is registered."""
    model = get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets, init_lora_weights=False))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(ValueError, match="balance_after_step: the model has no adapter 'nope'; it has 'default'"):
        balance_after_step(opt, model, adapter="nope")
    assert not opt._optimizer_step_post_hooks, "a refused hook must not stay registered"
    handle = balance_after_step(opt, model, adapter="default")
    model(*tiny_net_inputs).square().mean().backward()
    opt.step()
    assert handle.last_summary.balanced == len(tiny_net_targets)


def test_an_adapter_name_a_wrapped_model_lacks_is_refused_when_the_hook_is_registered(make_tiny_net, tiny_net_targets,
                                                                                      tiny_net_inputs):
    """A hand-written DDP loop (or accelerate's prepare on several processes) hands the hook
    DistributedDataParallel(peft_model), whose peft_config sits on .module (DataParallel here, the same
    wrapping in one process): the misspelt adapter was refused only from inside the first optimizer.step(),
    after that step had changed the weights."""
    model = torch.nn.DataParallel(get_peft_model(make_tiny_net(), LoraConfig(r=2, target_modules=tiny_net_targets,
                                                                             init_lora_weights=False)))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(ValueError, match="balance_after_step: the model has no adapter 'nope'; it has 'default'"):
        balance_after_step(opt, model, adapter="nope")
    assert not opt._optimizer_step_post_hooks, "a refused hook must not stay registered"
    cb = BalanceCallback(adapter="nope")
    with pytest.raises(ValueError, match="BalanceCallback: the model has no adapter 'nope'"):
        cb.on_train_begin(None, TrainerState(), TrainerControl(), model=model)
    handle = balance_after_step(opt, model, adapter="default")
    model(*tiny_net_inputs).square().mean().backward()
    opt.step()
    assert handle.last_summary.balanced == len(tiny_net_targets)


@pytest.mark.parametrize("stack", [False, True])
def test_trainer_balances_the_tied_lm_head_pair_of_ensure_weight_tying(stack, train_data, tmp_path, peft_deltas,
                                                                        assert_deltas_close, dw_after_optimizer,
                                                                        monkeypatch):
    """PEFT's ensure_weight_tying gives a tied lm_head the embedding's LoRA factors (its A is the embedding's B^T,
    its B the embedding's A^T). Pair by pair (a one-thread CPU) the pass wrote the second pair's transform on
    top of the first's, (Y^2 A, B X^2): dW kept, but the pair was never balanced (rel_imbalance 0.9 after every
    step), while the summary counted it balanced."""
    import balora.stacked
    from transformers import LlamaConfig, LlamaForCausalLM

    real = balora.stacked.use_stacks
    monkeypatch.setattr(balora.stacked, "use_stacks", lambda device, a, b, _: real(device, a, b, stack))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=16, tie_word_embeddings=True)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                             target_modules=["embed_tokens", "lm_head", "q_proj"],
                                                             ensure_weight_tying=True))
    emb, head = model.base_model.model.model.embed_tokens, model.base_model.model.lm_head
    assert head.lora_A["default"].weight.data_ptr() == emb.lora_embedding_B["default"].data_ptr()  # PEFT's tie
    checker = _CheckAtStepEnd(dw_after_optimizer, peft_deltas, assert_deltas_close)
    balancer = BalanceCallback()
    _trainer(model, train_data, tmp_path, [dw_after_optimizer, balancer, checker]).train()

    assert len(checker.max_rel_imbalance) == 3 and max(checker.max_rel_imbalance) < 1e-5
    report = layer_report(model)
    assert set(report["module"]) == {"model.embed_tokens", "lm_head", "model.layers.0.self_attn.q_proj"}
    assert head.lora_A["default"].weight.data_ptr() == emb.lora_embedding_B["default"].data_ptr()  # still tied
    # Balanced once, through the embedding: the summary does not count the lm_head pair as a second one.
    assert balancer.last_summary.balanced == 2 and "lm_head[default]" in balancer.last_summary.skipped
