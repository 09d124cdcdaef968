"""Writing a pass's new factors: into PEFT parameters (ParamWriter), whole re-homed stacks at once
(on the CPU in a few pieces that stay in cache), everything else with one foreach copy."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch

from balora.pairs import FactorPair
from balora.workspace import HOST, buffer as _buffer

if TYPE_CHECKING:
    from balora.stacked import Block


class ParamWriter:
    """`pair.write` for factors stored in tensors (PEFT parameters): copy new 2-D factors in,
    reshaped, in the destination's dtype. `targets()` lets a pass write many pairs at once."""

    def __init__(self, A_p: torch.Tensor, B_p: torch.Tensor):
        self.params = (A_p, B_p)  # e.g. lora_A.weight (r, in, *k), lora_B.weight (out, r, *1)
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        with torch.no_grad():
            for p, t in zip(self.params, (A, B)):
                p.copy_(t if t.shape == p.shape else t.reshape(p.shape))  # no view op when already shaped

    def targets(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """2-D views (r, in), (out, r) of the parameters' current storage; None when there are none
        (a tensor subclass such as a DTensor, or a layout that cannot be viewed as 2-D)."""
        views = self._views
        if views is not None and all(v is p or (v.data_ptr() == p.data_ptr() and v.dtype == p.dtype
                                                and v.device == p.device) for v, p in zip(views, self.params)):
            return views
        if any(type(p) not in (torch.Tensor, torch.nn.Parameter) for p in self.params):
            return None
        try:  # cached: a pass must not pay a view op per module (re-made when .to() moved a parameter);
            # a 2-D parameter is its own target (written under no_grad), so even a fresh walk costs no op.
            self._views = tuple(p if p.dim() == 2 else p.detach().view(p.shape[0], -1) for p in self.params)
        except RuntimeError:  # not viewable (unusual strides): the per-pair write reshapes a copy
            return None
        return self._views


# On the CPU a re-homed stack is formed and written back in CPU_PIECES pieces: each piece's
# product lands in a workspace buffer that is still in cache when it is copied into the
# parameters, where a whole-stack buffer (the adapter's size again, 43 MiB at 1B-like shapes) went
# out to memory and back. A fixed count keeps the pass's op count independent of the model's size.
# Measured on a 2-core CPU (docs/BENCHMARKS.md), 1B-like shapes: 4 pieces saved ~1 ms of a 13 ms
# pass, 8 about half that, 16 cost time. Stacks below CPU_PIECE_MIN_BYTES fit in cache whole.
CPU_PIECES = 4
CPU_PIECE_MIN_BYTES = 256 * 2**10


def _write_stack(b: Block, factor: str) -> None:
    """Form A' = Y A (factor "A") or B' = B X ("B") of a re-homed block and copy it into the
    parameters' stack, casting to their dtype. The product reads the stack before the copy writes
    it. A GPU does it in one product and one copy (ops are kernel launches there); a CPU in
    CPU_PIECES pieces of rows of B (columns of A): a new row depends only on the same old row, so
    a piece can be written as soon as it is formed."""
    home = b.homes[0] if factor == "A" else b.homes[1]
    src = b.A if factor == "A" else b.B  # in the compute dtype: the home itself, or its upcast copy
    if b.device != HOST or src.numel() * src.element_size() < CPU_PIECE_MIN_BYTES:
        home.copy_(b.new_A() if factor == "A" else b.new_B())
        return
    dim = 2 if factor == "A" else 1  # A (G, r, in): columns; B (G, out, r): rows
    n = src.shape[dim]
    step = -(-n // min(CPU_PIECES, n))
    parts, dests = src.split(step, dim), home.split(step, dim)
    shape = list(src.shape)
    shape[dim] = step
    flat = _buffer(("piece",), (math.prod(shape),), src.dtype, src.device, True)
    outs = {}  # one view per distinct piece shape (the last piece may be shorter)
    for part, dest in zip(parts, dests):
        out = outs.get(part.shape)
        if out is None:
            out = outs[part.shape] = flat[: part.numel()].view(part.shape)
        if factor == "A":
            torch.bmm(b.Y, part, out=out)
        else:
            torch.bmm(part, b.X, out=out)
        dest.copy_(out)


def write_all(pairs: list[FactorPair], new: dict[int, tuple[torch.Tensor, torch.Tensor] | Callable],
              whole: list[Block] = ()) -> None:
    """Write each block of `whole` (re-homed parameters) stack by stack, A' then B' (_write_stack:
    formed and copied into the parameters' stack while in cache, casting to their dtype). Then write new
    factors {index into pairs: (A', B'), or a function that forms them}: formed ones
    with one foreach copy for every pair whose `write` is a ParamWriter, the others through
    `pair.write` (files, FSDP2 shards); functions are called and written one pair at a time, so
    each new pair is written while it is still in cache."""
    with torch.no_grad():
        for b in whole:
            _write_stack(b, "A")
            _write_stack(b, "B")
    dst, src = [], []
    for i, value in new.items():
        write = pairs[i].write
        if callable(value):
            write(*value())
            continue
        targets = write.targets() if isinstance(write, ParamWriter) else None
        if targets is None:
            write(*value)
        else:
            dst += targets
            src += value
    if dst:
        with torch.no_grad():
            torch._foreach_copy_(dst, src)
