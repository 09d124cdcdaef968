"""The lm task: toy default, local text files, local transformers models, and every arm end to end."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from balora.adapters.live import iter_lora_pairs
from balora.balance import balance_
from balora.errors import InputError
from balora.imbalance import rel_imbalance
from balora.tasks import get_task, lm
from balora.tasks.text_data import read_texts, to_blocks
from balora.tasks.toy_corpus import ArithmeticCorpus, CharTokenizer
from balora.tasks.toy_model import load_toy_model, toy_config

CPU = torch.device("cpu")
TINY = {"toy_size": "tiny", "pretrain_steps": 12}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("balora_cache")


@pytest.fixture(autouse=True)
def offline_cache_one_thread(cache_dir, monkeypatch):
    # A private cache (no pre-existing toy model), and one thread: tiny models gain nothing
    # from intra-op threads, and on a shared 2-core runner they lose a lot to contention.
    monkeypatch.setenv("BALORA_CACHE", str(cache_dir))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_cfg(**overrides) -> dict:
    cfg = {**lm.DEFAULTS, "rank": 4, "dtype": "float32", **TINY,
           "train_blocks": 64, "eval_blocks": 8, "batch_size": 4}
    cfg.update(overrides)
    return cfg


def lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def manual_lm_loss(model, batch) -> float:
    """Mean next-token cross-entropy, shifting by hand (independent of transformers' labels path)."""
    with torch.no_grad():
        logits = model(input_ids=batch).logits  # (B, T, V)
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)))


def test_registered_with_defaults_for_every_compare_option():
    task = get_task("lm")
    assert task is lm.TASK and task.name == "lm"
    for key in ("steps", "seeds", "optimizer", "lr", "alpha", "rank", "eval_every", "layers_every", "spectra_every"):
        assert key in task.defaults
    assert task.defaults["model"] == "toy" and task.defaults["data"] == "toy"


