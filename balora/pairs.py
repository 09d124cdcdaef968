"""FactorPair: one LoRA (A, B) pair and what identifies it, wherever it came from.

Both the live-model walker and the adapter-file readers produce these, so the maths,
the report and the balancing never need to know whether the factors live in a model
or in a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# Layer kinds, named after the module they adapt.
KINDS = ("linear", "hf_conv1d", "conv1d", "conv2d", "conv3d", "embedding")


@dataclass
class FactorPair:
    """A (r, in) and B (out, r) as PEFT stores them once flattened, dW = scaling * B @ A.

    Conv factors are flattened: A (r, in * prod(kernel)), B (out, r). Embedding factors are
    lora_embedding_A (r, num_embeddings) and lora_embedding_B (embedding_dim, r).
    `write` (when set) stores new factors of the same 2-D shapes back where they came from.
    """

    module: str  # e.g. "model.layers.0.self_attn.q_proj" (PEFT's "base_model.model." prefix dropped)
    adapter: str  # PEFT adapter name, "default" unless the user chose one
    kind: str  # one of KINDS
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scaling: float | None  # s in dW = s B A; None when unknown (bare weights file)
    dora: bool = False
    skip_reason: str | None = None  # set when the pair cannot be balanced (e.g. grouped conv)
    write: Callable[[torch.Tensor, torch.Tensor], None] | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def r(self) -> int:
        return self.A.shape[0]

    @property
    def in_features(self) -> int:
        return self.A.shape[1]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    @property
    def name(self) -> str:
        """module[adapter], how messages name a pair."""
        return f"{self.module}[{self.adapter}]"


def group_by_shape(pairs: list[FactorPair]) -> dict[tuple, list[int]]:
    """Indices of pairs that can share one batched call: same factor shapes, dtype, device."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(pairs):
        key = (tuple(p.A.shape), tuple(p.B.shape), p.A.dtype, p.B.dtype, p.A.device)
        groups.setdefault(key, []).append(i)
    return groups
