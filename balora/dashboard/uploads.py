"""Uploads in, downloads out: the only files the Inspect page writes, all in temporary folders.

An upload (a .safetensors file, or a .zip of an adapter or Trainer output folder) is written
under a `balora-upload-*` temporary folder after every check below; anything refused is a
one-line UploadError and nothing of it stays on disk. A balanced copy is built in a
`balora-balance-*` temporary folder deleted before the download is offered. Paths shown to
the user name the upload, never the server's temporary folder.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import struct
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import streamlit as st

from balora.dashboard import settings
from balora.safe_io import describe_kind, first_line

UPLOAD_TYPES = ["safetensors", "zip"]
UPLOAD_PREFIX = "balora-upload-"
BALANCE_PREFIX = "balora-balance-"
# An adapter folder holds a handful of files, a Trainer output a few per checkpoint: an archive
# with more members, deeper folders or longer names than these is not one.
MAX_MEMBERS = 5000
MAX_DEPTH = 16
MAX_NAME_BYTES = 255  # one path component (the usual file-system limit)
MAX_PATH_BYTES = 1024
# Upload folders a session left behind (tab closed mid-look) are removed after this long.
STALE_UPLOAD_S = 12 * 3600


class UploadError(ValueError):
    """An uploaded file the Inspect page refuses, with a message for the user."""


def new_upload_dir() -> Path:
    """A fresh temporary folder for one upload (older leftovers of closed sessions are removed)."""
    prune_stale_uploads()
    return Path(tempfile.mkdtemp(prefix=UPLOAD_PREFIX))


def remove_tree(path: Path) -> None:
    """Delete a temporary folder the dashboard made (uploads); never anything else."""
    if Path(path).name.startswith((UPLOAD_PREFIX, BALANCE_PREFIX)):
        shutil.rmtree(path, ignore_errors=True)


# st.session_state key of the upload the Inspect page shows: (file id, its temporary folder, the path
# to inspect, the file's name). Kept outside the file_uploader widget, whose file streamlit drops when
# the user opens another page, so the upload is shown again on coming back.
SAVED_KEY = "insp_saved"


def forget_upload() -> None:
    """Forget the session's remembered upload and delete its temporary folder (the uploader's on_change,
    the Forget button, a switch to a path). A module function: a callback defined on the page would keep
    the page's globals alive for the session."""
    saved = st.session_state.pop(SAVED_KEY, None)
    if saved:
        remove_tree(Path(saved[1]))


def prune_stale_uploads(max_age_s: float = STALE_UPLOAD_S, now: float | None = None) -> None:
    """Remove `balora-upload-*` folders in the temporary directory untouched for `max_age_s`."""
    now = time.time() if now is None else now
    try:
        entries = list(os.scandir(tempfile.gettempdir()))
    except OSError:
        return
    for e in entries:
        try:
            old = now - e.stat(follow_symlinks=False).st_mtime > max_age_s
            if old and e.name.startswith(UPLOAD_PREFIX) and e.is_dir(follow_symlinks=False):
                remove_tree(Path(e.path))
        except OSError:
            continue


def _check_name(base: str) -> None:
    if not base or base in (".", ".."):
        raise UploadError("the uploaded file has no name; upload a .safetensors file or a .zip.")
    if len(base.encode()) > MAX_NAME_BYTES:
        raise UploadError(f"{base[:40]}...: file name longer than {MAX_NAME_BYTES} bytes; rename it and upload again.")


def save_upload(name: str, data: bytes, dest: Path, *, max_unzipped_mb: float = settings.MAX_UNZIPPED_MB) -> Path:
    """Write an uploaded adapter under `dest` (a temporary folder) and return what to inspect.

    A .safetensors file is written as is (kohya or bare LoRA weights); a .zip is unpacked
    (a zipped PEFT adapter folder or Trainer output) after checking every member (see
    unpack_zip). Raises UploadError, leaving nothing of the upload under `dest`.
    """
    base = Path(str(name).replace("\\", "/")).name  # never trust a client-side path
    _check_name(base)
    suffix = Path(base).suffix.lower()
    if suffix == ".safetensors":
        out = dest / base
        try:
            out.write_bytes(data)
        except OSError as e:
            out.unlink(missing_ok=True)
            raise UploadError(f"{base}: could not be saved for reading ({e.strerror or e}).") from None
        return out
    if suffix != ".zip":
        raise UploadError(f"{base}: upload a .safetensors file or a .zip of an adapter folder (got {suffix or 'no extension'}).")
    stem = Path(base).stem  # "...zip" has the stem "..": the folder above dest, never a name to unpack into
    root = dest / (stem if stem.strip(".") else "upload")
    try:
        unpack_zip(base, data, root, max_bytes=int(max_unzipped_mb * 2**20))
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    # A zip of one folder unpacks to root/<folder>: inspect that folder.
    entries = [p for p in root.iterdir() if not p.name.startswith(("__MACOSX", "."))]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else root