def test_toy_problem_has_lora_on_attention_and_mlp_only():
    cfg = make_cfg()
    problem = lm.build(cfg, seed=0, alpha=8.0, device=CPU)
    trainable = [n for n, p in problem.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    pairs = iter_lora_pairs(problem.model)
    n_layer = toy_config("tiny").n_layer
    suffixes = sorted(p.module.split(".", 3)[-1] for p in pairs)
    assert suffixes == sorted(["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"] * n_layer)
    for p in pairs:
        assert p.kind == "hf_conv1d" and p.r == 4
        assert p.scaling == pytest.approx(8.0 / 4)
        assert torch.count_nonzero(p.B) == 0  # PEFT init: dW = 0
    info = problem.info
    lines = toy_config("tiny").lines_per_block
    assert info["loss_floor"] == pytest.approx(ArithmeticCorpus(op="-").loss_floor(lines))
    assert info["block_tokens"] == lines * ArithmeticCorpus().line_length
    assert problem.best_loss is None  # a floor of the eval loss, not of the per-batch training loss


def test_seed_fixes_adapter_init_and_data_order():
    cfg = make_cfg()
    a, b, c = (lm.build(cfg, seed=s, alpha=8.0, device=CPU) for s in (0, 0, 1))
    sa, sb, sc = lora_state(a.model), lora_state(b.model), lora_state(c.model)
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert any(not torch.equal(sa[n], sc[n]) for n in sa if "lora_A" in n)

    def first(problem, n=20):
        it = problem.batches()
        return [next(it) for _ in range(n)]  # 20 batches of 4 > 64 blocks: crosses an epoch

    assert all(torch.equal(x, y) for x, y in zip(first(a), first(a)))  # same order on every call
    assert all(torch.equal(x, y) for x, y in zip(first(a), first(b)))
    assert any(not torch.equal(x, y) for x, y in zip(first(a), first(c)))


def test_batches_are_correct_subtraction_blocks():
    problem = lm.build(make_cfg(), seed=0, alpha=8.0, device=CPU)
    batch = next(problem.batches())
    assert batch.shape == (4, problem.info["block_tokens"]) and batch.dtype == torch.long
    for row in batch:
        for line in CharTokenizer().decode(row).splitlines():
            left, answer = line.split("=")
            a, b = left.split("-")
            assert int(answer) == int(a) - int(b)


def test_losses_match_the_base_model_at_init_and_target_sits_between_floor_and_initial():
    cfg = make_cfg()
    problem = lm.build(cfg, seed=0, alpha=8.0, device=CPU)
    base, _, _ = load_toy_model(toy_config("tiny", pretrain_steps=12), progress=False)
    batch = next(problem.batches())
    problem.model.train()
    assert float(problem.loss(problem.model, batch).detach()) == pytest.approx(manual_lm_loss(base, batch), rel=1e-5)

    corpus = ArithmeticCorpus(op="-", digits=2, seed=1)
    eval_blocks = corpus.blocks(8, toy_config("tiny").lines_per_block, "eval")
    with torch.no_grad():
        expected = manual_lm_loss(base, eval_blocks)
        problem.model.eval()
        got = problem.eval_loss(problem.model)
    assert got == pytest.approx(expected, rel=1e-5)
    floor = problem.info["loss_floor"]
    assert problem.target_loss == pytest.approx(floor + 0.25 * (expected - floor), rel=1e-5)
    assert floor < problem.target_loss < expected


@pytest.mark.parametrize("method", [None, "nearest", "svd"])
def test_minimal_training_loop_lowers_eval_loss(method):
    problem = lm.build(make_cfg(), seed=0, alpha=8.0, device=CPU)
    model = problem.model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.eval()
    with torch.no_grad():
        before = problem.eval_loss(model)
    model.train()
    data = problem.batches()
    for _ in range(15):
        loss = problem.loss(model, next(data))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if method:
            balance_(model, method=method, check=False)
    model.eval()
    with torch.no_grad():
        after = problem.eval_loss(model)
    assert after < before - 0.02  # every gauge trains (svd with AdamW slowest, as DESIGN.md found)
    if method:
        for p in iter_lora_pairs(model):
            assert float(rel_imbalance(p.A, p.B)) < 1e-4


def test_compare_runs_every_arm_on_the_tiny_toy(tmp_path):
    from balora.arms import ARMS
    from balora.runner import compare

    run = compare("lm", arms=",".join(ARMS), steps=4, eval_every=2, layers_every=2, spectra_every=4,
                  out=tmp_path / "run", quiet=True, rank=4, train_blocks=32, eval_blocks=4, batch_size=4, **TINY)
    summary = run.summary.set_index("arm")
    assert set(summary.index) == set(ARMS)
    for arm, row in summary.iterrows():
        assert row["status"] in ("completed", "skipped"), (arm, row["reason"])
    assert (summary["status"] == "completed").sum() >= 3  # lora, balora, balora-svd always run
    steps = run.steps[run.steps.arm == "lora"].set_index("step")
    assert list(steps.index) == [1, 2, 3, 4]
    assert steps.loc[[2, 4], "eval_loss"].notna().all() and steps.loc[[1, 3], "eval_loss"].isna().all()
    assert run.config["problem"]["loss_floor"] > 0 and run.config["task_options"]["toy_size"] == "tiny"
    assert len(run.layers) and len(run.spectra)


def test_the_eval_loss_target_is_not_put_on_the_training_loss(tmp_path):
    # --eval-every 0 records no eval loss: the task's target (a quarter of the way from the initial eval
    # loss to the eval floor) is then not applied to the per-batch training loss; a --target-loss is.
    from balora.runner import compare

    kw = dict(arms="lora", steps=2, layers_every=0, spectra_every=0, quiet=True, rank=4, train_blocks=32,
              eval_blocks=4, batch_size=4, **TINY)
    run = compare("lm", eval_every=0, out=tmp_path / "none", **kw)
    assert run.summary["target_loss"].isna().all() and run.summary["steps_to_target"].isna().all()
    run = compare("lm", eval_every=0, target_loss=50.0, out=tmp_path / "mine", **kw)
    assert (run.summary["target_loss"] == 50.0).all() and (run.summary["target_on"] == "loss").all()
    assert (run.summary["steps_to_target"] == 1).all()  # any loss is below 50
    run = compare("lm", eval_every=1, out=tmp_path / "eval", **kw)
    assert (run.summary["target_on"] == "eval_loss").all() and run.summary["target_loss"].notna().all()


def test_the_bf16_path_of_a_gpu_run_works_end_to_end(tmp_path, monkeypatch):
    """`balora compare --task lm --device cuda --dtype bfloat16` (what benchmarks/gpu_check.py runs)
    takes this path: a bf16 base model whose LoRA factors PEFT keeps in fp32. The task refuses bf16
    on a CPU, so the refusal is lifted here to run the same code on the CPU: both arms complete,
    the recorder measures the fp32 factors, and balancing keeps them balanced to fp32 rounding."""
    from balora.runner import compare
    from balora.tasks.model_setup import DTYPES

    monkeypatch.setattr(lm, "model_dtype", lambda cfg, device, task: DTYPES[cfg["dtype"]])
    run = compare("lm", arms="lora,balora", dtype="bfloat16", steps=4, eval_every=2, layers_every=2,
                  spectra_every=4, out=tmp_path / "run", quiet=True, rank=4, train_blocks=32, eval_blocks=4,
                  batch_size=4, **TINY)
    assert run.config["problem"]["dtype"] == "bfloat16"
    assert (run.summary["status"] == "completed").all(), run.summary[["arm", "reason"]]
    assert run.steps["eval_loss"].dropna().map(math.isfinite).all()
    last = run.layers[run.layers.step == run.layers.step.max()]
    assert set(last["dtype"]) == {"float32"}
    assert last[last.arm == "balora"]["rel_imbalance"].max() < 1e-5
    assert last[last.arm == "lora"]["rel_imbalance"].min() > 0.1  # without balancing it stays far off
    assert len(run.spectra)


def test_text_file_data_is_split_into_train_head_and_eval_tail(tmp_path):
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(200))
    path = tmp_path / "train.txt"
    path.write_text(text)
    problem = lm.build(make_cfg(data=str(path), block_size=16, eval_fraction=0.25), 0, 8.0, CPU)
    tok = CharTokenizer()
    n_blocks = len(text) // 16
    n_eval = min(round(n_blocks * 0.25), 8)  # make_cfg caps eval at eval_blocks=8
    assert problem.target_loss is None and problem.info["loss_floor"] is None
    it = problem.batches()
    seen = torch.cat([next(it) for _ in range(n_blocks // 4)])  # a whole epoch of the train blocks
    assert seen.shape == (n_blocks // 4 * 4, 16)
    train_text = text[: (n_blocks - n_eval) * 16]
    for row in seen:
        assert tok.decode(row) in train_text
    assert "train.txt" in problem.info["data"] and f"{n_eval} eval blocks" in problem.info["data"]


def test_blocks_never_exceed_the_model_positions(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("abcdefghij" * 200)
    problem = lm.build(make_cfg(data=str(path), block_size=10_000), 0, 8.0, CPU)
    positions = problem.model.base_model.model.config.n_positions
    batch = next(problem.batches())
    assert batch.shape[1] == positions
    problem.model.train()
    assert math.isfinite(float(problem.loss(problem.model, batch).detach()))


def test_jsonl_reads_the_named_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"doc {i}", "id": i}) for i in range(3)) + "\n\n")
    assert read_texts(str(path), "body") == ["doc 0", "doc 1", "doc 2"]
    with pytest.raises(InputError, match=r"docs.jsonl line 1 has no 'text' field.*text_field"):
        read_texts(str(path))


def test_a_byte_order_mark_is_not_text(tmp_path):
    # Notepad and Excel write UTF-8 files with a BOM: a .jsonl was refused ("line 1 is not JSON"),
    # and in a .txt the BOM became the first token of the training text.
    from balora.tasks.text_data import read_pairs

    docs = [f"doc {i}" for i in range(4)]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n", encoding="utf-8-sig")
    (tmp_path / "doc.txt").write_text("\n".join(docs), encoding="utf-8-sig")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"a": d, "b": d.upper()}) + "\n" for d in docs),
                                          encoding="utf-8-sig")
    assert read_texts(str(tmp_path / "docs.jsonl")) == docs
    assert read_texts(str(tmp_path / "doc.txt")) == ["\n".join(docs)]
    assert read_pairs(str(tmp_path / "pairs.jsonl"), ("a", "b")) == [(d, d.upper()) for d in docs]


def test_a_text_field_that_is_not_text_says_what_to_do(tmp_path):
    # A chat file ({"messages": [...]}) named with text_field=messages: the message said only "is not a string".
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}) + "\n")
    with pytest.raises(InputError, match=r"chat.jsonl line 1: field 'messages' is a JSON list.*--set text_field=") as e:
        read_texts(str(path), "messages")
    assert "\n" not in str(e.value)


def test_upper_case_suffixes_are_the_same_files(tmp_path):
    # NOTES.TXT (Windows, old tools) was refused: "has suffix '.TXT'; use a .txt or .jsonl file".
    (tmp_path / "NOTES.TXT").write_text("some notes")
    (tmp_path / "DOCS.JSONL").write_text(json.dumps({"text": "a doc"}) + "\n")
    assert read_texts(str(tmp_path / "NOTES.TXT")) == ["some notes"]
    assert read_texts(str(tmp_path / "DOCS.JSONL")) == ["a doc"]


def test_text_that_is_not_utf8_is_refused_naming_file_and_line(tmp_path):
    # A Latin-1 / cp1252 file: each undecodable byte silently became U+FFFD in the training text.
    (tmp_path / "notes.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    (tmp_path / "docs.jsonl").write_bytes(b'{"text": "ok"}\n' + '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(InputError, match=r"notes.txt is not UTF-8 .*byte 3.*UTF-8") as e:
        read_texts(str(tmp_path / "notes.txt"))
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match=r"docs.jsonl line 2 is not UTF-8 .*UTF-8"):
        read_texts(str(tmp_path / "docs.jsonl"))


