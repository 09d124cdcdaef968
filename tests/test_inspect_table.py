"""`balora inspect`'s human table: fits 100 columns by default, `--wide` shows every column, and
the `balora` command starts without importing torch or pandas until a command needs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import balora
from balora.cli import COMMANDS, build_parser, main
from balora.commands.formatting import num, short_module_names

LLAMA_LAYER = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 64), "self_attn.v_proj": (64, 64),
               "self_attn.o_proj": (64, 64), "mlp.gate_proj": (64, 160), "mlp.up_proj": (64, 160),
               "mlp.down_proj": (160, 64)}  # (in, out)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A PEFT folder with the 7 LoRA modules of one Llama layer (layer 12: two-digit index)."""
    folder = tmp_path_factory.mktemp("inspect") / "adapter"
    folder.mkdir()
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name, (n_in, n_out) in LLAMA_LAYER.items():
        key = f"base_model.model.model.layers.12.{name}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(8, n_in, generator=g)  # (r, in)
        tensors[f"{key}.lora_B.weight"] = 1e-3 * torch.randn(n_out, 8, generator=g)  # (out, r)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj"]}))
    return folder


def table(capsys, *argv) -> list[str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    return out.splitlines()


def test_default_table_fits_100_columns_with_the_numbers_that_matter(adapter, capsys):
    lines = table(capsys, "inspect", adapter)
    assert max(len(line.rstrip()) for line in lines) <= 100
    header = next(line for line in lines if line.startswith("module"))
    assert header.split() == ["module", "r", "scaling", "norm_A", "norm_B", "rel_imbalance", "cond_dW", "sigma_max(dW)"]
    df = balora.inspect(adapter)
    assert len(df) == 7
    for row in df.itertuples(index=False):
        short = "layers.12." + row.module.rsplit(".", 1)[-1]  # model.layers.12.self_attn.q_proj -> layers.12.q_proj
        rows = [line for line in lines if line.split()[:1] == [short]]
        assert len(rows) == 1, short  # one line per module: nothing folded onto a second line
        want = [short, str(row.r), num(row.scaling), num(row.norm_A), num(row.norm_B), num(row.rel_imbalance),
                num(row.cond_dW), num(row.sigma[0])]
        assert rows[0].split() == want
    worst = df.loc[df["rel_imbalance"].idxmax()]
    summary = lines[-1]
    assert summary.startswith("7 modules in 1 layer;")
    assert f"worst rel_imbalance {num(worst.rel_imbalance)} at layers.12.{worst.module.rsplit('.', 1)[-1]}" in summary


def test_wide_shows_every_column_and_full_names(adapter, capsys):
    lines = table(capsys, "inspect", adapter, "--wide")
    header = next(line for line in lines if line.startswith("module"))
    shown = header.split()
    expected = [c for c in balora.INSPECT_COLUMNS if c not in ("source", "checkpoint", "step")]
    # Lists of singular values are cut to --top (3 by default) and say so.
    assert [c for c in shown if c not in ("(top", "3)")] == expected
    df = balora.inspect(adapter)
    for row in df.itertuples(index=False):
        rows = [line for line in lines if line.split()[:1] == [row.module]]
        assert len(rows) == 1, row.module
        assert " ".join(num(x) for x in row.sigma[:3]) in rows[0]


def test_top_and_json_unchanged(adapter, capsys):
    lines = table(capsys, "inspect", adapter, "--top", "2")
    assert "top 2 sigma(dW)" in next(line for line in lines if line.startswith("module"))
    rc = main(["inspect", str(adapter), "--format", "json"])
    records = json.loads(capsys.readouterr().out)
    assert rc == 0 and len(records) == 7 and records[0]["module"].startswith("model.layers.12.")  # full names


def test_a_terminal_narrower_than_the_table_gets_every_module_and_whole_numbers(adapter, capsys, monkeypatch):
    """In a 60-column terminal rich squeezed the table: the module column vanished and numbers were cut
    ("0.5…" for 0.596). The table is laid out for 100 columns there too (the terminal wraps the lines)."""
    import re

    monkeypatch.setenv("COLUMNS", "60")
    monkeypatch.setenv("FORCE_COLOR", "1")  # a terminal, as rich sees it
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in table(capsys, "inspect", adapter)]
    assert not any("…" in line for line in lines)
    df = balora.inspect(adapter)
    for row in df.itertuples(index=False):
        short = "layers.12." + row.module.rsplit(".", 1)[-1]
        rows = [line for line in lines if line.split()[:1] == [short]]
        assert len(rows) == 1, short
        want = [short, str(row.r), num(row.scaling), num(row.norm_A), num(row.norm_B), num(row.rel_imbalance),
                num(row.cond_dW), num(row.sigma[0])]
        assert rows[0].split() == want


