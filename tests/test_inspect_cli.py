"""`balora inspect` and `balora balance` as a user runs them: formats, flags, exit codes, messages."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import balora
from balora.cli import main
from test_files import (
    KOHYA_METADATA,
    live_scalings,
    make_llama,
    peft_file_factors,
    reference_stats,
    token_batch,
    train_llama_adapter,
    write_kohya,
)

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "adapter"
    return out, train_llama_adapter(out, steps=3)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A folder laid out like Trainer output: checkpoint-2 and checkpoint-4 of one LoRA run."""
    from peft import LoraConfig, get_peft_model

    run = tmp_path_factory.mktemp("cli") / "run"
    model = get_peft_model(make_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = token_batch()
    for step in range(1, 5):
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 2 == 0:
            model.save_pretrained(run / f"checkpoint-{step}")
    return run


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_matches_float64_per_module(trained, capsys):
    folder, model = trained
    rc, out, err = run_cli(capsys, "inspect", folder, "--format", "json")
    assert rc == 0 and err == ""
    records = json.loads(out)
    scalings = live_scalings(model)
    assert {(r["module"], r["adapter"]) for r in records} == set(scalings)
    factors = {"default": peft_file_factors(folder / "adapter_model.safetensors"),
               "dora": peft_file_factors(folder / "dora" / "adapter_model.safetensors")}
    for rec in records:
        assert {"module", "imbalance", "rel_imbalance", "sigma", "checkpoint", "step"} <= rec.keys()
        assert rec["checkpoint"] == "" and rec["step"] is None
        A, B = factors[rec["adapter"]][rec["module"]]
        ref = reference_stats(A, B, scalings[(rec["module"], rec["adapter"])])
        where = f"{rec['module']}[{rec['adapter']}]"
        for key in ("imbalance", "rel_imbalance", "norm_A", "norm_B", "cond_A", "cond_B", "cond_dW", "eff_rank"):
            assert rec[key] == pytest.approx(ref[key], rel=2e-4), f"{where} {key}"
        np.testing.assert_allclose(rec["sigma"], ref["sigma"], rtol=2e-4, atol=1e-9, err_msg=where)
        assert len(rec["sigma"]) == rec["r"]


def test_csv_round_trips_the_dataframe(trained, capsys):
    folder, _ = trained
    rc, out, _ = run_cli(capsys, "inspect", folder, "--format", "csv")
    assert rc == 0
    parsed = pd.read_csv(io.StringIO(out), keep_default_na=False, na_values=[""])
    df = balora.inspect(folder)
    assert list(parsed.columns) == list(balora.INSPECT_COLUMNS)
    assert list(parsed["module"]) == list(df["module"])
    np.testing.assert_allclose(parsed["rel_imbalance"], df["rel_imbalance"], rtol=1e-12)
    for got, want in zip(parsed["sigma"], df["sigma"]):
        np.testing.assert_allclose(json.loads(got), want, rtol=1e-12)


def test_table_sort_top_and_adapter(trained, capsys):
    folder, _ = trained
    rc, out, _ = run_cli(capsys, "inspect", folder, "--top", "2", "--adapter", "dora")
    assert rc == 0
    assert "top 2 sigma(dW)" in out and "layers.1.v_proj" in out  # model.layers.1.self_attn.v_proj, shortened
    assert "gate_proj" not in out  # the dora adapter only targets q and v
    assert "4 modules in 2 layers; worst rel_imbalance" in out

    rc, out, _ = run_cli(capsys, "inspect", folder, "--format", "json", "--sort", "rel_imbalance")
    values = [r["rel_imbalance"] for r in json.loads(out)]
    assert rc == 0 and values == sorted(values, reverse=True)

    rc, _, err = run_cli(capsys, "inspect", folder, "--sort", "sigma")
    assert rc == 2 and err.count("\n") == 1 and "--sort: cannot sort by 'sigma'" in err


def test_checkpoint_folder_records_and_trend_table(checkpoints, capsys):
    rc, out, _ = run_cli(capsys, "inspect", checkpoints, "--format", "json")
    records = json.loads(out)
    assert rc == 0
    assert [(r["checkpoint"], r["step"]) for r in records] == [("checkpoint-2", 2)] * 4 + [("checkpoint-4", 4)] * 4
    for rec in records:
        A, B = peft_file_factors(checkpoints / rec["checkpoint"] / "adapter_model.safetensors")[rec["module"]]
        assert rec["rel_imbalance"] == pytest.approx(reference_stats(A, B, 2.0)["rel_imbalance"], rel=2e-4)
    rc, out, _ = run_cli(capsys, "inspect", checkpoints)
    assert rc == 0 and "Trainer output folder: 2 checkpoint(s), steps 2..4" in out
    assert "over training" in out and "layers at checkpoint-4" in out


def test_trend_table_shows_whole_checkpoint_names(checkpoints, tmp_path, capsys):
    # rich cut "checkpoint-12000" to "checkpoint-1…", and every long name looked alike
    import shutil

    run = tmp_path / "run"
    for src, name in (("checkpoint-2", "checkpoint-500"), ("checkpoint-4", "checkpoint-12000")):
        shutil.copytree(checkpoints / src, run / name)
    rc, out, _ = run_cli(capsys, "inspect", run)
    start = out.index("over training")
    end = out.find("layers at", start)
    trend = out[start:] if end < 0 else out[start:end]  # the trend table alone
    assert rc == 0 and "checkpoint-500 " in trend and "checkpoint-12000 " in trend and "…" not in trend


def test_kohya_metadata_shown(tmp_path, capsys):
    path = write_kohya(tmp_path / "sd_lora.safetensors")
    rc, out, _ = run_cli(capsys, "inspect", path)
    assert rc == 0
    for key in ("ss_network_dim = 4", "ss_base_model_version = sd_v1", "ss_output_name = tiny"):
        assert key in out
    long = KOHYA_METADATA["ss_tag_frequency"]
    assert f"({len(long)} chars)" in out and long not in out  # long values are shortened
    assert "1 module(s) without alpha" in out


def test_balance_command(trained, tmp_path, capsys):
    folder, _ = trained
    out_dir = tmp_path / "balanced"
    rc, out, err = run_cli(capsys, "balance", folder, out_dir, "--method", "svd")
    n = len(balora.inspect(folder))
    assert rc == 0 and err == ""
    assert f"balanced {n} LoRA pair(s)" in out and "what changed" in out
    assert (balora.inspect(out_dir)["rel_imbalance"] < 1e-4).all()
    before = load_file(str(out_dir / "adapter_model.safetensors"))

    rc, _, err = run_cli(capsys, "balance", folder, out_dir)
    assert rc == 2 and err.count("\n") == 1 and f"{out_dir}: already exists; pass --force" in err
    rc, _, _ = run_cli(capsys, "balance", folder, out_dir, "--force", "--on-rank-deficient", "balance")
    assert rc == 0
    after = load_file(str(out_dir / "adapter_model.safetensors"))
    # nearest gauge replaced the svd one: same products, different factors
    changed = [k for k in before if "lora_A" in k and not torch.allclose(before[k], after[k])]
    assert changed


def test_balance_suggests_force_only_where_force_would_replace(trained, checkpoints, tmp_path, capsys):
    """An existing OUT was answered "already exists; pass --force" whatever it was, and for a folder of other
    things, a Trainer output or a file where a folder goes, that --force was then refused in turn. Those
    refusals come first now; "pass --force" is said only where --force then works."""
    folder, _ = trained
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("old")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, why in [(other, "not an adapter folder"), (checkpoints, "holds Trainer checkpoints"),
                     (a_file, "exists but is not a folder")]:
        for force in ([], ["--force"]):
            rc, _, err = run_cli(capsys, "balance", folder, out, *force)
            assert rc == 2 and why in err and "pass --force" not in err and err.count("\n") == 1, err
    assert (other / "keep.txt").read_text() == "old" and a_file.read_text() == "x"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]

    earlier = tmp_path / "earlier"
    assert run_cli(capsys, "balance", folder, earlier)[0] == 0
    rc, _, err = run_cli(capsys, "balance", folder, earlier)
    assert rc == 2 and f"{earlier}: already exists; pass --force" in err
    assert run_cli(capsys, "balance", folder, earlier, "--force")[0] == 0  # the suggestion works


