"""One command to check balancing on a CUDA GPU (76-117 s on an NVIDIA H200, 2026-11-29):

    python benchmarks/gpu_check.py            # add --quick for fewer repetitions, --skip-compare to stop after the timings
    python benchmarks/gpu_check.py --smoke    # every part on the CPU at tiny shapes: checks the script, measures nothing

What it prints, all measured in this process:

  1. a randomly initialised Llama-3.2-1B-like model (hidden 2048, 16 blocks, shapes only,
     no weights downloaded) in bf16 with PEFT LoRA r=16 on q, k, v, o, gate, up, down;
     median milliseconds of one forward+backward (batch 4 x 1024 tokens), one fused AdamW
     step over the LoRA parameters, and one balancing pass as BalanceCallback runs it
     (cached pairs, check=False), for both gauges; the ratios are paired per round;
  2. ops dispatched per balancing pass (each one a kernel launch at most) and syncs per
     pass, counted twice: host reads seen by a TorchDispatchMode counter (.item(), copies to
     the CPU) and warnings from torch.cuda.set_sync_debug_mode("warn"), with where each happens;
  3. the peak CUDA memory a pass adds over what the model and optimizer already hold;
  4. the ops-per-pass table for 8, 16 and 28 blocks of 1B-like LoRA factors on the GPU;
  5. how the pass grows with the rank: fp32 LoRA factors of a Llama-3.2-3B-like model (196
     pairs) at r=16 and r=64, one pass against one fused AdamW step, and the share of the pass
     spent in the r x r maths, in float64 where the pass runs them: on the GPU up to r=32
     for enough pairs (balora.stacked.maths_on_device), else on the host CPU, where their cost grows as
     pairs x r^3 and does not shrink with a faster GPU;
  6. the FSDP2 pass (balora.sharded_step) on the GPU as the one rank of a one-rank NCCL mesh, in
     both layouts: its factors against the one-process pass's, its ops and syncs;
  7. a short bf16 `balora compare --task lm --device cuda` (lora against balora) and its
     per-arm summary side by side.

Without CUDA it says so and exits 0 (tests/test_gpu_check.py runs it that way).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_projection, opcount beside this file

REPO = Path(__file__).resolve().parents[1]


def _timed_rounds(fns: dict, reps: int, device: str) -> dict[str, list[float]]:
    """Milliseconds per call (CUDA events on a GPU), every function once per round in rotating order."""
    cuda = device.startswith("cuda")
    names = list(fns)
    for n in names:  # warm-up
        fns[n]()
    if cuda:
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for n in names[rep % len(names):] + names[: rep % len(names)]:
            if not cuda:
                t0 = time.perf_counter()
                fns[n]()
                times[n].append((time.perf_counter() - t0) * 1e3)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[n]()
            end.record()
            torch.cuda.synchronize()
            times[n].append(start.elapsed_time(end))
    return times


def _paired(times, num, den) -> float:
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def build_model(shape: str, rank: int, device: str):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from bench_projection import MODELS, TARGETS

    m = MODELS[shape]
    cfg = m.llama_config()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    # init_lora_weights=False: B is random, not zero, so every pass really balances every pair.
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS),
                                             init_lora_weights=False))
    return model


def check_training_step(reps: int, batch: int, seq: int, device: str = "cuda", shape: str = "1B") -> None:
    """Part 1-3 of the docstring. device="cpu" with shape="tiny" is a smoke test of this code."""
    from balora.adapters.pair_cache import PairCache
    from balora.balance import balance_and_write
    from balora.policy import BalancePolicy
    from opcount import count_ops

    cuda = device.startswith("cuda")
    model = build_model(shape, 16, device)
    params = [p for p in model.parameters() if p.requires_grad]
    lora_dtype = params[0].dtype
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)

    def forward_backward():
        model(input_ids=ids, labels=ids).loss.backward()

    forward_backward()
    opt.step()  # AdamW state exists before anything is measured
    cache = PairCache()
    policies = {m: BalancePolicy(m, check=False) for m in ("nearest", "svd")}
    pairs = cache.get(model)
    print(f"\n== {shape}-like Llama (random init), bf16 base, LoRA r=16 ({lora_dtype} factors), {len(pairs)} pairs, "
          f"{sum(p.numel() for p in params) / 1e6:.1f}M adapter params; batch {batch} x {seq} tokens ==")
    fns = {"forward+backward": forward_backward, "fused AdamW step": opt.step,
           "balance nearest": lambda: balance_and_write(cache.get(model), policies["nearest"]),
           "balance svd": lambda: balance_and_write(cache.get(model), policies["svd"])}
    times = _timed_rounds(fns, reps, device)
    print(f"   {'what':<20}{'median ms':>11}{'x fused AdamW':>15}{'x fwd+bwd':>11}")
    for n, t in times.items():
        print(f"   {n:<20}{statistics.median(t):>11.2f}{_paired(times, n, 'fused AdamW step'):>15.2f}"
              f"{_paired(times, n, 'forward+backward'):>11.3f}")

    adapter_mib = sum(p.numel() * p.element_size() for p in params) / 2**20
    for method, policy in policies.items():
        counter = count_ops(lambda: balance_and_write(cache.get(model), policy))
        syncs, added = (_syncs_and_memory(lambda: balance_and_write(cache.get(model), policy)) if cuda
                        else ("n/a (CPU)", float("nan")))
        print(f"   {method}: {counter.total} ops per pass ({counter.kernels} not view-only), host reads "
              f"{counter.host_reads} (dispatch counter), syncs {syncs} (set_sync_debug_mode), "
              f"peak memory added {added / 2**20:.1f} MiB (adapter {adapter_mib:.1f} MiB)")


def _syncs_and_memory(one_pass) -> tuple[str, int]:
    """Syncs one pass makes (torch.cuda.set_sync_debug_mode warnings) with where they happen (file:line),
    and the peak memory it adds (bytes). The syncs are those of the second of two passes under the
    counter: the first one in a process also counted a one-time sync inside torch (`__init__.py`,
    seen on torch 2.11)."""
    sites: list[str] = []
    for _ in range(2):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                one_pass()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        sites = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    one_pass()
    torch.cuda.synchronize()
    return f"{len(sites)} ({', '.join(sites)})", torch.cuda.max_memory_allocated() - before


def check_op_table(device: str = "cuda", shape: str = "1B") -> None:
    from bench_projection import MODELS, op_count_table

    op_count_table(MODELS[shape], 16, device)


def check_rank_cost(reps: int, device: str = "cuda", shape: str = "3B", ranks: tuple[int, ...] = (16, 64)) -> None:
    """Part 5 of the docstring: a pass at each rank next to a fused AdamW step, and its host r x r maths."""
    from bench_projection import MODELS, make_adapter

    from balora.balance import balance_and_write
    from balora.policy import BalancePolicy
    from balora.projection import gram_transforms
    from balora.stacked import maths_on_device

    m = MODELS[shape]
    policy = BalancePolicy("nearest", check=False)
    print(f"\n== the pass by rank: {m.name} LoRA factors (fp32, random, B small), nearest gauge ==")
    print(f"   {'r':>4}{'pairs':>7}{'pass ms':>10}{'x fused AdamW':>15}{'r x r ms':>10}{'run on':>8}{'share of pass':>15}")
    for r in ranks:
        ad = make_adapter(m, r, torch.float32, device)
        opt = torch.optim.AdamW(ad.params, lr=1e-4, fused=True)
        times = _timed_rounds({"adamw": opt.step, "pass": lambda: balance_and_write(ad.pairs, policy)}, reps, device)
        # The pass's r x r maths alone, where the pass runs them (balora.stacked.maths_on_device), on the
        # Grams it would see after the last step; the flags' read included (a sync on a GPU).
        on = device if maths_on_device(torch.device(device), r, len(ad.pairs)) else "cpu"
        with torch.no_grad():
            G_A = torch.stack([p.A @ p.A.mT for p in ad.pairs]).double().to(on)
            G_B = torch.stack([p.B.mT @ p.B for p in ad.pairs]).double().to(on)
        maths = _timed_rounds({"maths": lambda: gram_transforms(G_A, G_B, "nearest").accurate.tolist()},
                              max(3, reps // 3), on)["maths"]
        pass_ms, maths_ms = statistics.median(times["pass"]), statistics.median(maths)
        print(f"   {r:>4}{len(ad.pairs):>7}{pass_ms:>10.1f}{_paired(times, 'pass', 'adamw'):>15.2f}{maths_ms:>10.1f}"
              f"{'host' if on == 'cpu' else 'GPU':>8}{maths_ms / pass_ms:>15.0%}")
        del ad, opt
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def check_sharded(device: str = "cuda", shape: str = "1B", r: int = 16) -> None:
    """Part 6 of the docstring: the FSDP2 pass (balora.sharded_step.balance_step) on this device as
    one rank of a one-rank mesh, in both layouts, against the one-process pass on the same factors;
    its ops and syncs. Errors are printed, not raised, so the parts after it still run."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from balora.balance import balance_and_write
    from balora.policy import BalancePolicy
    from balora.sharded_step import balance_step
    from bench_fsdp2 import sharded_adapter
    from bench_projection import MODELS, make_adapter
    from opcount import count_ops

    m, policy = MODELS[shape], BalancePolicy(check=False)
    print(f"\n== the FSDP2 pass on {device}, one rank: {m.name} LoRA factors (fp32, r={r}), nearest gauge ==")
    if dist.is_initialized():
        print("   skipped: a process group is already initialised in this process")
        return
    try:  # the group's setup too: a one-rank NCCL group that fails to start is printed, the compare part still runs
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
        mesh = init_device_mesh(device.split(":")[0], (1,))
        one_process = make_adapter(m, r, torch.float32, device)  # the same factors as sharded_adapter's
        balance_and_write(one_process.pairs, policy)
        for a_dim, layout in ((1, "A by columns"), (0, "A by rows (FSDP2's default)")):
            params, pairs = sharded_adapter(m, r, mesh, a_dim)
            balance_step(pairs, policy)
            diff = max(float((p.detach().full_tensor() - q.detach()).abs().max() / q.detach().abs().max())
                       for p, q in zip(params, one_process.params))
            counter = count_ops(lambda: balance_step(pairs, policy))
            syncs = (_syncs_and_memory(lambda: balance_step(pairs, policy))[0] if device.startswith("cuda")
                     else "n/a (CPU)")
            print(f"   {layout}: max |difference| / max |one-process factor| = {diff:.1e}; {counter.total} ops per pass, "
                  f"syncs {syncs}")
    except Exception as e:  # noqa: BLE001 (a report, not a test: say what failed and go on)
        print(f"   FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def check_compare(timeout_s: int, device: str = "cuda", steps: int = 60) -> None:
    """A short lm comparison through the CLI (bf16 on a GPU), then its per-arm summary."""
    import balora

    out = Path(tempfile.mkdtemp(prefix="balora-gpu-check-")) / f"lm-{device}"
    dtype = ["--dtype", "bfloat16"] if device.startswith("cuda") else []  # the lm task has bf16 on CUDA only
    cmd = [sys.executable, "-m", "balora.cli", "compare", "--task", "lm", "--device", device, *dtype,
           "--arms", "lora,balora", "--steps", str(steps), "--seeds", "1", "--lr", "1e-3", "--out", str(out), "--quiet"]
    print(f"\n== {' '.join(cmd[2:])} ==")
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"   did not finish in {timeout_s} s")
        return
    print(f"   exit code {done.returncode} after {time.perf_counter() - t0:.0f} s")
    if done.returncode != 0:
        print("   " + (done.stderr or done.stdout).strip()[-2000:].replace("\n", "\n   "))
        return
    summary = balora.load_run(out).summary
    cols = [c for c in ("arm", "lr", "alpha", "status", "final_loss", "final_eval_loss", "total_seconds",
                        "balance_seconds") if c in summary.columns]
    print("   " + summary[cols].to_string(index=False).replace("\n", "\n   "))
    print(f"   run directory: {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--skip-compare", action="store_true", help="stop after the timings and op counts")
    ap.add_argument("--smoke", action="store_true",
                    help="run every part on the CPU at tiny shapes: checks this script, measures nothing")
    args = ap.parse_args(argv)
    if args.smoke:
        check_training_step(reps=2, batch=1, seq=16, device="cpu", shape="tiny")
        check_op_table("cpu", "tiny")
        check_rank_cost(reps=2, device="cpu", shape="tiny", ranks=(4, 16))
        check_sharded("cpu", "tiny", 4)
        if not args.skip_compare:
            check_compare(timeout_s=600, device="cpu", steps=3)
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False), so there is nothing to check. "
              f"torch {torch.__version__}; run this on a machine with an NVIDIA GPU.")
        return 0
    t0 = time.perf_counter()
    print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    check_training_step(reps=5 if args.quick else 15, batch=4, seq=1024)
    torch.cuda.empty_cache()  # the model is gone: give its memory back before the next part
    check_op_table()
    check_rank_cost(reps=5 if args.quick else 15)
    check_sharded()
    if not args.skip_compare:
        check_compare(timeout_s=180)
    print(f"\ngpu_check done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
