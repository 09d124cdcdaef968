"""FSDP2: under torchrun with 2 gloo processes on CPU, a tiny Llama-shaped PEFT model sharded with
fully_shard (per block + root) trains with balancing after every AdamW step (balance_after_step,
BalanceCallback's hook called directly, and balance_) and matches the same steps run in one process without
sharding; every rank ends with the same gathered factors and the same layer_report. One more run
uses FSDP2's MixedPrecisionPolicy (bf16 compute) and follows the fp32 run to bf16's rounding. Balancing runs
with the CPU's fp32 matmuls set to bf16, as in reduced-precision training: the byte counts show it
still takes the Gram path (full precision inside), and the script checks the setting is put back.

The Trainer's own FSDP2 (accelerate's fully_shard) with BalanceCallback runs too, against the
Trainer's DDP: accelerate enables its FSDP plugin only for accelerator devices, so its script lets
it take that path on the CPU (tests/fsdp2_trainer_script.py says how).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from balora.imbalance import rel_imbalance

SCRIPT = Path(__file__).with_name("fsdp2_train_script.py")
RUNS = ("hook", "callback", "balance_", "stacked")  # stacked: the hook, 2 threads per rank
MIXED = "mixed"  # the hook under MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)
RTOL = 1e-5  # the sharded and single-process runs differ only by the order of fp32 reductions

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with the gloo backend is not available in this torch build"),
    pytest.mark.slow,  # one torchrun of 2 processes, ~15 s alone, more on a busy 2-core runner
]



@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory, torchrun) -> Path:
    out = tmp_path_factory.mktemp("fsdp2")
    torchrun(SCRIPT, out)
    return out


def _load(run_dir: Path, tag: str):
    return load_file(run_dir / f"{tag}.safetensors"), json.loads((run_dir / f"{tag}.json").read_text())


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("run", RUNS)
def test_sharded_run_matches_single_process(fsdp2_run, run):
    ref, ref_info = _load(fsdp2_run, "reference")
    factors, info = _load(fsdp2_run, f"{run}_rank0")
    assert info["world_size"] == 2
    for loss, ref_loss in zip(info["losses"], ref_info["losses"], strict=True):
        assert abs(loss - ref_loss) <= RTOL * abs(ref_loss), (info["losses"], ref_info["losses"])
    assert factors.keys() == ref.keys() and len(ref) == 2 * 9  # 2 blocks x 4 targets + embed_tokens, (A, B)
    for name in ref:
        assert _rel(factors[name], ref[name]) <= RTOL, f"{name}: {_rel(factors[name], ref[name]):.2e}"


def test_mixed_precision_run_follows_the_single_process_run(fsdp2_run):
    """FSDP2's usual mixed precision: bf16 forward and backward, fp32 shards updated by AdamW and
    then balanced. Its trajectory is the fp32 one to bf16's rounding. The factors are the test that
    balancing took effect: dW does not depend on the gauge, the factors do. The same run without
    balancing ends 2.7 (relative) from the balanced reference's factors; this one ended 0.021 away
    when the test was written (the bf16 forward alone moves them that much)."""
    ref, ref_info = _load(fsdp2_run, "reference")
    factors, info = _load(fsdp2_run, f"{MIXED}_rank0")
    for loss, ref_loss in zip(info["losses"], ref_info["losses"], strict=True):
        assert abs(loss - ref_loss) <= 1e-3 * abs(ref_loss), (info["losses"], ref_info["losses"])
    worst = max(_rel(factors[name], ref[name]) for name in ref)
    assert worst <= 0.05, f"factors {worst:.3f} from the balanced single-process run"


@pytest.mark.parametrize("run", RUNS + (MIXED,))
def test_every_rank_holds_the_same_balanced_pairs(fsdp2_run, run):
    f0, info0 = _load(fsdp2_run, f"{run}_rank0")
    f1, info1 = _load(fsdp2_run, f"{run}_rank1")
    for name in f0:
        assert torch.equal(f0[name], f1[name]), f"{name} differs between the ranks"
    assert info0["report"] == info1["report"], "layer_report must be identical on all ranks"
    for name, A in f0.items():
        if ".lora_A." in name or ".lora_embedding_A." in name:
            B = f0[name.replace("_A.", "_B.")]
            imb = float(rel_imbalance(A.double()[None], B.double()[None])[0])
            assert imb < 1e-5, f"{name}: rel_imbalance {imb:.2e} after the last balancing step"


def test_layer_report_matches_the_single_process_model(fsdp2_run):
    _, ref_info = _load(fsdp2_run, "reference")
    _, info = _load(fsdp2_run, "hook_rank0")
    assert info["report"]["module"] == ref_info["report"]["module"]
    for column in ("norm_A", "norm_B"):  # block 1's lora_A is gathered by columns for the report
        for got, want in zip(info["report"][column], ref_info["report"][column], strict=True):
            assert math.isclose(got, want, rel_tol=RTOL), column
    for got, want in zip(info["report"]["sigma"], ref_info["report"]["sigma"]):
        assert all(math.isclose(g, w, rel_tol=1e-4) for g, w in zip(got, want))


def test_layer_report_after_a_forward_that_kept_the_parameters_unsharded(fsdp2_run):
    """reshard_after_forward=False under bf16 mixed precision: after a forward the modules hold FSDP2's
    temporary bf16 copies. The report must describe the fp32 factors the optimizer steps (float64
    from the factors gathered before the forward), not those copies."""
    for rank in (0, 1):
        factors = load_file(fsdp2_run / f"after_forward_rank{rank}.safetensors")
        report = json.loads((fsdp2_run / f"after_forward_rank{rank}.json").read_text())
        assert set(report["dtype"]) == {"float32"}, report["dtype"]
        names = {n.split("base_model.model.")[1].rsplit(".lora_", 1)[0]: n for n in factors if "_A." in n}
        for i, module in enumerate(report["module"]):
            A = factors[names[module]].double()
            B = factors[names[module].replace("_A.", "_B.")].double()
            assert math.isclose(report["norm_A"][i], float(A.norm()), rel_tol=1e-6), module
            assert math.isclose(report["norm_B"][i], float(B.norm()), rel_tol=1e-6), module
            want = float(rel_imbalance(A[None], B[None])[0])
            assert abs(report["rel_imbalance"][i] - want) <= 1e-6, (module, report["rel_imbalance"][i], want)


def _gathered_bytes(t: torch.Tensor, world: int, by_columns: bool) -> int:
    """What one rank receives when t is gathered: its rows (columns, when sharded by columns)
    padded to ceil(n / world) in one all_gather."""
    rows, cols = t.shape[0], math.prod(t.shape[1:])
    if by_columns:
        rows, cols = cols, rows
    return (world - 1) * math.ceil(rows / world) * cols * t.element_size()


def _by_columns(ref: dict, shards: int) -> set[str]:
    """The lora_A that lora_shard_placement shards by columns: block 1's, where their in_features
    divide evenly (down_proj's 65 do not: FSDP2 splits dims other than 0 only evenly)."""
    by_columns = {n for n, t in ref.items() if ".layers.1." in n and ".lora_A." in n and t.shape[1] % shards == 0}
    assert by_columns and not any(".down_proj." in n for n in by_columns)
    return by_columns


def _step_comm(ref: dict, shards: int, r: int = 3) -> dict:
    """What one balancing step communicates, from the shapes: the lora_A sharded by rows gathered
    in one all_gather (padded to ceil(r / shards) rows), the r x r float64 Grams of every B and of
    every lora_A by columns in one all_reduce."""
    by_columns = _by_columns(ref, shards)
    A_by_rows = {n for n in ref if (".lora_A." in n or ".lora_embedding_A." in n) and n not in by_columns}
    partial_grams = len(ref) - len(A_by_rows)  # every B, and every A by columns
    return {"collectives": 2, "bytes_received": sum(_gathered_bytes(ref[n], shards, False) for n in A_by_rows),
            "bytes_reduced": partial_grams * r * r * 8}


@pytest.mark.parametrize("run", RUNS + (MIXED,))
def test_bytes_communicated_per_pass(fsdp2_run, run):
    """Counted from the shapes. Every pair takes the Gram path on its shards: the B factors (by
    rows) and block 1's lora_A by columns send their r x r Grams, all in one float64 all_reduce;
    the lora_A sharded by rows (block 0, the embedding's) are gathered whole by one all_gather, each
    padded to ceil(r / ranks) rows. No B is ever gathered. The report gathers every factor whole:
    the row-sharded ones in one all_gather, block 1's lora_A (by columns) in another."""
    ref, _ = _load(fsdp2_run, "reference")
    world = 2
    by_columns = _by_columns(ref, world)
    step = _step_comm(ref, world)
    report_gathered = sum(_gathered_bytes(t, world, n in by_columns) for n, t in ref.items())
    for rank in (0, 1):
        _, info = _load(fsdp2_run, f"{run}_rank{rank}")
        walks, setup = info["step_comm"].pop("walks"), info["step_comm"].pop("setup_walks")
        assert walks == 1, f"{run}: the sharded model was walked {walks} times in {len(info['losses'])} steps"
        assert setup == (0 if run in ("callback", "balance_") else 1), f"{run}: {setup} walks to register the hook"
        assert info["step_comm"] == step
        assert info["report_comm"] == {"collectives": 2, "bytes_received": report_gathered}


def test_fully_shard_without_a_mesh_communicates_like_with_one(fsdp2_run):
    """fully_shard(block) and lora_shard_placement(model) without mesh= (the default group): every
    fully_shard call makes its own DeviceMesh object, all equal. The pass must still take the Gram
    path, communicating what it does with one mesh passed to every call."""
    ref, _ = _load(fsdp2_run, "reference")
    for rank in (0, 1):
        comm = json.loads((fsdp2_run / f"no_mesh_rank{rank}.json").read_text())
        assert comm == _step_comm(ref, shards=2), f"rank {rank}: {comm}"


def test_bf16_factors_are_balanced_on_their_shards_like_the_unsharded_model(fsdp2_run):
    """bf16 LoRA factors, both layouts, uneven shards (r=3 rows, 65 rows of up_proj's B): one pass
    writes bf16 shards that agree with the unsharded model's pass (to bf16's rounding)."""
    for rank in (0, 1):
        info = json.loads((fsdp2_run / f"bf16_rank{rank}.json").read_text())
        assert info["balanced"] == 9 and info["qr_path"] == 0 and info["dtypes"] == ["torch.bfloat16"], info
        assert info["worst"] <= 2**-7, info  # bf16 keeps 8 significant bits


def test_ops_per_pass_do_not_grow_with_the_number_of_blocks(fsdp2_run):
    """The sharded pass stacks pairs of one shape and layout (balora.sharded_step): a model of 6
    blocks dispatches exactly the ops of one of 2 blocks, on every rank."""
    for rank in (0, 1):
        ops = json.loads((fsdp2_run / f"ops_rank{rank}.json").read_text())
        assert ops["6"] == ops["2"], f"rank {rank}: ops per pass grew with the blocks: {ops}"


# HSDP: fully_shard on a 2-D mesh (2 replicas x 2 shards, 4 gloo processes). Each replica group
# balances its shards like FSDP2 on 2 ranks; the replicas must end with identical factors.
HSDP_RUNS = ("hook", "stacked")


@pytest.fixture(scope="module")
def hsdp_run(tmp_path_factory, torchrun) -> Path:
    out = tmp_path_factory.mktemp("hsdp")
    torchrun(SCRIPT, out, nproc=4, timeout=360, args=("--hsdp",))
    return out


@pytest.mark.parametrize("run", HSDP_RUNS)
def test_hsdp_run_matches_single_process_on_every_rank(hsdp_run, run):
    ref, ref_info = _load(hsdp_run, "reference")
    first, first_info = _load(hsdp_run, f"{run}_rank0")
    for rank in range(4):
        factors, info = _load(hsdp_run, f"{run}_rank{rank}")
        assert info["world_size"] == 4
        assert info["report"] == first_info["report"], "layer_report must be identical on all ranks"
        for loss, ref_loss in zip(info["losses"], ref_info["losses"], strict=True):
            assert abs(loss - ref_loss) <= RTOL * abs(ref_loss), (info["losses"], ref_info["losses"])
        for name in ref:
            assert _rel(factors[name], ref[name]) <= RTOL, f"rank {rank}, {name}: {_rel(factors[name], ref[name]):.2e}"
            assert torch.equal(factors[name], first[name]), f"{name} differs between rank 0 and rank {rank}"


@pytest.mark.parametrize("run", HSDP_RUNS)
def test_hsdp_communicates_within_the_shard_group(hsdp_run, run):
    """The same two collectives as FSDP2 on 2 ranks, over each replica's 2-rank shard group: the A
    factors by rows gathered, the partial Grams all-reduced."""
    ref, _ = _load(hsdp_run, "reference")
    step = _step_comm(ref, shards=2)
    for rank in range(4):
        _, info = _load(hsdp_run, f"{run}_rank{rank}")
        info["step_comm"].pop("walks"), info["step_comm"].pop("setup_walks")
        assert info["step_comm"] == step, f"rank {rank}"


# The Trainer's own FSDP2 (accelerate's fully_shard) with BalanceCallback, against the Trainer's
# DDP on the same 2 gloo ranks (tests/fsdp2_trainer_script.py says how accelerate is let shard on
# a CPU).
TRAINER_SCRIPT = Path(__file__).with_name("fsdp2_trainer_script.py")


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory, torchrun) -> Path:
    out = tmp_path_factory.mktemp("fsdp2_trainer")
    torchrun(TRAINER_SCRIPT, out)
    torchrun(TRAINER_SCRIPT, out, args=("--ddp",))
    return out


