"""Read LoRA adapters from files, without the base model, and write balanced copies.

Readers are registry entries (`READERS`), tried in order; each returns the adapters it
recognises at a path, or None when the path is not its format:

  trainer  a Trainer output folder: every checkpoint-N with a PEFT adapter, ordered by N
  peft     a PEFT adapter folder (adapter_config.json + adapter_model.safetensors/.bin),
           several adapters in one folder tree (PEFT saves adapter "x" in the subfolder x/)
  kohya    a kohya-style .safetensors (lora_down / lora_up / alpha keys, Stable Diffusion)
  bare     a .safetensors/.bin with PEFT key names and no config: scaling unknown

Reading a path only parses headers and configs (`AdapterSource.entries` hold keys and
shapes); tensors are loaded later, a bounded chunk of equal-shape pairs at a time
(`iter_pair_chunks`), so a large adapter is never materialised in fp32 at once.
Module names drop PEFT's "base_model.model." prefix, as `adapters.live` does.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from balora.errors import InputError
from balora.pairs import FactorPair

ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT prefers the first
TENSOR_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
PEFT_PREFIX = "base_model.model."
# Loaded factors per chunk, counted in fp32. The maths keeps ~5 fp32 copies of a chunk alive
# (upcast, QR factors), so this bounds inspect's extra memory to ~25 MiB whatever the file
# size (7B-shaped r=16 fp16 adapter: 76 MiB file), while still batching 4-8 such pairs per
# call; larger chunks were not faster on CPU (benchmarks/bench_inspect.py).
CHUNK_BYTES = 4 * 2**20
# PEFT nests non-default adapters one folder down; a little slack, but never crawl a disk.
MAX_TREE_DEPTH = 3

# LoraConfig switches whose variants change what B and A mean (dW is not s B A).
# DoRA and aLoRA keep dW = s B A and are read as plain pairs.
_NON_PRODUCT_VARIANTS = ("use_qalora", "velora_config", "monteclora_config", "use_bdlora", "arrow_config", "kasa_config")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


class TensorFile:
    """Lazy access to one weights file: names, shapes and dtypes now, tensors on request.

    safetensors: the header is parsed here and tensors are read with safe_open on demand.
    .bin/.pt: torch.load(weights_only=True, mmap=True), so storages stay on disk until used.
    """

    def __init__(self, path: Path, format: str | None = None):
        self.path = Path(path)
        # By suffix, unless the caller knows better (a copy written under the user's chosen name).
        self.format = format or ("safetensors" if self.path.suffix == ".safetensors" else "torch")
        self.metadata: dict[str, str] | None = None
        self._state: dict[str, torch.Tensor] | None = None
        if self.format == "safetensors":
            self._open_safetensors()
        else:
            self._open_torch()

    def _open_safetensors(self) -> None:
        from safetensors import safe_open

        self.shapes, self.dtypes = {}, {}
        try:
            with safe_open(str(self.path), framework="pt") as f:
                self.metadata = f.metadata()
                for key in f.keys():
                    sl = f.get_slice(key)
                    self.shapes[key] = tuple(sl.get_shape())
                    self.dtypes[key] = _ST_DTYPES.get(sl.get_dtype())
        except Exception as e:  # SafetensorError, OSError: truncated, corrupted or unreadable
            raise InputError(f"{self.path}: not a valid safetensors file ({_one_line(e)})") from e
        unknown = [k for k, d in self.dtypes.items() if d is None]
        if unknown:
            raise InputError(f"{self.path}: tensor {unknown[0]} has a dtype torch cannot represent")

    def _open_torch(self) -> None:
        try:
            try:
                state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                state = torch.load(self.path, map_location="cpu", weights_only=True)  # legacy non-zip format
        except Exception as e:  # a corrupted pickle can raise almost anything (KeyError, EOFError, ...)
            m = re.search(r"WeightsUnpickler error: (Unsupported global: GLOBAL \S+)", str(e))
            if isinstance(e, pickle.UnpicklingError) and m:
                raise InputError(
                    f"{self.path}: torch.load(weights_only=True) refused it ({m.group(1)}): the pickle holds Python "
                    "objects, not only tensors; balora never unpickles arbitrary code (convert it to .safetensors "
                    "in a session you trust)"
                ) from e
            detail = re.search(r"WeightsUnpickler error: (.*?)(?:Check the documentation|$)", " ".join(str(e).split()))
            why = detail.group(1).strip() if detail else _one_line(e)
            raise InputError(f"{self.path}: not a readable PyTorch weights file ({why})") from e
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise InputError(f"{self.path}: expected a flat dict of tensor names to tensors, got {type(state).__name__}")
        self._state = state
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}
        self.dtypes = {k: v.dtype for k, v in state.items()}

    def keys(self) -> list[str]:
        return list(self.shapes)

    def get(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, in their stored dtype and shape."""
        if self._state is not None:
            return {k: self._state[k] for k in keys}
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in keys}
        except Exception as e:
            raise InputError(f"{self.path}: could not read tensors ({_one_line(e)})") from e

    def nbytes(self, key: str) -> int:
        return math.prod(self.shapes[key]) * self.dtypes[key].itemsize


