"""Per-thread buffers that a balancing pass reuses from one pass to the next, on the CPU.

On the CPU a fresh multi-megabyte tensor is page-faulted in on first touch, which costs more
than a pass's arithmetic (about 6 ms per 16 MiB here, against 2.5 ms for the product that
fills it), so the tensors a pass writes internally (stacks, new factors) are kept for the next
pass, up to WORKSPACE_MAX_BYTES per thread. CUDA's caching allocator already reuses memory: no
workspace there.
"""

from __future__ import annotations

import threading

import torch

HOST = torch.device("cpu")
WORKSPACE_MAX_BYTES = 512 * 2**20
_local = threading.local()  # one workspace per thread: two threads balancing at once never share one


def buffer(role: tuple, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, reuse: bool) -> torch.Tensor:
    """An uninitialised tensor; on the CPU with reuse=True, the same one as last time for this role
    (what it holds and for which block: two live buffers never share a role) and shape."""
    if not reuse or device != HOST:
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = _local.__dict__.setdefault("buffers", {})
    key = (role, shape, dtype)
    buf = buffers.get(key)
    if buf is None:
        buf = torch.empty(shape, dtype=dtype)
        used = sum(b.numel() * b.element_size() for b in buffers.values())
        if used + buf.numel() * buf.element_size() <= WORKSPACE_MAX_BYTES:
            buffers[key] = buf
    return buf


def free_workspace() -> None:
    """Drop this thread's kept buffers (the next pass allocates afresh)."""
    _local.__dict__.pop("buffers", None)
