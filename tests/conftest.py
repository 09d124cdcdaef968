"""Shared fixtures: random factor pairs, tiny models built from code or configs (never downloaded),
PEFT reference quantities (its own get_delta_weight) and bit-exact snapshots.

Every model here is small enough that building it takes milliseconds; fixtures return
factories so each test can choose sizes and seeds and gets fresh, unshared weights.
"""

from __future__ import annotations


from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch import nn

# The models here are a few thousand parameters: intra-op threads only add synchronisation, and
# on a shared 2-core CI runner under load they made balance_ on TinyNet ~10x slower (0.3 s vs 0.03 s).
torch.set_num_threads(1)


def _randn(shape, gen, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=dtype)


@pytest.fixture
def make_factors():
    """make_factors(batch, r, n_in, n_out, dtype=fp32, seed=0, b_scale=0.1) -> A (*batch, r, n_in),
    B (*batch, n_out, r), drawn in float64 then cast. B is scaled down so that pairs start
    clearly imbalanced, as after PEFT init and a few steps."""

    def make(batch=(3,), r=4, n_in=12, n_out=10, *, dtype=torch.float32, seed=0, b_scale=0.1):
        batch = (batch,) if isinstance(batch, int) else tuple(batch)
        g = torch.Generator().manual_seed(seed)
        A = _randn((*batch, r, n_in), g)
        B = _randn((*batch, n_out, r), g) * b_scale
        return A.to(dtype), B.to(dtype)

    return make


@pytest.fixture
def make_conditioned():
    """make_conditioned(n, r, cond, dtype, seed) -> X (n, r) with singular values spaced
    geometrically from 1 down to 1/cond, built in float64 from random orthogonal factors."""

    def make(n, r, cond, dtype=torch.float32, seed=0):
        g = torch.Generator().manual_seed(seed)
        U, _ = torch.linalg.qr(_randn((n, r), g))
        V, _ = torch.linalg.qr(_randn((r, r), g))
        s = torch.logspace(0, -float(np.log10(cond)), r, dtype=torch.float64)
        return ((U * s) @ V.T).to(dtype)

    return make


