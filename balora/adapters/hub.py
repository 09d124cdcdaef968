"""Hugging Face Hub sources of adapters: `user/name[@revision]`, a folder or one weights file in it
(`user/name[@revision]/path/in/repo.safetensors`, `hf://...`, a copied https://huggingface.co/... address:
the forms are hub_names').

Only the adapter's own files are fetched (configs and LoRA weights, never a base model's
shards; for a named file, that file), through huggingface_hub's cache, so HF_HUB_OFFLINE, HF_HOME and
HF_HUB_CACHE work as they do for transformers. A string naming an existing local path always means that path.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

from balora.adapters.hub_names import HUB_FILE_SUFFIXES, HubRef, parse_hub_ref
from balora.adapters.reading import check_inside
from balora.errors import InputError
from balora.safe_io import listed, user_path

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

# A PEFT weights file named by itself: its adapter_config.json (r, lora_alpha) is fetched with it.
PEFT_WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    revision: str | None
    path: Path  # the snapshot folder in the cache, or the folder or file named inside it
    root: Path  # the repository's cache folder: snapshot files are symlinks into its blobs/


def resolve_source(source) -> Path | HubSource:
    """A local path (existing, or not shaped like a Hub source) as a Path; a Hub source as a HubSource.

    Paths win: `user/name` that exists on disk is read from disk. A Hub source is downloaded into
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
    path = user_path(text)
    if path.exists() or path.is_symlink():
        return path
    ref = parse_hub_ref(text)
    if ref is None or _under_local_folder(text, ref):
        return path  # the readers give their own "no such file" message
    return download_ref(ref)


def _under_local_folder(text: str, ref: HubRef) -> bool:
    """`outputs/run1/checkpoint-50O` where outputs/run1 is a folder here: a typo of a local path. Its "user/name"
    must not be looked up on the Hub (nor the user told to log in): the folder here wins, as a whole path does."""
    return bool(ref.path) and text.startswith(ref.repo_id + "/") and Path(ref.repo_id).is_dir()


