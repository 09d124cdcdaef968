"""Causal-LM LoRA fine-tuning: any transformers model (hub id or local folder) on local text.

Offline default (`--set model=toy --set data=toy`): a toy GPT-2 that balora pretrains once on
generated addition text (see `toy_model`), fine-tuned with LoRA on subtraction text. It is a
toy: it makes the comparison runnable on any machine in minutes, nothing more. Its eval loss
has an exact floor (operand digits are random), so `excess_loss`-style targets are meaningful.

Real models: `--set model=gpt2 --set data=train.txt` (or .jsonl with a "text" field, or a
`datasets` name when that package is installed). The batch is a (B, T) tensor of token ids;
the loss is the model's own mean next-token cross-entropy.
"""

from __future__ import annotations

import itertools
import sys

import torch
from torch import nn

from balora.errors import InputError
from balora.tasks import Problem, TaskSpec, target_fraction
from balora.tasks.model_setup import (add_lora, adapter_refusal, check_options, dtype_kwarg, first_line, model_dtype,
                                     model_source)
from balora.tasks.text_data import TokenBlocks, read_texts, to_blocks
from balora.tasks.toy_corpus import ArithmeticCorpus, CharTokenizer
from balora.tasks.toy_model import load_toy_model, toy_config

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]  # attention qkv + both output projections + MLP in

DEFAULTS = {
    "arms": "lora,balora",
    "steps": 200,  # toy default: 40-55 s per arm on 2 busy CPU cores; the eval curve is still falling
    "seeds": 1,  # a language model is slow enough that one seed is the default; pass --seeds for more
    "optimizer": "adamw",
    # Per optimizer, a step size at which LoRA on the toy model makes steady progress in 200 steps
    # (AdamW, toy default: 1e-3 is slower, 1e-2 about as good; both arms within ~2% at 200 steps).
    "lr": {"adamw": 3e-3, "adam": 3e-3, "sgd": 0.3, "sign": 1e-3},
    "alpha": 16,  # LoRA scaling s = alpha / r = 2
    "rank": 8,
    "weight_decay": 0.0,
    # One thread: the toy model is small, and on a busy machine OpenMP threads that wait for each
    # other made a step 10x slower. Pass --threads N for a real model on an idle machine.
    "threads": 1,
    "eval_every": 10,  # eval loss on the eval blocks (64 blocks of 60 tokens: a few forward passes)
    "layers_every": 20,  # per-layer report; with spectra ~0.5% of the step time on the toy model
    "spectra_every": 20,
    # task keys (--set KEY=VALUE)
    "model": "toy",  # "toy", a hub id (e.g. gpt2) or a local folder with a causal-LM model
    "data": "toy",  # "toy" (generated subtraction text), a .txt / .jsonl file, or a `datasets` name
    "text_field": "text",  # the .jsonl field / dataset column holding the text
    "toy_size": "small",  # "small" (3 layers x 128) or "tiny" (for tests)
    "pretrain_steps": None,  # None: the toy size's own pretraining length
    "target_modules": None,  # "a,b": module names for LoRA; None: GPT-2 names for GPT-2 models, else PEFT's
    "lora_dropout": 0.0,  # 0 so that arms differ only in what defines them
    "batch_size": 16,  # blocks per step
    "block_size": 128,  # tokens per block for file data (toy data: whole lines, the toy model's block)
    "train_blocks": 2048,  # toy data: generated fine-tuning blocks (6 lines each)
    "eval_blocks": 64,  # blocks for the eval loss (file data: held out, at most this many; toy: drawn apart)
    "eval_fraction": 0.1,  # file data: the tail of the token stream held out for eval
    # Toy data: target eval loss = floor + fraction * (initial - floor). 0.25 lies inside the
    # visible curve (initial ~4.5, floor 0.90, ~1.6 after 200 steps), so steps-to-target differ.
    "target_fraction": 0.25,
}


