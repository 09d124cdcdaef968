"""Adapters on disk, without their base model: per-layer report (`inspect`) and a balanced copy (`balance_file`).

The numbers are balora.report's (`pair_rows`) and the balancing is balora.balance's
(`balance_pairs`); this module only feeds them factor pairs read by balora.adapters.reading,
a bounded chunk at a time, and checks the written copy before it is moved into place.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch

from balora.adapters.entries import PairEntry
from balora.adapters.hub import HubSource, resolve_source
from balora.adapters.reading import AdapterSource, iter_pair_chunks, read_adapters
from balora.adapters.tensor_file import TensorFile
from balora.adapters.writing import (WEIGHT_SUFFIXES, check_destination, check_weights_suffix, copy_adapter_files,
                                    copy_metadata, staged_output, write_weights)
from balora.balance import BalanceError, balance_pairs
from balora.errors import InputError
from balora.imbalance import rel_imbalance
from balora.linalg import all_finite, compute_dtype
from balora.policy import BalancePolicy
from balora.precision import cast_overflow, storage_dtype
from balora.projection import product_rel_error
from balora.report import PRECISION_LOSS, REPORT_COLUMNS, pair_rows, to_frame
from balora.safe_io import listed, printable, user_path

# Where each row comes from, then the layer report columns.
INSPECT_COLUMNS: dict[str, str] = {
    "source": "string",  # the weights file
    "checkpoint": "string",  # "checkpoint-N" in a Trainer output folder, else ""
    "step": "Int64",  # N of checkpoint-N; <NA> outside a Trainer folder
    **REPORT_COLUMNS,
}

CHANGE_COLUMNS: dict[str, str] = {
    "source": "string",
    "module": "string",
    "adapter": "string",
    "action": "string",  # "balanced" or "unchanged"
    "reason": "string",  # why a pair was left unchanged, else ""
    "rel_imbalance_before": "float64",
    "rel_imbalance_after": "float64",
    "dW_rel_change": "float64",  # ||B'A' - BA||_F / ||BA||_F of the written factors (float64)
}


def local_path(source) -> Path:
    """`source` as a path on this machine: itself, or for a Hugging Face Hub id (`user/name[@revision]`, or
    `/path/in/repo` after it; an existing local path always wins) its snapshot in the Hub cache, or that path."""
    found = resolve_source(source)
    return found.path if isinstance(found, HubSource) else found


def inspect(path, adapter: str | None = None) -> pd.DataFrame:
    """Per-layer report of the adapter(s) at `path`, read from files alone.

    path: a Hugging Face Hub id (`user/name[@revision]`, adapter files only, through the Hub
        cache; HF_HUB_OFFLINE honoured; `user/name[@revision]/path/in/repo` one file or folder), a PEFT adapter folder (several adapters in its tree are all read), a Trainer output
        folder (every checkpoint-N, ordered by N), a kohya LoRA .safetensors, or a .safetensors/.bin
        with PEFT key names (scaling then unknown: NaN, and sigma is of the unscaled B A).
    Returns INSPECT_COLUMNS: source, checkpoint, step, then balora.REPORT_COLUMNS with the same
    numbers balora.layer_report gives for the live model. Pairs that cannot be measured (grouped
    conv, other LoRA variants, NaN/Inf values) keep a row whose `status` says why.
    `df.attrs["sources"]` describes each file read (format, notes, safetensors metadata such as ss_*).
    """
    sources = read_adapters(local_path(path), adapter)
    rows: list[dict] = []
    for src in sources:
        src_rows = []
        with torch.no_grad():
            for chunk in iter_pair_chunks(src):
                src_rows += pair_rows(chunk, precision=True)
        src_rows += [_skipped_row(e) for e in src.entries if e.skip_reason is not None]
        order = {(e.module, e.adapter): i for i, e in enumerate(src.entries)}
        src_rows.sort(key=lambda row: order[(row["module"], row["adapter"])])
        for row in src_rows:
            row.update(source=str(src.weights), checkpoint=src.checkpoint, step=src.step)
        rows += src_rows
    df = to_frame(rows, INSPECT_COLUMNS)
    df.attrs["sources"] = [src.describe() for src in sources]
    return df


def _skipped_row(e: PairEntry) -> dict:
    nan = float("nan")
    row = {c: nan for c, dtype in REPORT_COLUMNS.items() if dtype == "float64"}
    row.update(
        module=e.module, adapter=e.adapter, kind=e.kind, out_features=e.out_features, in_features=e.in_features,
        r=e.r, scaling=nan if e.scaling is None else e.scaling, dora=e.dora,
        dtype=str(e.dtype).removeprefix("torch."), rank=0, sigma=[], sigma_A=[], sigma_B=[],
        status=f"skipped: {e.skip_reason}", note="",
    )
    return row


@dataclass
class FileBalanceSummary:
    """What `balance_file` wrote."""

    src: str
    dst: str
    format: str  # "peft", "kohya" or "bare"
    method: str
    balanced: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # "module[adapter]" -> why it was copied unchanged
    rank_deficient: dict[str, int] = field(default_factory=dict)
    max_rel_error: float = float("nan")  # max dW_rel_change over balanced pairs, measured on the written file
    max_rel_imbalance_before: float = float("nan")
    max_rel_imbalance_after: float = float("nan")
    dtype: str = ""  # "float16"/"bfloat16" when written in that dtype (max_rel_error then includes the cast)
    files: list[str] = field(default_factory=list)  # weights files written
    notes: list[str] = field(default_factory=list)
    changes: pd.DataFrame = field(default_factory=lambda: to_frame([], CHANGE_COLUMNS))  # CHANGE_COLUMNS
    seconds: float = 0.0

    def __str__(self) -> str:
        """Lines for a terminal; module names, paths and notes with control characters escaped
        (each line is built whole, then escaped: a newline inside a name cannot start a line)."""
        lines = [
            f"wrote {self.dst} ({self.format}, method {self.method}{', in ' + self.dtype if self.dtype else ''}): "
            f"balanced {self.balanced} LoRA pair(s), {len(self.skipped)} unchanged, in {self.seconds:.2f} s"
        ]
        if self.dtype:
            lines += _cast_lines(self)
        elif self.balanced:
            lines.append(
                f"  max rel_imbalance {self.max_rel_imbalance_before:.3g} -> {self.max_rel_imbalance_after:.2e}, "
                f"max relative change of dW {self.max_rel_error:.2e}"
            )
        by_reason: dict[str, list[str]] = {}
        for name, why in self.skipped.items():
            by_reason.setdefault(why, []).append(name)
        for why, names in by_reason.items():
            lines.append(f"  unchanged: {listed(names, 3)}: {why}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(printable(line) for line in lines)


def _refuse_file_for_folder(src: Path, dst_text: str) -> None:
    """`balance lora.safetensors out/` would write a file named `out`: the slash, which Path() drops, said
    a folder. Refused, with the name to give instead."""
    if dst_text.endswith(("/", os.sep)) and not src.is_dir():
        raise InputError(f"{Path(dst_text)}/: ends with / (a folder) but {src} is a file; name the output file, "
                         f"e.g. {Path(dst_text) / src.name}")


def balance_file(src, dst, method: str = "nearest", on_rank_deficient: str = "skip", *,
                 force: bool = False, dtype: str | torch.dtype | None = None) -> FileBalanceSummary:
    """Write a balanced copy of the adapter at `src` (a path or a Hub id) to `dst`, in the input's own format.

    Same keys, dtypes, shapes, config and metadata; every dW = s B A is unchanged (the
    written file is re-read and checked: relative change <= 1e-5 in fp32, a few ulps of the
    factors' dtype in bf16/fp16). Everything is built in a temporary folder next to `dst`
    and moved into place only when the whole result checks out, so on any error nothing is
    written. From a PEFT folder only the adapter's own files are copied (config, README, tokenizer
    and checkpoint files, as regular files; never a link out of src, a FIFO or a device), with its
    weights balanced; what was left out is listed in `notes`. Refuses a Trainer output folder
    (balance one checkpoint-N), a dst inside src, and an existing dst unless force; even with
    force, a dst that is not a regular file, an empty folder or an adapter folder.

    method: "nearest" (the balanced pair closest to the stored one) or "svd" (the paper's gauge).
    on_rank_deficient: "skip" (copy such pairs unchanged), "balance" or "raise".
    dtype: "float16" or "bfloat16": every floating tensor but `.alpha` scales (kohya, LyCORIS, Flux-style
        diffusers; kept) in that dtype, balanced first so small factors survive the cast; each pair's
        dW_rel_change is the written file's against the original, cast included; an overflowing cast is refused.
    """
    t0 = time.perf_counter()
    BalancePolicy(method, on_rank_deficient)  # the one check (PolicyError) before anything is read or written
    try:
        target = storage_dtype(dtype)
    except ValueError as e:
        raise InputError(str(e)) from e
    src, dst, dst_text = local_path(src), user_path(dst), str(dst)  # OUT's ~ as IN's; Hub fetched only for valid options
    sources = read_adapters(src)
    given, src = src, _file_for_file_name(src, sources, dst_text)
    _refuse_trainer_folder(src, sources)
    _refuse_file_for_folder(src, dst_text)
    check_weights_suffix(src, dst)
    check_destination(src, dst, force, [s.weights for s in sources], given)

    summary = FileBalanceSummary(str(src), str(dst), sources[0].format, method,
                                 dtype=str(target).removeprefix("torch.") if target else "")
    changes: list[dict] = []
    with staged_output(dst, force) as staged:
        if src.is_dir():
            _copy_adapter_folder(src, staged, sources, summary)
        for s in sources:
            out_path = staged / s.weights.relative_to(src) if src.is_dir() else staged
            changes += _balance_source(s, out_path, method, on_rank_deficient, summary, target)
            summary.files.append(str(dst / s.weights.relative_to(src)) if src.is_dir() else str(dst))
            summary.notes += [n for n in s.notes if "also present" in n]
            if src.is_dir() and (out_path.parent / "optimizer.pt").is_file():
                summary.notes.append(
                    f"{s.weights.parent / 'optimizer.pt'} copied unchanged: its moments refer to the unbalanced factors"
                )
    summary.changes = to_frame(changes, CHANGE_COLUMNS)
    done = summary.changes[summary.changes["action"] == "balanced"]
    if target is not None:  # every pair was cast: its error against the original counts
        summary.max_rel_error = float(summary.changes["dW_rel_change"].max())
    elif len(done):
        summary.max_rel_error = float(done["dW_rel_change"].max())
    if len(done):
        summary.max_rel_imbalance_before = float(done["rel_imbalance_before"].max())
        summary.max_rel_imbalance_after = float(done["rel_imbalance_after"].max())
    summary.seconds = time.perf_counter() - t0
    return summary


def _file_for_file_name(src: Path, sources: list[AdapterSource], dst_text: str) -> Path:
    """The weights file itself when a folder (a Hub repository) holding one adapter file and no config
    (diffusers, kohya) is balanced to a weights file name: else the copy was a folder so named. A name
    for the other format (out.bin for a .safetensors) is then refused as for the file itself."""
    one = sources[0] if len(sources) == 1 and not sources[0].config_path else None
    return one.weights if src.is_dir() and one is not None and Path(dst_text).suffix in WEIGHT_SUFFIXES else src


def _refuse_trainer_folder(src: Path, sources: list[AdapterSource]) -> None:
    if any(s.reader == "trainer" for s in sources):
        last = next(s for s in reversed(sources) if s.checkpoint.startswith("checkpoint-"))
        n = len({s.checkpoint for s in sources if s.checkpoint.startswith("checkpoint-")})
        final = next((s.weights for s in sources if s.checkpoint == "final"), None)  # .safetensors or .bin, as saved
        raise InputError(  # the file's own suffix on OUT: without one balora, PEFT and diffusers cannot read it
            f"{src}: a Trainer output folder with {n} checkpoint(s){' and a final adapter' if final else ''}; "
            f"balance one at a time, e.g. balora balance {src / last.checkpoint} OUT"
            + (f" (the final adapter's weights: balora balance {final} OUT{final.suffix})" if final else "")
        )


def _copy_adapter_folder(src: Path, staged: Path, sources: list[AdapterSource], summary: FileBalanceSummary) -> None:
    """The adapter's own files beside its weights (not the weights: those are written balanced)."""
    folders = [src] + [s.weights.parent for s in sources]
    left_out = copy_adapter_files(src, staged, folders, skip={s.weights for s in sources})
    if left_out:
        summary.notes.append(f"left out of the copy: {listed(left_out, 5)}")


def _tolerance(dtype: torch.dtype, r: int) -> float:
    """Largest relative change of dW accepted: 1e-5 in fp32/fp64; in half precision, rounding
    the balanced factors alone can move s B A by up to ~eps * sqrt(r) (both factors, r terms)."""
    if torch.finfo(dtype).bits >= 32:
        return 1e-5
    return 1e-5 + torch.finfo(dtype).eps * math.sqrt(r)


def _balance_source(s: AdapterSource, out_path: Path, method: str, on_rank_deficient: str,
                    summary: FileBalanceSummary, target: torch.dtype | None = None) -> list[dict]:
    """Balance every pair of one weights file, write it to out_path in the same format and
    check the written file against the original. Returns one change row per pair."""
    tensors = s.tensors.get(s.tensors.keys())  # every key is written back, so all are needed
    todo = [e for e in s.entries if e.skip_reason is None]
    rows: dict[str, dict] = {}
    nonfinite: list[str] = []
    for chunk in iter_pair_chunks(s, todo, tensors=tensors):
        A = torch.stack([p.A for p in chunk])  # (G, r, in), own dtype: float64 beyond fp32's range stays finite
        B = torch.stack([p.B for p in chunk])  # (G, out, r)
        finite = all_finite(A) & all_finite(B)  # (G,)
        nonfinite += [p.name for p, ok in zip(chunk, finite.tolist()) if not ok]
        before = rel_imbalance(torch.nan_to_num(A), torch.nan_to_num(B)).tolist()
        if target is not None and A.dtype != target:  # balanced in fp32+, rounded once to target (via bf16, fp16 lost 8x)
            chunk = [replace(p, A=p.A.to(ct), B=p.B.to(ct)) for ct in [compute_dtype(A.dtype, B.dtype)] for p in chunk]
        try:
            new, part = balance_pairs(chunk, method, on_rank_deficient, on_nonfinite="skip", check=False)
        except BalanceError as e:
            raise InputError(f"{s.weights}: {e}") from e
        summary.skipped.update(part.skipped)
        summary.rank_deficient.update(part.rank_deficient)
        for i, p in enumerate(chunk):
            e = p.extra["entry"]
            rows[e.name] = _change_row(s, e, before[i], i in new, part.skipped.get(p.name, ""))
            if i in new:
                A_new, B_new = new[i]
                # copy: views into one batch share storage, which safetensors refuses to save
                tensors[e.key_A] = A_new.reshape(e.shape_A).to(target or e.dtype, copy=True)
                tensors[e.key_B] = B_new.reshape(e.shape_B).to(target or e.dtype, copy=True)
                # DoRA's magnitude vector is kept as is: it normalises W0 + dW, and dW is unchanged.
    if nonfinite:
        raise InputError(f"{s.weights}: non-finite values (NaN/Inf) in {listed(nonfinite, 5)}; nothing was written")
    for e in s.entries:
        if e.skip_reason is not None:
            summary.skipped[e.name] = e.skip_reason
            rows[e.name] = _change_row(s, e, float("nan"), False, e.skip_reason)
            if target is not None:
                rows[e.name]["dW_rel_change"] = float("nan")  # cast, but not a B @ A pair to measure

    if target is not None:
        tensors = _cast(tensors, target)
    changed = target is not None or any(r["action"] == "balanced" for r in rows.values())
    metadata, dropped = copy_metadata(s.tensors.metadata, changed)
    if dropped:
        summary.notes.append(f"{', '.join(dropped)} left out of {out_path.name}'s metadata: they hash the original tensors")
    write_weights(s.tensors, out_path, tensors, metadata)
    del tensors
    # In another dtype every pair changes: all are measured against the original.
    checked = todo if target is not None else [e for e in todo if rows[e.name]["action"] == "balanced"]
    _verify(s, out_path, checked, rows, target, metadata)
    summary.balanced += sum(r["action"] == "balanced" for r in rows.values())
    return [rows[e.name] for e in s.entries]


def _change_row(s: AdapterSource, e: PairEntry, before: float, balanced: bool, reason: str) -> dict:
    return {"source": str(s.weights), "module": e.module, "adapter": e.adapter,
            "action": "balanced" if balanced else "unchanged", "reason": "" if balanced else reason,
            "rel_imbalance_before": before, "rel_imbalance_after": float("nan") if balanced else before,
            "dW_rel_change": float("nan") if balanced else 0.0}


def _verify(s: AdapterSource, out_path: Path, balanced: list[PairEntry], rows: dict[str, dict],
            target: torch.dtype | None, metadata: dict | None) -> None:
    """Re-read the written file: same keys, shapes, dtypes (or `target` for floating tensors) and
    metadata; other tensors bit-identical (to their cast); every balanced dW within tolerance, or,
    with `target`, every measured dW finite. Raises (nothing is moved) otherwise."""
    written = TensorFile(out_path, format=s.tensors.format)
    where = f"balanced copy of {s.weights}"
    dtypes = {k: _cast_dtype(k, d, target) for k, d in s.tensors.dtypes.items()}
    if written.shapes != s.tensors.shapes or written.dtypes != dtypes:
        raise BalanceError(f"{where}: keys, shapes or dtypes differ from the input; nothing was written")
    if (written.metadata or {}) != (metadata or {}):  # the input's, less CONTENT_HASHES when changed
        raise BalanceError(f"{where}: safetensors metadata differs from the input; nothing was written")

    changed = {k for e in balanced for k in (e.key_A, e.key_B)}
    bad, overflow = [], []
    for keys in _key_batches(s.tensors, [k for k in s.tensors.keys() if k not in changed]):
        old, new = s.tensors.get(keys), written.get(keys)
        if target is not None:  # not factors measured below (DoRA magnitudes, modules_to_save): inf once cast?
            overflow += cast_overflow(old, new)
            old = _cast(old, target)
        for k in keys:
            if not torch.equal(_raw_bytes(old[k]), _raw_bytes(new[k])):
                raise BalanceError(f"{where}: {k} should be copied unchanged but differs; nothing was written")

    for old_chunk, new_chunk in zip(iter_pair_chunks(s, balanced), iter_pair_chunks(s, balanced, tensors=written)):
        A0 = torch.stack([p.A for p in old_chunk])  # (G, r, in)
        B0 = torch.stack([p.B for p in old_chunk])  # (G, out, r)
        A1 = torch.stack([p.A for p in new_chunk])
        B1 = torch.stack([p.B for p in new_chunk])
        err = product_rel_error(A0, B0, A1, B1).tolist()
        after = rel_imbalance(A1, B1).tolist()  # float64 Grams of the factors as written (any dtype)
        for p, e_, a in zip(old_chunk, err, after):
            e = p.extra["entry"]
            rows[e.name].update(dW_rel_change=e_, rel_imbalance_after=a)
            if target is not None and not math.isfinite(e_):
                overflow.append(e.name)
            elif target is None and not e_ <= _tolerance(e.dtype, e.r):
                bad.append(f"{e.name} (relative change {e_:.2e})")
    if overflow:  # the data, not balora: a one-line input error
        raise InputError(f"{where}: {', '.join(overflow[:5])} overflow {str(target).removeprefix('torch.')} (LoRA "
                         "factors: even balanced); write float32 (no --dtype) or bfloat16; nothing was written")
    if bad:
        raise BalanceError(f"{where}: dW would change in {', '.join(bad[:5])}; nothing was written")


def _cast_lines(summary: FileBalanceSummary) -> list[str]:
    """What writing in summary.dtype did to dW, against the original file."""
    lines = [f"  max relative change of dW against the original, the cast to {summary.dtype} included: "
             f"{summary.max_rel_error:.2e}"]
    lossy = summary.changes[summary.changes["dW_rel_change"] > PRECISION_LOSS]
    if len(lossy):
        names = [f"{m}[{a}]" for m, a in zip(lossy["module"], lossy["adapter"])]
        lines.append(f"  dW changes by more than {PRECISION_LOSS:g} in {listed(names, 3)} "
                     "(pairs left unbalanced keep their risk)")
    return lines


def _cast_dtype(key: str, dtype: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    """`target` for floating tensors but `.alpha` scales (any format's), which set dW's scale (in fp16 0.1 moves it)."""
    return target if target is not None and dtype.is_floating_point and not key.endswith(".alpha") else dtype


def _cast(tensors: dict[str, torch.Tensor], target: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: t.to(_cast_dtype(k, t.dtype, target)) for k, t in tensors.items()}


def _key_batches(tf: TensorFile, keys: list[str], max_bytes: int = 64 * 2**20):
    batch, size = [], 0
    for k in keys:
        batch.append(k)
        size += tf.nbytes(k)
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so NaN payloads compare equal to themselves."""
    return t.contiguous().reshape(-1).view(torch.uint8)
