"""The LoRA pairs of a model balanced again and again, found once and re-found only when stale.

Walking every module of a large model costs milliseconds (about 2 ms for the 112 pairs of a
1B-like Llama, most of it in building the pairs), which is a visible share of a balancing pass.
A cache hands the same pairs back while nothing they stand for has changed. It checks, on each
`get`, everything that can make them stale short of walking the model again:

- the model object (held weakly) and adapter name, and the adapter names in `peft_config`
  (`add_adapter`, `delete_adapter`);
- every link from the model down to each LoRA layer, and from the layer to each factor
  (`layer.lora_A[name].weight`, `layer.lora_embedding_A[name]`): a module or parameter put in
  another's place, as `merge_and_unload()`, `load_state_dict(assign=True)` or `fully_shard` do,
  breaks one;
- every factor still being its parameter's storage, dtype and device (`model.to(...)`, a dtype
  change; for an FSDP2 DTensor, its local shard).

What it cannot see: a LoRA layer added under an existing adapter name without going through
`peft_config` (PEFT's own `add_adapter` and `load_adapter` do); after such surgery, call `clear()`
(or `forget(model)` for the cache balance_ keeps). Scalings are not checked: balancing does not
read them (the cached pairs' `scaling` may be out of date; reports walk afresh).
A training hook's cache (`skip_frozen=True`) marks every pair with a factor whose `requires_grad` is
False as skipped (LoRA-FA's fixed A, an adapter loaded with `is_trainable=False` or left inactive
by PEFT's `set_adapter`): balancing would rewrite weights the user chose not to train. The flags
are read once per walk, and a flag that changed since (`requires_grad_`, `set_adapter`) makes the
pairs stale, like a replaced parameter.
The links are kept as weak references, so a cache never keeps a model alive; its pairs do hold
views of the factors, so after `model.to(...)` the old factors' memory is freed at the next `get`
(or by `clear()` / `forget(model)`).
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

from balora.adapters.live import model_pairs, peft_configs
from balora.distributed import gather_pairs, is_dtensor, local_storage
from balora.pairs import FactorPair


class PairCache:
    """The pairs of one model, walked once (BalanceCallback, balance_after_step, balance_)."""

    def __init__(self, skip_frozen: bool = False) -> None:
        self.skip_frozen = skip_frozen  # the training hooks: leave pairs with a frozen factor alone
        self._warned_frozen = 0  # how many frozen pairs the last warning named: warned once, not every walk
        self.frozen = 0  # pairs the last walk skipped for a frozen factor (skip_frozen)
        self.clear()

    def clear(self) -> None:
        """Forget the pairs: the next `get` walks the model."""
        self._model: weakref.ref | None = None
        self._key: tuple = ()
        self._pairs: list[FactorPair] = []
        self._modules: list[tuple[weakref.ref, str, weakref.ref]] = []  # (parent, attribute, child)
        self._params: list[tuple[weakref.ref, str, nn.Parameter]] = []  # (holder, attribute, parameter)
        self._trainable: list[bool] = []  # requires_grad of each parameter in _params at the walk (skip_frozen)

    def get(self, model: nn.Module, adapter: str | None = None, gather: bool = True) -> list[FactorPair]:
        """The pairs; gather=False hands FSDP2 pairs back as last gathered, for balora.sharded_step.balance_step,
        which reads their shards (extra["params"]) and gathers only what it needs."""
        if not self._fresh(model, adapter):
            self._fill(model, adapter)  # gathered once here under FSDP2
            return self._pairs
        # FSDP2: today's whole factors; unsharded pairs come back as they are
        return gather_pairs(self._pairs) if gather else self._pairs

    def _fresh(self, model: nn.Module, adapter: str | None) -> bool:
        if self._model is None or self._model() is not model or self._key != _key(model, adapter):
            return False
        if not self._pairs:  # nothing to check links against: LoRA may have been injected since
            return False
        for parent, attr, child in self._modules:
            p, c = parent(), child()
            if p is None or c is None or p._modules.get(attr) is not c:
                return False
        for holder, attr, param in self._params:
            h = holder()
            if h is None or h._parameters.get(attr) is not param:
                return False
        if self.skip_frozen and self._trainable != [param.requires_grad for _, _, param in self._params]:
            return False  # a factor frozen or unfrozen since the walk: which pairs to skip changed
        return all(_still_viewing(p) for p in self._pairs)

    def _fill(self, model: nn.Module, adapter: str | None) -> None:
        parents: dict[int, tuple[nn.Module, str]] = {}
        pairs = model_pairs(model, adapter, parents=parents)
        modules: dict[tuple[int, str], tuple] = {}
        params: list[tuple] = []
        for pair in pairs:
            slots = pair.extra.get("slots", ())
            if slots:  # the way from the model to the layer, which is the first slot's parent
                child = slots[0][0]
                while id(child) in parents:
                    parent, attr = parents[id(child)]
                    if (id(parent), attr) in modules:
                        break  # the rest of the way is shared with a layer seen before
                    modules[id(parent), attr] = (parent, attr, child)
                    child = parent
            for parent, attr, child in slots:
                if isinstance(child, nn.Module):
                    modules[id(parent), attr] = (parent, attr, child)
                else:
                    params.append((weakref.ref(parent), attr, child))
        self._modules = [(weakref.ref(p), attr, weakref.ref(c)) for p, attr, c in modules.values()]
        self._params = params
        _skip_tied(pairs)
        if self.skip_frozen:
            self._trainable = [param.requires_grad for _, _, param in params]
            self._skip_frozen(pairs)
        self._model, self._key, self._pairs = weakref.ref(model), _key(model, adapter), pairs

    def _skip_frozen(self, pairs: list[FactorPair]) -> None:
        """Mark the pairs with a frozen factor as skipped, and warn once when there are any."""
        frozen = [p for p in pairs if p.skip_reason is None and _mark_frozen(p)]
        self.frozen = len(frozen)
        if frozen and len(frozen) != self._warned_frozen:
            self._warned_frozen = len(frozen)
            warnings.warn(f"balora: {len(frozen)} LoRA pair(s) have a frozen factor (requires_grad=False), e.g. "
                          f"{frozen[0].name}: the training hooks leave them as they are and list them in each "
                          "pass's summary.skipped (balance_(model) balances every pair)", stacklevel=4)


def _skip_tied(pairs: list[FactorPair]) -> None:
    """Mark as skipped each pair whose factors are an earlier pair's: PEFT's ensure_weight_tying gives a tied
    lm_head the embedding's factors, transposed (its A is the embedding's B^T, its B the embedding's A^T), one
    pair met twice. Balanced twice in one pass, the second write landed on the first's: pair by pair the
    transform was applied twice, (Y^2 A, B X^2), which keeps dW and never balances. Balancing the first
    balances both; when any of them is skipped for its own reason, all are left alone."""
    owners: dict[int, FactorPair] = {}  # data_ptr of a factor -> the first pair holding it
    groups: dict[int, list[FactorPair]] = {}  # id of that first pair -> the pairs sharing its factors
    for pair in pairs:
        params = pair.extra.get("params", ())
        if not params or any(type(t) not in (torch.Tensor, nn.Parameter) or t.device.type == "meta" for t in params):
            continue  # a DTensor shard's or a meta tensor's data_ptr says nothing about sharing
        tied = [owners[t.data_ptr()] for t in params if t.data_ptr() in owners]
        if tied:
            groups[id(tied[0])].append(pair)
        else:
            owners.update((t.data_ptr(), pair) for t in params)
            groups[id(pair)] = [pair]
    for first, *others in (g for g in groups.values() if len(g) > 1):
        # One member left alone (an Embedding with max_norm, an unsupported variant) leaves them all alone:
        # balancing another would rewrite its factors, which were skipped for a reason.
        left = next((p for p in (first, *others) if p.skip_reason is not None), None)
        for pair in [first, *others] if left is not None else others:
            if pair.skip_reason is None:
                pair.skip_reason = (f"its factors are {(left or first).name}'s (tied weights, e.g. PEFT's "
                                    "ensure_weight_tying): " + ("balanced with that pair" if left is None else
                                                                "left alone with that pair, which is skipped"))
        first.extra["tied"] = True  # never re-homed (balora.stacked): its new storage would untie them


def _key(model: nn.Module, adapter: str | None) -> tuple:
    return adapter, tuple(peft_configs(model))  # a wrapped model's too: else add_adapter under DDP went unseen


def _mark_frozen(pair: FactorPair) -> bool:
    """Set pair.skip_reason when a factor's parameter (for FSDP2, the DTensor parameter) does not require grad."""
    params = pair.extra.get("params", ())
    frozen = [name for name, t in zip(_factor_names(pair), params) if not t.requires_grad]
    if not frozen:
        return False
    pair.skip_reason = (f"frozen {' and '.join(frozen)} (requires_grad=False): the training hooks leave "
                        "pairs with a frozen factor as they are")
    return True


