"""The offline toy corpus, tokenizer and cached toy GPT-2 (tiny sizes, temporary cache)."""

import math
import re
import threading
from pathlib import Path

import pytest
import torch

from balora.errors import InputError
from balora.tasks import toy_model
from balora.tasks.toy_corpus import ArithmeticCorpus, CharTokenizer
from balora.tasks.toy_model import ensure_toy_model, load_toy_model, toy_config, toy_model_dir


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BALORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


TINY = toy_config("tiny", pretrain_steps=12)


def test_char_tokenizer_round_trip_and_unknown():
    tok = CharTokenizer()
    text = "12+35=047\nHello, world!"
    ids = tok.encode(text)
    assert ids == [ord(c) for c in text]
    assert tok.decode(ids) == text
    assert tok.encode("é") == [tok.unk_id]
    assert max(tok.encode("".join(map(chr, range(300))))) < tok.vocab_size


@pytest.mark.parametrize("op,digits", [("+", 2), ("-", 2), ("-", 3), ("+", 1)])
def test_corpus_lines_are_correct_arithmetic_of_fixed_width(op, digits):
    corpus = ArithmeticCorpus(op=op, digits=digits, seed=3)
    lines = corpus.lines(500)
    pattern = re.compile(rf"^(\d{{{digits}}})([+-])(\d{{{digits}}})=(-?\d+)\n$")
    negatives = 0
    for line in lines:
        assert len(line) == corpus.line_length
        a, got_op, b, c = pattern.match(line).groups()
        assert got_op == op and len(c) == digits + 1
        assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        negatives += c.startswith("-")
    if op == "-":
        assert 0.3 < negatives / len(lines) < 0.7  # about half the differences are negative
    assert corpus.lines(500) == lines  # deterministic
    assert corpus.lines(500, "eval") != lines  # the held-out stream differs


def test_corpus_blocks_start_at_line_starts():
    corpus = ArithmeticCorpus(op="-", digits=2, seed=0)
    blocks = corpus.blocks(5, 3, "eval")
    assert blocks.shape == (5, 3 * corpus.line_length)
    text = "".join(corpus.lines(15, "eval"))
    assert CharTokenizer().decode(blocks.flatten()) == text


@pytest.mark.parametrize("digits,lines_per_block", [(2, 6), (3, 4), (1, 1)])
def test_loss_floor_counts_the_random_digits_that_are_predicted(digits, lines_per_block):
    corpus = ArithmeticCorpus(op="+", digits=digits)
    block = corpus.blocks(1, lines_per_block)[0]
    text = CharTokenizer().decode(block)
    # Independent count: an operand digit is a digit before '=' on its line; the block's first
    # character is never a prediction target of a causal LM.
    random_targets = 0
    before_equals = True
    for i, ch in enumerate(text):
        if i > 0 and before_equals and ch.isdigit():
            random_targets += 1
        before_equals = ch != "=" and (before_equals or ch == "\n")
    expected = random_targets * math.log(10) / (len(text) - 1)
    assert corpus.loss_floor(lines_per_block) == pytest.approx(expected, rel=1e-12)


def test_corpus_rejects_bad_specs():
    with pytest.raises(ValueError):
        ArithmeticCorpus(op="*")
    with pytest.raises(ValueError):
        ArithmeticCorpus(digits=0)


def test_toy_config_sizes_and_unknown_size():
    assert toy_config("small").n_layer == 3 and toy_config("small").n_embd == 128
    assert toy_config("tiny", pretrain_steps=5).pretrain_steps == 5
    with pytest.raises(InputError, match="toy_size"):
        toy_config("huge")


def test_cache_dir_follows_env_and_config(cache):
    path = toy_model_dir(TINY)
    assert path.parent == cache and path.name.startswith("toy-gpt2-")
    assert toy_model_dir(toy_config("tiny", pretrain_steps=13)) != path
    assert toy_model_dir(toy_config("tiny", pretrain_steps=12)) == path


def test_pretrain_is_cached_deterministic_and_learns(cache, monkeypatch):
    model, tok, info = load_toy_model(TINY, progress=False)
    path = Path(info["path"])
    assert path == toy_model_dir(TINY) and (path / "balora_toy.json").is_file()
    # It learned something: well below the loss of a uniform guess over the vocabulary.
    assert info["final_train_loss"] < math.log(tok.vocab_size) - 1.0
    assert info["final_train_loss"] > info["loss_floor"]

    # A second load is a cache hit: pretraining is not called again.
    def fail(*a, **k):
        raise AssertionError("pretrained twice")

    monkeypatch.setattr(toy_model, "pretrain", fail)
    again, _, _ = load_toy_model(TINY, progress=False)
    for (n, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), n
    monkeypatch.undo()

    # Same config in another cache: bit-identical weights (the pretraining is deterministic).
    monkeypatch.setenv("BALORA_CACHE", str(cache.parent / "other"))
    fresh, _, _ = load_toy_model(TINY, progress=False)
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n


def test_killed_pretrain_leaves_no_cache_and_next_run_recovers(cache, monkeypatch):
    from transformers import GPT2LMHeadModel

    original = GPT2LMHeadModel.save_pretrained

    def killed(self, path, *a, **k):
        original(self, path, *a, **k)  # the weights are written, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        ensure_toy_model(TINY, progress=False)
    assert not toy_model_dir(TINY).exists()
    assert [p for p in cache.iterdir() if not p.name.endswith(".lock")] == []  # no temp folder left behind
    monkeypatch.undo()
    monkeypatch.setenv("BALORA_CACHE", str(cache))
    assert (ensure_toy_model(TINY, progress=False) / "balora_toy.json").is_file()


def test_folder_without_marker_is_rebuilt(cache):
    broken = toy_model_dir(TINY)
    broken.mkdir(parents=True)
    (broken / "model.safetensors").write_bytes(b"truncated")
    path = ensure_toy_model(TINY, progress=False)
    assert path == broken and (path / "balora_toy.json").is_file()
    model, _, _ = load_toy_model(TINY, progress=False)  # loads: the broken weights are gone
    assert model.config.n_layer == TINY.n_layer


def test_concurrent_builders_pretrain_once(cache, monkeypatch):
    calls = []
    real = toy_model.pretrain

    def counted(cfg, progress=True):
        calls.append(threading.get_ident())
        return real(cfg, progress)

    monkeypatch.setattr(toy_model, "pretrain", counted)
    paths, errors = [], []

    def worker():
        try:
            paths.append(ensure_toy_model(TINY, progress=False))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1  # the lock made the others wait and reuse the result
    assert len(set(paths)) == 1 and (paths[0] / "balora_toy.json").is_file()
