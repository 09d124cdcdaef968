"""adapter_config.json -> what reading a PEFT adapter needs: r and scaling per module, variants.

The config comes from whoever made the adapter, so it is read like any untrusted file
(regular file, size cap: balora.safe_io) and its rank_pattern / alpha_pattern keys, which PEFT
matches as regular expressions, are matched with a time bound: a key that backtracks
catastrophically is refused with a one-line error naming it instead of hanging the process.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import regex

from balora.errors import InputError
from balora.safe_io import CONFIG_MAX_BYTES, read_json_capped

# LoraConfig switches whose variants change what B and A mean (dW is not s B A).
# DoRA, aLoRA and VeLoRA (it only compresses the activations kept for A's gradient) keep dW = s B A
# and are read as plain pairs, as live.py balances them; BD-LoRA is decided per module (bdlora_skip).
NON_PRODUCT_VARIANTS = ("use_qalora", "monteclora_config", "arrow_config", "kasa_config")

# PEFT's keys are module names or short suffix patterns ("q_proj", "layers.0.mlp"): tens of
# characters. A key of thousands is not such a pattern.
MAX_PATTERN_CHARS = 1000
# Matching one key against every module name of an adapter takes well under a millisecond per
# name; this bounds what one key may cost over the whole adapter (a 20k-module file included),
# and TABLE_SECONDS what all keys of one table may (many keys each just under the bound).
PATTERN_SECONDS = 2.0
TABLE_SECONDS = 10.0


class PatternTable:
    """A rank_pattern / alpha_pattern table, matched as PEFT's `get_pattern_key` does, with a bound.

    PEFT tries the keys in order and takes the first for which
    ``re.match(rf"(.*\\.)?({key})$", module)`` matches. The same expression is run here with the
    `regex` module (re-compatible syntax, and a timeout re lacks); the time each key spends is
    summed over all modules, and a key over PATTERN_SECONDS (or all keys over TABLE_SECONDS) raises
    an InputError naming it.
    """

    def __init__(self, table: dict, name: str = "rank_pattern", where: str = "adapter config"):
        self.table, self.name, self.where = table, name, where
        self._compiled = [(key, regex.compile(rf"(.*\.)?({key})$")) for key in table]
        self._spent = dict.fromkeys(table, 0.0)
        self._total = 0.0
        self._cache: dict[str, str] = {}

    def key_for(self, module: str) -> str:
        """The first key matching `module`, else `module` itself (PEFT's convention)."""
        if module not in self._cache:
            self._cache[module] = self._first_match(module)
        return self._cache[module]

    def get(self, module: str, default):
        return self.table.get(self.key_for(module), default)

    def _first_match(self, module: str) -> str:
        for key, pattern in self._compiled:
            left = PATTERN_SECONDS - self._spent[key]
            t0 = time.perf_counter()
            try:
                found = pattern.match(module, timeout=max(left, 1e-3)) is not None
            except TimeoutError:
                found = None
            took = time.perf_counter() - t0
            self._spent[key] += took
            self._total += took
            if found is None or self._spent[key] > PATTERN_SECONDS:
                raise self._too_slow(key, f"takes over {PATTERN_SECONDS:g} s")
            if self._total > TABLE_SECONDS:
                slowest = max(self._spent, key=self._spent.get)
                raise self._too_slow(slowest, f"and the other keys take over {TABLE_SECONDS:g} s")
            if found:
                return key
        return module

    def _too_slow(self, key: str, how: str) -> InputError:
        return InputError(
            f"{self.where}: {self.name} key {key!r:.120} {how} to match the module names (a pattern that "
            "backtracks, such as nested repetition '(.*)*'); use plain module names or simple suffixes"
        )


def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """The rank_pattern / alpha_pattern key that applies to a module (PEFT's rule), else the module."""
    return PatternTable(dict.fromkeys(pattern_keys)).key_for(key_to_match)


def read_config(path: Path) -> dict:
    """adapter_config.json, checked for what scaling needs; one-line InputError otherwise."""
    return check_config(read_json_capped(path, CONFIG_MAX_BYTES, "adapter config"), path)


def check_config(cfg, path) -> dict:
    """A LoraConfig as a dict (from adapter_config.json or another file's metadata), checked for
    what scaling needs; `path` names where it came from in the one-line InputError."""
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    peft_type = cfg.get("peft_type")
    if peft_type is None:
        raise InputError(f'{path}: no "peft_type": not a PEFT adapter config')
    if peft_type != "LORA":
        raise InputError(f'{path}: peft_type is {peft_type!r:.80}; balora reads LoRA adapters (peft_type "LORA")')

    def number(value, name, integer=False):
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        try:  # an integer beyond float range (JSON allows 10**400) is not a rank or an alpha
            ok = ok and not isinstance(value, bool) and math.isfinite(float(value))
        except OverflowError:
            ok = False
        if not ok or (integer and value <= 0):
            want = "a positive integer" if integer else "a finite number"
            raise InputError(f"{path}: {name} must be {want}, got {value!r:.80}")
        return value

    number(cfg.get("r", 8), "r", integer=True)
    number(cfg.get("lora_alpha", 8), "lora_alpha")
    for pat, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        table = cfg.get(pat) or {}
        if not isinstance(table, dict):
            raise InputError(f"{path}: {pat} must be an object mapping module patterns to numbers")
        for k, v in table.items():
            number(v, f"{pat}[{k!r:.80}]", integer)
            _check_pattern(path, pat, k)
    return cfg


def _check_pattern(path: Path, pat: str, key: str) -> None:
    if len(key) > MAX_PATTERN_CHARS:
        raise InputError(f"{path}: {pat} key {key!r:.60} is {len(key)} characters long; at most "
                         f"{MAX_PATTERN_CHARS} are accepted")
    # PEFT compiles with re: a key re refuses is refused here too, whatever `regex` would accept.
    for compile_ in (re.compile, regex.compile):
        try:
            compile_(rf"(.*\.)?({key})$")
        except (re.error, regex.error, RecursionError, OverflowError, ValueError) as e:
            raise InputError(f"{path}: {pat} key {key!r:.80} is not a valid pattern ({e})") from None


def rank_scaling_tables(cfg: dict, where: str = "adapter config") -> tuple[PatternTable, PatternTable]:
    """The config's rank_pattern and alpha_pattern as bounded matchers, built once per config."""
    return (PatternTable(cfg.get("rank_pattern") or {}, "rank_pattern", where),
            PatternTable(cfg.get("alpha_pattern") or {}, "alpha_pattern", where))


def rank_scalings(cfg: dict, rows: dict[str, int], where: str) -> dict[str, tuple[int, float | None]]:
    """config_rank_scaling for every layer of one adapter file ({module: lora_A's rows}), the patterns
    matched once. A stacked-experts layer (target_parameters) holds r x E rows, and two of its
    candidate r can both divide them (r 2 and 3 for 12 rows); the wrappers of one module share E,
    so where exactly one E suits them all, it decides each one's r."""
    tables = rank_scaling_tables(cfg, where)
    allowed: dict[str, set[int]] = {}
    for module, n in rows.items() if cfg.get("target_parameters") else ():
        ranks = {tables[0].get(name, cfg.get("r", 8)) for name in pattern_targets(cfg, module)}
        counts = {n // r for r in ranks if n % r == 0}
        owner = module.replace(".base_layer", "")
        allowed[owner] = allowed[owner] & counts if owner in allowed else counts
    experts = {m: next(iter(allowed.get(m.replace(".base_layer", ""), ()))) for m in rows
               if len(allowed.get(m.replace(".base_layer", ""), ())) == 1}
    return {m: config_rank_scaling(cfg, m, tables, n, experts.get(m)) for m, n in rows.items()}


def config_rank_scaling(cfg: dict, module: str, tables: tuple[PatternTable, PatternTable] | None = None,
                        rows: int | None = None, experts: int | None = None) -> tuple[int, float | None]:
    """(r, s) PEFT gives `module`: rank_pattern / alpha_pattern override r / lora_alpha;
    s = alpha / r, or alpha / sqrt(r) with rsLoRA. `tables`: from rank_scaling_tables(cfg), to
    reuse its matches and time bound across the modules of one adapter. rows: lora_A's rows in
    the file, to tell which targeted parameter a layer wraps (target_parameters: see
    pattern_targets); s is None when that stays ambiguous and the candidates' scalings differ.
    experts: the layer's expert count when known (rank_scalings): the r with r x experts = rows."""
    ranks, alphas = tables or rank_scaling_tables(cfg)
    options = {}
    for name in pattern_targets(cfg, module):
        r = ranks.get(name, cfg.get("r", 8))
        options.setdefault(r, set()).add(alphas.get(name, cfg.get("lora_alpha", 8)) / (
            math.sqrt(r) if cfg.get("use_rslora") else r))
    # The rows are r, or r per expert for a stacked 3-D parameter.
    fits = [r for r in options if experts and r * experts == rows] + [r for r in options if r == rows]
    r = next(iter(fits), next((r for r in options if rows and rows % r == 0), next(iter(options))))
    return r, next(iter(options[r])) if len(options[r]) == 1 else None


def pattern_targets(cfg: dict, module: str) -> list[str]:
    """The names PEFT may have matched rank_pattern / alpha_pattern against for the layer saved as `module`.

    target_parameters: PEFT matches "<module>.<parameter>" and nests one wrapper per parameter of a
    module (saved as <module>, <module>.base_layer, ...) in the module's own parameter order, which
    the file does not record: every targeted parameter of that module is a candidate.
    """
    module = module.removesuffix(_MHA_OUT_PROJ)
    owner = module.replace(".base_layer", "")
    found, targets = [], cfg.get("target_parameters")
    for target in targets if isinstance(targets, list) else ():  # PEFT takes a list of names only
        key = f"{owner}.{str(target).rpartition('.')[2]}"
        if key == target or key.endswith(f".{target}"):
            found.append(key)
    return found or [module]


# PEFT's LoRA on nn.MultiheadAttention also wraps the attention's out_proj, saved as
# <attention>.base_layer.out_proj, with the r and alpha it gave the attention module.
_MHA_OUT_PROJ = ".base_layer.out_proj"


def variant_skip(cfg: dict) -> str | None:
    """Why every pair of this config is skipped (a variant whose dW is not s B A), else None."""
    used = [k for k in NON_PRODUCT_VARIANTS if cfg.get(k)]
    if cfg.get("init_lora_weights") == "mica":
        used.append("init_lora_weights='mica'")
    if cfg.get("use_bdlora") and not isinstance(cfg["use_bdlora"], dict):  # no lists to tell the modules by
        used.append("use_bdlora")
    return f"LoRA variant ({', '.join(used)}) is not a plain s B @ A product" if used else None


def bdlora_skip(cfg: dict, module: str) -> str | None:
    """Why BD-LoRA (use_bdlora) leaves the pair of `module` alone, else None (a dense pair: dW = s B A).

    PEFT makes lora_A (lora_B) block-diagonal in the modules whose name contains a string of
    target_modules_bd_a (_bd_b), and saves it as its blocks side by side: (r, in / nblocks)
    ((out, r / nblocks)). The words are live.py's for the same pair.
    """
    bd = cfg.get("use_bdlora")
    for factor, key in (("lora_A", "target_modules_bd_a"), ("lora_B", "target_modules_bd_b")):
        names = bd.get(key) if isinstance(bd, dict) else None
        if isinstance(names, list) and any(isinstance(n, str) and n in module for n in names):
            return (f"BD-LoRA: {factor} is block-diagonal ({bd.get('nblocks', '?')} blocks), not a dense B @ A pair; "
                    "balancing would fill its zero blocks")
    return None