def download_ref(ref: HubRef) -> HubSource:
    """What `ref` names, fetched through the Hub cache: one weights file (and, for a PEFT weights file, the
    adapter_config.json beside it), or the adapter files of the repository or of one folder in it."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.errors import LocalEntryNotFoundError, RevisionNotFoundError
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        raise InputError(f"{ref.name}: reading Hub ids needs huggingface_hub (pip install huggingface_hub)") from None
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return _fetch(ref, offline)
    # Offline, the cache's refs/feature is the folder of the branch feature/x: reading it as a ref fails so.
    except (RevisionNotFoundError, LocalEntryNotFoundError, IsADirectoryError) as first:
        if ref.fallback is None:
            raise _hub_error(ref, first) from None
        try:  # user/name@feature/x: no revision "feature" (or not cached); the branch "feature/x" as before
            return _fetch(ref.fallback, offline)
        except (RevisionNotFoundError, LocalEntryNotFoundError, IsADirectoryError):
            raise _hub_error(ref, first) from None
        except Exception as e:  # the branch exists: what is wrong with it
            raise _hub_error(ref.fallback, e) from None
    except Exception as e:
        raise _hub_error(ref, e) from None


def _fetch(ref: HubRef, offline: bool) -> HubSource:
    """download_ref without the wording of errors: raises what huggingface_hub raises."""
    from huggingface_hub import snapshot_download

    # Unsized (the Hub's API did not answer), nothing is downloaded: only what the cache holds is read.
    cache_only = offline or not _check_download_size(ref)
    if ref.is_file:
        found = _download_file(ref, cache_only)
        snapshot = found.parents[ref.path.count("/")]
        # Named here, but not by the user: the repository folder bounds it, as it bounds a folder of the snapshot.
        check_inside(found, snapshot.parent.parent, "the Hub file")
    else:
        snapshot = Path(snapshot_download(
            ref.repo_id, revision=ref.revision, allow_patterns=_patterns(ref), ignore_patterns=MODEL_PATTERNS,
            local_files_only=cache_only, etag_timeout=10,
        ))
        found = snapshot / ref.path if ref.path else snapshot
        if not found.is_dir() or not any(p.is_file() for p in found.rglob("*")):
            where = f" has no folder {ref.path}, or it" if ref.path else ""
            raise InputError(
                f"{ref.name}: the Hub repository{where} holds no adapter files (looked for adapter_config.json, "
                "adapter_model.safetensors/.bin and LoRA .safetensors files)"
            )
    # <cache>/models--user--name/snapshots/<commit>: its files link into <cache>/models--user--name/blobs.
    return HubSource(repo_id=ref.repo_id, revision=ref.revision, path=found, root=snapshot.parent.parent)


def _patterns(ref: HubRef) -> list[str]:
    """ADAPTER_PATTERNS, under the folder `ref` names (fnmatch's `*` crosses `/`: at any depth below it). The folder's
    own name is escaped: run[1] would match run1/, and * every folder."""
    return [f"{glob.escape(ref.path)}/{p}" for p in ADAPTER_PATTERNS] if ref.path else ADAPTER_PATTERNS


def _download_file(ref: HubRef, cache_only: bool) -> Path:
    """One file of the repository, through the cache; a PEFT weights file brings its adapter_config.json
    (a few hundred bytes that hold its scaling), when the repository has one beside it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    found = Path(hf_hub_download(ref.repo_id, ref.path, revision=ref.revision, local_files_only=cache_only, etag_timeout=10))
    config = _config_beside(ref.path)
    if config is not None:
        try:
            hf_hub_download(ref.repo_id, config, revision=ref.revision, local_files_only=cache_only, etag_timeout=10)
        except (EntryNotFoundError, _remote_entry_error()):  # no config: read as bare PEFT weights, scaling unknown
            pass
    return found


def _config_beside(path: str) -> str | None:
    """The adapter_config.json fetched with the repository file `path` when it is a PEFT weights file, else None."""
    folder, _, name = path.rpartition("/")
    if name not in PEFT_WEIGHT_NAMES:
        return None
    return f"{folder}/adapter_config.json" if folder else "adapter_config.json"


def _remote_entry_error() -> type[Exception]:
    """huggingface_hub >= 1.0 raises RemoteEntryNotFoundError for a file the Hub does not have (before: EntryNotFoundError)."""
    from huggingface_hub import errors

    return getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)