@pytest.mark.parametrize("engine", ["fsdp2", "ddp"])
def test_balance_callback_in_the_trainer_balances_on_every_rank(trainer_runs, engine):
    f0, info0 = _load(trainer_runs, f"{engine}_rank0")
    f1, info1 = _load(trainer_runs, f"{engine}_rank1")
    sharded = engine == "fsdp2"
    assert info0["distributed_type"] == ("DistributedType.FSDP" if sharded else "DistributedType.MULTI_CPU")
    assert info0["param_types"] == (["DTensor"] if sharded else ["Parameter"]), "the engine was not the one asked for"
    for info in (info0, info1):
        assert info["balanced"] == 9 and info["qr_path"] == 0, info
        assert info["logged_rel_imbalance_max"] < 1e-5, info
    assert info0["losses"] == info1["losses"] and len(info0["losses"]) == 4
    for name, A in f0.items():
        assert torch.equal(A, f1[name]), f"{name} differs between the ranks"
        if ".lora_A." in name or ".lora_embedding_A." in name:
            B = f0[name.replace("_A.", "_B.")]
            assert float(rel_imbalance(A.double()[None], B.double()[None])[0]) < 1e-5, name


def test_the_trainers_fsdp2_run_matches_its_ddp_run(trainer_runs):
    """Same data, seed and steps; FSDP2 shards the factors, the AdamW state and the balancing, DDP
    replicates them. (They agreed bit for bit when this was written: with 2 ranks every
    reduction adds the same two numbers, and the Grams are float64.)"""
    fsdp2, fsdp2_info = _load(trainer_runs, "fsdp2_rank0")
    ddp, ddp_info = _load(trainer_runs, "ddp_rank0")
    for loss, ref in zip(fsdp2_info["losses"], ddp_info["losses"], strict=True):
        assert abs(loss - ref) <= RTOL * abs(ref)
    assert fsdp2.keys() == ddp.keys() and len(ddp) == 2 * 9
    for name in ddp:
        assert _rel(fsdp2[name], ddp[name]) <= RTOL, name


@pytest.mark.parametrize("engine", ["fsdp2", "ddp"])
def test_a_run_recorder_in_the_distributed_trainer_writes_one_run(trainer_runs, engine):
    """Every rank runs the callbacks: each RunRecorder wrote, so the second refused the folder and
    training stopped on every rank. Rank 0 writes; under FSDP2 the other rank still joins the
    gathers of the diagnostics (else rank 0 would wait for it)."""
    from balora.store import load_run

    run = load_run(trainer_runs / f"{engine}_run")
    _, info = _load(trainer_runs, f"{engine}_rank0")
    assert run.status == "completed" and run.config["source"] == "RunRecorder"
    losses = run.steps.dropna(subset=["loss"]).sort_values("step")
    assert losses["step"].tolist() == [1, 2, 3, 4]
    assert losses["loss"].tolist() == pytest.approx(info["losses"], rel=1e-6)  # the Trainer's logged losses
    assert sorted(run.layers["step"].unique()) == [0, 2, 4]
    final = run.layers[run.layers["step"] == 4]
    assert len(final) == 9 and final["rel_imbalance"].max() < 1e-5  # balanced by the callback, as the ranks hold