def _factor_names(pair: FactorPair) -> tuple[str, str]:
    return ("lora_embedding_A", "lora_embedding_B") if pair.kind == "embedding" else ("lora_A", "lora_B")


def _still_viewing(pair: FactorPair) -> bool:
    """pair's factors still view their parameters (same storage, dtype and device; a DTensor's local shard)."""
    params = pair.extra.get("params")
    if params is None:
        return True  # a skipped pair: nothing is ever read from or written to it
    views = pair.extra.get("views", (pair.A, pair.B))  # gathered pairs keep the DTensors they came from
    for p, t in zip(params, views):
        sharded = is_dtensor(p)
        if sharded != is_dtensor(t) or p.dtype != t.dtype or p.device != t.device:
            return False
        if (local_storage(p).data_ptr() != local_storage(t).data_ptr() if sharded
                else p.data_ptr() != t.data_ptr()):
            return False
    return True


_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {adapter: PairCache}, for balance_


def cached_model_pairs(model: nn.Module, adapter: str | None = None, gather: bool = True) -> list[FactorPair]:
    """model_pairs(model, adapter) through a cache kept for `model` as long as it lives (balance_);
    one per adapter name asked for, so calls that alternate adapters do not re-walk. gather: as
    PairCache.get."""
    caches = _CACHES.get(model)
    if caches is None:
        caches = _CACHES[model] = {}
    cache = caches.get(adapter)
    if cache is None:
        cache = caches[adapter] = PairCache()
    return cache.get(model, adapter, gather)


def forget(model: nn.Module) -> None:
    """Drop the pairs balance_ keeps for `model`: its next call walks the model again."""
    _CACHES.pop(model, None)
