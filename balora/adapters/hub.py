"""Hugging Face Hub ids as adapter sources: `user/name` or `user/name@revision`.

Only the adapter's own files are fetched (configs and LoRA weights, never a base model's
shards), through huggingface_hub's cache, so HF_HUB_OFFLINE, HF_HOME and HF_HUB_CACHE work as
they do for transformers. A string naming an existing local path always means that path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from balora.errors import InputError

# What an adapter repository holds: PEFT folders (also one level down, e.g. checkpoint-N/),
# diffusers' pytorch_lora_weights.safetensors and kohya/LyCORIS single files (a snapshot with one
# .safetensors reads as that file: wild.read_folder_of_one_file). fnmatch's `*`
# crosses `/`, so "*.safetensors" matches at any depth; the ignore list keeps out the weights
# of whole models that some repositories ship beside an adapter.
ADAPTER_PATTERNS = ["*adapter_config.json", "*adapter_model.safetensors", "*adapter_model.bin", "*.safetensors"]
MODEL_PATTERNS = [
    "*model-*-of-*.safetensors", "model.safetensors", "*/model.safetensors",
    "*diffusion_pytorch_model*.safetensors", "*consolidated*.safetensors",
]

# A LoRA adapter is megabytes, rarely a few GB; a base model's single-file checkpoint matches "*.safetensors"
# too (sd_xl_base_1.0.safetensors is 6.9 GB, flux1-dev.safetensors 24 GB). Online, the files a download
# would fetch are sized first (one Hub API call) and a total above this is refused, naming the largest:
# a base model's id typed by mistake, or typed into a shared dashboard, must not fill the disk.
MAX_DOWNLOAD_ENV = "BALORA_HUB_MAX_GB"
MAX_DOWNLOAD_GB = 5.0

# user/name with Hub's allowed characters, then an optional @revision (branch, tag or commit).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})(?:@(?P<revision>[\w./-]{1,255}))?$")


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    revision: str | None
    path: Path  # the snapshot folder in the cache
    root: Path  # the repository's cache folder: snapshot files are symlinks into its blobs/


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) when `text` has the shape of a Hub id, else None."""
    m = _HUB_ID.match(text)
    if m is None or ".." in text:  # the pattern's first character already rules out /, ~ and ./
        return None
    return m.group("repo"), m.group("revision")


def resolve_source(source) -> Path | HubSource:
    """A local path (existing, or not shaped like a Hub id) as a Path; a Hub id as a HubSource.

    Paths win: `user/name` that exists on disk is read from disk. A Hub id is downloaded into
    (or found in) the Hugging Face cache; offline and not cached is a one-line InputError.
    """
    if isinstance(source, Path):
        return source
    if not isinstance(source, (str, os.PathLike)):  # str() of a live model is its repr: "File name too long"
        live = " (a live model: balora.layer_report(model) reports it, balora.balance_(model) balances it)"
        raise TypeError(f"an adapter is read from a folder, a weights file or a Hub id user/name; got a "
                        f"{type(source).__name__}" + (live if hasattr(source, "named_modules") else ""))
    text = str(source)
    if not text.strip():  # Path("") is the current folder: an unset shell variable would read it, and below
        raise InputError("an empty path: give an adapter folder, a weights file or a Hub id user/name")
    path = Path(text).expanduser()
    if path.exists() or path.is_symlink():
        return path
    parsed = parse_hub_id(text)
    if parsed is None:
        return path  # the readers give their own "no such file" message
    return download_adapter(*parsed)


