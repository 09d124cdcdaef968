"""BalanceCallback in transformers' Trainer on 2 gloo CPU ranks, with the Trainer's own FSDP2
(`fsdp="full_shard"`, `fsdp_config={"version": 2}`: accelerate shards the model with fully_shard)
or, with --ddp, the DDP it falls back to on a CPU. Run by tests/test_fsdp2.py:

    torchrun --nproc_per_node 2 --standalone tests/fsdp2_trainer_script.py OUT_DIR [--ddp] [--qlora LLAMA_DIR]

--qlora (run by tests/test_qlora.py) trains the Llama saved in LLAMA_DIR loaded in 4 bits (NF4, the
packed weights stored as bf16 so that FSDP2 can shard them), prepared as QLoRA recipes do
(prepare_model_for_kbit_training, gradient checkpointing): FSDP-QLoRA in the Trainer.

accelerate (1.15) takes its FSDP path only on accelerator devices: on a CPU it keeps
DistributedType.MULTI_CPU and the Trainer trains with DDP. Without --ddp this script changes that
one decision, the state's distributed_type, to DistributedType.FSDP whenever the Trainer's FSDP
plugin is set, so the rest (accelerate's fsdp2_prepare_model, the optimizer it rebuilds over the
DTensor parameters, the Trainer's loop and callbacks) runs as on a GPU machine. The script checks
that it did: the parameters must be DTensors.

Each rank writes OUT_DIR/{fsdp2|ddp}[_qlora]_rank{R}.safetensors (its gathered LoRA factors) and .json
(losses, the callback's last summary, the parameter types, the last logged balora metrics).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from accelerate import state as accelerate_state
from accelerate.utils import DistributedType
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

from fsdp2_train_script import SEQ, VOCAB, make_model  # beside this script
from fsdp2_qlora_script import make_model as qlora_model
from gathered import lora_state

from balora import BalanceCallback, RunRecorder

STEPS, PER_RANK, LR = 4, 2, 5e-3


def let_accelerate_shard_on_the_cpu() -> None:
    """AcceleratorState as on an accelerator: FSDP whenever an FSDP plugin is set (see above)."""
    init = accelerate_state.AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        plugin = fsdp_plugin or getattr(self, "fsdp_plugin", None)  # a later init keeps the shared state's plugin
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, plugin

    accelerate_state.AcceleratorState.__init__ = patched


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, VOCAB, (STEPS * PER_RANK * 2, SEQ), generator=torch.Generator().manual_seed(7))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(out_dir: str, ddp: bool, qlora: str | None) -> None:
    torch.set_num_threads(1)
    tag = ("ddp" if ddp else "fsdp2") + ("_qlora" if qlora else "")
    sharding = {} if ddp else {"fsdp": "full_shard",
                               "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
    if not ddp:
        let_accelerate_shard_on_the_cpu()
    args = TrainingArguments(output_dir=os.path.join(out_dir, tag), use_cpu=True, report_to="none",
                             per_device_train_batch_size=PER_RANK, max_steps=STEPS, learning_rate=LR, logging_steps=1,
                             save_strategy="no", disable_tqdm=True, seed=0, gradient_checkpointing=bool(qlora),
                             **sharding)
    callback = BalanceCallback()
    model = qlora_model(qlora, prepare=True) if qlora else make_model()
    # A RunRecorder too, as a user adds one: rank 0 writes the run, every rank takes part in the
    # diagnostics' collectives (FSDP2 gathers the factors).
    # force: run_torchrun runs the script again after a rank's teardown abort, into the same folder.
    recorder = RunRecorder(os.path.join(out_dir, f"{tag}_run"), layers_every=2, balance_callback=callback, force=True)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback, recorder])
    trainer.train()
    rank = dist.get_rank()
    logged = [h for h in trainer.state.log_history if "balora/rel_imbalance_max" in h]
    info = {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "balanced": callback.last_summary.balanced, "qr_path": callback.last_summary.qr_path,
            "distributed_type": str(trainer.accelerator.state.distributed_type),
            "param_types": sorted({type(p).__name__ for p in trainer.model.parameters()}),
            "quantized": sorted({type(m).__name__ for m in trainer.model.modules() if "4bit" in type(m).__name__}),
            "logged_rel_imbalance_max": logged[-1]["balora/rel_imbalance_max"] if logged else None}
    save_file(lora_state(trainer.model), os.path.join(out_dir, f"{tag}_rank{rank}.safetensors"))
    with open(os.path.join(out_dir, f"{tag}_rank{rank}.json"), "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    flags = sys.argv[2:]
    main(sys.argv[1], ddp="--ddp" in flags, qlora=flags[flags.index("--qlora") + 1] if "--qlora" in flags else None)