class TinyNet(nn.Module):
    """One layer of every kind PEFT LoRA supports besides transformers' Conv1D:
    Embedding, Linear, Conv1d (k=3), Conv2d (3x3) and Conv2d (1x1)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.lin = nn.Linear(12, 10)
        self.conv1d = nn.Conv1d(3, 8, kernel_size=3, padding=1)
        self.conv2d = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.conv1x1 = nn.Conv2d(8, 6, kernel_size=1)

    def forward(self, ids, x1, x2):
        h = self.lin(self.emb(ids))  # (N, L, 10)
        c1 = self.conv1d(x1)  # (N, 8, L)
        c2 = self.conv1x1(torch.relu(self.conv2d(x2)))  # (N, 6, H, W)
        return torch.cat([h.flatten(1), c1.flatten(1), c2.flatten(1)], dim=1)  # (N, features)


TINY_NET_TARGETS = ["emb", "lin", "conv1d", "conv2d", "conv1x1"]


@pytest.fixture
def tiny_net_targets():
    """PEFT target_modules naming every layer of TinyNet."""
    return list(TINY_NET_TARGETS)


@pytest.fixture
def make_tiny_net():
    """make_tiny_net(seed=0) -> a fresh TinyNet with seeded weights."""

    def make(seed=0):
        torch.manual_seed(seed)
        return TinyNet()

    return make


@pytest.fixture
def tiny_net_inputs():
    """A fixed batch for TinyNet: (ids (4, 5), x1 (4, 3, 5), x2 (4, 3, 6, 6))."""
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(0, 20, (4, 5), generator=g)
    return ids, torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 6, 6, generator=g)


@pytest.fixture
def make_gpt2():
    """make_gpt2(n_layer=1, n_embd=32, seed=0) -> GPT2LMHeadModel from a config (transformers
    Conv1D layers, i.e. PEFT's fan_in_fan_out path). Vocabulary 64, context 16."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def make(n_layer=1, n_embd=32, seed=0):
        torch.manual_seed(seed)
        cfg = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=2, vocab_size=64, n_positions=16,
                         bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(cfg)

    return make


@pytest.fixture
def make_llama():
    """make_llama(n_layer=1, hidden=32, seed=0) -> LlamaForCausalLM from a config (nn.Linear
    layers, grouped-query attention). Vocabulary 64, context 16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(n_layer=1, hidden=32, seed=0):
        torch.manual_seed(seed)
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layer,
                          num_attention_heads=2, num_key_value_heads=1, vocab_size=64, max_position_embeddings=16,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return LlamaForCausalLM(cfg)

    return make


@pytest.fixture
def lm_batch():
    """Token ids (4, 12) over a vocabulary of 64, with a learnable pattern (counting mod 64)."""
    g = torch.Generator().manual_seed(7)
    start = torch.randint(0, 64, (4, 1), generator=g)
    return (start + torch.arange(12)) % 64


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


@pytest.fixture
def dw_after_optimizer(peft_deltas):
    """A Trainer callback whose .deltas is PEFT's dW (peft_deltas) right after optimizer.step():
    registered before BalanceCallback, it holds the dW balancing must keep."""
    from transformers import TrainerCallback

    class RecordAfterOptimizer(TrainerCallback):
        deltas = None

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.deltas = peft_deltas(model)

    return RecordAfterOptimizer()


@pytest.fixture
def peft_deltas():
    """peft_deltas(model) -> {(module name, adapter): PEFT's own get_delta_weight, float64 copy}.
    The reference for "dW unchanged": computed by PEFT, not by balora."""

    def deltas(model):
        out = {}
        with torch.no_grad():
            for name, layer in _lora_layers(model):
                for adapter in list(layer.lora_A.keys()) + list(layer.lora_embedding_A.keys()):
                    out[(name, adapter)] = layer.get_delta_weight(adapter).detach().double().clone()
        return out

    return deltas


@pytest.fixture
def assert_deltas_close():
    """assert_deltas_close(before, after, rtol): same keys, ||after - before|| <= rtol ||before|| each."""

    def check(before, after, rtol=1e-5):
        assert before.keys() == after.keys()
        for key in before:
            ref = before[key]
            err = (after[key] - ref).norm().item()
            assert err <= rtol * ref.norm().item(), f"{key}: dW changed by {err:.3e} (|dW| = {ref.norm().item():.3e})"

    return check


@pytest.fixture
def snapshot():
    """snapshot(model) -> {name: cloned tensor} of the whole state dict, for bit-exact comparison."""

    def take(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    return take


@pytest.fixture
def assert_bit_identical():
    """assert_bit_identical(a, b): two snapshots hold exactly the same bits (NaN == NaN)."""

    def bits(t):
        return t.contiguous().reshape(-1).view(torch.uint8) if t.is_floating_point() else t

    def check(a, b):
        assert a.keys() == b.keys()
        changed = [k for k in a if not torch.equal(bits(a[k]), bits(b[k]))]
        assert not changed, f"tensors changed: {changed}"

    return check


@pytest.fixture
def lora_factors():
    """lora_factors(model) -> {(module name, adapter): (A, B) float64 numpy}, read straight from
    the parameters (conv A flattened to (r, in*k*k), B to (out, r)): an independent path to
    the factors, not through balora's walker."""

    def read(model):
        out = {}
        for name, layer in _lora_layers(model):
            for adapter in layer.lora_A.keys():
                A = layer.lora_A[adapter].weight.detach().double()
                B = layer.lora_B[adapter].weight.detach().double()
                out[(name, adapter)] = (A.reshape(A.shape[0], -1).numpy(), B.reshape(B.shape[0], -1).numpy())
            for adapter in layer.lora_embedding_A.keys():
                A = layer.lora_embedding_A[adapter].detach().double()
                B = layer.lora_embedding_B[adapter].detach().double()
                out[(name, adapter)] = (A.numpy(), B.numpy())
        return out

    return read


class _DispatchedOps(TorchDispatchMode):
    """Every aten op dispatched while active, by name (`.names`), .item()/bool() included."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def dispatched_ops():
    """`with dispatched_ops() as ops: ...` records every aten op in `ops.names`."""
    return _DispatchedOps


@pytest.fixture
def make_live_pairs():
    """make_live_pairs(shapes, seed=0, dtype=float32) -> FactorPairs viewing nn.Parameters and
    written through ParamWriter, as the live walker makes them; shapes are (r, in, out)."""
    from balora.pairs import FactorPair
    from balora.stack_writes import ParamWriter

    def make(shapes, seed=0, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        pairs = []
        for i, (r, n_in, n_out) in enumerate(shapes):
            A_p = torch.nn.Parameter((torch.randn(r, n_in, generator=g) / n_in**0.5).to(dtype))
            B_p = torch.nn.Parameter((torch.randn(n_out, r, generator=g) * 0.3).to(dtype))
            pairs.append(FactorPair(f"m{i}", "default", "linear", A_p.detach(), B_p.detach(), 1.0,
                                    write=ParamWriter(A_p, B_p)))
        return pairs

    return make


def _float64(x) -> np.ndarray:
    """A torch tensor (any dtype, any device) or an array, as a float64 numpy array."""
    return x.detach().to("cpu", torch.float64).numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)


@pytest.fixture
def np_rel_imbalance():
    """np_rel_imbalance(A, B) = ||B^T B - A A^T|| / (||B^T B|| + ||A A^T||) in float64 numpy:
    the reference for balora.rel_imbalance. A (r, in), B (out, r), tensors or arrays."""

    def rel(A, B):
        A, B = _float64(A), _float64(B)
        BtB, AAt = B.T @ B, A @ A.T
        return np.linalg.norm(BtB - AAt) / (np.linalg.norm(BtB) + np.linalg.norm(AAt))

    return rel


@pytest.fixture
def np_product_error():
    """np_product_error(A0, B0, A1, B1) = ||B1 A1 - B0 A0||_F / ||B0 A0||_F on the formed float64
    products: the reference for "balancing keeps dW"."""

    def err(A0, B0, A1, B1):
        P0 = _float64(B0) @ _float64(A0)
        P1 = _float64(B1) @ _float64(A1)
        return np.linalg.norm(P1 - P0) / np.linalg.norm(P0)

    return err


@pytest.fixture(scope="session")
def torchrun():
    """torchrun(script, out): see run_torchrun."""
    return run_torchrun


def run_torchrun(script, out, nproc: int = 2, timeout: int = 240, args: tuple[str, ...] = ()) -> None:
    """Run `script OUT *args` under torchrun with `nproc` CPU processes (gloo) on a free local port,
    one thread each; fail the test with the processes' output when it does not exit 0."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), str(out), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and _TEARDOWN_ABORT in proc.stderr:
        # Seen 3 times in ~60 runs of tests/ddp_train_script.py on a 2-core machine: a rank aborts
        # in C++ after the Trainer has finished (std::terminate from a thread destroyed while still
        # joinable), not in anything the test checks. Run it once more, and say so in the output.
        print(f"torchrun: a rank aborted in teardown ({_TEARDOWN_ABORT!r}); running {script.name} once more")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


_TEARDOWN_ABORT = "terminate called without an active exception"


@pytest.fixture(scope="session")
def streamlit_server():
    """streamlit_server(cmd, cwd, env, port, log_path, start_timeout_s): see serve_streamlit."""
    return serve_streamlit


@contextmanager
def serve_streamlit(cmd, cwd, env, port: int, log_path, start_timeout_s: float):
    """Start a streamlit server with `cmd`, wait (bounded) until it answers its health check,
    yield the process, and stop it on exit; its output goes to `log_path`."""
    import subprocess
    import time
    import urllib.request

    log = open(log_path, "w")
    # Its own process group, stopped whole below: a server is never left behind by a test.
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"streamlit did not start (exit code {proc.poll()}): "
                            f"{open(log_path).read()[-2000:]}")
            time.sleep(0.3)
        yield proc
    finally:
        import os
        import signal

        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:  # the group is gone already
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache of the test's own, read offline (HF_HUB_OFFLINE): no network is needed."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache
