"""Readers for adapters as they are published: diffusers LoRA files and LyCORIS files.

diffusers  `pytorch_lora_weights.safetensors` (or its folder) as diffusers' `save_lora_weights`
           writes it: PEFT key names under a pipeline component prefix (`unet.`, `transformer.`,
           `text_encoder.`, ...), and, from diffusers 0.35 on, each component's LoraConfig in the
           safetensors metadata `lora_adapter_metadata` as `"<prefix>.<field>"`. Scaling comes
           from there, else from `<module>.alpha` keys (Flux LoRAs: diffusers' network_alphas);
           without either the scaling is unknown (NaN), as for any bare file. The older
           `lora.down` / `lora.up` naming, and the first `to_q_lora.down` / `lora_linear_layer.down`
           one, are kohya's reader's (same roles, `alpha` keys).
lycoris    LyCORIS files: LoCon modules (`lora_down` / `lora_up`, convs included) are kohya
           pairs and are read and balanced as such; LoHa, LoKr, OFT/BOFT and full-difference
           modules are not `B @ A` and are listed as skipped with the reason, never misread.
folder     a folder (a Hub repository's snapshot) whose one .safetensors file is a LoRA file of any
           name, read as that file; several such files are refused with their names.

The first two register in front of the generic readers (`kohya`, `bare`) of balora.adapters.reading,
`folder` after them all.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

from balora.adapters.entries import PEFT_KEYS, PairEntry, find_entries, has_kohya_factors, natural_key
from balora.adapters.hub_names import HUB_FILE_SUFFIXES, cache_name
from balora.adapters.peft_config import (bdlora_skip, check_config, config_rank_scaling, rank_scaling_tables,
                                         variant_skip)
from balora.adapters.reading import (
    READERS,
    AdapterSource,
    Candidate,
    check_inside,
    read_kohya_file,
    register_reader,
)
from balora.adapters.tensor_file import TensorFile
from balora.errors import InputError
from balora.safe_io import listed, regular_file_size

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA = "lora_adapter_metadata"
# Pipeline components whose LoRA layers diffusers saves under their own prefix.
DIFFUSERS_PREFIXES = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "decoder")
UNKNOWN_SCALING = "scaling unknown, so sigma is of the unscaled B A (ratios such as cond_dW do not depend on it)"


# ---- diffusers ----------------------------------------------------------------------------------


def metadata_configs(metadata: dict, where, components=()) -> dict[str | None, dict]:
    """{component prefix: LoraConfig dict} from diffusers' `lora_adapter_metadata` (None: unprefixed).

    A key "X.field" belongs to component X when X is a known diffusers component or the first name
    of the file's own weight keys (`components`): pipelines add components (`transformer_ref`), and a
    component read as unprefixed fields would silently take another's config, or the defaults."""
    raw = metadata.get(DIFFUSERS_METADATA)
    if raw is None:
        return {}
    try:
        table = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, or an integer with thousands of digits
        msg = getattr(e, "msg", None) or ("nested too deeply" if isinstance(e, RecursionError) else str(e)[:120])
        raise InputError(f"{where}: safetensors metadata {DIFFUSERS_METADATA} is not valid JSON ({msg})") from None
    if not isinstance(table, dict):
        raise InputError(f"{where}: safetensors metadata {DIFFUSERS_METADATA} should be a JSON object, "
                         f"got {type(table).__name__}")
    configs: dict[str | None, dict] = {}
    for key, value in table.items():
        prefix, dot, field = str(key).partition(".")
        known = prefix in DIFFUSERS_PREFIXES or prefix in components
        prefix, field = (prefix, field) if dot and known else (None, key)
        configs.setdefault(prefix, {})[field] = value
    for prefix, cfg in configs.items():
        cfg.setdefault("peft_type", "LORA")
        check_config(cfg, f"{where} ({DIFFUSERS_METADATA}{'' if prefix is None else ', ' + prefix})")
    return configs


def _diffusers_candidate(c: Candidate) -> Candidate | None:
    """`c` when it is a weights file; for a folder, its pytorch_lora_weights.safetensors as a Candidate."""
    if not c.path.is_dir():
        return c if c.tensors is not None else None
    weights = c.path / DIFFUSERS_WEIGHTS
    if not os.path.lexists(weights):
        return None
    check_inside(weights, c.root, "the LoRA weights")
    regular_file_size(weights, "weights file")  # a folder so named is refused, as TensorFile would
    return Candidate(weights, c.root)


@register_reader("diffusers", before="kohya")
def read_diffusers_file(c: Candidate) -> list[AdapterSource] | None:
    """diffusers' LoRA file: PEFT keys under component prefixes, LoraConfigs in the metadata."""
    found = _diffusers_candidate(c)
    if found is None:
        return None
    weights, tf = found.path, found.tensors
    if c.path.is_dir() and has_kohya_factors(tf.keys()):  # the older lora.down / lora.up naming
        return read_kohya_file(found)  # the same Candidate: its file is not parsed again
    metadata = tf.metadata or {}
    named = DIFFUSERS_METADATA in metadata or weights.name == DIFFUSERS_WEIGHTS
    if not named and not any(k.partition(".")[0] in DIFFUSERS_PREFIXES for k in tf.keys()):
        return None  # cheap test first: most files are not diffusers'
    entries, other, _ = find_entries(tf, PEFT_KEYS, "peft", "default")
    if not entries or not (named or {e.module.partition(".")[0] for e in entries} <= set(DIFFUSERS_PREFIXES)):
        return None
    configs = metadata_configs(metadata, weights, {k.partition(".")[0] for k in tf.keys()})
    tables = {p: rank_scaling_tables(cfg, f"{weights} ({DIFFUSERS_METADATA})") for p, cfg in configs.items()}
    unknown = set()
    # pairs no metadata config covers (an unprefixed one covers all): their `.alpha` keys, if any, give the scaling
    bare = [] if None in configs else [e for e in entries if e.module.partition(".")[0] not in configs]
    alphas = _alpha_scalings(tf, bare, weights)
    common = _common_alphas(alphas, bare)
    read = {key for key, _ in alphas.values()}
    other = [k for k in other if k not in read]  # read, as kohya's alphas are
    for e in entries:
        prefix, _, rest = e.module.partition(".")
        key = prefix if prefix in configs else None
        if key not in configs:
            if e.name in alphas:
                e.scaling = alphas[e.name][1] / e.r
            elif common.get(prefix) is not None:  # as diffusers: the file's most common alpha over this rank
                e.scaling = common[prefix] / e.r
            else:
                unknown.add(prefix)
            continue
        cfg = configs[key]
        r_cfg, e.scaling = config_rank_scaling(cfg, rest if key else e.module, tables[key])
        if r_cfg != e.r and e.skip_reason is None:
            raise InputError(f"{weights}: {e.module}: lora_A has r={e.r} rows but the file's {DIFFUSERS_METADATA} "
                             f"gives r={r_cfg} for it: the metadata does not belong to these weights")
        e.dora = e.dora or bool(cfg.get("use_dora"))
        e.skip_reason = e.skip_reason or variant_skip(cfg) or bdlora_skip(cfg, rest if key else e.module)
    notes = []
    tied = sorted(p for p in unknown if p in common)  # alphas for some pairs, none most common
    if tied:
        notes.append(f"{', '.join(tied)}: diffusers gives pairs without a `.alpha` key the most common alpha of the "
                     f"others, and two alphas are equally common here: for those pairs, {UNKNOWN_SCALING}")
        unknown -= set(tied)
    if unknown and not configs:
        notes.append(f"no {DIFFUSERS_METADATA} in the file: {UNKNOWN_SCALING}")
    elif unknown:
        notes.append(f"no {DIFFUSERS_METADATA} entry for {', '.join(sorted(unknown))}: {UNKNOWN_SCALING}")
    notes += [f"{len(other)} other tensor(s) are not LoRA factors"] if other else []
    return [AdapterSource("diffusers", "diffusers", weights, tf, "default", entries, other, notes=notes)]


def _alpha_scalings(tf: TensorFile, entries: list[PairEntry], where) -> dict[str, tuple[str, float]]:
    """{pair name: (alpha key, alpha)} of the pairs stored with a `<module>.alpha` beside lora_A / lora_B (Flux
    LoRAs such as TheLastBen/Jon_Snow_Flux_LoRA): diffusers loads those alphas as network_alphas when the
    file has no lora_adapter_metadata, so the scaling is not unknown but alpha / r."""
    found = [(e, e.key_A[: e.key_A.rindex(".lora_A")] + ".alpha") for e in entries if ".lora_A" in e.key_A]
    found = [(e, k) for e, k in found if k in tf.shapes]
    values = tf.get([k for _, k in found]) if found else {}
    out = {}
    for e, k in found:
        a = values[k]
        if a.numel() != 1 or not a.is_floating_point() or not bool(a.float().isfinite().all()):
            raise InputError(f"{where}: {k} should be one finite floating-point number (the pair's alpha), "
                             f"got {a.dtype} of shape {list(a.shape)}")
        out[e.name] = k, float(a.float())
    return out


def _common_alphas(alphas: dict[str, tuple[str, float]], entries: list[PairEntry]) -> dict[str, float | None]:
    """{model prefix (`transformer`, `text_encoder`): the alpha diffusers gives that model's pairs stored
    without one}: diffusers hands each model the network_alphas under its prefix and makes the most common
    of them the config's lora_alpha (get_peft_kwargs). None where two values tie: diffusers' pick then
    follows the order it read the keys in, so the scaling of those pairs stays unknown."""
    by_prefix: dict[str, Counter] = {}
    for e in entries:
        if e.name in alphas:
            by_prefix.setdefault(e.module.partition(".")[0], Counter())[alphas[e.name][1]] += 1
    out = {}
    for prefix, counts in by_prefix.items():
        (top, n), *rest = counts.most_common()
        out[prefix] = None if rest and rest[0][1] == n else top
    return out


# ---- LyCORIS ------------------------------------------------------------------------------------

# Module kinds whose update is not one dense B @ A: (name, why, required parts, optional parts).
# A part is the key's last name; a required entry "x|y+z" means part x, or parts y and z.
LYCORIS_ALGOS = [
    ("LoHa", "dW is the Hadamard product (w1_a w1_b) * (w2_a w2_b), not B @ A",
     ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), ("hada_t1", "hada_t2")),
    ("LoKr", "dW is a Kronecker product w1 (x) w2, not B @ A",
     ("lokr_w1|lokr_w1_a+lokr_w1_b", "lokr_w2|lokr_w2_a+lokr_w2_b"), ("lokr_t2",)),
    ("OFT", "an orthogonal rotation of the base weight, not an added B @ A", ("oft_blocks|oft_diag",), ()),
    ("BOFT", "butterfly orthogonal rotations of the base weight, not an added B @ A", ("boft_blocks",), ()),
    ("full", "dW is stored whole (diff), not as B @ A", ("diff",), ("diff_b",)),
]
_PART = re.compile(r"^(?P<module>.+)\.(?P<part>hada_[wt][12](?:_[ab])?|lokr_[wt][12](?:_[ab])?|oft_blocks|oft_diag|"
                   r"boft_blocks|boft_m|rescale|diff|diff_b)$")
_ALGO_OF = {"hada": "LoHa", "lokr": "LoKr", "oft": "OFT", "boft": "BOFT", "diff": "full"}


def lycoris_modules(keys) -> dict[str, dict[str, str]]:
    """{module: {part: key}} of the LyCORIS modules that are not LoRA pairs (LoHa, LoKr, OFT, BOFT, full)."""
    found: dict[str, dict[str, str]] = {}
    for key in keys:
        m = _PART.match(key) if ("hada_" in key or "lokr_" in key or "oft_" in key or "rescale" in key
                                 or key.endswith((".diff", ".diff_b"))) else None
        if m:
            found.setdefault(m.group("module"), {})[m.group("part")] = key
    return {mod: parts for mod, parts in found.items() if set(parts) != {"rescale"}}


def _algo(path, module: str, parts: dict[str, str]) -> tuple[str, str]:
    names = {_ALGO_OF[p.split("_")[0]] for p in parts if p != "rescale" and p.split("_")[0] in _ALGO_OF}
    if len(names) != 1:
        raise InputError(f"{path}: {module}: keys of several LyCORIS kinds ({', '.join(sorted(names))}) in one module")
    name = names.pop()
    _, why, required, _ = next(a for a in LYCORIS_ALGOS if a[0] == name)
    for need in required:
        options = [alt.split("+") for alt in need.split("|")]
        if not any(all(p in parts for p in opt) for opt in options):
            missing = min((p for opt in options for p in opt if p not in parts), key=len)
            raise InputError(f"{path}: {module}: {name} module without its {missing} (has {', '.join(sorted(parts))}); "
                             "the file is incomplete")
    return name, why


def _skipped_entry(tf: TensorFile, module: str, parts: dict[str, str], name: str, why: str,
                   scaling: float | None) -> PairEntry:
    """A row for a module that is listed, never balanced: shapes as close to (r, in) / (out, r) as the kind allows."""
    if name == "LoHa":  # w1_a (out, r), w1_b (r, in[*k])
        kB, kA = parts["hada_w1_a"], parts["hada_w1_b"]
        shape_A, shape_B = tf.shapes[kA], tf.shapes[kB]
    else:  # no single rank: r is reported as 0
        kA = kB = next(iter(parts.values()))
        shape_A, shape_B = (0, 0), (0, 0)
    kind = "linear" if len(shape_A) == 2 else f"conv{len(shape_A) - 2}d"
    return PairEntry(module, "default", kind, kA, kB, tuple(shape_A), tuple(shape_B), tf.dtypes[kA], scaling=scaling,
                     skip_reason=f"LyCORIS {name}: {why}")


def _loha_scalings(tf: TensorFile, modules: dict[str, dict[str, str]]) -> dict[str, float]:
    """alpha / r of each LoHa module that stores a finite scalar alpha (LyCORIS scales LoHa like LoRA)."""
    keys = {m: f"{m}.alpha" for m, parts in modules.items() if "hada_w1_a" in parts and f"{m}.alpha" in tf.shapes}
    values = tf.get(list(keys.values())) if keys else {}
    out = {}
    for m, k in keys.items():
        a = values[k].float()
        if a.numel() == 1 and bool(a.isfinite().all()):
            out[m] = float(a) / tf.shapes[modules[m]["hada_w1_a"]][1]
    return out


@register_reader("lycoris", before="kohya")
def read_lycoris_file(c: Candidate) -> list[AdapterSource] | None:
    """A file with LyCORIS modules: LoCon pairs read as kohya's, the other kinds listed as skipped."""
    tf = c.tensors
    if tf is None:
        return None
    modules = lycoris_modules(tf.keys())
    if not modules:
        return None
    kinds, skipped = set(), []
    alphas = _loha_scalings(tf, modules)
    for module, parts in modules.items():
        name, why = _algo(c.path, module, parts)
        kinds.add(name)
        skipped.append(_skipped_entry(tf, module, parts, name, why, alphas.get(module)))
    consumed = {k for parts in modules.values() for k in parts.values()}
    consumed |= {f"{m}.{extra}" for m in modules for extra in ("alpha", "dora_scale")}
    if has_kohya_factors(tf.keys()):
        (src,) = read_kohya_file(c)
        src.reader = "lycoris"
        src.other_keys = [k for k in src.other_keys if k not in consumed]
        src.notes = [n for n in src.notes if "other tensor" not in n]
    else:
        src = AdapterSource("lycoris", "kohya", c.path, tf, "default", [], [k for k in tf.keys() if k not in consumed])
    src.entries = sorted(src.entries + skipped, key=lambda e: (natural_key(e.module), e.adapter))
    src.notes.append(f"{len(skipped)} LyCORIS module(s) ({', '.join(sorted(kinds))}) are not B @ A pairs: "
                     "listed as skipped, copied unchanged")
    if src.other_keys:
        src.notes.append(f"{len(src.other_keys)} other tensor(s) are not LoRA factors")
    return [src]


# ---- a folder of one LoRA file ------------------------------------------------------------------


@register_reader("folder")
def read_folder_of_one_file(c: Candidate) -> list[AdapterSource] | None:
    """A folder with no adapter the readers above know, holding one .safetensors file: that file.

    A Hub repository of a kohya or LyCORIS LoRA is one file of any name (and diffusers' own
    `save_lora_weights(..., weight_name=...)` names it too); a Hub id names only the repository,
    so its snapshot folder must read as the file. Several files are not guessed between."""
    if not c.path.is_dir():
        return None
    files = sorted(p for p in c.path.iterdir()  # a FIFO so named stays in, to be refused by name
                   if p.suffix == ".safetensors" and not p.name.startswith(".") and not p.is_dir())
    if len(files) > 1:
        names = listed((p.name for p in files), 5)
        # A Hub snapshot's own path is the cache's; the user names a file on the Hub as user/name/FILE.
        where, example = cache_name(c.path), cache_name(files[0])
        raise InputError(f"{where or c.path}: no adapter_config.json and {len(files)} .safetensors files ({names}); "
                         f"pass the one to read, e.g. {example or files[0]}")
    if not files:
        _refuse_hub_files_below(c.path)
        return None
    check_inside(files[0], c.root, "the LoRA weights")
    regular_file_size(files[0], "weights file")
    inner = Candidate(files[0], c.root)
    for name, read in READERS.items():
        sources = None if name == "folder" else read(inner)
        if sources is not None:
            return sources
    return None


def _refuse_hub_files_below(folder: Path) -> None:
    """A Hub repository (or a folder of it) whose LoRA files all lie in folders below (loras/x.safetensors):
    name them in the form that reads one, not "<cache snapshot path>: not a LoRA adapter". Only a cache
    snapshot: the download took adapter files only, so its tree is small."""
    where = cache_name(folder)
    if where is None:
        return
    below = sorted(p for p in folder.rglob("*") if p.suffix in HUB_FILE_SUFFIXES and p.is_file())
    if below:
        names = listed((p.relative_to(folder).as_posix() for p in below), 5)
        raise InputError(f"{where}: no adapter_config.json and no LoRA file at its top level; its weights files: "
                         f"{names}; pass the one to read, e.g. {cache_name(below[0])}")
