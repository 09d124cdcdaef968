"""Write balanced copies of adapter files: the weights, the adapter's own files beside them, atomically.

`staged_output` builds the result in a hidden temporary folder next to the destination,
`.OUT.<pid>.<random>.balora-tmp`, and moves it into place only when the block succeeds. The
folder is removed on any error, on Ctrl-C, SIGTERM and SIGHUP; one left by a killed process
(SIGKILL, power loss) is removed by the next run writing next to the same destination.

`copy_adapter_files` copies what belongs to an adapter (config, weights, tokenizer, README,
Trainer checkpoint state) as regular files, never follows a link out of the input folder and
never reads a FIFO, socket or device; everything else is left out and listed.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from balora.adapters.hub_names import inside_root
from balora.adapters.reading import adapter_root
from balora.adapters.tensor_file import TensorFile
from balora.errors import InputError
from balora.safe_io import OPEN_NO_WAIT, describe_kind

TMP_SUFFIX = ".balora-tmp"
OWNER_FILE = ".balora-owner.json"  # in the temporary folder: who made it, so a later run can tell it is stale
# What a PEFT adapter folder or a Trainer checkpoint-N holds besides the weights: the files
# PEFT, transformers' tokenizers and Trainer write. Anything else is not copied (and is listed).
ADAPTER_FILES = (
    "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
    "README*", "LICENSE*",
    "tokenizer*.json", "tokenizer.model", "*.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "chat_template.json", "chat_template.jinja",
    "generation_config.json", "preprocessor_config.json", "processor_config.json",
    "trainer_state.json", "training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth",
)
# The weights file formats by suffix, as TensorFile reads them.
WEIGHT_SUFFIXES = {".safetensors": "safetensors", ".bin": "torch", ".pt": "torch", ".pth": "torch"}
_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


class Stopped(KeyboardInterrupt):
    """SIGTERM/SIGHUP arrived while an output was being staged: handled like Ctrl-C (a
    KeyboardInterrupt, which no `except Exception` swallows before the temporary folder is removed;
    the CLI says "interrupted" and exits 130)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


# safetensors metadata that hashes the file's tensors (kohya's sd-scripts, the modelspec): a changed
# copy that kept them would be taken for the original by tools that identify files by them.
CONTENT_HASHES = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")


def copy_metadata(metadata: dict | None, changed: bool) -> tuple[dict | None, list[str]]:
    """The metadata a copy keeps: all of it, less CONTENT_HASHES when its tensors `changed`; and the
    keys left out."""
    if not metadata or not changed:
        return metadata, []
    dropped = [k for k in CONTENT_HASHES if k in metadata]
    return {k: v for k, v in metadata.items() if k not in dropped}, dropped


