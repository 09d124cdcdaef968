"""The offline default model of the `lm` task: a toy GPT-2 that balora pretrains itself, once.

A tiny `GPT2LMHeadModel` (character vocabulary, see `toy_corpus`) is pretrained on generated
addition text, then cached with `save_pretrained` under

    $BALORA_CACHE/toy-gpt2-<hash>/      (default ~/.cache/balora/toy-gpt2-<hash>/)

where the hash covers every setting that changes the weights. The folder is written under a
temporary name and renamed when complete, so a killed pretrain never leaves a half-written
cache; a lock file makes a second process wait for the first instead of training twice.

This is a toy: a few hundred thousand parameters that learned 2-digit addition for a minute.
It makes `balora compare --task lm` runnable anywhere, not representative of real LLMs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from balora.errors import InputError
from balora.safe_io import user_path
from balora.tasks.toy_corpus import ArithmeticCorpus, CharTokenizer

# Bump when the pretraining recipe changes in a way the config below does not capture.
FORMAT_VERSION = 1
_MARKER = "balora_toy.json"  # written last inside the folder: its presence means "complete"


@dataclass(frozen=True)
class ToyModelConfig:
    """Architecture and pretraining recipe; every field is part of the cache key."""

    n_layer: int = 3  # 3 x 128 is the model of DESIGN.md's language-model check
    n_embd: int = 128
    n_head: int = 4
    digits: int = 2  # operand width of the addition corpus (see ArithmeticCorpus)
    lines_per_block: int = 6  # 6 lines of 10 characters = 60-token blocks
    pretrain_steps: int = 600  # ~80 s CPU (140-200 s wall on 2 busy cores); addition eval loss ~1.14, floor 0.90
    batch_size: int = 16  # blocks per step; more steps of smaller batches learned more per second
    lr: float = 3e-3  # AdamW peak, warmup then cosine decay to 10%; 5e-3 learned less in 800 steps
    seed: int = 0  # weights init and corpus

    @property
    def corpus(self) -> ArithmeticCorpus:
        return ArithmeticCorpus(op="+", digits=self.digits, seed=self.seed)

    @property
    def block_tokens(self) -> int:
        return self.lines_per_block * self.corpus.line_length


# Named sizes for `--set toy_size=...`; "tiny" builds in about a second (tests).
TOY_SIZES = {
    "small": ToyModelConfig(),
    "tiny": ToyModelConfig(n_layer=1, n_embd=32, n_head=2, lines_per_block=2, pretrain_steps=30, batch_size=8),
}


def toy_config(size: str = "small", **overrides) -> ToyModelConfig:
    """A named size with some fields replaced (e.g. pretrain_steps); InputError for unknown names."""
    if size not in TOY_SIZES:
        raise InputError(f"lm: unknown toy_size {size!r}; use one of {', '.join(TOY_SIZES)}")
    return replace(TOY_SIZES[size], **{k: v for k, v in overrides.items() if v is not None})


def cache_root() -> Path:
    """$BALORA_CACHE, else ~/.cache/balora."""
    env = os.environ.get("BALORA_CACHE")
    return user_path(env) if env else Path.home() / ".cache" / "balora"


def toy_model_dir(cfg: ToyModelConfig) -> Path:
    key = json.dumps({"format": FORMAT_VERSION, **asdict(cfg)}, sort_keys=True)
    return cache_root() / f"toy-gpt2-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def gpt2_config(cfg: ToyModelConfig):
    from transformers import GPT2Config

    newline = ord("\n")
    return GPT2Config(
        vocab_size=CharTokenizer.vocab_size,
        n_positions=cfg.block_tokens,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        # No dropout: pretraining is short, and fine-tuning comparisons should not depend on masks.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=newline,
        eos_token_id=newline,
    )


def pretrain(cfg: ToyModelConfig, progress: bool = True):
    """Train a fresh toy GPT-2 on addition text. Returns (model, info dict)."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(cfg.seed)
    model = _named_loss(GPT2LMHeadModel(gpt2_config(cfg)))
    data = cfg.corpus.blocks(cfg.pretrain_steps * cfg.batch_size, cfg.lines_per_block)  # (steps * B, T)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, cfg.pretrain_steps // 20)

    def lr_factor(step: int) -> float:  # linear warmup, cosine decay to 10% of the peak
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, cfg.pretrain_steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    t0, losses = time.perf_counter(), []
    bar = _progress_bar(cfg.pretrain_steps, progress)
    for step in range(cfg.pretrain_steps):
        batch = data[step * cfg.batch_size : (step + 1) * cfg.batch_size]  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    if bar is not None:
        bar.close()
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    info = {
        "config": asdict(cfg),
        "format": FORMAT_VERSION,
        "corpus": f"generated addition lines like {cfg.corpus.format_line(42, 17)!r}, seed {cfg.seed}",
        "final_train_loss": sum(tail) / len(tail),  # mean over the last 10% of steps
        "loss_floor": cfg.corpus.loss_floor(cfg.lines_per_block),
        "pretrain_seconds": time.perf_counter() - t0,
        "torch": torch.__version__,
    }
    return model, info


def ensure_toy_model(cfg: ToyModelConfig, progress: bool = True) -> Path:
    """The cached folder for `cfg`, pretraining it first if no complete copy exists."""
    final = toy_model_dir(cfg)
    if (final / _MARKER).is_file():
        return final
    root = final.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"lm: cannot create the model cache {root} ({e}); set BALORA_CACHE to a writable folder") from e
    with _lock(root / f".{final.name}.lock"):
        if (final / _MARKER).is_file():  # another process finished it while we waited
            return final
        if final.exists():  # no marker: not written by this code; safe to replace while we hold the lock
            shutil.rmtree(final)
        if progress:
            print(f"balora: pretraining the toy GPT-2 once (cached in {final})", file=sys.stderr)
        model, info = pretrain(cfg, progress)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        try:
            model.save_pretrained(tmp)
            (tmp / _MARKER).write_text(json.dumps(info, indent=2))
            os.replace(tmp, final)  # atomic on one filesystem; final does not exist here
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if (final / _MARKER).is_file():  # lost a race with a process that had no lock (no fcntl)
                return final
            raise
    return final


def load_toy_model(cfg: ToyModelConfig, progress: bool = True):
    """(GPT2LMHeadModel in eval mode, CharTokenizer, info dict), pretraining on first use."""
    from transformers import GPT2LMHeadModel

    path = ensure_toy_model(cfg, progress)
    model = _named_loss(GPT2LMHeadModel.from_pretrained(path))
    info = json.loads((path / _MARKER).read_text())
    info["path"] = str(path)
    return model, CharTokenizer(), info


def _named_loss(model):
    # transformers looks the loss up by model.loss_type and logs a warning on every new
    # process when it is unset; the causal-LM loss is what it falls back to anyway.
    model.loss_type = "ForCausalLM"
    return model


@contextlib.contextmanager
def _lock(path: Path):
    """Exclusive lock on `path` (POSIX flock); without fcntl, rely on the atomic rename alone."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # blocks while another process pretrains the same model
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="pretrain toy GPT-2", unit="step", file=sys.stderr, leave=False)
