"""Train a tiny Llama-shaped PEFT model under FSDP2 (fully_shard per block + root, gloo, CPU) with
balancing after every AdamW step, and the same steps in one process without sharding (rank 0).
Run by tests/test_fsdp2.py:

    torchrun --nproc_per_node 2 --standalone tests/fsdp2_train_script.py OUT_DIR
    torchrun --nproc_per_node 4 --standalone tests/fsdp2_train_script.py OUT_DIR --hsdp   # 2 replicas x 2 shards

Five sharded runs from the same init: "hook" balances with balance_after_step, "callback" calls
BalanceCallback.on_optimizer_step by hand after each step (how the Trainer calls it), "balance_"
calls balora.balance_(model, check=False) after an eval forward (its kept walk: every step after the
first re-gathers the cached pairs), all with one thread per rank (the pass goes pair by pair), "stacked" is
"hook" with two threads per rank (the pass stacks pairs of one shape, as on a GPU), and "mixed"
is "hook" under FSDP2's MixedPrecisionPolicy (bf16 compute, fp32 shards and reduction). Every rank
writes OUT_DIR/{run}_rank{R}.safetensors (its gathered LoRA factors) and OUT_DIR/{run}_rank{R}.json
(losses, layer_report, what the last balancing pass and the report communicated). Rank 0 also writes reference.* from the
single-process run over the whole batch (FSDP2 averages the ranks' gradients, so the single
process sees the mean of the ranks' mean losses: the same objective). Balancing always runs with
the CPU's fp32 matmuls set to bf16, as a user training in reduced precision has them: it must
use full precision anyway (else its Gram path refuses every pair and every pair is gathered
whole, which the byte counts would show) and put the setting back.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM, TrainerControl, TrainerState

from gathered import lora_state  # beside this script

from balora import BalanceCallback, balance_, balance_after_step, layer_report, lora_shard_placement
import balora.adapters.live as live
from balora.distributed import last_comm

WALKS = []  # one entry per walk of a model for its pairs: the hooks and balance_ keep theirs


def _counted_walk(model, adapter=None, parents=None):
    WALKS.append(adapter)
    return _walk(model, adapter, parents)


_walk, live._walk_pairs = live._walk_pairs, _counted_walk

VOCAB, SEQ, PER_RANK, STEPS, LR = 64, 12, 2, 4, 5e-3
# r=3 shards unevenly over 2 ranks (2 rows + 1 row of A): the padding path is exercised. So does
# intermediate_size=65: up_proj's B by rows (33 + 32), and down_proj's A (r, 65), which
# lora_shard_placement leaves by rows (FSDP2 splits other dims only evenly).
LORA = dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "up_proj", "down_proj", "embed_tokens"])


def make_model(layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=65, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(**LORA))
    with torch.no_grad():  # PEFT starts B (A for embeddings) at 0; random values make every pair count from step 1
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                p.normal_(0, 0.05)
    return model


def shard(model: torch.nn.Module, mesh, mixed: bool = False) -> None:
    """fully_shard every decoder block and the root. Odd blocks shard their lora_A by columns
    (lora_shard_placement), so their pairs are balanced from all-reduced r x r Grams alone; even
    blocks and the embedding keep FSDP2's default rows, so their lora_A are gathered whole.
    mixed: FSDP2's usual mixed precision (bf16 forward and backward, fp32 gradient reduction); the
    sharded parameters, which the optimizer and balancing update, stay fp32."""
    mp = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} if mixed else {}
    by_columns = lora_shard_placement(model, mesh)  # an A whose columns do not split evenly keeps its rows
    for i, block in enumerate(model.base_model.model.model.layers):
        fully_shard(block, mesh=mesh, shard_placement_fn=by_columns if i % 2 else None, **mp)
    fully_shard(model, mesh=mesh, **mp)


class CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched while active (collectives included)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def bf16_pass(mesh) -> dict:
    """One balance_(model, check=False) of the model in bf16, sharded (both layouts, uneven shards),
    against the same call on the unsharded bf16 model: the largest difference of any factor,
    relative to its largest entry."""
    plain = make_model().to(torch.bfloat16)
    balance_(plain, check=False)
    want = {n: p.detach().float() for n, p in plain.named_parameters() if "lora_" in n}
    model = make_model().to(torch.bfloat16)
    shard(model, mesh)
    summary = balance_(model, check=False)
    got = {n: t.float() for n, t in lora_state(model).items()}
    dtypes = {str(p.dtype) for n, p in model.named_parameters() if "lora_" in n}
    worst = max(float((got[n] - want[n]).abs().max() / want[n].abs().max()) for n in want)
    return {"balanced": summary.balanced, "qr_path": summary.qr_path, "dtypes": sorted(dtypes), "worst": worst}


def report_after_forward(out_dir: str, rank: int, mesh) -> None:
    """layer_report after a forward that left FSDP2's parameters unsharded (reshard_after_forward=False,
    bf16 MixedPrecisionPolicy: the registered parameters are then FSDP2's temporary bf16 copies).
    Writes the fp32 factors as the optimizer holds them (gathered before the forward) and the report."""
    model = make_model()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.base_model.model.model.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
    balance_(model, check=False)
    save_file(lora_state(model), os.path.join(out_dir, f"after_forward_rank{rank}.safetensors"))
    with torch.no_grad():
        model(input_ids=batch(1)[0])
    report = layer_report(model)
    with open(os.path.join(out_dir, f"after_forward_rank{rank}.json"), "w") as f:
        json.dump(report[["module", "dtype", "norm_A", "norm_B", "rel_imbalance"]].to_dict("list"), f)


def comm_without_mesh() -> dict:
    """What one balance_(model, check=False) pass communicates when fully_shard and lora_shard_placement
    are given no mesh (each fully_shard call then makes its own DeviceMesh over the default group)."""
    model = make_model()
    shard(model, None)
    balance_(model, check=False)  # the first pass walks the model
    balance_(model, check=False)
    comm = last_comm()
    return {"collectives": comm.collectives, "bytes_received": comm.bytes_received, "bytes_reduced": comm.bytes_reduced}


def ops_per_pass(mesh, layers: int) -> int:
    """Ops one balance_(model, check=False) dispatches on a sharded model of `layers` blocks (both
    layouts), after a first pass that walked the model, with two threads per rank (stacked, as on a
    GPU); they must not grow with the blocks."""
    model = make_model(layers)
    shard(model, mesh)
    torch.set_num_threads(2)
    try:
        balance_(model, check=False)
        with CountOps() as ops:
            summary = balance_(model, check=False)
    finally:
        torch.set_num_threads(1)
    assert summary.balanced == 4 * layers + 1 and summary.qr_path == 0, summary
    return ops.count


def batch(world: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (STEPS, world * PER_RANK, SEQ), generator=g)  # (steps, global batch, seq)


@contextlib.contextmanager
def reduced_precision():
    """The CPU's oneDNN fp32 matmuls in bf16 (TF32 changes nothing on a CPU), checked to be set
    again after balancing; the forward and backward passes run outside it, at full precision."""
    if not hasattr(torch.backends, "fp32_precision"):  # torch < 2.9
        yield
        return
    before = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        yield
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16", "balancing did not put the setting back"
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before


def train(model, ids: torch.Tensor, balance: str, distributed: bool) -> tuple[list[float], dict]:
    """STEPS AdamW steps on ids (steps, batch, seq), balancing after each; the mean loss per step
    and what the last balancing pass communicated."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    callback, hook, walks_at_start = BalanceCallback(log_diagnostics=False), None, len(WALKS)
    if balance == "hook":
        hook = balance_after_step(opt, model)
    # registering the hook walks once (no communication) to refuse FSDP1 / DeepSpeed before any step
    walks_before = len(WALKS)
    args, state, control = SimpleNamespace(), TrainerState(), TrainerControl()  # on_optimizer_step reads no args
    losses = []
    for step in range(STEPS):
        loss = model(input_ids=ids[step], labels=ids[step]).loss
        loss.backward()
        with reduced_precision():  # the hook balances inside step()
            opt.step()
        opt.zero_grad()
        if balance == "callback":
            state.global_step = step
            with reduced_precision():
                callback.on_optimizer_step(args, state, control, model=model)
            assert callback.last_summary.balanced == 9, callback.last_summary  # 2 blocks x 4 targets + embed_tokens
        elif balance == "balance_":
            # An eval forward first, as a loop that evaluates before balancing has: the root keeps its
            # parameters unsharded after it (reshard_after_forward's default), and balance_ must still
            # balance the shards that AdamW steps, not FSDP2's temporary whole copies.
            with torch.no_grad():
                model(input_ids=ids[step][:1])
            with reduced_precision():
                summary = balance_(model, check=False)
            assert summary.balanced == 9, summary
        loss = loss.detach()
        if distributed:
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        losses.append(float(loss))
    step_comm = last_comm()
    if hook is not None:
        hook.remove()
    return losses, {"collectives": step_comm.collectives, "bytes_received": step_comm.bytes_received,
                    "bytes_reduced": step_comm.bytes_reduced, "walks": len(WALKS) - walks_before,
                    "setup_walks": walks_before - walks_at_start}