def test_a_jsonl_line_that_is_not_an_object_says_so(tmp_path):
    # A .jsonl of bare strings ("some text" per line) was told "has no 'text' field; name the text field
    # with --set text_field=...", which no field name can fix.
    path = tmp_path / "strings.jsonl"
    path.write_text(json.dumps("some text") + "\n")
    with pytest.raises(InputError, match=r"strings.jsonl line 1 is a JSON string, not an object") as e:
        read_texts(str(path))
    assert "\n" not in str(e.value)


def test_to_blocks_joins_documents_and_caps_eval():
    tok = CharTokenizer()
    blocks = to_blocks(["abcd", "efgh"], tok.encode, block_size=3, eval_fraction=0.5, max_eval_blocks=1,
                       separator=tok.encode("|"), source="x")
    assert tok.decode(blocks.train.flatten()) == "abcd|e"  # 9 tokens -> 3 blocks, last one held out
    assert tok.decode(blocks.eval.flatten()) == "fgh"


@pytest.mark.parametrize("content,name,message", [
    (None, "missing.txt", "not found"),
    ("", "empty.txt", "holds no text"),
    ("  \n\n", "blank.txt", "holds no text"),
    ("some text", "data.csv", "use a .txt or .jsonl"),
    ("{not json\n", "bad.jsonl", "line 1 is not JSON"),
    ('{"text": 3}\n', "num.jsonl", "is a JSON number, not text"),
    ("short", "short.txt", "fewer than 2 blocks"),
])
def test_bad_data_is_an_input_error_naming_the_file(tmp_path, content, name, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message) as e:
        lm.build(make_cfg(data=str(path)), 0, 8.0, CPU)
    assert name in str(e.value) and "\n" not in str(e.value)


