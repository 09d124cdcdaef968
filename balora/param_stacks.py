"""LoRA parameters of one shape kept as slices of one stacked tensor, so that a balancing pass
reads and writes them in place instead of copying them into a stack and back out.

The per-step pass works on stacks A (G, r, in) and B (G, out, r) of all pairs of one shape.
Gathering the parameters into such stacks and scattering the new factors back cost about as
much as the arithmetic in between (for a 1B-like adapter, r=16, fp32, 2 CPU cores: 2.6 ms to
stack and 2.7 ms to write back, against about 7 ms of Grams and products; docs/BENCHMARKS.md).
So the first pass that writes a block *re-homes* its parameters: one stack per factor is
allocated, the values are copied in, and each parameter's `.data` becomes its slice of the
stack (FSDP1's flat parameter does the same). Later passes find the stack again and use it as
it is: the Grams read it, the products go to a workspace, and one copy per stack writes them
back.

Re-homing changes no value and no parameter object (the optimizer's state, hooks and grads are
untouched), only where the values live: the parameters of one block now share one storage, and a
tensor taken from a parameter's `.data` (or `.detach()`) before the first pass no longer aliases
it afterwards; take such views after balancing has started, or from the Parameter itself.
PEFT's `save_pretrained` and safetensors (slices that do not overlap) save them as before, and
`torch.save` of a state dict writes each stack once (a stack holds one adapter's parameters, so
saving one adapter writes no other's); a single parameter saved alone with
`torch.save` carries its whole stack (torch saves storages, not views). Re-homing is refused,
and the pass copies as before, when the parameters are not plain tensors (DTensor shards,
quantized weights), when one already shares its storage with another tensor (a view, a tied
weight), when a parameter appears twice, or under torch.inference_mode().
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

# A stack's storage -> (ids of its parameters, their data_ptrs when re-homed, the stack's shape and
# strides): one lookup and two tuple compares find a block's stack again, and one view op rebuilds
# it. Weak keys, by identity (a storage's Python object lives as long as its memory): an entry lives
# as long as the stack's memory, no longer. Nothing here refers to a parameter: model.to() and
# load_state_dict under torch.__future__.set_swap_module_params_on_conversion(True) swap parameters
# with torch.utils.swap_tensors, which refuses a tensor that has weak references. Nothing holds a
# stack either: after model.to(...) gives the parameters new storage, the old stacks' memory goes.
_STACKS = WeakIdKeyDictionary()


def stack_of(params: list[torch.Tensor]) -> torch.Tensor | None:
    """The stack (G, *shape) whose slices 0..G-1 are `params`, in this order, if they still are;
    else None. Python-side checks of identities and pointers, then one view of the storage."""
    entry = _entry(params[0])
    if entry is None:
        return None
    ids, ptrs, shape, strides = entry
    if ids != tuple(map(id, params)) or ptrs != tuple(p.data_ptr() for p in params):
        return None
    return params[0].data.as_strided(shape, strides, 0)  # .data: no op, and (as the stack had) its own version counter


def is_rehomed(param: torch.Tensor) -> bool:
    """Whether `param`'s data is (still) its slice of one of balora's stacks."""
    return _home(param) is not None


def _home(param: torch.Tensor) -> tuple | None:
    """The registry's entry for the stack whose slice `param`'s data (still) is, else None."""
    entry = _entry(param)
    return entry if entry is not None and (id(param), param.data_ptr()) in zip(entry[0], entry[1]) else None


def _entry(param: torch.Tensor) -> tuple | None:
    """The registry's entry for `param`'s storage (plain tensors only: subclasses are never re-homed)."""
    if type(param) not in (torch.Tensor, torch.nn.Parameter):
        return None
    return _STACKS.get(param.untyped_storage())


def can_rehome(params: list[torch.Tensor], shared: set[int]) -> bool:
    """Whether `params` (one block's A or B parameters, same shape, dtype and device) may become
    slices of one stack: plain contiguous tensors that own their whole storage (or a slice of one
    of our stacks whose parameters all move), none twice, none in `shared` (data_ptrs used by more
    than one parameter of the pass: tied weights stay tied). Never under torch.inference_mode(): the stack would be an
    inference tensor, which training could not use afterwards."""
    if torch.is_inference_mode_enabled():
        return False
    seen, ids = set(), set(map(id, params))
    for p in params:
        if type(p) not in (torch.Tensor, torch.nn.Parameter) or not p.is_contiguous():
            return False
        ptr = p.data_ptr()
        if ptr in seen or ptr in shared:
            return False
        owns = p.untyped_storage().nbytes() == p.numel() * p.element_size()
        if not owns and not _whole_stack_moves(p, ids):
            return False
        seen.add(ptr)
    return True


def _whole_stack_moves(param: torch.Tensor, ids: set[int]) -> bool:
    """Whether `param` is re-homed and every parameter of its stack is among `ids` (moving with it).
    A stack left with some of its parameters keeps its whole memory for them, stale copies of the
    ones that moved included (torch.save writes them too): freezing layers one by one mid-training
    (the hooks skip frozen pairs, so each pass's block shrinks) piled up a stack per frozen layer.
    Such a block is copied as before, and the stack is found whole again when the layer is unfrozen."""
    entry = _home(param)
    return entry is not None and ids.issuperset(entry[0])


def rehome(params: list[torch.Tensor]) -> torch.Tensor:
    """Copy `params` into one new stack (G, *shape) and make each parameter's data its slice.
    Returns the stack. Call can_rehome first."""
    with torch.no_grad():
        stack = torch.stack([p.detach() for p in params])
        for g, p in enumerate(params):
            p.data = stack[g]  # a view: (shape) at offset g * numel of the stack's storage
    _STACKS[stack.untyped_storage()] = (tuple(map(id, params)), tuple(p.data_ptr() for p in params),
                                        tuple(stack.shape), stack.stride())
    return stack