def _hub_error(ref: HubRef, e: Exception) -> Exception:
    """The one-line InputError for what huggingface_hub raised while fetching `ref`."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    name, cache = ref.name, Path(constants.HF_HUB_CACHE)
    if isinstance(e, InputError):
        return e
    if isinstance(e, (LocalEntryNotFoundError, IsADirectoryError)):  # the latter: refs/feature, a folder of refs
        how = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        if getattr(e, "snapshot_path", None):  # IncompleteSnapshotError: files of its cached tree listing are missing
            return InputError(
                f"{name}: only part of it is in the Hugging Face cache (files are missing from {e.snapshot_path}: "
                f"an interrupted download?) while {how}; download it again where there is network access"
            )
        cached = _cached_weights(ref, cache) if ref.is_file else ""
        if cached:  # the repository is cached, this file of it not (a typo, or another epoch's file): say what is
            return InputError(f"{name}: {ref.path} is not among the files of {ref.repo_id} in the Hugging Face cache "
                              f"while {how}; its cached weights files: {cached}")
        return InputError(
            f"{name}: not a local path, and not in the Hugging Face cache ({cache}) while {how}; "
            "download it where there is network access, or give a local path"
        )
    if isinstance(e, RevisionNotFoundError):
        hint = f" (nor {ref.fallback.revision!r}; a branch with / in its name is written {ref.fallback.name})" if ref.fallback else ""
        return InputError(f"{name}: the Hub repository has no revision {ref.revision!r}{hint}")
    if isinstance(e, GatedRepoError):  # a RepositoryNotFoundError too, but the repository is there
        return InputError(f"{name}: a gated repository: accept its conditions at https://huggingface.co/{ref.repo_id} "
                          "and log in here as that user (`hf auth login`)")
    if isinstance(e, RepositoryNotFoundError):
        return InputError(f"{name}: not a local path, and no such model repository on the Hub (or it is private: "
                          "log in with `hf auth login`)")
    if isinstance(e, (EntryNotFoundError, _remote_entry_error())):
        return InputError(f"{name}: the Hub repository {ref.repo_id} has no file {ref.path}")
    if isinstance(e, HFValidationError):
        return InputError(f"{name}: not a valid Hub id ({str(e).splitlines()[0]})")
    if isinstance(e, OSError):  # network failures that huggingface_hub does not wrap
        return InputError(f"{name}: could not fetch from the Hub ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    return e


def _cached_weights(ref: HubRef, cache: Path) -> str:
    """The weights files the cache holds for `ref`'s repository at its revision, listed for a message ("" if none)."""
    repo = cache / ("models--" + ref.repo_id.replace("/", "--"))
    ref_file = repo / "refs" / (ref.revision or "main")
    commit = ref_file.read_text(errors="replace").strip()[:64] if ref_file.is_file() else (ref.revision or "")
    snapshot = repo / "snapshots" / commit
    if not re.fullmatch(r"[0-9a-f]{40}", commit) or not snapshot.is_dir():
        return ""
    files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.suffix in HUB_FILE_SUFFIXES)
    return listed(files, 5)


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


def _check_download_size(ref: HubRef) -> bool:
    """Refuse before downloading when the files a download of `ref` would fetch exceed max_download_bytes(),
    or when the file it names is not in the repository. Raises what model_info raises for a missing repository
    or revision (the caller words those). False when the Hub's API cannot be reached (nothing sized: the caller
    then reads the cache only, or says it cannot), True when sized within the limit."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    limit = max_download_bytes()
    try:
        info = HfApi().model_info(ref.repo_id, revision=ref.revision, files_metadata=True, timeout=10)
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError):
        raise
    except Exception:  # no network, a proxy, a timeout (httpx and requests errors are not OSErrors)
        return False
    files = _fetched(ref, info.siblings or [])
    total = sum(f.size or 0 for f in files)
    if total > limit:
        largest = sorted(files, key=lambda f: -(f.size or 0))[:3]
        listed = ", ".join(f"{f.rfilename} ({(f.size or 0) / 1e9:.1f} GB)" for f in largest)
        raise InputError(
            f"{ref.name}: its files that could hold an adapter come to {total / 1e9:.1f} GB ({listed}), more than "
            f"{limit / 1e9:g} GB: is it a base model rather than an adapter? Give a LoRA repository, or set "
            f"{MAX_DOWNLOAD_ENV} to a larger number of gigabytes to download it anyway"
        )
    return True


def _fetched(ref: HubRef, siblings: list) -> list:
    """The repository files (RepoSibling) that fetching `ref` downloads; a named file missing is an InputError
    that lists the weights files the repository does have."""
    from huggingface_hub.utils import filter_repo_objects

    if not ref.is_file:
        return list(filter_repo_objects(siblings, allow_patterns=_patterns(ref), ignore_patterns=MODEL_PATTERNS,
                                        key=lambda f: f.rfilename))
    files = [f for f in siblings if f.rfilename == ref.path]
    if files:  # the config fetched beside a PEFT weights file is the author's file too: it counts
        files += [f for f in siblings if f.rfilename == _config_beside(ref.path)]
    else:
        weights = [f.rfilename for f in siblings if f.rfilename.endswith(HUB_FILE_SUFFIXES)]
        raise InputError(f"{ref.name}: the Hub repository {ref.repo_id} has no file {ref.path}"
                         + (f"; its weights files: {listed(weights, 5)}" if weights else "; it holds no weights files"))
    return files