@dataclass
class PairEntry:
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

    @property
    def r(self) -> int:
        return self.shape_A[0]

    @property
    def in_features(self) -> int:
        return math.prod(self.shape_A[1:])

    @property
    def out_features(self) -> int:
        return self.shape_B[0]

    @property
    def name(self) -> str:
        return f"{self.module}[{self.adapter}]"


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
        return {
            "path": str(self.weights), "reader": self.reader, "format": self.format, "adapter": self.adapter,
            "checkpoint": self.checkpoint, "step": self.step, "modules": len(self.entries),
            "other_tensors": len(self.other_keys), "metadata": self.metadata, "notes": list(self.notes),
        }


# ---- key names -> pairs ---------------------------------------------------------------

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
    (re.compile(r"^(?P<module>.+)\.alpha$"), "alpha"),
    (re.compile(r"^(?P<module>.+)\.dora_scale$"), "magnitude"),
    (re.compile(r"^(?P<module>.+)\.lora_mid\.weight$"), "mid"),
]
_ROLE_NAMES = {
    "peft": {"A": "lora_A", "B": "lora_B", "emb_A": "lora_embedding_A", "emb_B": "lora_embedding_B"},
    "kohya": {"A": "lora_down", "B": "lora_up"},
}


def _group_keys(keys, patterns, default_adapter: str) -> tuple[dict[tuple[str, str], dict[str, str]], list[str]]:
    """{(module, adapter): {role: key}} for keys matching `patterns`, and the keys that match none."""
    groups: dict[tuple[str, str], dict[str, str]] = {}
    other = []
    for key in keys:
        for pattern, role in patterns:
            m = pattern.match(key)
            if m:
                module = m.group("module").removeprefix(PEFT_PREFIX)
                adapter = m.groupdict().get("adapter") or default_adapter
                groups.setdefault((module, adapter), {})[role] = key
                break
        else:
            other.append(key)
    return groups, other


def _make_entry(tf: TensorFile, module: str, adapter: str, roles: dict[str, str], fmt: str) -> PairEntry:
    """Validate one pair's keys and shapes (headers only) into a PairEntry."""
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
        else:
            raise InputError(
                f"{where}: shapes do not chain: {names[ra]} {list(sA)} has r={sA[0]} rows but {names[rb]} {list(sB)} "
                f"has {sB[1]} columns"
            )
    if "mid" in roles:
        skip = "LoCon Tucker factor (lora_mid): dW is not lora_up @ lora_down"
    return PairEntry(module, adapter, kind, kA, kB, sA, sB, tf.dtypes[kA], scaling=None,
                     dora="magnitude" in roles, magnitude_key=roles.get("magnitude"), skip_reason=skip)


def _entries(tf: TensorFile, patterns, fmt: str, default_adapter: str) -> tuple[list[PairEntry], list[str], dict]:
    groups, other = _group_keys(tf.keys(), patterns, default_adapter)
    entries, extra = [], {}
    for (module, adapter), roles in groups.items():
        factor_roles = set(roles) - {"magnitude", "alpha", "mid"}
        if not factor_roles:  # e.g. a stray alpha: not a pair, keep it as is
            other.extend(roles.values())
            continue
        entries.append(_make_entry(tf, module, adapter, roles, fmt))
        extra[(module, adapter)] = roles
    entries.sort(key=lambda e: (natural_key(e.module), e.adapter))
    return entries, other, extra


