"""Resume: a Trainer run with BalanceCallback resumed from a checkpoint follows the same
trajectory as an uninterrupted one (LoRA factors and loss history)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from balora import BalanceCallback
from balora.imbalance import rel_imbalance

VOCAB, SEQ = 64, 12
STEPS, CHECKPOINT = 8, 4


class StopAt(TrainerCallback):
    """Simulate an interruption: stop training after `step` (the checkpoint is saved first)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 48):
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    # lora_dropout > 0 so the trajectory also depends on the RNG state the checkpoint restores.
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"])
    return get_peft_model(LlamaForCausalLM(config), lora)


def _trainer(out, save_steps, callbacks):
    args = TrainingArguments(
        output_dir=str(out),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=4,  # 12 batches per epoch: crosses no epoch boundary
        max_steps=STEPS,  # the same schedule in every run; the interruption is StopAt
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    return Trainer(model=_model(), args=args, train_dataset=Tokens(), callbacks=callbacks)


def _factors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


# every=3, start_step=2 balances after steps 2, 5 and 8: the checkpoint at 4 falls between two
# balancing steps, so a callback that counted steps itself instead of reading the Trainer's
# global_step would balance at the wrong steps after resuming.
@pytest.mark.parametrize("method,every,start_step", [("nearest", 1, 1), ("svd", 3, 2)])
def test_resume_follows_uninterrupted_trajectory(tmp_path, method, every, start_step):
    def balance():
        return BalanceCallback(every, start_step, method, log_diagnostics=False)

    full = _trainer(tmp_path / "full", None, [balance()])
    full.train()

    first = _trainer(tmp_path / "resumed", CHECKPOINT, [balance(), StopAt(CHECKPOINT)])
    first.train()
    assert first.state.global_step == CHECKPOINT
    checkpoint = tmp_path / "resumed" / f"checkpoint-{CHECKPOINT}"
    assert (checkpoint / "optimizer.pt").is_file(), "the first half did not write a checkpoint"
    mid_factors = _factors(first.model)

    second = _trainer(tmp_path / "resumed", CHECKPOINT, [balance()])
    second.train(resume_from_checkpoint=str(checkpoint))
    assert second.state.global_step == STEPS

    a, b = _factors(full.model), _factors(second.model)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
        # The resumed run really moved on from the checkpoint.
        assert not torch.equal(b[name], mid_factors[name]) or "lora_B" not in name
    assert _losses(second) == pytest.approx(_losses(full), rel=1e-6, abs=0)
    assert sorted(_losses(second)) == list(range(1, STEPS + 1))

    # The last step (8) is a balancing step in both configurations: the end point is balanced.
    for name, A in a.items():
        if ".lora_A." in name:
            B = a[name.replace(".lora_A.", ".lora_B.")]
            assert float(rel_imbalance(A.double()[None], B.double()[None])[0]) < 1e-5, name