def test_short_module_names_stay_unique():
    llama = [f"model.layers.{i}.{m}" for i in (0, 10) for m in LLAMA_LAYER]
    short = short_module_names(llama)
    assert short["model.layers.10.mlp.up_proj"] == "layers.10.up_proj"
    assert len(set(short.values())) == len(llama)
    # Two modules that differ only in the middle keep the middle; nothing equal after shortening.
    clash = ["model.layers.0.attn.o", "model.layers.0.mlp.o", "lm_head", "a.proj", "b.proj"]
    short = short_module_names(clash)
    assert short["model.layers.0.attn.o"] == "layers.0.attn.o" and short["lm_head"] == "lm_head"
    assert short["a.proj"] == "a.proj" and len(set(short.values())) == len(clash)


def test_num_formats_missing_and_infinite_values():
    import numpy as np
    import pandas as pd

    assert [num(v) for v in (None, pd.NA, float("nan"), float("inf"), -np.inf)] == ["-", "-", "-", "inf", "-inf"]
    assert num(np.float32(0.000123456)) == "0.000123" and num(1234567.0, digits=4) == "1.235e+06"
    assert num(float("nan"), unknown="?") == "?" and num("text") == "text"


# ---------------------------------------------------------------------------- fast start


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


HEAVY = {"torch", "pandas", "transformers", "peft", "numpy", "streamlit"}


def test_help_imports_no_heavy_library():
    loaded = _modules_after(
        "import contextlib, io\nimport balora.cli as c\n"
        "for argv in (['--help'], ['inspect', '--help'], ['compare', '--help'], ['dashboard', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        c.main(argv)"
    )
    assert not HEAVY & loaded, HEAVY & loaded


def test_lazy_parser_lists_the_same_commands_as_the_full_one():
    full = build_parser()
    sub = next(a for a in full._actions if a.dest == "command")
    helps = {c.dest: c.help for c in sub._choices_actions}
    assert helps == {name: help_text for name, (_, help_text) in COMMANDS.items()}
    lazy = build_parser(["--help"])
    assert set(next(a for a in lazy._actions if a.dest == "command").choices) == set(COMMANDS)
    # Only the named command is built in full; the parse is the same as with the full parser.
    argv = ["--debug", "inspect", "x", "--wide", "--top", "2"]
    assert vars(build_parser(argv).parse_args(argv)) == vars(full.parse_args(argv))


def test_run_store_and_dashboard_loaders_do_not_import_torch():
    # The Compare page reads runs: knowing the report's columns must not cost a torch import.
    loaded = _modules_after("import balora.store, balora.columns\n"
                            "from balora.dashboard import frames, loaders, compare_plots, run_index")
    assert "torch" not in loaded and "peft" not in loaded and "transformers" not in loaded
    from balora.columns import HALF_DTYPE_NAMES, REPORT_COLUMNS
    from balora.precision import HALF_DTYPES
    from balora.report import REPORT_COLUMNS as reexported

    assert HALF_DTYPE_NAMES == tuple(HALF_DTYPES) and reexported is REPORT_COLUMNS
