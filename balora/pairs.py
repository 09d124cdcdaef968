"""FactorPair: one LoRA (A, B) pair and what identifies it, wherever it came from.

Both the live-model walker and the adapter-file readers produce these, so the maths,
the report and the balancing never need to know whether the factors live in a model
or in a file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# Layer kinds, named after the module they adapt.
KINDS = ("linear", "hf_conv1d", "conv1d", "conv2d", "conv3d", "embedding")


class PairShape:
    """r, in/out features and the name of a pair, from `shape_A` (r, in, *kernel) and `shape_B`
    (out, r, ...), whether the factors are loaded (FactorPair) or only described (a file's PairEntry)."""

    module: str
    adapter: str
    shape_A: tuple[int, ...]
    shape_B: tuple[int, ...]

    @property
    def r(self) -> int:
        return self.shape_A[0]

    @property
    def in_features(self) -> int:
        return math.prod(self.shape_A[1:])  # conv: in * prod(kernel), the width of the flattened A

    @property
    def out_features(self) -> int:
        return self.shape_B[0]

    @property
    def name(self) -> str:
        """module[adapter], how messages name a pair."""
        return f"{self.module}[{self.adapter}]"


@dataclass
class FactorPair(PairShape):
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
    def shape_A(self) -> tuple[int, ...]:
        return self.A.shape  # torch.Size is a tuple

    @property
    def shape_B(self) -> tuple[int, ...]:
        return self.B.shape  # torch.Size is a tuple


def group_by_shape(pairs: list[FactorPair], *, by_adapter: bool = False) -> dict[tuple, list[int]]:
    """Indices of pairs that can share one batched call: same factor shapes, dtype, device (and
    adapter name with by_adapter)."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(pairs):
        key = (tuple(p.A.shape), tuple(p.B.shape), p.A.dtype, p.B.dtype, p.A.device, p.adapter if by_adapter else None)
        groups.setdefault(key, []).append(i)
    return groups


# Pad pairs of one rank to a common size when that at most doubles the work: balancing tiny
# modules is dominated by per-call overhead, not arithmetic, so one padded call beats several.
_MAX_PADDING_WASTE = 2.0


def batch_groups(pairs: list[FactorPair]) -> list[list[int]]:
    """Indices of pairs to balance in one batched call (see stack_padded).

    Pairs of one rank, dtype and device go together, zero-padded to the largest in/out,
    when padding costs at most _MAX_PADDING_WASTE x the unpadded work; otherwise pairs are
    grouped by exact shape. Zero padding is exact: the padded rows of B and columns of A
    stay zero through QR, SVD and the rotation.
    """
    by_rank: dict[tuple, list[int]] = {}
    for i, p in enumerate(pairs):
        by_rank.setdefault((p.r, p.A.dtype, p.B.dtype, p.A.device), []).append(i)
    batches = []
    for idx in by_rank.values():
        in_max = max(pairs[i].in_features for i in idx)
        out_max = max(pairs[i].out_features for i in idx)
        work = sum(pairs[i].in_features + pairs[i].out_features for i in idx)
        if len(idx) * (in_max + out_max) <= _MAX_PADDING_WASTE * work:
            batches.append(idx)
        else:
            sub = group_by_shape([pairs[i] for i in idx])
            batches.extend([idx[j] for j in members] for members in sub.values())
    return batches


def stack_padded(pairs: list[FactorPair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack pairs of one rank into A (G, r, in_max), B (G, out_max, r), zero-padded."""
    if len({(p.A.shape, p.B.shape) for p in pairs}) == 1:
        return torch.stack([p.A for p in pairs]), torch.stack([p.B for p in pairs])
    r = pairs[0].r
    in_max = max(p.in_features for p in pairs)
    out_max = max(p.out_features for p in pairs)
    A = pairs[0].A.new_zeros(len(pairs), r, in_max)
    B = pairs[0].B.new_zeros(len(pairs), out_max, r)
    for g, p in enumerate(pairs):
        A[g, :, : p.in_features] = p.A
        B[g, : p.out_features, :] = p.B
    return A, B