def test_balance_runs_on_one_torch_thread_unless_told(trained, tmp_path, capsys, monkeypatch):
    # As inspect: on a busy 2-core machine torch's two OpenMP threads wait on each other, and balancing a
    # Llama-3-8B r=64 fp32 adapter took 41-89 s with them against 10-15 s with one.
    import balora.inspection

    folder, _ = trained
    seen = []
    real = balora.inspection.balance_file

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(balora.inspection, "balance_file", spy)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert run_cli(capsys, "balance", folder, tmp_path / "one")[0] == 0
        assert run_cli(capsys, "balance", folder, tmp_path / "two", "--threads", "2")[0] == 0
        rc, _, err = run_cli(capsys, "balance", folder, tmp_path / "none", "--threads", "0")
        # past a C int, torch.set_num_threads used to fail with "Overflow when unpacking long"
        rc_big, _, err_big = run_cli(capsys, "balance", folder, tmp_path / "big", "--threads", "99999999999")
        rc_inspect, out_inspect, err_inspect = run_cli(capsys, "inspect", folder, "--threads", "99999999999")
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 2]
    assert rc == 2 and err.count("\n") == 1 and "--threads must be >= 1" in err and not (tmp_path / "none").exists()
    for rc, err in ((rc_big, err_big), (rc_inspect, err_inspect)):
        assert rc == 2 and err.count("\n") == 1 and "--threads must be >= 1 and <= 1024, got 99999999999" in err
    assert not (tmp_path / "big").exists() and out_inspect == ""