def natural_key(name: str) -> tuple:
    """layers.2 before layers.10, as the model orders them."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


# ---- PEFT config -> scaling -------------------------------------------------------------


def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """The rank_pattern / alpha_pattern key that applies to a module (PEFT's rule), else the module."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def read_config(path: Path) -> dict:
    """adapter_config.json, checked for what scaling needs; one-line InputError otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read it ({_one_line(e)})") from e
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    peft_type = cfg.get("peft_type")
    if peft_type is None:
        raise InputError(f'{path}: no "peft_type": not a PEFT adapter config')
    if peft_type != "LORA":
        raise InputError(f'{path}: peft_type is {peft_type!r}; balora reads LoRA adapters (peft_type "LORA")')

    def number(value, name, integer=False):
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or not math.isfinite(value) or (integer and value <= 0):
            want = "a positive integer" if integer else "a finite number"
            raise InputError(f"{path}: {name} must be {want}, got {value!r}")
        return value

    number(cfg.get("r", 8), "r", integer=True)
    number(cfg.get("lora_alpha", 8), "lora_alpha")
    for pat, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        table = cfg.get(pat) or {}
        if not isinstance(table, dict):
            raise InputError(f"{path}: {pat} must be an object mapping module patterns to numbers")
        for k, v in table.items():
            number(v, f"{pat}[{k!r}]", integer)
            try:
                re.compile(k)
            except re.error as e:
                raise InputError(f"{path}: {pat} key {k!r} is not a valid pattern ({e})") from e
    return cfg


def config_rank_scaling(cfg: dict, module: str) -> tuple[int, float]:
    """(r, s) PEFT gives `module`: rank_pattern / alpha_pattern override r / lora_alpha;
    s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern, module), cfg.get("r", 8))
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern, module), cfg.get("lora_alpha", 8))
    return r, alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def _variant_skip(cfg: dict) -> str | None:
    used = [k for k in _NON_PRODUCT_VARIANTS if cfg.get(k)]
    if cfg.get("init_lora_weights") == "mica":
        used.append("init_lora_weights='mica'")
    return f"LoRA variant ({', '.join(used)}) is not a plain s B @ A product" if used else None


# ---- readers ------------------------------------------------------------------------------

Reader = Callable[[Path], "list[AdapterSource] | None"]
READERS: dict[str, Reader] = {}


def register_reader(name: str):
    """Add a reader; readers are tried in registration order."""

    def deco(fn: Reader) -> Reader:
        READERS[name] = fn
        return fn

    return deco


def _peft_source(folder: Path, adapter: str, weights: Path | None = None) -> AdapterSource:
    cfg_path = folder / ADAPTER_CONFIG
    cfg = read_config(cfg_path)
    if weights is None:
        found = [folder / n for n in WEIGHT_NAMES if (folder / n).is_file()]
        if not found:
            raise InputError(f"{folder}: has {ADAPTER_CONFIG} but no {' or '.join(WEIGHT_NAMES)}")
        weights = found[0]
    tf = TensorFile(weights)
    entries, other, _ = _entries(tf, PEFT_KEYS, "peft", adapter)
    if not entries:
        raise InputError(f"{weights}: no lora_A/lora_B keys among its {len(tf.keys())} tensors")
    variant = _variant_skip(cfg)
    for e in entries:
        r_cfg, e.scaling = config_rank_scaling(cfg, e.module)
        if r_cfg != e.r and e.skip_reason is None:
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