def build(cfg: dict, seed: int, alpha: float, device: torch.device) -> Problem:
    dtype = model_dtype(cfg, device, "lm")
    fraction = target_fraction(cfg)  # checked before the model loads (or the toy model pretrains)
    check_options(cfg, {"batch_size": 1, "block_size": 2, "train_blocks": 1, "eval_blocks": 1,
                        **({"pretrain_steps": 1} if cfg.get("pretrain_steps") is not None else {})})
    # Read first: a missing data file must not wait for a model download or the toy model's pretraining.
    texts = None if str(cfg["data"]) == "toy" else read_texts(str(cfg["data"]), str(cfg["text_field"]))
    model, tokenizer, info = _load_model(cfg, dtype)
    data, floor = _load_data(cfg, tokenizer, _max_positions(model), texts)
    _check_token_ids(data, model, str(cfg["model"]))
    lora_model = add_lora(model, cfg, alpha, seed, task="lm", task_type="CAUSAL_LM",
                   default_targets={"gpt2": GPT2_TARGETS}).to(device)
    _check_causal(lora_model, data.train[:1, :16].to(device), str(cfg["model"]))  # B = 0: the base model's logits
    batch_size = min(int(cfg["batch_size"]), len(data.train))
    eval_blocks = data.eval.to(device)

    def loss(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:  # batch (B, T) token ids
        return m(input_ids=batch, labels=batch).loss

    def eval_loss(m: nn.Module) -> float:
        return _mean_loss(m, eval_blocks, batch_size=64)

    target = None
    if floor is not None:
        # B = 0 at init, so the LoRA model's eval loss is the base model's, for every seed and alpha.
        lora_model.eval()
        with torch.no_grad():
            initial = eval_loss(lora_model)
        lora_model.train()
        target = floor + fraction * (initial - floor)
        info["initial_eval_loss"] = initial
    info.update(
        data=data.description,
        batch_size=batch_size,
        block_tokens=int(data.train.shape[1]),
        loss_floor=floor,
        trainable_params=sum(p.numel() for p in lora_model.parameters() if p.requires_grad),
        dtype=str(dtype).removeprefix("torch."),
    )
    return Problem(
        model=lora_model,
        batches=_batches(data.train, batch_size, seed, device),
        loss=loss,
        eval_loss=eval_loss,
        best_loss=None,  # the floor holds for the eval loss, not for the noisy per-batch training loss
        target_loss=target,
        info=info,
    )


def _load_model(cfg: dict, dtype: torch.dtype):
    """(causal-LM model, tokenizer with .encode, info dict)."""
    name = str(cfg["model"])
    if name == "toy":
        toy = toy_config(str(cfg["toy_size"]), pretrain_steps=cfg.get("pretrain_steps"))
        model, tokenizer, toy_info = load_toy_model(toy, progress=sys.stderr.isatty())
        info = {
            "model": f"toy GPT-2 ({toy.n_layer} layers x {toy.n_embd}, pretrained by balora on addition text)",
            "model_path": toy_info["path"],
            "pretrain_loss": toy_info["final_train_loss"],
            "pretrain_loss_floor": toy_info["loss_floor"],
            "pretrain_seconds": toy_info["pretrain_seconds"],
        }
        return model.to(dtype), tokenizer, info
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = model_source(name, "lm", hub=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **dtype_kwarg(dtype))
    except (OSError, ValueError) as e:  # not found, no network, not a causal LM
        raise InputError(
            f"lm: could not load model {name!r} ({first_line(e)}); pass a local model folder "
            "or a hub id reachable from this machine, or --set model=toy"
        ) from e
    try:  # after the model: a folder saved without its tokenizer is then named as such
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise InputError(
            f"lm: could not load the tokenizer of {name!r} ({first_line(e)}); save the tokenizer into "
            "the model folder too (tokenizer.save_pretrained(folder))"
        ) from e
    if getattr(model, "peft_config", None):
        # transformers loaded a PEFT adapter's base model with the adapter in it (a Hub adapter id: model_source
        # refuses local adapter folders); add_lora's own adapter, also named "default", would replace it
        raise adapter_refusal(name, "lm")
    tokenizer.model_max_length = sys.maxsize  # we cut blocks ourselves; silences the long-input warning
    return model, _HFEncoder(tokenizer), {"model": name}


class _HFEncoder:
    """A transformers tokenizer seen through the same .encode(text) -> ids as CharTokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def separator(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [eos] if eos is not None else self.encode("\n\n")


def _max_positions(model: nn.Module) -> int | None:
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def _check_token_ids(data: TokenBlocks, model: nn.Module, name: str) -> None:
    """An InputError when a token id has no row in the model's embedding: the first forward failed as a bare
    "IndexError: index out of range in self" (on CUDA a device-side assert), after the run folder was written."""
    rows = model.get_input_embeddings().num_embeddings
    top = max(int(data.train.max()), int(data.eval.max()))
    if top >= rows:
        raise InputError(
            f"lm: the tokenizer of {name!r} gives token id {top}, but the model embeds only {rows} tokens; "
            "save the model's own tokenizer with it (or resize_token_embeddings(len(tokenizer)) after adding tokens)"
        )


def _check_causal(model: nn.Module, ids: torch.Tensor, name: str) -> None:
    """An InputError when a position's logits depend on later tokens. transformers loads an encoder folder
    (BERT, RoBERTa...) as its *LMHeadModel / *ForCausalLM without is_decoder: attention stays bidirectional,
    each position sees the token it is trained to predict, and the run "completed" on a leaked target.
    ids (1, T): the gradient of the earlier positions' logits with respect to the last token's embedding is
    exactly 0 in a causal model, in any dtype. Comparing logits with the last token changed was not: in a
    mixture of experts the changed token joins other experts' batches, so earlier logits moved by rounding
    (~20 eps in fp32) and, in bf16, by whole rerouted experts (a third of the last position's change)."""
    try:
        embeddings, leaves = model.get_input_embeddings(), []
    except (AttributeError, NotImplementedError):  # no embedding module to take the gradient at: no check
        return

    def as_leaf(module, args, out):  # the embedding's output, as the leaf the gradient is taken to
        leaves.append(out.detach().requires_grad_())
        return leaves[-1].clone()  # a clone: later in-place ops act on it, not on the leaf

    was_training = model.training
    model.eval()
    handle = embeddings.register_forward_hook(as_leaf)
    try:
        with torch.enable_grad():
            logits = model(input_ids=ids).logits[:, :-1].float()  # (1, T - 1, V)
            weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0)).to(logits.device)
            grads = torch.autograd.grad((logits * weights).sum(), leaves[:1], allow_unused=True)
    finally:
        handle.remove()
        model.train(was_training)
    if grads[0] is not None and float(grads[0][:, -1].abs().max()) > 0:
        raise InputError(
            f"lm: {name!r} is not a causal language model: its prediction at a position changes with the tokens "
            "after it (an encoder such as BERT loaded with a language-model head), so it would learn to copy the "
            "token it should predict; use a decoder model (GPT-2, Llama...), or --task encoder for an encoder"
        )