def test_a_missing_data_file_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    # Loading the model can mean a download or pretraining the toy model (minutes on an empty cache).
    monkeypatch.setattr(lm, "_load_model", lambda *a: pytest.fail("the model was loaded before the data was read"))
    with pytest.raises(InputError, match="missing.txt not found"):
        lm.build(make_cfg(data=str(tmp_path / "missing.txt")), 0, 8.0, CPU)


def test_bad_options_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="bfloat16"):
        lm.build(make_cfg(dtype="bfloat16"), 0, 8.0, CPU)
    with pytest.raises(InputError, match="toy_size"):
        lm.build(make_cfg(toy_size="huge"), 0, 8.0, CPU)
    with pytest.raises(InputError, match="model folder"):
        lm.build(make_cfg(model=str(tmp_path / "no-such-model")), 0, 8.0, CPU)
    for fraction in (-1, 1.5, "abc", None):  # once a target below the floor (never reached) or a bare ValueError
        with pytest.raises(InputError, match="--set target_fraction"):
            lm.build(make_cfg(target_fraction=fraction), 0, 8.0, CPU)
    # once a bare ValueError / ZeroDivisionError, some only in the first cell, after the run folder was written
    for key, value in [("batch_size", 0), ("batch_size", "abc"), ("train_blocks", 0), ("eval_blocks", 0),
                       ("block_size", 2.5), ("lora_dropout", "abc"), ("lora_dropout", 1.0),
                       ("pretrain_steps", "abc"), ("pretrain_steps", -3),
                       ("eval_fraction", "abc"), ("eval_fraction", 1), ("eval_fraction", 0), ("eval_fraction", True)]:
        with pytest.raises(InputError, match=f"--set {key}="):
            lm.build(make_cfg(**{key: value}), 0, 8.0, CPU)


