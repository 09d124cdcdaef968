"""Tensor names and header shapes of a weights file -> LoRA pairs (`PairEntry`), no tensor loaded.

PEFT names: <module>.lora_A[.<adapter>].weight / lora_B, lora_embedding_A/B, lora_magnitude_vector.
kohya names: <module>.lora_down.weight / lora_up / alpha / dora_scale / lora_mid; diffusers' older
<module>.lora.down / .lora.up, <attn>.processor.to_q_lora.down / .up and <proj>.lora_linear_layer.down / .up
are read the same way (same roles, no alpha: scaling 1, as diffusers loads them).
Module names drop PEFT's "base_model.model." prefix; two keys that then name the same factor
of the same module are an error, never a silent merge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from balora.adapters import PEFT_PREFIX
from balora.adapters.tensor_file import TensorFile
from balora.errors import InputError
from balora.pairs import PairShape


@dataclass
class PairEntry(PairShape):
    """Where one LoRA pair lives in a weights file; tensors are loaded later."""

    module: str  # without PEFT's "base_model.model." prefix
    adapter: str
    kind: str  # one of balora.pairs.KINDS ("linear" also for transformers Conv1D: a file cannot tell)
    key_A: str
    key_B: str
    shape_A: tuple[int, ...]  # as stored: (r, in), (r, in, *k) for conv
    shape_B: tuple[int, ...]  # (out, r), (out, r, 1, ...) for conv
    dtype: torch.dtype
    scaling: float | None  # None when unknown
    dora: bool = False
    magnitude_key: str | None = None
    skip_reason: str | None = None


_ADP = r"(?:\.(?P<adapter>(?!weight$)[^.]+))?"
PEFT_KEYS = [
    (re.compile(rf"^(?P<module>.+)\.lora_A{_ADP}\.weight$"), "A"),
    (re.compile(rf"^(?P<module>.+)\.lora_B{_ADP}\.weight$"), "B"),
    (re.compile(rf"^(?P<module>.+)\.lora_embedding_A{_ADP}$"), "emb_A"),
    (re.compile(rf"^(?P<module>.+)\.lora_embedding_B{_ADP}$"), "emb_B"),
    (re.compile(rf"^(?P<module>.+)\.lora_magnitude_vector{_ADP}(?:\.weight)?$"), "magnitude"),
]
KOHYA_KEYS = [
    (re.compile(r"^(?P<module>.+)\.lora_down\.weight$"), "A"),
    (re.compile(r"^(?P<module>.+)\.lora_up\.weight$"), "B"),
    (re.compile(r"^(?P<module>.+)\.lora\.down\.weight$"), "A"),  # older diffusers naming
    (re.compile(r"^(?P<module>.+)\.lora\.up\.weight$"), "B"),
    # diffusers' first files (still loaded by diffusers): attention processors' to_q_lora, text encoders' lora_linear_layer
    (re.compile(r"^(?P<module>.+)(?:_lora|\.lora_linear_layer)\.down\.weight$"), "A"),
    (re.compile(r"^(?P<module>.+)(?:_lora|\.lora_linear_layer)\.up\.weight$"), "B"),
    (re.compile(r"^(?P<module>.+)\.alpha$"), "alpha"),
    (re.compile(r"^(?P<module>.+)\.dora_scale$"), "magnitude"),
    (re.compile(r"^(?P<module>.+)\.lora_mid\.weight$"), "mid"),
]
_ROLE_NAMES = {
    "peft": {"A": "lora_A", "B": "lora_B", "emb_A": "lora_embedding_A", "emb_B": "lora_embedding_B"},
    "kohya": {"A": "lora_down", "B": "lora_up"},
}
# Cheap test before the regexes: a key that contains none of these is not a LoRA key.
_MARKERS = {"peft": ("lora_",), "kohya": ("lora_", "lora.", "alpha", "dora_scale")}


def group_keys(path, keys, patterns, default_adapter: str) -> tuple[dict[tuple[str, str], dict[str, str]], list[str]]:
    """{(module, adapter): {role: key}} for keys matching `patterns`, and the keys that match none."""
    groups: dict[tuple[str, str], dict[str, str]] = {}
    other = []
    markers = _MARKERS["kohya" if patterns is KOHYA_KEYS else "peft"]
    for key in keys:
        if not any(m in key for m in markers):
            other.append(key)
            continue
        for pattern, role in patterns:
            m = pattern.match(key)
            if m:
                module = m.group("module").removeprefix(PEFT_PREFIX)
                adapter = m.groupdict().get("adapter") or default_adapter
                roles = groups.setdefault((module, adapter), {})
                if role in roles:
                    raise InputError(
                        f"{path}: keys {roles[role]!r:.120} and {key!r:.120} both name the {role} factor of module "
                        f"{module!r:.120} (PEFT's {PEFT_PREFIX!r} prefix is dropped); remove one of them"
                    )
                roles[role] = key
                break
        else:
            other.append(key)
    return groups, other


def make_entry(tf: TensorFile, module: str, adapter: str, roles: dict[str, str], fmt: str,
               preset: str | None = None) -> PairEntry:
    """Validate one pair's keys and shapes (headers only) into a PairEntry. preset: why the config
    skips this pair (BD-LoRA's block-diagonal factor), known before its shapes are read."""
    names = _ROLE_NAMES[fmt]
    emb = "emb_A" in roles or "emb_B" in roles
    ra, rb = ("emb_A", "emb_B") if emb else ("A", "B")
    where = f"{tf.path}: {module}"
    if ra not in roles or rb not in roles:
        have, missing = (ra, rb) if ra in roles else (rb, ra)
        raise InputError(f"{where}: {names[have]} without its {names[missing]} (key {roles[have]})")
    kA, kB = roles[ra], roles[rb]
    sA, sB = tf.shapes[kA], tf.shapes[kB]
    for k in (kA, kB):
        if not tf.dtypes[k].is_floating_point:
            raise InputError(f"{where}: {k} has dtype {str(tf.dtypes[k]).removeprefix('torch.')}, expected floating point")
        if tf.dtypes[k].itemsize < 2:  # float8: torch has no promotion, abs or max for it, so no maths either
            raise InputError(f"{where}: {k} has dtype {str(tf.dtypes[k]).removeprefix('torch.')}, "
                             "expected float16, bfloat16, float32 or float64")
    if tf.dtypes[kA] != tf.dtypes[kB]:
        raise InputError(f"{where}: {names[ra]} is {tf.dtypes[kA]} but {names[rb]} is {tf.dtypes[kB]}")
    if len(sA) == 2 and len(sB) == 2:
        kind = "embedding" if emb else "linear"
    elif not emb and len(sA) in (3, 4, 5) and len(sB) == len(sA) and all(d == 1 for d in sB[2:]):
        kind = f"conv{len(sA) - 2}d"
    else:
        raise InputError(f"{where}: {names[ra]} {list(sA)} and {names[rb]} {list(sB)} are not LoRA factor shapes")
    if 0 in sA or 0 in sB:
        raise InputError(f"{where}: empty factor ({names[ra]} {list(sA)}, {names[rb]} {list(sB)})")
    skip = None
    if sB[1] != sA[0]:
        if kind.startswith("conv") and sA[0] % sB[1] == 0:
            skip = f"grouped conv (groups={sA[0] // sB[1]}): dW is not B @ A"
        elif preset is None:  # a block-diagonal factor is stored as its blocks side by side: (out, r / blocks)
            raise InputError(
                f"{where}: shapes do not chain: {names[ra]} {list(sA)} has r={sA[0]} rows but {names[rb]} {list(sB)} "
                f"has {sB[1]} columns"
            )
    if "mid" in roles:
        skip = "LoCon Tucker factor (lora_mid): dW is not lora_up @ lora_down"
    return PairEntry(module, adapter, kind, kA, kB, sA, sB, tf.dtypes[kA], scaling=None,
                     dora="magnitude" in roles, magnitude_key=roles.get("magnitude"), skip_reason=skip or preset)


def find_entries(tf: TensorFile, patterns, fmt: str, default_adapter: str,
                 preset_skip=None) -> tuple[list[PairEntry], list[str], dict]:
    """(pairs sorted by module name in natural order (layers.2 before layers.10: blocks come in the model's
    order; within a block, names sort alphabetically, where the live model lists q, k, v, o, ...),
    keys that are not factors, {(module, adapter): roles}). preset_skip(module): make_entry's preset."""
    groups, other = group_keys(tf.path, tf.keys(), patterns, default_adapter)
    entries, extra = [], {}
    for (module, adapter), roles in groups.items():
        factor_roles = set(roles) - {"magnitude", "alpha", "mid"}
        if not factor_roles:  # e.g. a stray alpha: not a pair, keep it as is
            other.extend(roles.values())
            continue
        entries.append(make_entry(tf, module, adapter, roles, fmt, preset_skip(module) if preset_skip else None))
        extra[(module, adapter)] = roles
    entries.sort(key=lambda e: (natural_key(e.module), e.adapter))
    return entries, other, extra


def has_kohya_factors(keys) -> bool:
    factor_patterns = [p for p, role in KOHYA_KEYS if role in ("A", "B")]
    return any(p.match(k) for k in keys if ".down." in k or ".up." in k or "_down." in k or "_up." in k
               for p in factor_patterns)


_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """layers.2 before layers.10, as the model orders its blocks. Digit runs compare as numbers of any
    length (a 10,000-digit "number" is compared by length first, never converted to int)."""
    parts = _DIGITS.split(name)  # text, digits, text, ...: odd positions are the digit runs
    return tuple((len(p.lstrip("0")), p.lstrip("0")) if i % 2 else p for i, p in enumerate(parts))
