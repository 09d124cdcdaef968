"""Text for language-model tasks: a .txt / .jsonl file (or a `datasets` name) -> token blocks.

Documents are tokenized, joined with a separator and cut into equal blocks; the last
`eval_fraction` of the stream (whole blocks) is held out, so evaluation text never
overlaps training text.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from balora.errors import InputError
from balora.safe_io import user_path

SUFFIXES = (".txt", ".jsonl")
# UTF-8 without the byte order mark that Notepad and Excel write: with plain "utf-8" a BOM .jsonl failed
# as "line 1 is not JSON", and in a .txt the BOM became the first token of the training text.
ENCODING = "utf-8-sig"


@dataclass
class TokenBlocks:
    train: torch.Tensor  # (N_train, T) token ids
    eval: torch.Tensor  # (N_eval, T) token ids, from the end of the stream
    description: str  # for config.json: where the text came from and how much of it


def read_texts(source: str, text_field: str = "text") -> list[str]:
    """Documents of a .txt file (one), a .jsonl file (one per line) or a `datasets` name."""
    path = user_path(source)
    suffix = path.suffix.lower()  # NOTES.TXT is a text file too
    if path.is_file():
        if suffix == ".txt":
            with _utf8(f"lm: {path}"):
                texts = [path.read_text(encoding=ENCODING)]
        elif suffix == ".jsonl":
            texts = _read_jsonl(path, text_field)
        else:
            raise InputError(f"lm: data file {path} has suffix {path.suffix!r}; use a .txt or .jsonl file")
    elif suffix in SUFFIXES or path.exists():
        raise InputError(f"lm: data file {path} not found (or not a file); pass an existing .txt or .jsonl file")
    else:
        texts = _read_dataset(source, text_field)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InputError(f"lm: data {source} holds no text; give a file with some text in it")
    return texts


def to_blocks(
    texts: Sequence[str],
    encode: Callable[[str], list[int]],
    block_size: int,
    eval_fraction: float = 0.1,
    max_eval_blocks: int = 64,
    separator: Sequence[int] = (),
    source: str = "",
) -> TokenBlocks:
    """Tokenize, join with `separator`, cut into (N, block_size) blocks, hold out the tail."""
    if block_size < 2:
        raise InputError(f"lm: block_size must be at least 2 tokens, got {block_size}")
    if not 0 < eval_fraction < 1:
        raise InputError(f"lm: eval_fraction must be between 0 and 1, got {eval_fraction}")
    ids: list[int] = []
    text_tokens = 0
    for i, text in enumerate(texts):
        if i:
            ids.extend(separator)
        encoded = encode(text)
        ids.extend(encoded)
        text_tokens += len(encoded)
    if not text_tokens:  # texts are non-blank: a tokenizer without a vocabulary (left out of a model folder)
        raise InputError(
            f"lm: the model's tokenizer turned all the text of {source} into no tokens (only separators would "
            "be trained on); save the tokenizer into the model folder too (tokenizer.save_pretrained(folder))"
        )
    n_blocks = len(ids) // block_size
    if n_blocks < 2:
        raise InputError(
            f"lm: data {source} has {len(ids)} tokens, fewer than 2 blocks of {block_size}; "
            "give more text or lower --set block_size=..."
        )
    blocks = torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)  # (N, T)
    n_eval = min(max(1, round(n_blocks * eval_fraction)), max_eval_blocks, n_blocks - 1)
    n_train = n_blocks - n_eval
    description = f"{source}: {len(texts)} document(s), {len(ids)} tokens, {n_train} train + {n_eval} eval blocks of {block_size}"
    return TokenBlocks(train=blocks[:n_train], eval=blocks[n_blocks - n_eval :], description=description)


@contextmanager
def _utf8(what: str):
    """A UnicodeDecodeError inside as a one-line InputError: `what` is not UTF-8. Decoding with
    errors="replace" made each undecodable byte of a Latin-1 / cp1252 file a U+FFFD in the training text."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise InputError(f"{what} is not UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8") from None


