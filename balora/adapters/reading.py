"""Read LoRA adapters from files, without the base model.

Readers are registry entries (`READERS`), tried in order; each looks at one `Candidate` (the
path, its tensor file opened at most once whichever readers ask for it) and returns the
adapters it recognises, or None when the path is not its format:

  trainer  a Trainer output folder: every checkpoint-N with a PEFT adapter, ordered by N (the
           newest one left out with a note when unreadable: a run may be writing it)
  peft     a PEFT adapter folder (adapter_config.json + adapter_model.safetensors/.bin),
           several adapters in one folder tree (PEFT saves adapter "x" in the subfolder x/)
  kohya    a kohya-style .safetensors (lora_down / lora_up / alpha keys, Stable Diffusion)
  bare     a .safetensors/.bin with PEFT key names and no config: scaling unknown

Reading a path only parses headers and configs (`AdapterSource.entries` hold keys and
shapes); tensors are loaded later, a bounded chunk of equal-shape pairs at a time
(`iter_pair_chunks`), so a large adapter is never materialised in fp32 at once.

A folder may come from a stranger: only regular files are read, configs up to a size cap
(balora.safe_io), and no symbolic link is followed out of the folder given (`AdapterRoot`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

import torch

from balora.adapters.entries import KOHYA_KEYS, PEFT_KEYS, PairEntry, find_entries, has_kohya_factors
from balora.adapters.peft_config import bdlora_skip, rank_scalings, read_config, variant_skip
from balora.adapters.hub_names import inside_root
from balora.adapters.sharded_checkpoint import sharded_checkpoint_hint
from balora.adapters.tensor_file import TensorFile
from balora.errors import InputError
from balora.pairs import FactorPair
from balora.safe_io import describe_kind

ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT prefers the first
TENSOR_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Loaded factors per chunk, counted in fp32. The maths keeps ~5 fp32 copies of a chunk alive
# (upcast, QR factors), so this bounds inspect's extra memory to ~25 MiB whatever the file
# size (7B-shaped r=16 fp16 adapter: 76 MiB file), while still batching 4-8 such pairs per
# call; larger chunks were not faster on CPU (benchmarks/bench_inspect.py).
CHUNK_BYTES = 4 * 2**20
# PEFT nests non-default adapters one folder down; a little slack, but never crawl a disk.
MAX_TREE_DEPTH = 3
# checkpoint-N: N is a step count; more digits than an int64 holds is not one.
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_MAX_STEP_DIGITS = 18


@dataclass
class AdapterSource:
    """One adapter read from one weights file."""

    reader: str  # registry name of the reader that found it
    format: str  # "peft", "kohya" or "bare": the format balanced copies are written in
    weights: Path  # the tensor file
    tensors: TensorFile
    adapter: str
    entries: list[PairEntry]
    other_keys: list[str]  # tensors that are not LoRA factors (modules_to_save, alpha, bias): copied as is
    config_path: Path | None = None
    checkpoint: str = ""  # "checkpoint-N" inside a Trainer output folder
    step: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.tensors.metadata or {})

    def describe(self) -> dict:
        """Plain-data summary for DataFrame.attrs and reports."""
        return {"path": str(self.weights), "reader": self.reader, "format": self.format, "adapter": self.adapter,
                "checkpoint": self.checkpoint, "step": self.step, "modules": len(self.entries),
                "other_tensors": len(self.other_keys), "metadata": self.metadata, "notes": list(self.notes)}


def adapter_root(path: Path) -> Path:
    """The folder whose files reading `path` may open: the folder given (a file's own folder).

    One exception, so a Hugging Face cache snapshot reads as it is: huggingface_hub stores
    `models--org--name/snapshots/<rev>/<file>` as links to `models--org--name/blobs/<hash>`,
    so inside such a snapshot the repository folder is the root.
    """
    folder = Path(os.path.abspath(path if path.is_dir() else path.parent))
    for p in (folder, *folder.parents):  # the snapshot itself or a subfolder of it
        if p.parent.name == "snapshots" and p.parent.parent.name.startswith(("models--", "datasets--")):
            return p.parent.parent
    return folder


def check_inside(path: Path, root: Path, what: str) -> None:
    """Refuse a `what` (e.g. "adapter_config.json") that is, or lies behind, a link out of `root`, or a broken link."""
    if inside_root(path, root):
        return
    try:
        target = Path(path).resolve(strict=True)
    except (OSError, RuntimeError):  # dangling link, or a loop of links
        raise InputError(f"{path}: {what} is a broken symbolic link (its target does not exist, or the links "
                         "form a loop)") from None
    raise InputError(f"{path}: {what} is a symbolic link to {target}, outside the folder {root}; balora does not "
                     "follow links out of the folder it reads (copy the real file in if you trust it)")


@dataclass
class Candidate:
    """What the readers look at: a path, the folder it may read in, its tensor file opened once."""

    path: Path
    root: Path

    @cached_property
    def tensors(self) -> TensorFile | None:
        """The path's TensorFile when it is a file with a weights suffix (parsed on first use only)."""
        if self.path.suffix not in TENSOR_SUFFIXES or self.path.is_dir() or not os.path.lexists(self.path):
            return None
        return TensorFile(self.path)


Reader = Callable[[Candidate], "list[AdapterSource] | None"]
READERS: dict[str, Reader] = {}


def register_reader(name: str, before: str | None = None):
    """Add a reader; readers are tried in registration order, or just before reader `before`."""

    def deco(fn: Reader) -> Reader:
        items = [(k, v) for k, v in READERS.items() if k != name]
        at = next((i for i, (k, _) in enumerate(items) if k == before), len(items))
        items.insert(at, (name, fn))
        READERS.clear()
        READERS.update(items)
        return fn

    return deco


def _weights_in(folder: Path) -> Path | None:
    """The adapter weights PEFT would load from `folder` (a FIFO named like them counts: it is refused later)."""
    return next((folder / n for n in WEIGHT_NAMES if os.path.lexists(folder / n)), None)


def _peft_source(folder: Path, adapter: str, root: Path, weights: Path | None = None,
                 tensors: TensorFile | None = None) -> AdapterSource:
    cfg_path = folder / ADAPTER_CONFIG
    check_inside(cfg_path, root, ADAPTER_CONFIG)
    cfg = read_config(cfg_path)
    if weights is None:  # found here, not named by the user: it must not lead out of the folder
        weights = _weights_in(folder)
        if weights is None:
            raise InputError(f"{folder}: has {ADAPTER_CONFIG} but no {' or '.join(WEIGHT_NAMES)}")
        check_inside(weights, root, "the weights file")
    tf = tensors if tensors is not None else TensorFile(weights)
    entries, other, _ = find_entries(tf, PEFT_KEYS, "peft", adapter, lambda module: bdlora_skip(cfg, module))
    if not entries:
        raise InputError(f"{weights}: no lora_A/lora_B keys among its {len(tf.keys())} tensors")
    variant = variant_skip(cfg)
    ranks = rank_scalings(cfg, {e.module: e.r for e in entries}, str(cfg_path))
    for e in entries:
        r_cfg, e.scaling = ranks[e.module]
        experts = e.r // r_cfg if r_cfg and e.r % r_cfg == 0 else 0
        if r_cfg != e.r and e.skip_reason is None and cfg.get("target_parameters") and experts > 1:
            # PEFT's LoRA on a 3-D expert parameter stacks one r-block per expert (r x E rows), as live.py reads it
            e.skip_reason = f"LoRA on {experts} stacked experts: each expert's dW is its own block, not B @ A"
        elif r_cfg != e.r and e.skip_reason is None:
            raise InputError(
                f"{weights}: {e.module}: lora_A has r={e.r} rows but {cfg_path} gives r={r_cfg} for it "
                "(r / rank_pattern): the config does not belong to these weights"
            )
        e.dora = e.dora or bool(cfg.get("use_dora"))
        e.skip_reason = e.skip_reason or variant
    notes = [f"{len(other)} other tensor(s) (e.g. modules_to_save) are not LoRA factors"] if other else []
    if weights.suffix != ".safetensors" and (folder / WEIGHT_NAMES[0]).is_file():
        notes.append(f"{WEIGHT_NAMES[0]} also present")
    if weights.name == WEIGHT_NAMES[0] and (folder / WEIGHT_NAMES[1]).is_file():
        notes.append(f"{WEIGHT_NAMES[1]} also present: PEFT loads the .safetensors; the .bin is copied unchanged")
    return AdapterSource("peft", "peft", weights, tf, adapter, entries, other, cfg_path, notes=notes)


def adapter_dirs(folder: Path) -> list[tuple[Path, str]]:
    """(folder, adapter name) for every folder with an adapter_config.json under `folder`.
    Symbolic links to folders are not entered (os.walk's default), hidden folders are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = Path(dirpath).relative_to(folder)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if len(rel.parts) < MAX_TREE_DEPTH else []
        if ADAPTER_CONFIG in filenames:
            found.append((Path(dirpath), "default" if rel == Path(".") else rel.as_posix()))
    return found


def _checkpoints(path: Path, root: Path) -> list[tuple[int, Path]]:
    """(N, folder) of every checkpoint-N folder in `path`, ordered by N."""
    found = []
    for d in path.iterdir():
        m = _CHECKPOINT.fullmatch(d.name)
        if not m or not d.is_dir():
            continue
        if len(m.group(1).lstrip("0")) > _MAX_STEP_DIGITS:
            raise InputError(f"{d}: step number with {len(m.group(1))} digits; a Trainer checkpoint is "
                             f"checkpoint-N with N a step count (at most {_MAX_STEP_DIGITS} digits)")
        check_inside(d, root, "the checkpoint folder")
        found.append((int(m.group(1)), d))
    return sorted(found)


@register_reader("trainer")
def read_trainer_folder(c: Candidate) -> list[AdapterSource] | None:
    """Every checkpoint-N (ordered by N) of a transformers Trainer output folder."""
    path = c.path
    if not path.is_dir():
        return None
    ckpts = _checkpoints(path, c.root)
    if not ckpts:
        return None
    sources, empty, notes = [], [], []
    for n, d in ckpts:
        dirs = adapter_dirs(d)
        empty += [] if dirs else [d.name]
        try:
            found = [_peft_source(folder, adapter, c.root) for folder, adapter in dirs]
        except InputError as e:  # the newest checkpoint of a run still training may be half-written
            if (n, d) != ckpts[-1] or not sources:  # a damaged older one, or the only one: an error as before
                raise
            notes.append(f"{d.name} left out, unreadable (still being written?): {e}")
            continue
        for src in found:
            src.reader, src.checkpoint, src.step = "trainer", d.name, n
        sources += found
    if not sources and any(p.suffix == ".safetensors" for p in path.iterdir()):
        return None  # diffusers' scripts keep checkpoint-N beside their final LoRA file: the readers below read it
    if not sources:
        hint = sharded_checkpoint_hint(path, MAX_TREE_DEPTH)
        raise InputError(f"{path}: Trainer output folder whose checkpoints hold no LoRA adapter ({ADAPTER_CONFIG})"
                         + (f"; found {hint}" if hint else ""))
    if os.path.lexists(path / ADAPTER_CONFIG):  # trainer.save_model(output_dir) after training
        # every adapter PEFT saved there: "default" at the top, the others in folders named after them
        finals = [(d, a) for d, a in adapter_dirs(path) if not _CHECKPOINT.fullmatch(Path(a).parts[0])]
        for folder, adapter in finals:
            src = _peft_source(folder, adapter, c.root)
            src.reader, src.checkpoint = "trainer", "final"
            sources.append(src)
    if empty:
        notes.insert(0, f"checkpoint(s) without an adapter left out: {', '.join(empty)}")
    sources[0].notes += notes
    return sources


@register_reader("peft")
def read_peft_folder(c: Candidate) -> list[AdapterSource] | None:
    """A PEFT adapter folder (each adapter_config.json in its tree is one adapter), or its weights file."""
    path = c.path
    if not path.is_dir():
        if path.name in WEIGHT_NAMES and os.path.lexists(path.parent / ADAPTER_CONFIG):
            return [_peft_source(path.parent, "default", c.root, weights=path, tensors=c.tensors)]
        return None
    dirs = adapter_dirs(path)
    if not dirs:
        orphan = _weights_in(path)
        if orphan is not None:
            raise InputError(
                f"{path}: {orphan.name} without {ADAPTER_CONFIG}, which gives r and lora_alpha; pass the weights "
                f"file itself ({orphan}) to read it with the scaling unknown"
            )
    return [_peft_source(folder, adapter, c.root) for folder, adapter in dirs] or None


@register_reader("kohya")
def read_kohya_file(c: Candidate) -> list[AdapterSource] | None:
    """kohya-ss LoRA: lora_down (r, in[, k..]) = A, lora_up (out, r[, 1..]) = B, s = alpha / r."""
    tf = c.tensors
    if tf is None or not has_kohya_factors(tf.keys()):
        return None
    entries, other, roles = find_entries(tf, KOHYA_KEYS, "kohya", "default")
    alpha_keys = {m: r["alpha"] for m, r in roles.items() if "alpha" in r}
    alphas = tf.get(list(alpha_keys.values()))
    missing = zero = 0
    for e in entries:
        key = alpha_keys.get((e.module, e.adapter))
        if key is None:
            missing += 1  # kohya's networks/lora.py takes alpha = r when none is stored
            e.scaling = 1.0
            continue
        a = alphas[key]
        if a.numel() != 1:
            raise InputError(f"{c.path}: {key} should be one finite number, got shape {list(a.shape)}")
        if not torch.isfinite(a.float()).all():
            raise InputError(f"{c.path}: {key} should be one finite number, got {float(a.float())}")
        zero += float(a) == 0  # so does an alpha of 0 there: alpha = r, scaling 1
        e.scaling = float(a.float()) / e.r if float(a) != 0 else 1.0
    notes = [f"{missing} module(s) without alpha: scaling 1 (kohya's default alpha = r)"] if missing else []
    notes += [f"{zero} module(s) with alpha 0: scaling 1 (kohya reads alpha 0 as alpha = r)"] if zero else []
    notes += [f"{len(other)} other tensor(s) are not LoRA factors"] if other else []
    return [AdapterSource("kohya", "kohya", c.path, tf, "default", entries, other, notes=notes)]


@register_reader("bare")
def read_bare_file(c: Candidate) -> list[AdapterSource] | None:
    """Tensors with PEFT key names and no adapter_config.json: dW = s B A with s unknown."""
    tf = c.tensors
    if tf is None:
        return None
    entries, other, _ = find_entries(tf, PEFT_KEYS, "peft", "default")
    if not entries:
        raise InputError(
            f"{c.path}: no LoRA keys (lora_A/lora_B, lora_embedding_A/B or lora_down/lora_up) among its "
            f"{len(tf.keys())} tensors"
        )
    notes = ["no adapter_config.json: scaling unknown, so sigma is of the unscaled B A (ratios such as cond_dW do not depend on it)"]
    notes += [f"{len(other)} other tensor(s) are not LoRA factors"] if other else []
    adapters = sorted({e.adapter for e in entries})
    # One source per file (writing a balanced copy needs every pair of the file together);
    # each entry keeps its own adapter name.
    return [AdapterSource("bare", "bare", c.path, tf, ", ".join(adapters), entries, other, notes=notes)]


def read_adapters(path, adapter: str | None = None) -> list[AdapterSource]:
    """Every adapter at `path` (file or folder), headers only. `adapter` keeps one adapter name."""
    path = Path(path)
    if not os.path.lexists(path):
        raise InputError(f"{path}: no such file or directory")
    if not path.exists():
        raise InputError(f"{path}: a symbolic link to {os.readlink(path)}, which does not exist")
    if not path.is_dir() and not path.is_file():
        raise InputError(f"{path}: is {describe_kind(path.stat().st_mode)}; balora reads adapter folders and "
                         "regular weights files only")
    candidate = Candidate(path, adapter_root(path))
    for read in READERS.values():
        try:
            sources = read(candidate)
        except OSError as e:  # a folder or file the readers cannot open (permissions, I/O error)
            where = e.filename or path
            raise InputError(f"{where}: cannot read it ({e.strerror or e})") from e
        if sources is not None:
            break
    else:
        hint = sharded_checkpoint_hint(path, MAX_TREE_DEPTH)
        if hint:
            raise InputError(f"{path}: {hint}")
        raise InputError(
            f"{path}: not a LoRA adapter: expected a PEFT adapter folder ({ADAPTER_CONFIG} + "
            f"{' or '.join(WEIGHT_NAMES)}), a Trainer output folder (checkpoint-N), "
            f"a kohya LoRA .safetensors or a {'/'.join(TENSOR_SUFFIXES)} file with PEFT lora_A/lora_B keys"
        )
    if adapter is not None:
        found = sorted({e.adapter for s in sources for e in s.entries})
        for s in sources:
            s.entries = [e for e in s.entries if e.adapter == adapter]
        sources = [s for s in sources if s.entries]
        if not sources:
            raise InputError(f"{path}: no adapter named {adapter!r}; found: {', '.join(found)}")
    return sources


# ---- tensors, a chunk at a time -------------------------------------------------------------


def iter_pair_chunks(source: AdapterSource, entries: list[PairEntry] | None = None,
                     max_bytes: int | None = None, tensors=None) -> Iterator[list[FactorPair]]:
    """FactorPairs for `entries` (default: every pair of the source that can be treated),
    a chunk of equal-shape pairs at a time, so one batched call measures each chunk and at
    most ~max_bytes (default CHUNK_BYTES) of fp32 factors are in memory. `pair.extra["entry"]`
    is its PairEntry.

    tensors: read the factors from this {key: tensor} dict or TensorFile instead of the
    source's own file (the chunks depend only on `entries`, so two files line up).
    """
    entries = [e for e in source.entries if e.skip_reason is None] if entries is None else entries
    max_bytes = CHUNK_BYTES if max_bytes is None else max_bytes
    if tensors is None:
        tensors = source.tensors
    get = tensors.get if isinstance(tensors, TensorFile) else (lambda keys: {k: tensors[k] for k in keys})
    groups: dict[tuple, list[PairEntry]] = {}
    for e in entries:
        groups.setdefault((e.shape_A, e.shape_B, e.dtype), []).append(e)
    for (shape_A, shape_B, _), group in groups.items():
        per_pair = 4 * (math.prod(shape_A) + math.prod(shape_B))
        step = max(1, max_bytes // per_pair)
        for i in range(0, len(group), step):
            chunk = group[i : i + step]
            loaded = get([k for e in chunk for k in (e.key_A, e.key_B)])
            yield [_factor_pair(e, loaded[e.key_A], loaded[e.key_B]) for e in chunk]


def _factor_pair(e: PairEntry, A: torch.Tensor, B: torch.Tensor) -> FactorPair:
    # Conv: A (r, in, *k) -> (r, in * prod(k)), B (out, r, 1..) -> (out, r), so dW = B A reshaped.
    A2 = A.reshape(e.r, -1)  # (r, in)
    B2 = B.reshape(e.out_features, -1)  # (out, r)
    return FactorPair(e.module, e.adapter, e.kind, A2, B2, e.scaling, e.dora, extra={"entry": e})


# The readers of diffusers and LyCORIS files register themselves in front of kohya's and bare's.
from balora.adapters import wild as _wild  # noqa: E402,F401