def _load_data(cfg: dict, tokenizer, max_positions: int | None,
               texts: list[str] | None) -> tuple[TokenBlocks, float | None]:
    """Train/eval blocks (from `texts`, read_texts of cfg["data"], unless it is "toy") and, for toy
    data on the character tokenizer, the exact eval-loss floor.

    Blocks longer than the model's positions are cut to fit (block_size=128 on the 60-position
    toy model gives 60-token blocks) rather than failing inside the position embedding.
    """
    source = str(cfg["data"])
    if source == "toy":
        corpus = ArithmeticCorpus(op="-", digits=_toy_digits(cfg), seed=1)  # fixed: every seed sees the same text
        if isinstance(tokenizer, CharTokenizer):
            lines = _toy_lines_per_block(cfg)
            blocks = TokenBlocks(
                train=corpus.blocks(int(cfg["train_blocks"]), lines, "train"),
                eval=corpus.blocks(int(cfg["eval_blocks"]), lines, "eval"),
                description=(
                    f"generated subtraction lines like {corpus.format_line(17, 42)!r}: "
                    f"{cfg['train_blocks']} train + {cfg['eval_blocks']} eval blocks of {lines} lines, drawn apart "
                    f"(a small line space: many eval lines also occur in training)"
                ),
            )
            return blocks, corpus.loss_floor(lines)
        texts = [corpus.text(int(cfg["train_blocks"]) * 6)]
        source = "generated subtraction text"
    separator = getattr(tokenizer, "separator", tokenizer.encode("\n\n"))
    block_size = min(int(cfg["block_size"]), max_positions or int(cfg["block_size"]))
    blocks = to_blocks(texts, tokenizer.encode, block_size, float(cfg["eval_fraction"]),
                       int(cfg["eval_blocks"]), separator, source)
    return blocks, None


def _toy_digits(cfg: dict) -> int:
    return toy_config(str(cfg["toy_size"])).digits if str(cfg["model"]) == "toy" else 2


def _toy_lines_per_block(cfg: dict) -> int:
    """The toy model's own block length, so fine-tuning never exceeds its positions."""
    return toy_config(str(cfg["toy_size"])).lines_per_block


def _batches(train: torch.Tensor, batch_size: int, seed: int, device: torch.device):
    """A factory of endless batch iterators: reshuffled each epoch, the same sequence on every call."""

    def batches():
        gen = torch.Generator().manual_seed(int(seed))
        for _ in itertools.count():
            order = torch.randperm(len(train), generator=gen)
            for i in range(0, len(order) - batch_size + 1, batch_size):  # drop the last partial batch
                yield train[order[i : i + batch_size]].to(device)  # (B, T)

    return batches


def _mean_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over all blocks (equal lengths, so a size-weighted mean of batch means)."""
    total = 0.0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i : i + batch_size]  # (b, T)
        total += float(model(input_ids=batch, labels=batch).loss) * len(batch)
    return total / len(blocks)


TASK = TaskSpec(name="lm", build=build, defaults=DEFAULTS)