def test_errors_one_line_exit_2_debug_shows_traceback(tmp_path, capsys):
    missing = tmp_path / "nope"
    # A real process once: the exit code and stderr a shell sees.
    bad = subprocess.run([sys.executable, "-m", "balora.cli", "inspect", str(missing)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"balora inspect: error: {missing}: no such file or directory"]
    rc, _, err = run_cli(capsys, "--debug", "inspect", missing)
    assert rc == 2 and "Traceback" in err and "InputError" in err


def test_debug_works_where_the_error_message_says_to_add_it(tmp_path, capsys, monkeypatch):
    """An unexpected error ends "(rerun with --debug for the traceback)"; rerunning with --debug added at the
    end, as people do, failed with "balora: error: unrecognized arguments: --debug". It is taken after the
    command too now, as before it."""
    import balora.inspection

    rc, _, err = run_cli(capsys, "inspect", tmp_path / "nope", "--debug")  # bad input: traceback and the message
    assert rc == 2 and "Traceback" in err and err.strip().endswith(f"{tmp_path / 'nope'}: no such file or directory")
    rc, _, err = run_cli(capsys, "inspect", tmp_path / "nope")
    assert rc == 2 and "Traceback" not in err  # without it, one line as before

    def broken(*args, **kwargs):
        raise RuntimeError("something unforeseen")

    monkeypatch.setattr(balora.inspection, "inspect", broken)
    rc, _, err = run_cli(capsys, "inspect", tmp_path)
    assert rc == 1 and err.strip() == ("balora inspect: error: RuntimeError: something unforeseen "
                                       "(rerun with --debug for the traceback)")
    for argv in (["inspect", tmp_path, "--debug"], ["--debug", "inspect", tmp_path]):
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 1 and "Traceback" in err and "RuntimeError: something unforeseen" in err, argv


@pytest.mark.parametrize("command", [["inspect", ""], ["balance", " ", "out"]])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(tmp_path, capsys, monkeypatch, command):
    # Path("") is ".": `balora inspect "$UNSET"` read the current folder and its subfolders three deep.
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(capsys, *command)
    assert rc == 2 and out == "" and err.strip().endswith("an empty path: give an adapter folder, a weights file or "
                                                          "a Hub id user/name")
    assert list(tmp_path.iterdir()) == []


def test_json_has_no_nan_or_inf_and_keeps_infinities_as_strings(tmp_path, capsys):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 16, generator=g)
    B = torch.randn(16, 4, generator=g)
    B[:, 3] = 0  # rank 3 < r: cond_dW = inf
    save_file({"m.lora_A.weight": A, "m.lora_B.weight": B,
               "n.lora_A.weight": A.clone(), "n.lora_B.weight": torch.full_like(B, math.inf)}, str(tmp_path / "x.safetensors"))
    rc, out, _ = run_cli(capsys, "inspect", tmp_path / "x.safetensors", "--format", "json")
    assert rc == 0

    def strict(name):
        raise AssertionError(f"{name} is not JSON")

    recs = {r["module"]: r for r in json.loads(out, parse_constant=strict)}
    # cond_dW of a rank-deficient product is a true infinity (kept, as "inf"); scaling is unknown (null)
    assert recs["m"]["cond_dW"] == "inf" and float(recs["m"]["cond_dW"]) == math.inf
    assert recs["m"]["rank"] == 3 and recs["m"]["scaling"] is None
    assert recs["n"]["status"].startswith("non-finite") and recs["n"]["imbalance"] is None


