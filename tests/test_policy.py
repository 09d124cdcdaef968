"""BalancePolicy: one error type and one message for a bad option at every entry point, checked
where the user gives it (call or construction), never again on the per-step path."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import balora
import balora.policy
from balora import BalanceCallback, balance_, balance_after_step, balance_pairs
from balora.balance import balance_and_write
from balora.errors import InputError
from balora.pairs import FactorPair
from balora.policy import BalancePolicy, PolicyError
from balora.projection import balanced_factors, gram_transforms


@pytest.fixture
def lora_net(make_tiny_net, tiny_net_targets):
    model = make_tiny_net()
    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=tiny_net_targets,
                                            init_lora_weights=False))


def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    return FactorPair("m", "default", "linear", torch.randn(3, 8, generator=g), torch.randn(6, 3, generator=g), 1.0)


def test_policy_error_is_one_line_input_error_and_value_error():
    assert issubclass(PolicyError, InputError) and issubclass(PolicyError, ValueError)
    with pytest.raises(PolicyError, match=r"^unknown balancing method 'bogus'; use one of nearest, svd$"):
        BalancePolicy("bogus")
    with pytest.raises(PolicyError, match="on_rank_deficient must be one of skip, balance, raise, got 'ignore'"):
        BalancePolicy(on_rank_deficient="ignore")
    with pytest.raises(PolicyError, match="on_nonfinite must be one of raise, skip"):
        BalancePolicy(on_nonfinite="balance")
    with pytest.raises(PolicyError, match="check must be True or False"):
        BalancePolicy(check="yes")
    p = BalancePolicy("svd", "balance", "skip", False)
    with pytest.raises(AttributeError):  # frozen: what was validated stays valid
        p.method = "bogus"


def test_every_entry_point_raises_the_same_error_for_a_bad_method(lora_net):
    message = r"^unknown balancing method 'bogus'; use one of nearest, svd$"
    opt = torch.optim.SGD(lora_net.parameters(), lr=0.1)
    A, B = torch.randn(1, 3, 8), torch.randn(1, 6, 3)
    G = torch.eye(3)[None]
    entry_points = [
        lambda: balance_(lora_net, method="bogus"),
        lambda: balance_pairs([_pair()], "bogus"),
        lambda: balance_and_write([_pair()], "bogus"),
        lambda: BalanceCallback(method="bogus"),
        lambda: balance_after_step(opt, lora_net, method="bogus"),
        lambda: balanced_factors(A, B, "bogus"),
        lambda: gram_transforms(G, G, "bogus"),
        lambda: balora.balance_file("no/such/adapter", "out", method="bogus"),  # before the input is read
    ]
    for call in entry_points:
        with pytest.raises(PolicyError, match=message):
            call()


def test_bad_options_fail_at_construction_not_at_the_first_step(lora_net):
    opt = torch.optim.SGD(lora_net.parameters(), lr=0.1)
    with pytest.raises(PolicyError, match="on_nonfinite"):
        balance_after_step(opt, lora_net, on_nonfinite="ignore")
    with pytest.raises(PolicyError, match="on_rank_deficient"):
        BalanceCallback(on_rank_deficient="ignore")
    assert not opt._optimizer_step_post_hooks  # nothing was registered


def test_per_step_path_does_not_revalidate(lora_net, lora_factors, monkeypatch):
    """Once built, the callback's and the hook's steps never construct or check a policy again."""
    opt = torch.optim.SGD(lora_net.parameters(), lr=0.1)
    handle = balance_after_step(opt, lora_net, method="svd")
    callback = BalanceCallback(method="svd")
    assert callback.policy == BalancePolicy("svd", check=False)
    calls = []
    monkeypatch.setattr(balora.policy, "check_method", lambda m: calls.append(m) or m)
    before = lora_factors(lora_net)
    opt.step()  # no gradients: SGD changes nothing, then the hook balances
    handle.remove()
    after = lora_factors(lora_net)
    assert any(not (before[k][0] == after[k][0]).all() for k in before)  # the hook did balance

    class _State:
        global_step = 0

    callback.on_optimizer_step(None, _State(), None, model=lora_net)
    assert calls == []  # no policy was built on the per-step path
    assert callback.last_summary is not None and callback.last_summary.balanced > 0


def test_a_policy_object_is_used_as_given():
    pairs = [_pair(0), _pair(1)]
    policy = BalancePolicy("svd", check=True)
    new, summary = balance_pairs(pairs, policy)
    assert summary.balanced == 2 and summary.max_rel_error < 1e-5  # check=True came from the policy
    new_default, summary_default = balance_pairs(pairs, policy.method, check=False)
    for i in range(2):
        for a, b in zip(new[i], new_default[i]):
            torch.testing.assert_close(a, b)
    assert balora.BalancePolicy is BalancePolicy and balora.PolicyError is PolicyError
