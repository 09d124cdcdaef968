"""What the torchrun scripts save: every LoRA factor whole, gathered with DTensor's own
full_tensor() (a collective: every rank calls it), independent of balora's gathering code."""

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
