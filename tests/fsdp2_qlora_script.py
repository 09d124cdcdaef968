"""FSDP2 over a 4-bit (NF4) bitsandbytes base model with LoRA (FSDP-QLoRA) on 2 gloo CPU ranks,
balancing after every AdamW step. Run by tests/test_qlora.py:

    torchrun --nproc_per_node 2 --standalone tests/fsdp2_qlora_script.py OUT_DIR

FSDP2 shards the packed 4-bit weights only when they are stored in a float dtype
(`bnb_4bit_quant_storage=torch.bfloat16`, as FSDP-QLoRA recipes set it). Rank 0 saves a tiny random
Llama; every rank loads it quantized, adds LoRA (fp32 factors), shards every block and the root,
and trains. Every step checks the pass itself, on the gathered factors: dW of every pair before
and after (float64), the imbalance after, and the local bytes of every base weight shard before
and after. Each rank writes OUT_DIR/rank{R}.json and OUT_DIR/rank{R}.safetensors (its gathered
factors); rank 0 also writes reference.json from the same steps in one process, unsharded.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from gathered import base_bytes, lora_state  # beside this script

from balora import balance_, layer_report

VOCAB, SEQ, PER_RANK, STEPS, LR = 64, 12, 2, 3, 5e-3
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def make_model(path: str, prepare: bool = False, **load) -> torch.nn.Module:
    """The saved Llama at `path` in NF4 (fp32 compute, bf16 storage) with LoRA r=4 on TARGETS.
    prepare: peft's prepare_model_for_kbit_training first, with gradient checkpointing (the
    Trainer's recipe); load: more from_pretrained arguments."""
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                               bnb_4bit_quant_storage=torch.bfloat16)
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32, **load)
    if prepare:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    torch.manual_seed(1)
    # init_lora_weights=False: B is random, so every pair is moved by balancing from the first step.
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))


def pass_defects(before: dict, after: dict) -> tuple[float, float]:
    """The largest relative change of dW = B A over the pairs, and the largest rel_imbalance after."""
    worst_dW = worst_imbalance = 0.0
    for name, A0 in before.items():
        if ".lora_A." not in name:
            continue
        b = name.replace(".lora_A.", ".lora_B.")
        dW0 = before[b].double() @ A0.double()
        A, B = after[name].double(), after[b].double()
        worst_dW = max(worst_dW, float((B @ A - dW0).norm() / dW0.norm()))
        BtB, AAt = B.T @ B, A @ A.T
        worst_imbalance = max(worst_imbalance, float((BtB - AAt).norm() / (BtB.norm() + AAt.norm())))
    return worst_dW, worst_imbalance


def train(model, ids: torch.Tensor, distributed: bool) -> dict:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses, dW, imbalance, summaries, base_kept = [], [], [], [], True
    for step in range(STEPS):
        loss = model(input_ids=ids[step], labels=ids[step]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        before, base = lora_state(model), base_bytes(model)
        summary = balance_(model, check=False)
        summaries.append([summary.balanced, summary.qr_path])
        d, i = pass_defects(before, lora_state(model))
        dW.append(d)
        imbalance.append(i)
        base_kept &= base_bytes(model) == base
        loss = loss.detach()
        if distributed:
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        losses.append(float(loss))
    report = layer_report(model)  # a collective under FSDP2
    return {"losses": losses, "dW": dW, "imbalance": imbalance, "summaries": summaries, "base_kept": base_kept,
            "report": report[["module", "rel_imbalance", "norm_A", "norm_B"]].to_dict("list"),
            "quantized": sorted({type(m).__name__ for m in model.modules() if "4bit" in type(m).__name__})}


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    path = os.path.join(out_dir, "llama")
    if rank == 0:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
        LlamaForCausalLM(config).save_pretrained(path)
    dist.barrier()
    ids = torch.randint(0, VOCAB, (STEPS, world * PER_RANK, SEQ), generator=torch.Generator().manual_seed(5))
    mesh = init_device_mesh("cpu", (world,))
    model = make_model(path, device_map="cpu")
    for block in model.base_model.model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    info = train(model, ids[:, rank * PER_RANK:(rank + 1) * PER_RANK], distributed=True)
    info["sharded"] = sorted({type(p).__name__ for p in model.parameters()})
    save_file(lora_state(model), os.path.join(out_dir, f"rank{rank}.safetensors"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)
    if rank == 0:
        with open(os.path.join(out_dir, "reference.json"), "w") as f:
            json.dump(train(make_model(path, device_map="cpu"), ids, distributed=False), f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
