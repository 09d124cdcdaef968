"""Safe reads of small files from folders balora did not write (adapter folders, run folders).

Every read here refuses, with a one-line :class:`~balora.errors.InputError`, what could hang the
process or exhaust its memory: FIFOs, sockets and devices (also behind a symlink), and files larger
than a cap. A FIFO is never opened (opening one blocks until a writer appears), so the check is a
``stat`` before the open plus an ``fstat`` of the opened descriptor (the path could be swapped in
between), and the read stops at ``max_bytes + 1`` bytes whatever the file claims its size is.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from balora.errors import InputError

# A PEFT adapter_config.json is a few KB; a run's status.json or config.json a few hundred bytes.
# Anything in the megabytes is not such a file, and reading it whole only costs memory.
CONFIG_MAX_BYTES = 4 * 1024 * 1024
# os.open flags for a file checked to be regular by a stat just before: if the path was swapped
# for a FIFO in between, open() still returns at once (O_NONBLOCK), and a terminal device does not
# become the process's controlling terminal (O_NOCTTY). The caller fstats what it opened.
OPEN_NO_WAIT = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)


# st_mode kinds other than a regular file, named for messages.
_KINDS = (
    (stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symbolic link"),
)


def describe_kind(mode: int) -> str:
    """A short name for what a ``st_mode`` describes, for messages ("a FIFO", "a directory")."""
    return next((name for is_kind, name in _KINDS if is_kind(mode)), "not a regular file")


def regular_file_size(path: str | os.PathLike, what: str = "file") -> int:
    """Size in bytes of ``path`` after checking that it is (or links to) a regular file."""
    try:
        st = os.stat(path)  # follows symlinks: a link to /dev/zero is judged by its target
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist.") from None
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}.") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(
            f"{what} {path} is {describe_kind(st.st_mode)}, not a regular file; balora reads only "
            "regular files (replace it with the real file)."
        )
    return st.st_size


def read_bytes_capped(path: str | os.PathLike, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of the regular file ``path``, refusing special files and files over ``max_bytes``."""
    size = regular_file_size(path, what)
    if size > max_bytes:
        raise _too_big(path, size, max_bytes, what)
    try:
        fd = os.open(path, OPEN_NO_WAIT)
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}.") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(
                f"{what} {path} is {describe_kind(st.st_mode)}, not a regular file; balora reads "
                "only regular files."
            )
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}.") from None
    finally:
        os.close(fd)
    if total > max_bytes:  # the file grew after the stat
        raise _too_big(path, total, max_bytes, what)
    return b"".join(chunks)


def read_text_capped(
    path: str | os.PathLike, max_bytes: int = CONFIG_MAX_BYTES, what: str = "file"
) -> str:
    """The UTF-8 text of the regular file ``path`` (at most ``max_bytes``), or a one-line InputError."""
    data = read_bytes_capped(path, max_bytes, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start}).") from None


def read_json_capped(
    path: str | os.PathLike, max_bytes: int = CONFIG_MAX_BYTES, what: str = "JSON file"
) -> Any:
    """The parsed JSON of ``path`` (any JSON value), read with :func:`read_text_capped`.

    Deep nesting (``[[[[...]]]]``) makes the json module raise RecursionError; that and every
    syntax error become a one-line InputError naming the file.
    """
    text = read_text_capped(path, max_bytes, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{what} {path}: malformed JSON ({e.msg}: line {e.lineno}, column {e.colno}).") from None
    except RecursionError:
        raise InputError(f"{what} {path} is nested too deeply to be a configuration.") from None
    except ValueError as e:  # e.g. an integer literal with more digits than Python allows
        raise InputError(f"{what} {path} cannot be parsed: {first_line(e)}.") from None


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path``, with every symlink resolved, lies inside ``folder`` (also resolved)."""
    try:
        real = Path(path).resolve(strict=True)
        root = Path(folder).resolve(strict=True)
    except (OSError, RuntimeError):  # dangling link, symlink loop
        return False
    return real == root or root in real.parents


# C0/C1 controls (ANSI escape sequences start with ESC), DEL, zero-width and bidi controls that
# reorder what a terminal shows: key names and metadata come from the file's author. Lone
# surrogates (file names that are not UTF-8) cannot even be written to a UTF-8 terminal.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff\ud800-\udfff]")


def printable(text) -> str:
    """`text` with control characters shown as escapes (ESC as \\x1b, a newline as \\n), for a terminal."""
    return _CONTROLS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def _too_big(path, size: int, max_bytes: int, what: str) -> InputError:
    return InputError(
        f"{what} {path} is {_human(size)}, more than the {_human(max_bytes)} balora reads for such a "
        "file; it is not what it is named."
    )


def _human(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def user_path(text: str) -> Path:
    """`text` as a path, a leading ~ or ~user expanded (no shell did it: the dashboard, a Python call);
    ~user of no user on this machine (~.cache/x typed for ~/.cache/x) is a one-line InputError."""
    try:
        return Path(text).expanduser()
    except RuntimeError:  # "Could not determine home directory."
        user = text[1:].split("/", 1)[0].split(os.sep, 1)[0]
        raise InputError(f"{text}: there is no user {user!r} on this machine for ~{user}; write ~/ for your home "
                         "folder, or give the whole path") from None


def listed(names, most: int) -> str:
    """The first `most` names, comma-separated, then how many more there are (for one-line messages)."""
    names = list(names)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    return (str(e).splitlines() or [type(e).__name__])[0]
