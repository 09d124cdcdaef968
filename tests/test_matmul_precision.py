"""Training often runs fp32 matmuls in TF32 or bf16 (transformers' tf32=True, torch's
fp32_precision / set_float32_matmul_precision). Balancing must not: its Grams and products run at
full fp32 precision whatever was set (linalg.full_fp32_matmuls), the setting comes back as it was,
and reading it never fails (torch >= 2.9 raises when its legacy getters follow the new API)."""

from __future__ import annotations

import pytest
import torch

from balora.balance import balance_and_write, balance_pairs
from balora.linalg import full_fp32_matmuls, matmul_unit_roundoff
from balora.pairs import FactorPair

pytestmark = pytest.mark.skipif(not hasattr(torch.backends, "fp32_precision"), reason="torch < 2.9 has no fp32_precision API")

def _state() -> tuple[str, str, str]:
    return torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision


@pytest.fixture
def restore_precision():
    """Both APIs' settings back as they were: the legacy one first (setting it writes the backends')."""
    legacy, saved = torch.get_float32_matmul_precision(), _state()
    yield
    torch.set_float32_matmul_precision(legacy)
    torch.backends.fp32_precision = saved[0]
    torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision = saved[1:]


def _set_new_api(precision: str) -> None:
    """What transformers' enable_tf32(True) does on torch >= 2.9: the global setting, which the
    backends follow unless they were set themselves."""
    torch.backends.fp32_precision = precision
    torch.backends.cuda.matmul.fp32_precision = torch.backends.mkldnn.matmul.fp32_precision = "none"


SETTINGS = {
    "legacy high": lambda: torch.set_float32_matmul_precision("high"),
    "legacy medium": lambda: torch.set_float32_matmul_precision("medium"),
    "new API tf32": lambda: _set_new_api("tf32"),
    "new API, CPU bf16": lambda: setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16"),
}


@pytest.mark.parametrize("setting", SETTINGS)
def test_full_precision_inside_and_the_setting_restored(restore_precision, setting):
    SETTINGS[setting]()
    before = _state()
    assert matmul_unit_roundoff(torch.float32) > 2.0**-24  # no RuntimeError after the new API either
    with full_fp32_matmuls():
        assert torch.backends.cuda.matmul.fp32_precision == torch.backends.mkldnn.matmul.fp32_precision == "ieee"
        assert matmul_unit_roundoff(torch.float32) == 2.0**-24
    assert _state() == before


def test_unit_roundoff_follows_the_backend_of_the_device(restore_precision):
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    assert matmul_unit_roundoff(torch.float32, "cpu") == 2.0**-8
    assert matmul_unit_roundoff(torch.float32, torch.device("cuda", 0)) == 2.0**-11
    assert matmul_unit_roundoff(torch.float32) == 2.0**-8  # no device: the coarser
    assert matmul_unit_roundoff(torch.float64, "cpu") == 2.0**-53
    assert matmul_unit_roundoff(torch.bfloat16) == 2.0**-8


def _pairs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [FactorPair(f"m{i}", "default", "linear", torch.randn(8, 96, generator=g) / 10,
                       torch.randn(80, 8, generator=g), 1.0) for i in range(n)]


@pytest.mark.parametrize("setting", SETTINGS)
def test_balancing_under_reduced_precision_takes_the_gram_path_and_is_exact(
        restore_precision, np_product_error, np_rel_imbalance, make_live_pairs, setting):
    """Without full precision inside, a bf16 or TF32 unit roundoff made the Gram path refuse every
    pair (every pass on the QR path) and, on a GPU, left dW moved by ~1e-3."""
    SETTINGS[setting]()
    before = _state()
    pairs = _pairs()
    new, summary = balance_pairs(pairs, "nearest", check=True)
    assert summary.qr_path == 0 and summary.balanced == len(pairs)
    for i, p in enumerate(pairs):
        assert np_rel_imbalance(*new[i]) < 1e-6 and np_product_error(p.A, p.B, *new[i]) < 1e-6
    summary = balance_and_write(make_live_pairs([(8, 96, 80)] * 6, seed=1), "nearest", check=False)
    assert summary.qr_path == 0 and summary.balanced == 6
    assert _state() == before


def test_threads_balancing_at_once_restore_the_setting_when_the_last_leaves(restore_precision):
    """Thread 1 enters, thread 2 enters, thread 1 leaves (full precision must hold for thread 2),
    thread 2 leaves: the user's TF32 is back (saving per entry would have left "ieee" for good)."""
    import threading

    _set_new_api("tf32")
    before = _state()
    seen = {}
    t1_in, t2_in, t1_out = threading.Event(), threading.Event(), threading.Event()

    def first():
        with full_fp32_matmuls():
            t1_in.set()
            t2_in.wait(10)
        t1_out.set()

    def second():
        t1_in.wait(10)
        with full_fp32_matmuls():
            t2_in.set()
            t1_out.wait(10)
            seen["inside after the first left"] = matmul_unit_roundoff(torch.float32)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"inside after the first left": 2.0**-24}
    assert _state() == before


def test_nothing_is_changed_when_matmuls_already_run_at_full_precision(restore_precision):
    """The default: not one of torch's settings is written (writing "ieee" where the backends said
    "none" would pin them, and a later torch.backends.fp32_precision = "tf32" would be ignored)."""
    torch.backends.fp32_precision = "none"
    torch.backends.cuda.matmul.fp32_precision = torch.backends.mkldnn.matmul.fp32_precision = "none"
    with full_fp32_matmuls():
        assert _state() == ("none", "none", "none")
    assert _state() == ("none", "none", "none")


@pytest.mark.parametrize("setting", ["legacy medium", "new API tf32"])
def test_balanced_for_storage_forms_its_grams_at_full_precision(restore_precision, monkeypatch, setting):
    """What `balora balance` writes: under a reduced setting its Grams' unit roundoff refused every
    pair from the Gram path (all of them redone by the slower float64 QR route)."""
    import balora.precision as precision

    SETTINGS[setting]()
    redone = []
    real = precision._qr_balanced
    monkeypatch.setattr(precision, "_qr_balanced", lambda A, B: (redone.append(A.shape[0]), real(A, B))[1])
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(5, 8, 96, generator=g) / 10, torch.randn(5, 80, 8, generator=g)
    precision.balanced_for_storage(A, B)
    assert redone == []
