"""What the tests compare, read without balora's code: every LoRA factor whole, gathered with
DTensor's own full_tensor() (a collective under FSDP2: every rank calls it), and the bytes of every
base weight (this rank's shard under FSDP2)."""

from __future__ import annotations

import torch


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> the whole LoRA factor, contiguous, for every parameter whose name has "lora_"."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            t = p.detach()
            out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).clone().contiguous()
    return out


def base_bytes(model: torch.nn.Module) -> dict[str, bytes]:
    """name -> the raw bytes of every parameter whose name has no "lora_" (this rank's shard of a
    DTensor, without communication)."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" not in name:
            t = p.detach()
            t = t.to_local() if hasattr(t, "to_local") else t
            out[name] = t.contiguous().view(torch.uint8).numpy().tobytes()
    return out