def _char_tokenizer_folder(path, text):
    """A transformers fast tokenizer (character-level WordLevel) saved offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(["<unk>", "<eos>"] + sorted(set(text)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(path)
    return len(vocab)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_local_transformers_model_folder(tmp_path, arch):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    text = "".join(f"{i} apples and {i + 1} pears\n" for i in range(120))
    folder = tmp_path / arch
    vocab = _char_tokenizer_folder(folder, text)
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=16, n_layer=1, n_head=2))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    model.save_pretrained(folder)
    data = tmp_path / "fruit.txt"
    data.write_text(text)

    problem = lm.build(make_cfg(model=str(folder), data=str(data), block_size=32), 0, 8.0, CPU)
    modules = {p.module.rsplit(".", 1)[-1] for p in iter_lora_pairs(problem.model)}
    # GPT-2: balora's attention + MLP targets; other models: PEFT's defaults for the architecture.
    assert modules == ({"c_attn", "c_proj", "c_fc"} if arch == "gpt2" else {"q_proj", "v_proj"})
    batch = next(problem.batches())
    assert batch.shape == (4, 32) and int(batch.max()) < vocab
    loss = problem.loss(problem.model, batch)
    assert math.isfinite(float(loss.detach())) and loss.requires_grad
    # Without a known floor the task sets no target; the eval loss still works.
    assert problem.target_loss is None
    problem.model.eval()
    with torch.no_grad():
        assert math.isfinite(problem.eval_loss(problem.model))


def test_a_model_folder_without_its_tokenizer_is_refused(tmp_path):
    # model.save_pretrained alone: transformers then builds an empty GPT-2 tokenizer that turns any text into
    # no tokens. A .txt was blamed ("has 0 tokens ... give more text"); a .jsonl trained on the end-of-text
    # separators between its documents alone, and the run completed.
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(folder)
    lines = [f"{i} apples and {i + 1} pears" for i in range(300)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    (tmp_path / "fruit.txt").write_text("\n".join(lines))
    for data in (tmp_path / "docs.jsonl", tmp_path / "fruit.txt"):
        with pytest.raises(InputError, match="tokenizer") as e:
            lm.build(make_cfg(model=str(folder), data=str(data), block_size=16), 0, 8.0, CPU)
        assert data.name in str(e.value) and "\n" not in str(e.value)


def test_a_llama_folder_without_its_tokenizer_says_so(tmp_path):
    # It failed as "could not load model ... (Couldn't instantiate the backend tokenizer from one of: )":
    # the model itself was fine, and nothing said that the folder lacked the tokenizer's files.
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(folder)
    (tmp_path / "fruit.txt").write_text("apples and pears\n" * 100)
    with pytest.raises(InputError, match=r"tokenizer.*tokenizer\.save_pretrained") as e:
        lm.build(make_cfg(model=str(folder), data=str(tmp_path / "fruit.txt"), block_size=16), 0, 8.0, CPU)
    assert "\n" not in str(e.value)


def test_token_ids_beyond_the_model_embedding_are_refused(tmp_path):
    # A tokenizer saved with the model but not its own (or grown by add_tokens without resize_token_embeddings):
    # the first forward failed as "IndexError: index out of range in self" (on CUDA, a device-side assert).
    from transformers import LlamaConfig, LlamaForCausalLM

    text = "".join(f"{i} apples and {i + 1} pears\n" for i in range(60))
    folder = tmp_path / "llama"
    vocab = _char_tokenizer_folder(folder, text)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab - 3, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(folder)
    (tmp_path / "fruit.txt").write_text(text)
    with pytest.raises(InputError, match=f"token id {vocab - 1}.* {vocab - 3} ") as e:
        lm.build(make_cfg(model=str(folder), data=str(tmp_path / "fruit.txt"), block_size=32), 0, 8.0, CPU)
    assert "\n" not in str(e.value)


def test_a_peft_adapter_folder_is_refused_not_silently_dropped(tmp_path):
    # A PEFT output folder (adapter_config.json) as model: transformers loads the base model with the adapter,
    # and the task's own LoRA, also named "default", replaced it: the run trained the base model instead.
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    text = "".join(f"{i} apples and {i + 1} pears\n" for i in range(60))
    base, adapter = tmp_path / "llama", tmp_path / "adapter"
    _char_tokenizer_folder(base, text)
    _char_tokenizer_folder(adapter, text)
    LlamaForCausalLM(LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(base)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                                LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    peft_model.save_pretrained(adapter)
    (tmp_path / "fruit.txt").write_text(text)
    with pytest.raises(InputError, match="adapter.*merge_and_unload") as e:
        lm.build(make_cfg(model=str(adapter), data=str(tmp_path / "fruit.txt"), block_size=32), 0, 8.0, CPU)
    assert "adapter" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_an_encoder_loaded_as_a_causal_lm_is_refused(tmp_path, arch):
    # transformers loads BERT-like folders as BertLMHeadModel & co. without is_decoder: attention stays
    # bidirectional, every position sees the token it is trained to predict, and the run "completed".
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    text = "".join(f"{i} apples and {i + 1} pears\n" for i in range(60))
    folder = tmp_path / arch
    vocab = _char_tokenizer_folder(folder, text)
    sizes = dict(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=70)
    torch.manual_seed(0)
    (BertModel(BertConfig(**sizes)) if arch == "bert" else RobertaModel(RobertaConfig(**sizes))).save_pretrained(folder)
    (tmp_path / "fruit.txt").write_text(text)
    # the leak, measured independently of balora: an earlier position's logits move with the last token
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.arange(3, 19).view(1, 16)
    other = ids.clone()
    other[0, -1] = 2
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits[:, :-1], model(input_ids=other).logits[:, :-1])
    with pytest.raises(InputError, match=f"'{folder}' is not a causal language model.*--task encoder") as e:
        lm.build(make_cfg(model=str(folder), data=str(tmp_path / "fruit.txt"), block_size=32), 0, 8.0, CPU)
    assert "\n" not in str(e.value)


def test_a_peft_adapter_whose_base_cannot_be_loaded_is_named_as_an_adapter(tmp_path, monkeypatch):
    # The check above ran only once transformers had loaded the adapter's base model. An adapter whose base is a
    # Hub id out of reach (offline, gated) or unset (null) said "could not load model 'FOLDER' (We couldn't
    # connect to 'https://huggingface.co' ...); pass a local model folder or a hub id reachable from this
    # machine": the user had passed a local folder, and the folder was the problem. It is named before loading.
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never ask the Hub for the base model
    text = "".join(f"{i} apples and {i + 1} pears\n" for i in range(60))
    adapter = tmp_path / "adapter"
    _char_tokenizer_folder(adapter, text)
    peft_model = get_peft_model(LlamaForCausalLM(LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=32,
                                                             num_hidden_layers=1, num_attention_heads=2,
                                                             num_key_value_heads=2)),
                                LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    peft_model.save_pretrained(adapter)
    (tmp_path / "fruit.txt").write_text(text)
    for base in ("someone/a-model-not-downloaded", None):
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        for model in (str(adapter), "adapter"):  # a path, and a folder name relative to the current one
            monkeypatch.chdir(tmp_path)
            with pytest.raises(InputError, match="PEFT adapter.*merge_and_unload") as e:
                lm.build(make_cfg(model=model, data=str(tmp_path / "fruit.txt"), block_size=32), 0, 8.0, CPU)
            assert "\n" not in str(e.value) and "huggingface.co" not in str(e.value), base


def test_a_mixture_of_experts_decoder_is_not_refused_as_an_encoder(tmp_path):
    # Mixtral is causal, but changing the last token changes which tokens each expert's matmul holds, so
    # earlier logits moved by rounding (16 eps of the last position's change here, on this CPU; in bf16 a
    # rerouted expert moved them by a third of it) and the logit comparison refused it as an encoder.
    from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

    text = "".join(f"{i} apples and {i + 1} pears\n" for i in range(120))
    folder = tmp_path / "mixtral"
    vocab = _char_tokenizer_folder(folder, text)
    torch.manual_seed(3)
    MixtralForCausalLM(MixtralConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=64)).save_pretrained(folder)
    (tmp_path / "fruit.txt").write_text(text)
    # causal, measured apart from balora: the first 15 positions' logits are those of the first 15 tokens alone
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[2 + sorted(set(text)).index(ch) for ch in text[:16]]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits[:, :15], model(input_ids=ids[:, :15]).logits,
                                   rtol=1e-4, atol=1e-5)
    problem = lm.build(make_cfg(model=str(folder), data=str(tmp_path / "fruit.txt"), block_size=32,
                                target_modules="q_proj,v_proj"), 0, 8.0, CPU)
    assert {p.module.rsplit(".", 1)[-1] for p in iter_lora_pairs(problem.model)} == {"q_proj", "v_proj"}


def test_user_target_modules_are_used(tmp_path):
    problem = lm.build(make_cfg(target_modules="c_fc"), 0, 8.0, CPU)
    assert {p.module.rsplit(".", 1)[-1] for p in iter_lora_pairs(problem.model)} == {"c_fc"}
    with pytest.raises(InputError, match="target_modules"):
        lm.build(make_cfg(target_modules="no_such_layer"), 0, 8.0, CPU)


def test_target_modules_all_linear_is_peft_s_shorthand():
    # PEFT's target_modules="all-linear" (every linear layer but the output head) was split into the layer
    # name ["all-linear"] and refused: "Target modules {'all-linear'} not found in the base model".
    from transformers.pytorch_utils import Conv1D

    problem = lm.build(make_cfg(target_modules="all-linear"), 0, 8.0, CPU)
    base = lm._load_model(make_cfg(), torch.float32)[0]  # a fresh copy of the toy model, without LoRA
    linear = {n for n, m in base.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and n != "lm_head"}
    assert {p.module.removeprefix("base_model.model.") for p in iter_lora_pairs(problem.model)} == linear


@pytest.mark.parametrize("version, keyword", [("4.45.0", "torch_dtype"), ("4.55.4", "torch_dtype"),
                                              ("4.56.0", "dtype"), ("5.0.0", "dtype")])
def test_a_local_folder_loads_with_the_dtype_keyword_its_transformers_takes(tmp_path, monkeypatch, version, keyword):
    # pyproject allows transformers 4.45: before 4.56 from_pretrained took torch_dtype, and a dtype=
    # went on to the model's __init__ (TypeError: GPT2LMHeadModel.__init__() got an unexpected keyword).
    import transformers
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    text = "".join(f"{i} apples\n" for i in range(60))
    folder = tmp_path / "gpt2"
    vocab = _char_tokenizer_folder(folder, text)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(folder)
    (tmp_path / "fruit.txt").write_text(text)

    seen = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, name, **kwargs):
        seen.append(sorted(kwargs))
        return real(cls, name)  # float32, the default, in any transformers

    monkeypatch.setattr(transformers, "__version__", version)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(from_pretrained))
    problem = lm.build(make_cfg(model=str(folder), data=str(tmp_path / "fruit.txt"), block_size=32), 0, 8.0, CPU)
    assert seen == [[keyword]] and next(problem.model.parameters()).dtype == torch.float32


def test_a_4bit_model_still_trains_after_the_eval(tmp_path):
    # A bitsandbytes 4-bit checkpoint (like the Hub's *-bnb-4bit models). On a CPU with AVX512-BF16,
    # bitsandbytes' Linear4bit repacks its weight in place for inference the first time it runs in eval mode
    # without grad, into a layout whose kernel has no backward: after the task's first eval (or the initial one
    # of toy data) no LoRA factor below the last 4-bit layer got a gradient, in that cell and every later one,
    # so only the cells before it trained and the comparison between arms was void.
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: pip install -e '.[qlora]'")
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    text = "".join(f"{i} apples and {i + 1} pears\n" for i in range(120))
    source, folder = tmp_path / "llama", tmp_path / "llama-bnb-4bit"
    vocab = _char_tokenizer_folder(folder, text)
    torch.manual_seed(0)
    # 64 wide: bitsandbytes' 4-bit blocks are 64 values long
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(source)
    LlamaForCausalLM.from_pretrained(source, quantization_config=BitsAndBytesConfig(load_in_4bit=True),
                                     device_map="cpu").save_pretrained(folder)
    data = tmp_path / "fruit.txt"
    data.write_text(text)
    problem = lm.build(make_cfg(model=str(folder), data=str(data), block_size=32), 0, 8.0, CPU)
    batch = next(problem.batches())

    def grads() -> dict:
        problem.model.zero_grad()
        problem.loss(problem.model, batch).backward()
        return {n: p.grad for n, p in problem.model.named_parameters() if p.requires_grad}

    before = grads()
    problem.model.eval()  # as balora.cell runs the eval, between training steps
    with torch.no_grad():
        problem.eval_loss(problem.model)
    problem.model.train()
    after = grads()
    assert all(g is not None for g in before.values())
    missing = [n for n, g in after.items() if g is None]
    assert not missing, f"{len(missing)} of {len(after)} LoRA factors got no gradient after the eval, e.g. {missing[0]}"
    for name, g in after.items():
        torch.testing.assert_close(g, before[name], msg=name)  # the same weights and batch: the same gradient
