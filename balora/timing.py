"""Wall-clock seconds for work that may run on a GPU."""

from __future__ import annotations

import time

import torch
from torch import nn


def synced_clock(device: torch.device | None) -> float:
    """time.perf_counter() once `device` has finished its queued work. CUDA runs asynchronously: a
    clock read right after queuing kernels times their launch only, and one after a device read
    also counts whatever was queued before it (the optimizer step, for a balancing pass)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def model_device(model: nn.Module | None) -> torch.device | None:
    """The device of the model's first trainable parameter (a LoRA factor in a PEFT model; frozen
    parts such as embeddings may be offloaded to the CPU), else of its first parameter; None
    without any."""
    if model is None:
        return None
    p = next((q for q in model.parameters() if q.requires_grad), None)
    if p is None:
        p = next(model.parameters(), None)
    return None if p is None else p.device