def write_weights(like: TensorFile, path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write `tensors` in the same file format as `like`, with safetensors `metadata` (default: like's)."""
    if like.format == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata=like.metadata if metadata is None else metadata)
    else:
        torch.save(tensors, path)


# ---- the adapter's own files ---------------------------------------------------------------


def copy_adapter_files(src: Path, dst: Path, folders: list[Path], skip: set[Path]) -> list[str]:
    """Copy the adapter files (ADAPTER_FILES) of each folder in `folders` (src or folders under it)
    to the same place under dst, as regular files; `skip` (the weights written separately) are not
    copied. Returns what was left out, one 'name (why)' each."""
    root = Path(os.path.abspath(src))
    # Links may lead anywhere inside the folder read (for a Hub cache snapshot: its repository folder).
    boundary = adapter_root(root)
    skip = {Path(os.path.abspath(p)) for p in skip}
    folders = sorted({Path(os.path.abspath(f)) for f in folders})
    left_out: list[str] = []
    for folder in folders:
        rel = folder.relative_to(root)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path = Path(entry.path)
            if path in skip:
                continue
            why = _why_not_copied(entry, boundary, folders)
            if why is None:
                why = _copy_regular(path, dst / rel / entry.name)
            if why:  # "" : a folder copied on its own (another adapter), not left out
                left_out.append(f"{(rel / entry.name).as_posix()} ({why})")
    return left_out


def _why_not_copied(entry: os.DirEntry, root: Path, folders: list[Path]) -> str | None:
    """None: copy it; "": not copied here but not left out; else why it is left out."""
    if entry.is_dir(follow_symlinks=False):
        sub = Path(entry.path)
        return "" if any(sub == f or sub in f.parents for f in folders) else "a folder"
    if entry.is_symlink() and not inside_root(entry.path, root):
        return "a symbolic link leading out of the input folder"
    if not any(fnmatch.fnmatch(entry.name, p) for p in ADAPTER_FILES):
        return "not an adapter, tokenizer or checkpoint file"
    return None


def _copy_regular(src: Path, dst: Path) -> str | None:
    """Copy src's bytes to a new regular file dst; the reason it was not copied, else None.

    Checked before the open (opening a device can act on it, opening a FIFO waits for a writer)
    and again on the opened file, so a name swapped in between is caught. Only the bytes are
    copied: the new file gets default permissions, never the source's (setuid) mode bits.
    """
    try:
        mode = os.stat(src).st_mode
        if not stat.S_ISREG(mode):
            return describe_kind(mode)
        fd = os.open(src, OPEN_NO_WAIT)
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            return describe_kind(mode)
        with open(dst, "xb") as out:
            shutil.copyfileobj(f, out, 1 << 20)
    return None


def check_destination(src: Path, dst: Path, force: bool, weights: list[Path], given: Path | None = None) -> None:
    """Refuse, before any work, a balanced copy of `src` (whose weights files are `weights`) at `dst`
    that would land inside src, contain it, follow a link, replace something without force, or,
    even with force, replace what is not a regular file, an empty folder or an adapter folder.
    given: the folder named as the input when src is the one weights file in it (a Hub repository):
    dst may not land inside that either (a second LoRA file there and the folder no longer reads)."""
    for inside in (given or src, src):
        s, d = inside.resolve(), dst.resolve()
        if d == s or s in d.parents:
            raise InputError(f"{dst}: is inside the input {inside}; write the balanced copy somewhere else")
    s = src.resolve()
    if d in s.parents:
        raise InputError(f"{dst}: contains the input {src}; replacing it would delete the input")
    if not d.parent.is_dir():
        why = "is not a folder" if d.parent.exists() else "does not exist"
        raise InputError(f"{dst}: its folder {dst.parent} {why}")
    if dst.is_symlink():  # replacing it would either follow it elsewhere or swap a link for a folder
        raise InputError(f"{dst}: is a symbolic link; write the balanced copy to a real path (or remove the link)")
    if dst.exists():
        # What --force would refuse is said first, with or without it: suggesting --force there sent the user
        # to a second refusal.
        if dst.is_dir() != src.is_dir():
            want = "folder" if src.is_dir() else "file"
            raise InputError(f"{dst}: exists but is not a {want} like {src}; remove it or choose another name")
        if not dst.is_dir() and not dst.is_file():
            raise InputError(f"{dst}: is not a regular file (a device, FIFO or socket); choose another path")
        checkpoints = sorted(c.name for c in dst.glob("checkpoint-*") if c.is_dir()) if dst.is_dir() else []
        if checkpoints:  # a Trainer's output: its final adapter makes it "an adapter folder" too
            raise InputError(f"{dst}: holds Trainer checkpoints ({', '.join(checkpoints[:3])}), so --force will not "
                             "replace it; choose another path")
        if dst.is_dir() and not _replaceable_folder(dst, [w.relative_to(src) for w in weights]):
            raise InputError(f"{dst}: not empty and not an adapter folder, so --force will not delete anything "
                             "in it; choose another path")
        if not force:
            raise InputError(f"{dst}: already exists; pass --force (force=True in Python) to replace it")


def check_weights_suffix(src: Path, dst: Path) -> None:
    """Refuse a copy of the weights file `src` named for the other format (out.bin for a .safetensors,
    out.safetensors for a .bin): it is written in src's format, and tools (torch.load, diffusers,
    kohya's loaders, balora itself) choose the parser by the suffix, so such a file reads as corrupt."""
    if src.is_dir() or WEIGHT_SUFFIXES.get(dst.suffix, "") == WEIGHT_SUFFIXES.get(src.suffix):
        return
    if dst.suffix not in WEIGHT_SUFFIXES:  # `balanced`, `out.lora`: a file no reader would open as weights
        raise InputError(f"{dst}: has no weights file suffix, and tools (balora, PEFT, diffusers) choose the parser "
                         f"by it; name it {dst.with_name(dst.name + src.suffix)}")
    raise InputError(f"{dst}: ends in {dst.suffix} but {src.name} is a {WEIGHT_SUFFIXES.get(src.suffix, 'torch')} "
                     f"file, and the balanced copy keeps its format; name it {dst.with_suffix(src.suffix or '.bin')}")


def _replaceable_folder(dst: Path, weights: list[Path]) -> bool:
    """--force replaces a folder only if it is empty or holds an adapter (a config, or a weights file
    where the input has one): never a folder of other things, named by mistake."""
    try:
        empty = not any(dst.iterdir())
    except OSError:
        return False
    return empty or (dst / "adapter_config.json").is_file() or any((dst / w).is_file() for w in weights)


# ---- staging -----------------------------------------------------------------------------------


@contextmanager
def staged_output(dst: Path, force: bool = False) -> Iterator[Path]:
    """Yield a path next to `dst` to build the output at; it replaces dst only if the block
    finishes without an exception. Otherwise nothing is left behind (also on SIGTERM/SIGHUP,
    raised as `Stopped` inside the block)."""
    dst = Path(dst)
    remove_stale_temporaries(dst)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=dst.parent))
        (tmp / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    except OSError as e:
        raise InputError(f"{dst}: cannot write next to it ({e.strerror or e})") from e
    try:
        with _signals_raise_stopped():
            staged = tmp / dst.name
            yield staged
            if not staged.exists():
                raise RuntimeError(f"{dst}: nothing was produced")
            if (dst.exists() or dst.is_symlink()) and not force:
                raise InputError(f"{dst}: already exists; pass --force (force=True in Python) to replace it")
            with _signals_blocked():  # the swap must not stop halfway, with dst renamed away
                _move_into_place(staged, dst, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(staged: Path, dst: Path, tmp: Path) -> None:
    if dst.exists() and not dst.is_symlink() and not dst.is_dir() and not dst.is_file():
        raise InputError(f"{dst}: is not a regular file (a device, FIFO or socket); choose another path")
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


def remove_stale_temporaries(dst: Path) -> list[Path]:
    """Remove the temporary folders next to dst left by balora processes that no longer run on
    this machine (their pid is in the name and in OWNER_FILE). Returns what was removed."""
    dst = Path(dst)
    # mkdtemp's random part has no dots: with `[^/]*`, `.OUT.1000.<pid>.<random>` (a balance to OUT.1000)
    # matched here with 1000 read as the pid, and a running copy's folder was deleted.
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.(\d{{1,10}})\.[^./]*{re.escape(TMP_SUFFIX)}")
    removed = []
    try:
        names = os.listdir(dst.parent)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        path = dst.parent / name
        if not m or path.is_symlink() or not path.is_dir() or _alive(int(m.group(1))):
            continue
        try:
            owner = json.loads((path / OWNER_FILE).read_text()) if (path / OWNER_FILE).is_file() else {}
        except (OSError, ValueError):
            owner = {}
        if isinstance(owner, dict) and owner.get("host", socket.gethostname()) != socket.gethostname():
            continue  # a process of another machine sharing this folder: its pid means nothing here
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or a number we cannot ask about: leave it alone
    return True


@contextmanager
def _signals_raise_stopped():
    """Turn SIGTERM/SIGHUP into `Stopped` while the block runs, like Ctrl-C's KeyboardInterrupt.
    Only in the main thread (Python delivers signals there), and only over default handlers,
    so an application that installed its own (a server) keeps it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in _STOP_SIGNALS:
        if signal.getsignal(sig) is signal.SIG_DFL:
            previous[sig] = signal.signal(sig, _raise_stopped)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _raise_stopped(signum, frame):
    raise Stopped(signum)


@contextmanager
def _signals_blocked():
    can = threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask")
    sigs = {signal.SIGINT, *_STOP_SIGNALS}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs) if can else None
    try:
        yield
    finally:
        if can:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