@pytest.fixture
def fsdp_sharded_checkpoint(tmp_path):
    """A Trainer output folder as FSDP's SHARDED_STATE_DICT leaves it: checkpoint-N holds
    torch.distributed.checkpoint folders (.metadata + .distcp shards) and no PEFT adapter."""
    import torch.distributed.checkpoint as dcp

    ckpt = tmp_path / "out" / "checkpoint-4"
    factors = {"base_model.model.q_proj.lora_A.weight": torch.randn(2, 6),
               "base_model.model.q_proj.lora_B.weight": torch.randn(5, 2)}
    dcp.save({"model": factors}, checkpoint_id=ckpt / "pytorch_model_fsdp_0", no_dist=True)
    dcp.save({"state": {"step": torch.tensor(4.0)}}, checkpoint_id=ckpt / "optimizer_0", no_dist=True)
    (ckpt / "trainer_state.json").write_text("{}")
    return ckpt


def test_an_fsdp_sharded_checkpoint_gets_a_one_line_error_saying_what_to_save(fsdp_sharded_checkpoint, capsys):
    ckpt = fsdp_sharded_checkpoint
    shard = next((ckpt / "pytorch_model_fsdp_0").glob("*.distcp"))
    for path in (ckpt.parent, ckpt, ckpt / "pytorch_model_fsdp_0", shard):
        rc, _, err = run_cli(capsys, "inspect", path)
        assert rc == 2 and err.count("\n") == 1, err
        message = err.removeprefix("balora inspect: error: ")
        assert message.startswith(f"{path}: "), message
        assert "FSDP sharded checkpoint" in message and "FULL_STATE_DICT" in message and "save_model" in message
        if path != shard:  # the model's shards are named, not the optimizer's
            assert str(ckpt / "pytorch_model_fsdp_0") in message and "optimizer_0" not in message


@pytest.mark.parametrize("fmt", ["json", "csv", "table"])
def test_reader_closing_the_pipe_is_not_an_error(trained, fmt):
    """`balora inspect ADAPTER --format csv | head -1`: the reader closing the pipe early is the user's choice,
    not a failure. It printed "error: BrokenPipeError ... rerun with --debug" and exited 1, the code kept for
    bugs; now it stops quietly with a shell's code for a closed pipe (128 + SIGPIPE)."""
    folder, _ = trained
    proc = subprocess.Popen([sys.executable, "-m", "balora.cli", "inspect", str(folder), "--format", fmt],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line: every write fails
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141
    assert "error" not in err.lower() and "Traceback" not in err and "Exception ignored" not in err, err


def test_balance_piped_to_a_reader_that_stops_is_not_an_error(trained, tmp_path):
    """`balora balance IN OUT | head -1` exited 1, the code kept for bugs (rich's own broken-pipe handler),
    although OUT was written whole before anything was printed."""
    folder, _ = trained
    out = tmp_path / "balanced"
    proc = subprocess.Popen([sys.executable, "-m", "balora.cli", "balance", str(folder), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
