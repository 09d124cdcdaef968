"""Train a tiny PEFT model with Trainer + BalanceCallback under torchrun (gloo, CPU); every rank
saves its LoRA factors. Run by tests/test_distributed.py:

    torchrun --nproc_per_node 2 --standalone tests/ddp_train_script.py OUT_DIR

Writes OUT_DIR/rank{R}.safetensors (every lora_A / lora_B weight of that rank's replica) and
OUT_DIR/rank{R}.json (world size, steps done, balancing calls, losses, whether the LoRA parameters
were re-homed into stacks).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from balora import BalanceCallback
from balora.param_stacks import is_rehomed

VOCAB, SEQ, N_SAMPLES, STEPS = 64, 16, 64, 6


class CountingBalance(BalanceCallback):
    """BalanceCallback that also counts how often it balanced, so the test knows it ran."""

    calls = 0

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        super().on_optimizer_step(args, state, control, model=model, **kwargs)
        if self.last_summary is not None and self.last_summary.balanced:
            self.calls += 1
            self.last_summary = None


class Tokens(torch.utils.data.Dataset):
    """Random token sequences; each rank's sampler takes a different half of them."""

    def __init__(self):
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, VOCAB, (N_SAMPLES, SEQ), generator=g)

    def __len__(self):
        return N_SAMPLES

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(out_dir: str) -> None:
    # torchrun sets one thread per process; with two, BalanceCallback runs the stacked pass that
    # re-homes the LoRA parameters (balora.param_stacks), which DDP must live with.
    torch.set_num_threads(2)
    torch.manual_seed(0)  # same init on every rank (DDP also broadcasts it)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "trainer"),
        use_cpu=True,
        ddp_backend="gloo",
        report_to="none",
        per_device_train_batch_size=4,
        max_steps=STEPS,
        learning_rate=1e-2,  # large enough that the factors move far from PEFT's init in a few steps
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    callback = CountingBalance(log_diagnostics=False)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
    trainer.train()

    rank = trainer.args.process_index
    factors = {name: p.detach().clone().contiguous() for name, p in model.named_parameters() if "lora_" in name}
    save_file(factors, os.path.join(out_dir, f"rank{rank}.safetensors"))
    info = {
        "rank": rank,
        "world_size": trainer.args.world_size,
        "distributed": torch.distributed.is_initialized(),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "global_step": trainer.state.global_step,
        "balance_calls": callback.calls,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "rehomed": all(is_rehomed(p) for name, p in model.named_parameters() if "lora_" in name),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    main(sys.argv[1])
