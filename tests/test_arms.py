"""Arms and optimizers: each arm trains at tiny size; LoRA+ and Riemannian optimizers are what PEFT builds."""

import peft.optimizers
import pytest
import torch

from balora.arms import ARMS, arm_options, get_arm, parse_arms
from balora.errors import InputError
from balora.optim import SignDescent, make_optimizer
from balora.runner import compare
from balora.tasks import get_task
from balora.tasks.synthetic import DEFAULTS

TINY = {"in_features": 6, "out_features": 5}


def tiny_problem(seed=0, alpha=2.0):
    cfg = {**DEFAULTS, **TINY, "rank": 2, "dtype": "float64"}
    return get_task("synthetic").build(cfg, seed, alpha, torch.device("cpu"))


def test_every_arm_trains_at_tiny_size(tmp_path):
    # PEFT before 0.21 has no create_riemannian_optimizer: that arm's skip is tested on its own below.
    arms = [a for a in ARMS if a != "riemannian" or hasattr(peft.optimizers, "create_riemannian_optimizer")]
    run = compare("synthetic", arms=",".join(arms), steps=6, seeds=1, optimizer="adam", lr=0.05, rank=2,
                  device="cpu", out=tmp_path / "run", quiet=True, layers_every=3, spectra_every=3, **TINY)
    assert run.status == "completed"
    s = run.summary.set_index("arm")
    assert list(s.index) == arms
    assert (s["status"] == "completed").all(), s[["status", "reason"]]
    assert (s["final_loss"] < s["final_loss"].max() * 10).all()
    first = run.steps[run.steps["step"] == 1].set_index("arm")["loss"]
    assert first.nunique() == 1  # every arm starts from the same weights on the same data
    last = run.steps[run.steps["step"] == 6].set_index("arm")["loss"]
    assert (last < first).all()  # every arm makes progress
    assert last.nunique() > 1  # and they are not all the same method


def test_loraplus_groups_have_the_b_learning_rate_ratio():
    model = tiny_problem().model
    opts = arm_options(["loraplus"], {"loraplus_lr_ratio": 8}, weight_decay=0.0)
    opt = get_arm("loraplus").make_optimizer(model, "adam", 0.01, opts)
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {}
    for group in opt.param_groups:
        for p in group["params"]:
            by_lr.setdefault(group["lr"], []).append(names[id(p)])
    assert sorted(by_lr) == [0.01, 0.08]
    assert all("lora_A" in n for n in by_lr[0.01]) and all("lora_B" in n for n in by_lr[0.08])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert sorted(by_lr[0.01] + by_lr[0.08]) == trainable
    assert isinstance(opt, torch.optim.Adam)
    sign = get_arm("loraplus").make_optimizer(model, "sign", 0.01, opts)
    assert isinstance(sign, SignDescent)


def test_loraplus_trains_embedding_adapters_at_the_arms_lr():
    """LoRA+'s ratio is for linear layers; its code (and PEFT's) gives embedding adapters a group of their
    own, at 1e-6 by default. The arm trains both embedding factors at its lr, as its help says."""
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin = torch.nn.Embedding(10, 6), torch.nn.Linear(6, 5)

        def forward(self, x):
            return self.lin(self.emb(x))

    model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["emb", "lin"]))
    opts = arm_options(["loraplus"], {"loraplus_lr_ratio": 8}, weight_decay=0.0)
    opt = get_arm("loraplus").make_optimizer(model, "sgd", 0.01, opts)
    lr = {n: g["lr"] for g in opt.param_groups for p in g["params"] for n, q in model.named_parameters() if q is p}
    assert {n.split(".")[-2] if "embedding" in n else n.split(".")[-3]: v for n, v in lr.items()} == {
        "lora_embedding_A": 0.01, "lora_embedding_B": 0.01, "lora_A": 0.01, "lora_B": 0.08}
    assert "embedding adapters: lr for both" in get_arm("loraplus").help