def download_adapter(repo_id: str, revision: str | None = None) -> HubSource:
    """The snapshot folder holding `repo_id`'s adapter files, fetched through the Hub cache."""
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        raise InputError(f"{repo_id}: reading Hub ids needs huggingface_hub (pip install huggingface_hub)") from None
    name = f"{repo_id}@{revision}" if revision else repo_id
    cache = Path(constants.HF_HUB_CACHE)
    try:
        if not constants.HF_HUB_OFFLINE:
            _check_download_size(repo_id, revision, name)
        snapshot = Path(snapshot_download(
            repo_id, revision=revision, allow_patterns=ADAPTER_PATTERNS, ignore_patterns=MODEL_PATTERNS,
            local_files_only=bool(constants.HF_HUB_OFFLINE), etag_timeout=10,
        ))
    except LocalEntryNotFoundError as e:
        how = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        if getattr(e, "snapshot_path", None):  # IncompleteSnapshotError: files of its cached tree listing are missing
            raise InputError(
                f"{name}: only part of it is in the Hugging Face cache (files are missing from {e.snapshot_path}: "
                f"an interrupted download?) while {how}; download it again where there is network access"
            ) from None
        raise InputError(
            f"{name}: not a local path, and not in the Hugging Face cache ({cache}) while {how}; "
            "download it where there is network access, or give a local path"
        ) from None
    except RevisionNotFoundError:
        raise InputError(f"{name}: the Hub repository has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise InputError(f"{name}: no such model repository on the Hub (or it is private: log in with `hf auth login`)") from None
    except HFValidationError as e:
        raise InputError(f"{name}: not a valid Hub id ({str(e).splitlines()[0]})") from None
    except OSError as e:  # network failures that huggingface_hub does not wrap
        raise InputError(f"{name}: could not fetch from the Hub ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not any(p.is_file() for p in snapshot.rglob("*")):
        raise InputError(
            f"{name}: the Hub repository holds no adapter files (looked for adapter_config.json, "
            "adapter_model.safetensors/.bin and LoRA .safetensors files)"
        )
    # <cache>/models--user--name/snapshots/<commit>: its files link into <cache>/models--user--name/blobs.
    return HubSource(repo_id=repo_id, revision=revision, path=snapshot, root=snapshot.parent.parent)


def max_download_bytes() -> float:
    """The most a Hub id may download: $BALORA_HUB_MAX_GB gigabytes, else MAX_DOWNLOAD_GB."""
    text = os.environ.get(MAX_DOWNLOAD_ENV, "").strip()
    if not text:
        return MAX_DOWNLOAD_GB * 1e9
    try:
        gb = float(text)
    except ValueError:
        gb = float("nan")
    if not gb > 0:  # also NaN
        raise InputError(f"{MAX_DOWNLOAD_ENV}={text!r}: give a number of gigabytes > 0 (default {MAX_DOWNLOAD_GB:g})")
    return gb * 1e9


def _check_download_size(repo_id: str, revision: str | None, name: str) -> None:
    """Refuse before downloading when the files snapshot_download would fetch exceed max_download_bytes().
    Raises what model_info raises for a missing repository or revision (the caller words those); when
    the Hub cannot be reached, checks nothing: snapshot_download then reads the cache or says it cannot."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    limit = max_download_bytes()
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, timeout=10)
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError):
        raise
    except Exception:  # no network, a proxy, a timeout (httpx and requests errors are not OSErrors)
        return
    files = list(filter_repo_objects(info.siblings or [], allow_patterns=ADAPTER_PATTERNS,
                                     ignore_patterns=MODEL_PATTERNS, key=lambda f: f.rfilename))
    total = sum(f.size or 0 for f in files)
    if total > limit:
        largest = sorted(files, key=lambda f: -(f.size or 0))[:3]
        listed = ", ".join(f"{f.rfilename} ({(f.size or 0) / 1e9:.1f} GB)" for f in largest)
        raise InputError(
            f"{name}: its files that could hold an adapter come to {total / 1e9:.1f} GB ({listed}), more than "
            f"{limit / 1e9:g} GB: is it a base model rather than an adapter? Give a LoRA repository, or set "
            f"{MAX_DOWNLOAD_ENV} to a larger number of gigabytes to download it anyway"
        )
