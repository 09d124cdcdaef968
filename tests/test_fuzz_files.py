"""Corrupted adapters: `balora inspect` and `balora balance` never crash, never write a partial
output, and say in one line which file is wrong and why.

Every case runs both commands through the real CLI entry point. Allowed outcomes: exit 0
(the damage left a valid adapter, e.g. a flipped mantissa bit), or exit 2 with exactly one
stderr line that names a path inside the case. Exit 1 means an unexpected exception (a bug).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from balora.cli import main

R = 4


def peft_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = "base_model.model."
    return {
        f"{p}layers.0.proj.lora_A.weight": torch.randn(R, 12, generator=g),
        f"{p}layers.0.proj.lora_B.weight": 0.1 * torch.randn(10, R, generator=g),
        f"{p}layers.1.proj.lora_A.weight": torch.randn(R, 12, generator=g),
        f"{p}layers.1.proj.lora_B.weight": 0.1 * torch.randn(10, R, generator=g),
        f"{p}embed.lora_embedding_A": torch.randn(R, 30, generator=g),
        f"{p}embed.lora_embedding_B": 0.1 * torch.randn(8, R, generator=g),
        f"{p}conv.lora_A.weight": torch.randn(R, 3, 3, 3, generator=g),
        f"{p}conv.lora_B.weight": 0.1 * torch.randn(6, R, 1, 1, generator=g),
    }


CONFIG = {"peft_type": "LORA", "r": R, "lora_alpha": 8, "target_modules": ["proj", "embed", "conv"]}


def write_peft(folder: Path, tensors=None, config=None) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG if config is None else config))
    save_file(peft_tensors() if tensors is None else tensors, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return folder


def write_kohya(path: Path, alpha=2.0) -> Path:
    g = torch.Generator().manual_seed(1)
    save_file({"lora_unet_a.lora_down.weight": torch.randn(R, 16, generator=g).half(),
               "lora_unet_a.lora_up.weight": (0.1 * torch.randn(16, R, generator=g)).half(),
               "lora_unet_a.alpha": torch.tensor(alpha) if not isinstance(alpha, torch.Tensor) else alpha},
              str(path), metadata={"ss_network_dim": str(R)})
    return path


class Foo:
    """Not a tensor: torch.load(weights_only=True) must refuse a pickle holding it."""


def run_both(capsys, case: Path, work: Path):
    """(inspect rc, inspect stderr, balance rc, balance stderr); checks the rules every case shares."""
    results = []
    out = work / f"{case.name}.balanced"
    for argv in (["inspect", str(case)], ["balance", str(case), str(out)]):
        rc = main(argv)
        _, err = capsys.readouterr()
        assert rc in (0, 2), f"{argv}: exit {rc} (unexpected exception): {err}"
        assert "Traceback" not in err
        if rc == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1, err
            assert str(case) in lines[0] or str(out) in lines[0], f"message does not name the file: {lines[0]}"
        results += [rc, err]
    if results[2] == 2:
        assert not out.exists(), "failed balance left an output"
    leftovers = [p.name for p in work.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    return tuple(results)


def _mutate_tensors(drop=None, replace=None):
    t = peft_tensors()
    if drop:
        del t[drop]
    t.update(replace or {})
    return t


LORA_B1 = "base_model.model.layers.1.proj.lora_B.weight"

FOLDER_CASES = {
    # name: (tensors, config (None: valid; str: raw text), expected phrase in the inspect error or None when it works)
    "config_truncated": (None, json.dumps(CONFIG)[:25], "malformed JSON"),
    "config_array": (None, "[1, 2]", "expected a JSON object"),
    "config_r_string": (None, {**CONFIG, "r": "four"}, "r must be a positive integer"),
    "config_alpha_nan": (None, json.dumps(CONFIG).replace('"lora_alpha": 8', '"lora_alpha": NaN'), "lora_alpha must be a finite"),
    "config_no_peft_type": (None, {k: v for k, v in CONFIG.items() if k != "peft_type"}, 'no "peft_type"'),
    "config_ia3": (None, {**CONFIG, "peft_type": "IA3"}, "peft_type is 'IA3'"),
    "config_bad_pattern": (None, {**CONFIG, "rank_pattern": {"(": 2}}, "is not a valid pattern"),
    "config_r_mismatch": (None, {**CONFIG, "r": 8}, "lora_A has r=4 rows but"),
    "a_without_b": (_mutate_tensors(drop=LORA_B1), None, "lora_A without its lora_B"),
    "no_chain": (_mutate_tensors(replace={LORA_B1: torch.randn(10, R + 1)}), None, "shapes do not chain"),
    "not_factor_shapes": (_mutate_tensors(replace={LORA_B1: torch.randn(10, R, 2)}), None, "not LoRA factor shapes"),
    "int_factor": (_mutate_tensors(replace={LORA_B1: torch.ones(10, R, dtype=torch.int64)}), None, "expected floating point"),
    "float8_factors": (_mutate_tensors(replace={LORA_B1.replace("lora_B", "lora_A"): torch.randn(R, 12).to(torch.float8_e4m3fn),
                                                LORA_B1: torch.randn(10, R).to(torch.float8_e4m3fn)}), None, "float8_e4m3fn"),
    "empty_factor": (_mutate_tensors(replace={LORA_B1: torch.randn(10, 0)}), None, "empty factor"),
    "no_lora_keys": ({"base_model.model.x.weight": torch.randn(3, 3)}, None, "no lora_A/lora_B keys"),
    "nan_values": (_mutate_tensors(replace={LORA_B1: torch.full((10, R), float("nan"))}), None, None),
}


@pytest.mark.parametrize("name", list(FOLDER_CASES))
def test_folder_cases(name, tmp_path, capsys):
    tensors, config, phrase = FOLDER_CASES[name]
    case = tmp_path / name
    write_peft(case, tensors, None if isinstance(config, str) else config)
    if isinstance(config, str):
        (case / "adapter_config.json").write_text(config)
    rc_i, err_i, rc_b, err_b = run_both(capsys, case, tmp_path)
    if phrase is None:  # NaN: reported per module by inspect, refused by balance
        assert rc_i == 0 and rc_b == 2 and "non-finite values (NaN/Inf) in layers.1.proj[default]" in err_b
    else:
        assert rc_i == 2 and phrase in err_i, err_i
        assert rc_b == 2


def test_missing_pieces(tmp_path, capsys):
    no_config = write_peft(tmp_path / "no_config")
    (no_config / "adapter_config.json").unlink()
    no_weights = write_peft(tmp_path / "no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    empty_file = tmp_path / "empty.safetensors"
    empty_file.write_bytes(b"")
    expected = {no_config: "adapter_model.safetensors without adapter_config.json", no_weights: "has adapter_config.json but no adapter_model",
                empty_dir: "not a LoRA adapter", empty_file: "not a valid safetensors file",
                tmp_path / "missing": "no such file or directory"}
    for case, phrase in expected.items():
        rc_i, err_i, rc_b, _ = run_both(capsys, case, tmp_path)
        assert rc_i == rc_b == 2 and phrase in err_i, (case, err_i)


def test_pickles(tmp_path, capsys):
    refused = tmp_path / "refused.bin"
    torch.save({"layers.0.lora_A.weight": torch.zeros(R, 4), "evil": Foo()}, refused)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"definitely not a pickle " * 20)
    truncated = tmp_path / "truncated.bin"
    torch.save(peft_tensors(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    not_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], not_dict)
    expected = {refused: "torch.load(weights_only=True) refused it", garbage: "not a readable PyTorch weights file",
                truncated: "not a readable PyTorch weights file", not_dict: "expected a flat dict"}
    for case, phrase in expected.items():
        rc_i, err_i, rc_b, _ = run_both(capsys, case, tmp_path)
        assert rc_i == rc_b == 2 and phrase in err_i, (case, err_i)


def test_kohya_bad_alpha(tmp_path, capsys):
    for name, alpha in (("nan_alpha", float("nan")), ("vector_alpha", torch.ones(2))):
        case = write_kohya(tmp_path / f"{name}.safetensors", alpha)
        rc_i, err_i, rc_b, _ = run_both(capsys, case, tmp_path)
        assert rc_i == rc_b == 2 and "should be one finite number" in err_i


def _header_len(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


@pytest.mark.parametrize("seed", range(3))
def test_random_truncation_and_byte_flips(seed, tmp_path, capsys):
    """Random damage to the safetensors file of a PEFT folder and to a kohya file."""
    rng = random.Random(seed)
    base = write_peft(tmp_path / "base")
    kohya = write_kohya(tmp_path / "base_kohya.safetensors")
    for k, (template, weights_rel) in enumerate([(base, "adapter_model.safetensors"), (kohya, None)]):
        data = (template / weights_rel if weights_rel else template).read_bytes()
        damaged = []
        for _ in range(4):
            damaged.append(data[: rng.randrange(len(data))])  # truncated anywhere
        for region in ((0, _header_len(data)), (_header_len(data), len(data))):
            for _ in range(4):  # flip a byte in the header, then in the tensor data
                b = bytearray(data)
                i = rng.randrange(*region)
                b[i] ^= 1 << rng.randrange(8)
                damaged.append(bytes(b))
        for j, blob in enumerate(damaged):
            if weights_rel:
                case = write_peft(tmp_path / f"case{k}_{j}")
                (case / weights_rel).write_bytes(blob)
            else:
                case = tmp_path / f"case{k}_{j}.safetensors"
                case.write_bytes(blob)
            rc_i, _, rc_b, _ = run_both(capsys, case, tmp_path)
            if j < 4:
                assert rc_i == rc_b == 2  # a truncated file is always refused
            if rc_b == 0:  # whatever survived the damage was balanced and written whole
                out = tmp_path / f"{case.name}.balanced"
                weights = out / weights_rel if weights_rel else out
                assert sorted(load_file(str(weights))) == sorted(load_file(str(case / weights_rel if weights_rel else case)))


def test_output_rules(tmp_path, capsys):
    case = write_peft(tmp_path / "ok")
    assert main(["balance", str(case), str(case / "inside")]) == 2
    assert "inside the input" in capsys.readouterr().err
    assert not (case / "inside").exists()
    target = tmp_path / "a_file"
    target.write_text("x")
    assert main(["balance", str(case), str(target), "--force"]) == 2
    assert "exists but is not a folder" in capsys.readouterr().err
    assert target.read_text() == "x"