def _member_parts(base: str, m: zipfile.ZipInfo) -> tuple[str, ...]:
    """The member's path as folder names, after refusing what must not be unpacked."""
    name = m.filename
    kind = stat.S_IFMT(m.external_attr >> 16)
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        raise UploadError(f"{base}: member {name!r} is {describe_kind(kind)}; archives may hold regular files only.")
    path = name.replace("\\", "/")
    parts = tuple(p for p in PurePosixPath(path).parts if p not in ("", "."))
    if path.startswith("/") or ".." in parts or any(":" in p for p in parts[:1]):
        raise UploadError(f"{base}: member {name!r} points outside the archive; refusing to unpack it.")
    if not parts:
        raise UploadError(f"{base}: a member has an empty name; the archive is damaged.")
    if len(parts) > MAX_DEPTH:
        raise UploadError(f"{base}: member {name[:60]!r}... is nested {len(parts)} folders deep (at most {MAX_DEPTH}).")
    if len(path.encode()) > MAX_PATH_BYTES or any(len(p.encode()) > MAX_NAME_BYTES for p in parts):
        raise UploadError(f"{base}: member {name[:60]!r}... has a name too long to unpack.")
    return parts


def check_members(base: str, members: list[zipfile.ZipInfo], max_bytes: int) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """Every file member with its path, after refusing archives that are not an adapter folder:
    too many members, links and special files, '..' or absolute names, deep or long names, two
    members with one name, a name that is both a file and a folder, a declared size over the cap."""
    if len(members) > MAX_MEMBERS:
        raise UploadError(f"{base}: {len(members)} entries; an adapter archive has at most {MAX_MEMBERS}.")
    total = sum(m.file_size for m in members)
    if total > max_bytes:
        raise UploadError(f"{base}: expands to {total / 2**20:.0f} MB, more than the {max_bytes / 2**20:.0f} MB allowed.")
    files: dict[tuple[str, ...], zipfile.ZipInfo] = {}
    dirs: set[tuple[str, ...]] = set()
    for m in members:
        parts = _member_parts(base, m)
        if m.is_dir():
            dirs.add(parts)
        elif parts in files:
            raise UploadError(f"{base}: {'/'.join(parts)!r} appears twice in the archive; which one is meant is unclear.")
        else:
            files[parts] = m
    for parts in files:
        clash = parts in dirs or any(parts[:i] in files for i in range(1, len(parts)))
        if clash:
            raise UploadError(f"{base}: {'/'.join(parts)!r} is both a file and a folder in the archive.")
    if not files:
        raise UploadError(f"{base}: the archive holds no files.")
    return [(m, parts) for parts, m in files.items()]


def declared_entries(data: bytes) -> int | None:
    """The entry count a zip's end-of-central-directory record declares (zip64 too), read
    before zipfile parses one ZipInfo per entry; None when there is no such record."""
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - (1 << 16) - 22))
    if end < 0 or end + 22 > len(data):
        return None
    count = struct.unpack_from("<H", data, end + 10)[0]
    locator = end - 20  # zip64: a locator right before the record points at the zip64 record
    if count == 0xFFFF and locator >= 0 and data[locator:locator + 4] == b"PK\x06\x07":
        at = struct.unpack_from("<Q", data, locator + 8)[0]
        if data[at:at + 4] == b"PK\x06\x06" and at + 40 <= len(data):
            count = struct.unpack_from("<Q", data, at + 32)[0]
    return count


def unpack_zip(base: str, data: bytes, root: Path, *, max_bytes: int) -> None:
    """Unpack the zip `data` under `root` (created here), counting the bytes actually written
    against `max_bytes` (a member may declare a smaller size than it inflates to)."""
    declared = declared_entries(data)
    if declared is not None and declared > MAX_MEMBERS:
        raise UploadError(f"{base}: {declared} entries; an adapter archive has at most {MAX_MEMBERS}.")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        members = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError):
        raise UploadError(f"{base}: not a valid zip archive.") from None
    with zf:
        written = 0
        for m, parts in check_members(base, members, max_bytes):
            target = root.joinpath(*parts)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(target, "xb") as out:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:
                            raise UploadError(f"{base}: expands to more than the {max_bytes / 2**20:.0f} MB allowed.")
                        out.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                raise UploadError(f"{base}: member {m.filename!r} is damaged ({first_line(e)}).") from None
            except (RuntimeError, NotImplementedError) as e:  # encrypted, or an unsupported compression
                raise UploadError(f"{base}: member {m.filename!r} cannot be unpacked ({first_line(e)}).") from None
            except OSError as e:
                raise UploadError(f"{base}: member {m.filename!r} could not be written ({e.strerror or e}).") from None


# ------------------------------------------------------------------------------ what the user sees