def _jsonl_records(path: Path, task: str):
    """(line number, parsed record) for each non-blank line of a .jsonl file; a line that is not
    JSON is an InputError naming the file, the line and the task."""
    with path.open("rb") as f:  # bytes, so that a line that is not UTF-8 can be named
        for lineno, raw in enumerate(f, 1):
            with _utf8(f"{task}: {path} line {lineno}"):
                line = raw.decode(ENCODING)
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{task}: {path} line {lineno} is not JSON ({e.msg}); each line must be one JSON object") from e


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    texts = []
    for lineno, record in _jsonl_records(path, "lm"):
        if not isinstance(record, dict):  # no --set text_field can fix a line of bare text
            raise InputError(
                f"lm: {path} line {lineno} is a JSON {_json_type(record)}, not an object; "
                f'write each line as an object with the text in a field, like {{"text": "..."}}'
            )
        if text_field not in record:
            raise InputError(
                f"lm: {path} line {lineno} has no {text_field!r} field; "
                "name the text field with --set text_field=..."
            )
        value = record[text_field]
        if not isinstance(value, str):  # e.g. a chat file's "messages" list: say what to do, not only what is wrong
            strings = [k for k, v in record.items() if isinstance(v, str)]
            raise InputError(
                f"lm: {path} line {lineno}: field {text_field!r} is a JSON {_json_type(value)}, not text; name a "
                f"field that holds the text with --set text_field=... ({', '.join(map(repr, strings)) or 'none'} "
                "on this line), or write the text of each record into one field first"
            )
        texts.append(record[text_field])
    return texts


def _json_type(value) -> str:
    """The JSON name of a parsed value's type (list, not Python's 'list'; null, not 'NoneType')."""
    names = {str: "string", list: "list", dict: "object", bool: "boolean", int: "number", float: "number",
             type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _read_dataset(name: str, text_field: str) -> list[str]:
    """`datasets.load_dataset(name)` ("name" or "name:config"), train split, when installed."""
    try:
        import datasets
    except ImportError:
        raise InputError(
            f"lm: data {name!r} is not a file, and the `datasets` package is not installed to load it by name; "
            "pass a .txt or .jsonl file (or pip install datasets)"
        ) from None
    dataset, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(dataset, config or None, split="train")
    except Exception as e:  # network, unknown name, missing config: all user-fixable
        raise InputError(f"lm: could not load dataset {name!r} ({type(e).__name__}: {e})") from e
    if text_field not in ds.column_names:
        raise InputError(
            f"lm: dataset {name!r} has no column {text_field!r} (columns: {', '.join(ds.column_names)}); "
            "use --set text_field=..."
        )
    return [t for t in ds[text_field] if isinstance(t, str)]


def read_pairs(path_text: str, fields: tuple[str, str]) -> list[tuple[str, str]]:
    """(anchor, positive) string pairs from a .jsonl file with the two named fields."""
    path = user_path(path_text)
    if path.suffix.lower() != ".jsonl":  # PAIRS.JSONL too, as the lm task reads NOTES.TXT
        raise InputError(f"encoder: data file {path} must be a .jsonl file with {fields[0]!r} and {fields[1]!r} fields")
    if not path.is_file():
        raise InputError(f"encoder: data file {path} not found; pass an existing .jsonl file")
    pairs = []
    for lineno, record in _jsonl_records(path, "encoder"):
        missing = [k for k in fields if not isinstance(record, dict) or not isinstance(record.get(k), str)]
        if missing:
            raise InputError(
                f"encoder: {path} line {lineno} has no text field {missing[0]!r}; "
                "name the fields with --set anchor_field=... --set positive_field=..."
            )
        blank = [k for k in fields if not record[k].strip()]
        if blank:  # "" embeds as the bare special tokens of every other blank text: no pair to learn
            raise InputError(f"encoder: {path} line {lineno}: field {blank[0]!r} is blank; fill it in or remove "
                             "the pair")
        pairs.append((record[fields[0]], record[fields[1]]))
    if len(pairs) < 4:
        raise InputError(f"encoder: {path} holds {len(pairs)} pair(s); give at least 4 (2 to train, 2 to evaluate)")
    return pairs
