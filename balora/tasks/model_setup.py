"""Setup shared by the tasks that fine-tune a transformers model (lm, encoder): its dtype and a
seeded LoRA adapter."""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from balora.errors import InputError
from balora.safe_io import user_path


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def adapter_refusal(name: str, task: str) -> InputError:
    """The one-line refusal of a PEFT adapter given where a model goes: balora adds a LoRA of its own."""
    return InputError(
        f"{task}: {name!r} is a PEFT adapter (adapter_config.json), and balora adds a LoRA of its own; merge "
        "the adapter into its base model first (PeftModel.merge_and_unload(), then save_pretrained) "
        "or pass the base model")


def model_source(name: str, task: str, *, hub: bool) -> str:
    """A model name as from_pretrained should get it: a path (starting with . / ~) must be an
    existing folder, said in one line rather than asked of the hub; anything else is returned
    as is. hub: whether the task also accepts hub ids (named in the message)."""
    local = user_path(name)
    if (local / "adapter_config.json").is_file():
        # A PEFT adapter folder: from_pretrained would fetch its base model first, and a base out of reach (offline,
        # gated, unset) read as "could not connect to huggingface.co" about a folder the user has on disk. With a
        # config.json beside it too: transformers loads the model with the adapter in it, which the task's own
        # LoRA (also "default") replaced, silently in the encoder task.
        raise adapter_refusal(name, task)
    if not name.startswith((".", "/", "~")):
        return name
    if not local.is_dir():
        raise InputError(f"{task}: model folder {local} not found; pass a folder written by save_pretrained"
                         + (" or a hub id" if hub else ""))
    return str(local)


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (transformers' load errors run to paragraphs), or its type."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def model_dtype(cfg: dict, device: torch.device, task: str) -> torch.dtype:
    """cfg["dtype"] (default float32) as a torch dtype; bf16 only on CUDA."""
    name = str(cfg.get("dtype") or "float32")
    if name not in DTYPES:
        raise InputError(f"--dtype {name}: the {task} task supports {', '.join(DTYPES)}")
    if name == "bfloat16" and device.type != "cuda":
        raise InputError(f"--dtype bfloat16: the {task} task uses bf16 only on CUDA (device is {device}); drop --dtype")
    return DTYPES[name]


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """from_pretrained's dtype keyword for the installed transformers: `dtype` from 4.56 on; before,
    `torch_dtype`, and a `dtype` went on to the model's __init__, a TypeError (pyproject allows 4.45)."""
    import transformers
    from packaging.version import Version

    new = Version(transformers.__version__).release >= (4, 56)
    return {"dtype" if new else "torch_dtype": dtype}


def check_options(cfg: dict, minimums: dict[str, int]) -> None:
    """Each cfg[key] of `minimums` an integer >= its minimum, cfg["lora_dropout"] in [0, 1) and, where present,
    cfg["scale"] a positive number and cfg["eval_fraction"] in (0, 1); else an InputError naming the option.
    Checked before the model loads: int() cut 2.5 to 2 and raised a bare ValueError on text, and 0 blocks or
    0 rows per batch failed inside the first cell, after the run folder was written."""
    for key, minimum in minimums.items():
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
            raise InputError(f"--set {key}={v}: must be an integer >= {minimum}")
    # key: (a valid value for a task without the key, the check, what it must be); an eval_fraction of "abc"
    # was a bare ValueError, and 1 was refused only after the model had loaded (maybe a download)
    checks = {"lora_dropout": (0.0, lambda x: 0 <= x < 1, "a number from 0 (no dropout) up to, not including, 1"),
              "scale": (1.0, lambda x: math.isfinite(x) and x > 0, "a positive finite number"),
              "eval_fraction": (0.1, lambda x: 0 < x < 1, "a number between 0 and 1, not including either")}
    for key, (default, ok, what) in checks.items():
        v = cfg.get(key, default)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not ok(v):
            raise InputError(f"--set {key}={v}: must be {what}")


def add_lora(model: nn.Module, cfg: dict, alpha: float, seed: int, *, task: str, task_type: str,
             default_targets: dict[str, list[str]]) -> nn.Module:
    """PEFT LoRA on `model` with r = cfg["rank"], the given alpha and cfg["lora_dropout"].

    Targets: cfg["target_modules"] (a list, "a,b" or PEFT's "all-linear"), else default_targets[model_type] when the
    architecture is listed, else PEFT's own defaults. The LoRA init (A random, B = 0) comes from
    the global RNG: it is seeded here and the caller's RNG is left as it was.
    """
    from peft import LoraConfig, get_peft_model

    model_type = getattr(model.config, "model_type", None)
    targets = cfg.get("target_modules")
    if isinstance(targets, str) and targets.strip().lower() == "all-linear":
        targets = "all-linear"  # PEFT's shorthand (every linear layer but the output head), not a layer name
    elif isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    elif targets is None:
        targets = default_targets.get(model_type)
    lora = LoraConfig(
        r=int(cfg["rank"]),
        lora_alpha=alpha,
        lora_dropout=float(cfg["lora_dropout"]),
        target_modules=targets,
        fan_in_fan_out=model_type == "gpt2",  # GPT-2 uses transformers' Conv1D, weights (in, out)
        task_type=task_type,
    )
    keep_4bit_trainable(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        try:
            peft_model = get_peft_model(model, lora)
        except ValueError as e:  # PEFT cannot guess targets for this architecture, or none matched
            raise InputError(
                f"{task}: LoRA could not be added to {cfg['model']!r} ({str(e).splitlines()[0]}); "
                "name the layers with --set target_modules=a,b"
            ) from e
    _check_rank_fits(peft_model, int(cfg["rank"]))
    return peft_model


def keep_4bit_trainable(model: nn.Module) -> None:
    """Keep every bitsandbytes 4-bit layer of `model` in its training layout. On a CPU with AVX512-BF16,
    bitsandbytes' Linear4bit repacks its weight in place for inference the first time it runs in eval mode
    without grad, and the repacked kernel has no backward: after the task's first eval (between training
    steps) no LoRA factor below the last 4-bit layer got a gradient, in that cell and every later one."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):  # only bitsandbytes' Linear4bit has it
            module.support_avx512bf16_for_cpu = False


def _check_rank_fits(model: nn.Module, r: int) -> None:
    """An InputError when r exceeds min(in, out) of a LoRA layer: there B A has rank below r, so every
    balancing pass leaves the pair alone as rank-deficient and the BaLoRA arms silently train it as plain
    LoRA (the synthetic task refuses such ranks too). Checked in the first build, before the run is written."""
    from balora.adapters.live import model_pairs

    narrow = [p for p in model_pairs(model) if p.r > min(p.in_features, p.out_features)]
    if narrow:
        widest = min(min(p.in_features, p.out_features) for p in narrow)
        p = narrow[0]
        raise InputError(
            f"--rank {r}: {p.name} is {p.in_features} -> {p.out_features} wide, so its B A has rank below {r} "
            f"({len(narrow)} such layer(s)): balancing leaves those pairs alone and the BaLoRA arms would train "
            f"them as plain LoRA; use --rank {widest} or less, or other layers with --set target_modules=a,b"
        )