def shown_path(path: str | Path, root: Path | None, label: str) -> str:
    """`path` as the page shows it: under an upload's temporary folder `root`, the upload's own
    name (`label`) followed by the path inside it; anywhere else, the path itself."""
    if root is None:
        return str(path)
    try:
        rel = Path(path).resolve().relative_to(Path(root).resolve())
    except (ValueError, OSError):
        return str(path)
    parts = rel.parts[1:] if rel.parts else ()  # the first part is the upload's own name
    return "/".join((label, *parts))


def redact(text: str, root: Path | None, label: str) -> str:
    """`text` (an error message, a note) with the upload's temporary folder replaced by its name."""
    if root is None:
        return text
    for prefix in {str(root), str(Path(root).resolve())}:
        # root/<the upload's own file or folder>/... -> label/..., as shown_path does
        text = re.sub(re.escape(prefix + os.sep) + r"[^/\s:'\"`]+", lambda _: label, text)
        text = text.replace(prefix, label)
    return text


# ------------------------------------------------------------------------------ downloads


def balance_source(root: Path, checkpoint: str | None) -> Path:
    """What to balance: the inspected path, or one checkpoint-N of a Trainer output folder
    (balora.balance_file balances one checkpoint at a time)."""
    if checkpoint and checkpoint.startswith("checkpoint-") and (root / checkpoint).is_dir():
        return root / checkpoint
    return root


@dataclass(frozen=True)
class Balanced:
    """A balanced copy of an adapter, ready to download, and balora's summary of it."""

    data: bytes
    file_name: str
    mime: str
    summary: object  # balora.inspect.FileBalanceSummary: .changes has dW_rel_change per layer

    def download(self) -> bytes:
        """The copy, for st.download_button's deferred `data`: streamlit md5-hashes bytes given to it on every
        rerun (a second per widget for a 640 MB copy), a callable only when the user downloads."""
        return self.data

    def for_button(self) -> bytes | Callable[[], bytes]:
        """What st.download_button gets: the bytes, or for a large copy the deferred `download`. Deferred data
        gets a new id on every run of the page, and in a browser a click now and then still fetched the last
        run's, dropped id (nothing downloaded, nothing said: 1 click in 8 in tests/test_browser.py); bytes are
        hashed on every run instead, ~0.2 s at DEFERRED_FROM_BYTES."""
        return self.download if len(self.data) >= DEFERRED_FROM_BYTES else self.data


# Copies from this size are offered as deferred data (Balanced.for_button).
DEFERRED_FROM_BYTES = 128 * 2**20


def _zip_folder(folder: Path) -> bytes:
    # Tensor files are stored in the download zip as they are: deflate shrinks float weights by 7% (fp32) to
    # 20% (bf16) at 6-20 MB/s on this machine, so a Llama-3-8B r=64 copy took 46 s to zip after 10 s of
    # balancing. (Imported here: the page imports this module without torch, which reading needs.)
    from balora.adapters.reading import TENSOR_SUFFIXES

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file() and not p.is_symlink():
                how = zipfile.ZIP_STORED if p.suffix in TENSOR_SUFFIXES else zipfile.ZIP_DEFLATED  # configs, tokenizers
                zf.write(p, Path(folder.name) / p.relative_to(folder), compress_type=how)
    return buf.getvalue()


# cache_resource, not cache_data: cache_data unpickles its value on every hit, so each widget after the
# Balance button made a new copy of the whole file (1-5 s and +600 MB per rerun for a Llama-3-8B r=64 adapter).
# The value is never mutated: the page reads the summary and offers the bytes.
@st.cache_resource(show_spinner=False, max_entries=4)
def _balance(src: str, version: tuple, method: str, name: str | None = None) -> Balanced:
    import balora
    from balora.teaching.threads import one_thread

    # Built in a temporary folder that is deleted before returning: the dashboard writes
    # nothing outside the runs folder; the result only leaves as a download.
    with tempfile.TemporaryDirectory(prefix=BALANCE_PREFIX) as tmp:
        srcp = Path(src)
        stem = name or (srcp.stem if srcp.is_file() else srcp.name)
        dst = Path(tmp) / (f"{stem}-balanced{srcp.suffix}" if srcp.is_file() else f"{stem}-balanced")
        with one_thread():  # as `balora balance` (see loaders._inspect)
            summary = balora.balance_file(srcp, dst, method=method)
        if dst.is_file():
            return Balanced(dst.read_bytes(), dst.name, "application/octet-stream", summary)
        return Balanced(_zip_folder(dst), f"{dst.name}.zip", "application/zip", summary)


def balance(src: str | Path, method: str, name: str | None = None) -> Balanced:
    """A balanced copy of the adapter at `src` (balora.balance_file), as download bytes, named
    NAME-balanced (default: after `src`; a Hub snapshot's folder is a commit hash, not a name)."""
    from balora.dashboard.loaders import path_version

    return _balance(str(src), path_version(Path(src)), method, name)