def save(out_dir: str, tag: str, model, trained: tuple[list[float], dict]) -> None:
    report = layer_report(model)  # also a collective under FSDP2
    save_file(lora_state(model), os.path.join(out_dir, f"{tag}.safetensors"))
    comm = last_comm()
    info = {"losses": trained[0], "report": report[["module", "rel_imbalance", "sigma", "norm_A", "norm_B"]].to_dict("list"),
            "step_comm": trained[1],
            "report_comm": {"collectives": comm.collectives, "bytes_received": comm.bytes_received},
            "world_size": dist.get_world_size() if dist.is_initialized() else 1}
    with open(os.path.join(out_dir, f"{tag}.json"), "w") as f:
        json.dump(info, f)


def main(out_dir: str, hsdp: bool = False) -> None:
    """hsdp: a 2-D mesh (2 replicas x world / 2 shards, fully_shard's HSDP), two runs only."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = (init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")) if hsdp
            else init_device_mesh("cpu", (world,)))
    if not hsdp:  # first: later in this process fully_shard's default meshes came out as one object
        with open(os.path.join(out_dir, f"no_mesh_rank{rank}.json"), "w") as f:
            json.dump(comm_without_mesh(), f)
    ids = batch(world)
    local = ids[:, rank * PER_RANK : (rank + 1) * PER_RANK]  # this rank's part of every global batch
    for run in ("hook", "stacked") if hsdp else ("hook", "callback", "balance_", "stacked", "mixed"):
        model = make_model()
        shard(model, mesh, mixed=run == "mixed")
        # "stacked": the hook with two threads per rank, where the pass stacks the pairs of one shape
        # as on a GPU (with one thread it goes pair by pair: balora.stacked.use_stacks)
        torch.set_num_threads(2 if run == "stacked" else 1)
        trained = train(model, local, run if run in ("callback", "balance_") else "hook", distributed=True)
        torch.set_num_threads(1)
        save(out_dir, f"{run}_rank{rank}", model, trained)
    if not hsdp:
        with open(os.path.join(out_dir, f"bf16_rank{rank}.json"), "w") as f:
            json.dump(bf16_pass(mesh), f)
        report_after_forward(out_dir, rank, mesh)
        ops = {layers: ops_per_pass(mesh, layers) for layers in (2, 6)}
        with open(os.path.join(out_dir, f"ops_rank{rank}.json"), "w") as f:
            json.dump(ops, f)
    if rank == 0:
        model = make_model()
        save(out_dir, "reference", model, train(model, ids, "hook", distributed=False))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], hsdp="--hsdp" in sys.argv[2:])
