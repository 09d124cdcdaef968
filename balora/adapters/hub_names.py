"""How a Hugging Face Hub source is written, and read back from a cache path: pure string work.

The forms are huggingface_hub's own (HfFileSystem paths, `parse_hf_uri`), written out here because
older huggingface_hub releases have no parser to call:

    user/name[@revision][/path/in/repo]        also with the prefix hf:// (or hf://models/)
    https://huggingface.co/user/name[/blob|resolve|tree/<revision>[/path/in/repo]]

The revision after `@` runs to the next `/`, except the Hub's refs/pr/N and refs/convert/NAME; a branch
with a `/` in its name is written with %2F, as HfFileSystem and Hub URLs write it. A path whose last
part has a file suffix (`x.safetensors`, `README.md`; not `v1.5`) names one file, and only weights
files are read; any other path, or one ending in `/`, names a folder of the repository.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from balora.errors import InputError
from balora.safe_io import is_inside

# A weights file named inside a repository: what hf_hub_download fetches for one file.
HUB_FILE_SUFFIXES = (".safetensors", ".bin")
PREFIX = "hf://"
URL_HOSTS = ("huggingface.co", "www.huggingface.co", "hf.co")

# user/name as huggingface_hub's validate_repo_id takes it: each part begins and ends with a letter, digit or _,
# the name not with .git (`..` and `--` are refused below). ASCII: Python's \w takes any letter. What no Hub id
# can be is a local path (données/run1/x, outputs/.cache/x that are not there), never "not a valid Hub id".
_REPO = re.compile(r"^[A-Za-z0-9](?:[\w.-]{0,94}\w)?/\w(?:[\w.-]{0,94}\w)?$(?<!\.git)", re.ASCII)
_REVISION = re.compile(r"^[\w./-]{1,255}$")  # branch, tag, commit, refs/pr/N
_SPECIAL_REF = re.compile(r"^refs/(?:convert/[\w.-]+|pr/\d+)(?=/|$)")
_SPECIAL_REF_WHOLE = re.compile(r"^refs/(?:convert/[\w.-]+|pr/\d+)$")
_FILE_SUFFIX = re.compile(r"^\.[A-Za-z][A-Za-z0-9]*$")  # .safetensors, .md; not the .5 of v1.5
_OTHER_TYPES = ("datasets", "spaces", "buckets", "kernels")  # hf:// and URL prefixes of other repository kinds
# huggingface_hub >= 2.4 keeps Xet downloads once per cache, in <cache>/blobs/<2 hex>/<hash> (this file marks
# the folder), and links each repository's blobs/<etag> there: outside models--user--name, but the cache's own.
SHARED_BLOBS_MARKER = ".huggingface-shared-blobs"


@dataclass(frozen=True)
class HubRef:
    """One source on the Hub: a model repository, or a folder or file inside it."""

    repo_id: str
    revision: str | None = None
    path: str = ""  # inside the repository, "/"-separated; "" for the whole repository
    is_file: bool = False
    fallback: HubRef | None = None  # user/name@a/b also meant the branch "a/b" before paths: tried second

    @property
    def name(self) -> str:
        """The canonical `user/name[@revision][/path]`, for messages."""
        rev = "" if self.revision is None else "@" + _quoted_revision(self.revision)
        return f"{self.repo_id}{rev}{'/' + self.path if self.path else ''}"


def parse_hub_ref(text: str) -> HubRef | None:
    """The Hub source `text` names, or None when it has no Hub shape (then it is a local path).

    Raises a one-line InputError for what is unmistakably meant for the Hub but cannot be read:
    another kind of repository, a web page that is not a file or folder, a file that is not weights.
    """
    if text.startswith(PREFIX):
        body, typed = _without_type(text[len(PREFIX):], text), False
    else:
        url = _url_body(text)
        body, typed = (text, True) if url is None else (url, False)  # typed: neither hf:// nor a Hub address
    ref = _parse_body(body, typed)
    if ref is None and not typed:  # meant for the Hub, so not a local path after all
        raise InputError(f"{text}: not a Hub model repository user/name[@revision][/path/in/repo]")
    if ref is not None and ref.is_file and not ref.path.endswith(HUB_FILE_SUFFIXES):
        raise InputError(f"{text}: names the file {ref.path} of the Hub repository {ref.repo_id}; balora reads "
                         f"{' or '.join(HUB_FILE_SUFFIXES)} weights files, a folder of the repository, or all of it "
                         f"({ref.repo_id})")
    return ref


def _parse_body(body: str, typed: bool) -> HubRef | None:
    """`user/name[@revision][/path]` (no prefix) as a HubRef; None when it is not one. Typed without
    a prefix, `user/name@a/b` (not a file) keeps its meaning from before paths as a fallback: branch a/b."""
    folder = body.endswith("/")
    repo, at, after = body.partition("@")
    if at:
        special = _SPECIAL_REF.match(after)
        rev_text = special.group(0) if special else after.partition("/")[0]
        path = after[len(rev_text) + 1:]
        revision = unquote(rev_text)
    else:
        parts = body.split("/", 2)
        repo, revision, path = "/".join(parts[:2]), None, (parts[2] if len(parts) > 2 else "")
    path = path.rstrip("/")
    segments = path.split("/") if path else []
    if (not _REPO.fullmatch(repo) or ".." in repo or "--" in repo or (revision is not None and not _is_revision(revision))
            or any(s in ("", ".", "..") or "\\" in s or not s.isprintable() for s in segments)):
        return None
    is_file = bool(segments) and not folder and bool(_FILE_SUFFIX.match(PurePosixPath(path).suffix))
    fallback = None
    if typed and at and path and not is_file and "%" not in rev_text and not _SPECIAL_REF.match(after):
        fallback = HubRef(repo, after.rstrip("/")) if _is_revision(after.rstrip("/")) else None
    return HubRef(repo, revision, path, is_file, fallback)


def _is_revision(text: str) -> bool:
    """A ref name git accepts (git check-ref-format), or a commit: no `..`, no part empty or starting with `.`,
    none ending in `.` or `.lock`. `..` would even reach the Hub as another address (/revision/.. is main's)."""
    return (_REVISION.fullmatch(text) is not None and ".." not in text
            and not any(p == "" or p.startswith(".") or p.endswith((".", ".lock")) for p in text.split("/")))


def _without_type(body: str, text: str) -> str:
    """An hf:// body without its `models/` prefix; other repository kinds are refused."""
    head = body.partition("/")[0]
    if head in _OTHER_TYPES:
        raise InputError(f"{text}: a Hub {head[:-1]} repository; balora reads adapters from model repositories")
    return body[len("models/"):] if head == "models" else body


def _url_body(url: str) -> str | None:
    """A Hub web address's `user/name[@revision][/path]`; None for what is no web address (a local path then).
    The query (`?download=true`) and fragment are dropped; a page that names no file or folder is refused."""
    lowered = url.lower()
    if not lowered.startswith(("http://", "https://", *(h + "/" for h in URL_HOSTS))):
        return None
    try:
        parts = urlsplit(url if "://" in url else "https://" + url)
        host = (parts.hostname or "").lower()
    except ValueError:  # "Invalid IPv6 URL": a [ or ] in the host
        host = "not readable"
    if host not in URL_HOSTS:  # another site's address, never a local path ("https:/civitai.com/...: no such file")
        raise InputError(f"{_without_password(url)}: not an address on the Hugging Face Hub (its host is {host or 'missing'}); "
                         "balora fetches https://huggingface.co/user/name/... only: download the file and give its path")
    if "@" in parts.netloc:  # user:token@huggingface.co: never sent, and never shown back (a message may be shared)
        raise InputError(f"{url.replace(parts.netloc, '***@' + host, 1)}: a Hub address with credentials in it, which "
                         "balora neither sends nor shows; give it without them (a private repository: `hf auth login`)")
    segments = [s for s in parts.path.split("/") if s]
    if segments and segments[0] == "models":
        segments = segments[1:]
    if segments and segments[0] in _OTHER_TYPES:
        raise InputError(f"{url}: a Hub {segments[0][:-1]} repository; balora reads adapters from model repositories")
    if len(segments) < 2:
        raise InputError(f"{url}: not the address of a Hub model repository (https://huggingface.co/user/name)")
    repo, rest = "/".join(segments[:2]), segments[2:]
    if not rest:
        return repo
    if rest[0] not in ("blob", "resolve", "tree", "raw") or len(rest) < 2:
        raise InputError(f"{url}: a Hub page that names no file or folder; copy the address of the file "
                         f"(.../blob/main/FILE) or of the repository")
    # Each segment is percent-decoded, a / inside the revision kept as %2F so it stays one segment.
    revision, path = unquote(rest[1]).replace("/", "%2F"), [unquote(s) for s in rest[2:]]
    folder = "/" if rest[0] == "tree" and path else ""
    return f"{repo}@{revision}" + "".join("/" + s for s in path) + folder


def _without_password(url: str) -> str:
    """`url` with the password of a user:password@ part shown as ***."""
    head, sep, rest = url.partition("://")
    netloc = rest.split("/", 1)[0]
    if not sep or "@" not in netloc or ":" not in netloc.rpartition("@")[0]:
        return url
    user = netloc.rpartition("@")[0].split(":", 1)[0]
    return url.replace(netloc, f"{user}:***@{netloc.rpartition('@')[2]}", 1)


def _quoted_revision(revision: str) -> str:
    """A revision as written after @: a / inside it as %2F, but refs/pr/N as it is."""
    return revision if _SPECIAL_REF_WHOLE.match(revision) else revision.replace("/", "%2F")


def cache_name(path: Path) -> str | None:
    """`user/name[@revision][/path]` for a path inside a Hugging Face cache snapshot, else None.

    The cache keeps `models--user--name/snapshots/<commit>/<path>` (repository names cannot hold
    `--`); the revision is left out when refs/main points at that commit, else a ref that does is
    named, else the commit itself.
    """
    path = Path(path)
    for snap in (path, *path.parents):
        repo_dir = snap.parent.parent
        if snap.parent.name == "snapshots" and repo_dir.name.startswith("models--"):
            break
    else:
        return None
    if "--" not in repo_dir.name[len("models--"):]:  # a repository without a user (gpt2): not user/name
        return None
    refs = repo_dir / "refs"
    names = sorted(str(f.relative_to(refs)) for f in refs.rglob("*") if f.is_file()) if refs.is_dir() else []
    pointing = [n for n in names if _read_ref(refs / n) == snap.name]
    revision = None if "main" in pointing else (pointing[0] if pointing else snap.name)
    repo_id = repo_dir.name[len("models--"):].replace("--", "/", 1)
    return HubRef(repo_id, revision, path.relative_to(snap).as_posix() if path != snap else "").name


def inside_root(path: Path, root: Path) -> bool:
    """Whether `path`, links resolved, lies inside `root`; for a cache repository folder (models--user--name),
    also inside the cache's shared blob store, which its blobs link into (SHARED_BLOBS_MARKER)."""
    if is_inside(path, root):
        return True
    store = Path(root).parent / "blobs"
    in_cache = Path(root).name.startswith(("models--", "datasets--"))
    return in_cache and (store / SHARED_BLOBS_MARKER).is_file() and is_inside(path, store)


def _read_ref(ref: Path) -> str:
    try:
        return ref.read_text(encoding="utf-8", errors="replace").strip()[:100]
    except OSError:
        return ""