def _adapter_dirs(root: Path) -> list[tuple[Path, str]]:
    """(folder, adapter name) for every folder with an adapter_config.json under root."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if len(rel.parts) < MAX_TREE_DEPTH else []
        if ADAPTER_CONFIG in filenames:
            found.append((Path(dirpath), "default" if rel == Path(".") else rel.as_posix()))
    return found


@register_reader("trainer")
def read_trainer_folder(path: Path) -> list[AdapterSource] | None:
    """Every checkpoint-N (ordered by N) of a transformers Trainer output folder."""
    if not path.is_dir():
        return None
    ckpts = sorted(
        (int(m.group(1)), d) for d in path.iterdir() if d.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", d.name))
    )
    if not ckpts:
        return None
    sources, empty = [], []
    for n, d in ckpts:
        dirs = _adapter_dirs(d)
        if not dirs:
            empty.append(d.name)
        for folder, adapter in dirs:
            src = _peft_source(folder, adapter)
            src.reader, src.checkpoint, src.step = "trainer", d.name, n
            sources.append(src)
    if not sources:
        raise InputError(f"{path}: Trainer output folder whose checkpoints hold no LoRA adapter ({ADAPTER_CONFIG})")
    if (path / ADAPTER_CONFIG).is_file():  # trainer.save_model(output_dir) after training
        src = _peft_source(path, "default")
        src.reader, src.checkpoint = "trainer", "final"
        sources.append(src)
    if empty:
        sources[0].notes.append(f"checkpoint(s) without an adapter left out: {', '.join(empty)}")
    return sources


@register_reader("peft")
def read_peft_folder(path: Path) -> list[AdapterSource] | None:
    """A PEFT adapter folder (each adapter_config.json in its tree is one adapter), or its weights file."""
    if path.is_file():
        if path.name in WEIGHT_NAMES and (path.parent / ADAPTER_CONFIG).is_file():
            return [_peft_source(path.parent, "default", weights=path)]
        return None
    dirs = _adapter_dirs(path)
    if not dirs:
        orphans = [n for n in WEIGHT_NAMES if (path / n).is_file()]
        if orphans:
            raise InputError(
                f"{path}: {orphans[0]} without {ADAPTER_CONFIG}, which gives r and lora_alpha; pass the weights "
                f"file itself ({path / orphans[0]}) to read it with the scaling unknown"
            )
    return [_peft_source(folder, adapter) for folder, adapter in dirs] or None


def _tensor_file(path: Path) -> TensorFile | None:
    return TensorFile(path) if path.is_file() and path.suffix in TENSOR_SUFFIXES else None


@register_reader("kohya")
def read_kohya_file(path: Path) -> list[AdapterSource] | None:
    """kohya-ss LoRA: lora_down (r, in[, k..]) = A, lora_up (out, r[, 1..]) = B, s = alpha / r."""
    tf = _tensor_file(path)
    if tf is None or not any(p.match(k) for k in tf.keys() for p, role in KOHYA_KEYS if role in ("A", "B")):
        return None
    entries, other, roles = _entries(tf, KOHYA_KEYS, "kohya", "default")
    alpha_keys = {m: r["alpha"] for m, r in roles.items() if "alpha" in r}
    alphas = tf.get(list(alpha_keys.values()))
    missing = 0
    for e in entries:
        key = alpha_keys.get((e.module, e.adapter))
        if key is None:
            missing += 1  # kohya's networks/lora.py takes alpha = r when none is stored
            e.scaling = 1.0
            continue
        a = alphas[key]
        if a.numel() != 1 or not torch.isfinite(a.float()).all():
            raise InputError(f"{path}: {key} should be one finite number, got shape {list(a.shape)}")
        e.scaling = float(a.float()) / e.r
    notes = [f"{missing} module(s) without alpha: scaling 1 (kohya's default alpha = r)"] if missing else []
    notes += [f"{len(other)} other tensor(s) are not LoRA factors"] if other else []
    return [AdapterSource("kohya", "kohya", path, tf, "default", entries, other, notes=notes)]


@register_reader("bare")
def read_bare_file(path: Path) -> list[AdapterSource] | None:
    """Tensors with PEFT key names and no adapter_config.json: dW = s B A with s unknown."""
    tf = _tensor_file(path)
    if tf is None:
        return None
    entries, other, _ = _entries(tf, PEFT_KEYS, "peft", "default")
    if not entries:
        raise InputError(
            f"{path}: no LoRA keys (lora_A/lora_B, lora_embedding_A/B or lora_down/lora_up) among its {len(tf.keys())} tensors"
        )
    notes = ["no adapter_config.json: scaling unknown, so sigma and cond_dW are of the unscaled B A"]
    notes += [f"{len(other)} other tensor(s) are not LoRA factors"] if other else []
    by_adapter: dict[str, list[PairEntry]] = {}
    for e in entries:
        by_adapter.setdefault(e.adapter, []).append(e)
    # One source per file (writing a balanced copy needs every pair of the file together);
    # each entry keeps its own adapter name.
    return [AdapterSource("bare", "bare", path, tf, ", ".join(sorted(by_adapter)), entries, other, notes=notes)]


def read_adapters(path, adapter: str | None = None) -> list[AdapterSource]:
    """Every adapter at `path` (file or folder), headers only. `adapter` keeps one adapter name."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    for read in READERS.values():
        sources = read(path)
        if sources is not None:
            break
    else:
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


# ---- writers --------------------------------------------------------------------------------


def write_weights(like: TensorFile, path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` in the same file format as `like` (safetensors keeps its metadata)."""
    if like.format == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata=like.metadata)
    else:
        torch.save(tensors, path)


def copy_tree(src: Path, dst: Path, skip: set[Path]) -> None:
    """Copy the folder src to dst verbatim (configs, README, tokenizer files), except the files in `skip`."""
    skip = {p.resolve() for p in skip}

    def ignore(folder, names):
        return [n for n in names if (Path(folder) / n).resolve() in skip]

    shutil.copytree(src, dst, ignore=ignore)


@contextmanager
def staged_output(dst: Path, force: bool = False) -> Iterator[Path]:
    """Yield a path next to `dst` to build the output at; it replaces dst only if the block
    finishes without an exception. Otherwise nothing is left behind."""
    dst = Path(dst)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".balora-tmp", dir=dst.parent))
    except OSError as e:
        raise InputError(f"{dst}: cannot write next to it ({e.strerror or e})") from e
    try:
        staged = tmp / dst.name
        yield staged
        if not staged.exists():
            raise RuntimeError(f"{dst}: nothing was produced")
        if dst.exists() or dst.is_symlink():
            if not force:
                raise InputError(f"{dst}: already exists; pass --force to replace it")
            if dst.is_dir() and not dst.is_symlink():
                old = tmp / (dst.name + ".old")
                os.rename(dst, old)  # same filesystem: atomic; restored below if the next step fails
                try:
                    os.rename(staged, dst)
                except OSError:
                    os.rename(old, dst)
                    raise
                return
        os.replace(staged, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