def test_riemannian_preconditions_gradients_like_its_definition():
    if get_arm("riemannian").unavailable():
        pytest.skip(get_arm("riemannian").unavailable())
    problem = tiny_problem()
    model = problem.model
    layer = model.base_model.model.layers[0]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        B.normal_()  # B = 0 would make the A preconditioner singular
    reg, lr = 0.1, 0.01
    opt = get_arm("riemannian").make_optimizer(model, "sgd", lr, {"weight_decay": 0.0, "riemannian_reg": reg})
    problem.loss(model, next(problem.batches())).backward()
    A0, B0, gA, gB = A.detach().clone(), B.detach().clone(), A.grad.clone(), B.grad.clone()
    opt.step()
    eye = torch.eye(2, dtype=A0.dtype)
    expected_A = A0 - lr * torch.linalg.solve(B0.T @ B0 + reg * eye, gA)
    expected_B = B0 - lr * gB @ torch.linalg.inv(A0 @ A0.T + reg * eye)
    torch.testing.assert_close(A.detach(), expected_A)
    torch.testing.assert_close(B.detach(), expected_B)


def test_riemannian_is_skipped_with_a_message_when_peft_lacks_it(tmp_path, monkeypatch):
    monkeypatch.delattr(peft.optimizers, "create_riemannian_optimizer", raising=False)  # PEFT before 0.21 has none
    run = compare("synthetic", arms="lora,riemannian", steps=3, seeds=1, lr=0.01, rank=2, device="cpu",
                  out=tmp_path / "run", quiet=True, layers_every=0, spectra_every=0, **TINY)
    s = run.summary.set_index("arm")
    assert s.loc["lora", "status"] == "completed"
    assert s.loc["riemannian", "status"] == "skipped"
    reason = s.loc["riemannian", "reason"]
    assert "create_riemannian_optimizer" in reason and peft.__version__ in reason
    assert set(run.steps["arm"]) == {"lora"}
    assert run.status == "completed"


def test_sign_descent_step_and_weight_decay():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    p.grad = torch.tensor([0.3, -1e-6, 0.0, -4.0])
    SignDescent([p], lr=0.1, weight_decay=0.5).step()
    decayed = torch.tensor([1.0, -2.0, 3.0, 0.5]) * (1 - 0.1 * 0.5)
    torch.testing.assert_close(p.detach(), decayed - 0.1 * torch.tensor([1.0, -1.0, 0.0, -1.0]))


def test_make_optimizer_names_and_errors():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer("adamw", p, 0.1), torch.optim.AdamW)
    assert make_optimizer("adamw", p, 0.1).param_groups[0]["weight_decay"] == 0.0  # shared default, not torch's 0.01
    assert isinstance(make_optimizer("sgd", p, 0.1), torch.optim.SGD)
    with pytest.raises(InputError, match="--optimizer.*adam, adamw, sgd, sign"):
        make_optimizer("lion", p, 0.1)


def test_parse_arms():
    assert parse_arms("lora, balora") == ["lora", "balora"]
    assert parse_arms(["balora-svd"]) == ["balora-svd"]
    with pytest.raises(InputError, match="unknown arm 'dora'.*available: lora"):
        parse_arms("lora,dora")
    with pytest.raises(InputError, match="twice"):
        parse_arms("lora,lora")
    with pytest.raises(InputError, match="no arm"):
        parse_arms(" , ")


def test_arms_carry_one_balancing_policy_and_resolve_returns_the_arms(tmp_path):
    from balora.arms import Arm, resolve_arms
    from balora.compare_config import CompareConfig, resolve
    from balora.policy import BalancePolicy, PolicyError

    assert ARMS["balora"].method == "nearest" and ARMS["balora-svd"].method == "svd"
    # built once, when the arm is registered: the training loop passes it as it is
    assert ARMS["balora"].policy == BalancePolicy("nearest", on_rank_deficient="skip", on_nonfinite="raise", check=False)
    assert all(ARMS[n].method is None and ARMS[n].policy is None for n in ("lora", "loraplus", "riemannian"))
    with pytest.raises(PolicyError, match="unknown balancing method 'qr'"):
        Arm("bad", "a typo in a new arm's gauge fails where the arm is defined", ARMS["lora"].make_optimizer, method="qr")
    resolved = resolve(CompareConfig(arms="balora-svd,lora", out=str(tmp_path / "run")))
    assert resolved.arms == [ARMS["balora-svd"], ARMS["lora"]] and resolved.run.arms == ["balora-svd", "lora"]
    assert resolve_arms(["lora"])[0] is ARMS["lora"]
