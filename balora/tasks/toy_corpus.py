"""Deterministic generated arithmetic text and a fixed character tokenizer.

The offline `lm` task needs text and a tokenizer without any hub access. Lines look like

    "42+17=059\\n"   (pretraining: addition)
    "42-17=025\\n"   (fine-tuning: subtraction, the shifted corpus)
    "17-42=-25\\n"

Operands are zero-padded to `digits` characters and answers to `digits + 1`, so every
line has the same length and every operand digit is uniform and independent. That makes
the lowest achievable loss exact (`loss_floor`): operand digits cost ln(10) nats each
for a perfect model, every other character is determined by what came before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

OPS = ("+", "-")


class CharTokenizer:
    """One token per ASCII character (id = code point); anything else is id 0.

    Fixed vocabulary, no files: the toy model and any .txt file share it.
    """

    vocab_size = 128  # ASCII
    unk_id = 0  # NUL never occurs in text, so it stands for "not ASCII"

    def encode(self, text: str) -> list[int]:
        return [o if o < self.vocab_size else self.unk_id for o in map(ord, text)]

    def decode(self, ids) -> str:
        return "".join("\ufffd" if int(i) == self.unk_id else chr(int(i)) for i in ids)


@dataclass(frozen=True)
class ArithmeticCorpus:
    """Lines "a<op>b=c\\n" with a, b uniform in [0, 10**digits)."""

    op: str = "+"  # "+" (pretraining) or "-" (the shifted fine-tuning corpus)
    digits: int = 2  # operand width; 2 keeps the toy model learnable in a minute of CPU pretraining
    seed: int = 0  # corpus seed; train and eval splits use different streams of it

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"ArithmeticCorpus: op must be one of {OPS}, got {self.op!r}")
        if self.digits < 1:
            raise ValueError(f"ArithmeticCorpus: digits must be >= 1, got {self.digits}")

    @property
    def line_length(self) -> int:
        """Characters per line: operands, op, '=', answer (digits + 1 wide), newline."""
        return 3 * self.digits + 4

    def format_line(self, a: int, b: int) -> str:
        d = self.digits
        c = a + b if self.op == "+" else a - b
        # Answer always d + 1 characters: zero-padded, or '-' and d digits when negative.
        answer = f"-{-c:0{d}d}" if c < 0 else f"{c:0{d + 1}d}"
        return f"{a:0{d}d}{self.op}{b:0{d}d}={answer}\n"

    def lines(self, n: int, split: str = "train") -> list[str]:
        """n lines, the same for the same (corpus, split, n) on every machine."""
        rng = np.random.default_rng([self.seed, _SPLITS[split]])  # PCG64: stable across numpy versions
        ab = rng.integers(0, 10**self.digits, size=(n, 2))
        return [self.format_line(int(a), int(b)) for a, b in ab]

    def text(self, n_lines: int, split: str = "train") -> str:
        return "".join(self.lines(n_lines, split))

    def blocks(self, n_blocks: int, lines_per_block: int, split: str = "train") -> torch.Tensor:
        """(n_blocks, lines_per_block * line_length) token ids; each block starts at a line start."""
        ids = CharTokenizer().encode(self.text(n_blocks * lines_per_block, split))
        return torch.tensor(ids, dtype=torch.long).view(n_blocks, lines_per_block * self.line_length)

    def loss_floor(self, lines_per_block: int) -> float:
        """Lowest expected mean next-token loss (nats) on `blocks(..., lines_per_block)`.

        A causal LM predicts tokens 1..T-1 of a T-token block. Each line has 2 * digits
        uniform operand digits (ln 10 each for a perfect model); everything else is
        determined by the preceding characters. Token 0 is an operand digit that is never
        predicted, hence the "- 1".
        """
        T = lines_per_block * self.line_length
        random_digits = 2 * self.digits * lines_per_block - 1
        return random_digits * math.log(10) / (T - 1)


# Independent random streams per split, so the held-out lines never repeat training order.
_SPLITS = {"train": 0, "eval": 1}


# ---------------------------------------------------------------- number words (encoder task)

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words of 0 <= n < 10**6: 342 -> 'three hundred forty-two'."""
    if not 0 <= n < 10**6:
        raise ValueError(f"number_words: n must be in [0, 10**6), got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("-" + _ONES[n % 10] if n % 10 else "")
    if n < 1000:
        return _ONES[n // 100] + " hundred" + (" " + number_words(n % 100) if n % 100 else "")
    return number_words(n // 1000) + " thousand" + (" " + number_words(n % 1000) if n % 1000 else "")


@dataclass(frozen=True)
class NumberPairs:
    """(words, digits) pairs such as ('three hundred forty-two', '342') for 0 <= n < max_value.

    The numbers are shuffled once and split, so held-out pairs are numbers never seen in
    training, and no number occurs twice (in-batch negatives are never duplicates).
    """

    max_value: int = 10_000
    eval_size: int = 128
    seed: int = 0

    def split(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(train pairs, eval pairs), the same on every machine."""
        if not 0 < self.eval_size < self.max_value:
            raise ValueError(f"NumberPairs: eval_size must be in (0, {self.max_value}), got {self.eval_size}")
        order = np.random.default_rng(self.seed).permutation(self.max_value)
        pairs = [(number_words(int(n)), str(int(n))) for n in order]
        return pairs[self.eval_size :], pairs[: self.eval_size]
