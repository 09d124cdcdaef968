"""Count the ops a piece of code dispatches, and those that read device values on the host.

On a GPU every dispatched aten op is (at most) one kernel launch, and a host read of a device
value (`.item()`, `bool(t)`, `.tolist()`, a copy to the CPU) waits for the device: a sync.
Used by bench_projection.py and gpu_check.py; works on any device.
"""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

# Ops that only make views or metadata: no kernel on any device.
VIEW_OPS = {"aten.view.default", "aten._unsafe_view.default", "aten.transpose.int", "aten.expand.default",
            "aten.select.int", "aten.unbind.int", "aten.unsqueeze.default", "aten.slice.Tensor",
            "aten.split_with_sizes.default", "aten.split.Tensor", "aten.t.default", "aten.detach.default",
            "aten.alias.default", "aten.squeeze.dim", "aten.permute.default", "aten.reshape.default",
            "aten.promote_types.default", "aten.lift_fresh.default"}


class OpCounter(TorchDispatchMode):
    """with OpCounter() as c: ...  then c.total, c.kernels (total less view ops), c.host_reads,
    c.scalar_reads, c.ops (a Counter by op name)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.host_reads = 0
        self.scalar_reads = 0  # .item()/bool() on any device (a sync on a GPU, not on the CPU)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        self.ops[name] += 1
        if name == "aten._local_scalar_dense.default":
            self.scalar_reads += 1
            self.host_reads += args[0].device.type != "cpu"  # .item() / bool() of a device tensor
        elif name in ("aten._to_copy.default", "aten.copy_.default"):
            src = args[1] if name == "aten.copy_.default" else args[0]
            dst_cpu = (args[0].device.type == "cpu") if name == "aten.copy_.default" else (
                str(kwargs.get("device", src.device)).startswith("cpu"))
            if dst_cpu and src.device.type != "cpu":
                self.host_reads += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        return sum(n for name, n in self.ops.items() if name not in VIEW_OPS)


def count_ops(fn) -> OpCounter:
    """Run fn() once under an OpCounter and return the counter."""
    with OpCounter() as counter:
        fn()
    return counter
