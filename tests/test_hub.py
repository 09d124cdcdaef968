"""Hub ids as adapter sources, offline: the tests build a Hugging Face cache folder themselves
(models--user--name/{blobs,refs,snapshots}/ with snapshot files linking into blobs/, as
huggingface_hub lays it out) and never touch the network."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from balora.adapters import hub
from balora.errors import InputError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_cache(cache, repo_id: str, files: dict[str, bytes], commit: str = COMMIT, ref: str = "main"):
    """A cache entry for `repo_id` at `commit`, with `refs/<ref>` pointing at it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)  # a branch feature/x is refs/feature/x
    (repo / "refs" / ref).write_text(commit)
    snap = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snap


@pytest.mark.parametrize("text, expected", [
    ("user/name", ("user/name", None)),
    ("user/name@main", ("user/name", "main")),
    (f"org-x/my.model_v2@{COMMIT}", ("org-x/my.model_v2", COMMIT)),
    ("user/name@refs/pr/3", ("user/name", "refs/pr/3")),
    ("./user/name", None),
    ("/abs/path", None),
    ("name", None),
    ("user/../etc", None),
    ("user/name@", None),
])
def test_parse_hub_id(text, expected):
    ref = hub.parse_hub_ref(text)
    assert (None if ref is None else (ref.repo_id, ref.revision)) == expected and (ref is None or ref.path == "")


def test_cached_id_resolves_offline_to_the_snapshot(offline_cache):
    snap = make_cache(offline_cache, "user/name", {"adapter_config.json": b"{}", "adapter_model.safetensors": b"x"})
    src = hub.resolve_source("user/name")
    assert isinstance(src, hub.HubSource)
    assert src.path == snap and src.root == snap.parent.parent and src.revision is None
    assert (src.path / "adapter_config.json").read_bytes() == b"{}"
    # A commit id pins the snapshot too.
    assert hub.resolve_source(f"user/name@{COMMIT}").path == snap


def test_base_model_weights_are_not_part_of_the_adapter(offline_cache):
    # Offline, snapshot_download returns the snapshot folder; the patterns decide what a download
    # would fetch. Check them directly: adapter files in, model shards out.
    import fnmatch

    def wanted(name):
        return any(fnmatch.fnmatch(name, p) for p in hub.ADAPTER_PATTERNS) and not any(
            fnmatch.fnmatch(name, p) for p in hub.MODEL_PATTERNS)

    for name in ("adapter_config.json", "adapter_model.safetensors", "checkpoint-5/adapter_model.safetensors",
                 "pytorch_lora_weights.safetensors", "my_lora.safetensors", "adapter_model.bin"):
        assert wanted(name), name
    for name in ("model.safetensors", "model-00001-of-00002.safetensors", "unet/diffusion_pytorch_model.safetensors",
                 "pytorch_model.bin", "tokenizer.json"):
        assert not wanted(name), name


def test_existing_local_path_wins_over_a_hub_id(offline_cache, tmp_path, monkeypatch):
    make_cache(offline_cache, "user/name", {"adapter_config.json": b"{}"})
    local = tmp_path / "user" / "name"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.resolve_source("user/name") == local.relative_to(tmp_path)


def test_missing_id_offline_is_one_line(offline_cache):
    with pytest.raises(InputError) as err:
        hub.resolve_source("user/absent")
    msg = str(err.value)
    assert "\n" not in msg and "user/absent" in msg and "not in the Hugging Face cache" in msg
    assert str(offline_cache) in msg and "HF_HUB_OFFLINE" in msg


def test_missing_revision_offline_is_one_line(offline_cache):
    make_cache(offline_cache, "user/name", {"adapter_config.json": b"{}"})
    with pytest.raises(InputError) as err:
        hub.resolve_source("user/name@v2")
    assert "\n" not in str(err.value) and "user/name@v2" in str(err.value)


def test_non_id_strings_stay_paths(offline_cache, tmp_path):
    assert hub.resolve_source(str(tmp_path / "nope")) == tmp_path / "nope"
    assert hub.resolve_source("just-a-name") == hub.Path("just-a-name")


# ------------------------------------------------------------------ through inspect and balance
@pytest.fixture
def cached_peft_adapter(offline_cache, tmp_path, make_tiny_net):
    """A real PEFT adapter (TinyNet, LoRA r=4 with a trained-looking B), stored in the hand-built
    Hub cache as user/tiny-lora: snapshot files are links into blobs/, as huggingface_hub makes them."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_net(), LoraConfig(r=4, lora_alpha=8, target_modules=["lin", "conv"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    files = {p.name: p.read_bytes() for p in saved.iterdir() if p.is_file()}
    make_cache(offline_cache, "user/tiny-lora", files)
    return saved


def test_inspect_and_balance_a_cached_hub_id(cached_peft_adapter, tmp_path):
    import balora

    from_hub = balora.inspect("user/tiny-lora")
    local = balora.inspect(cached_peft_adapter)
    assert len(from_hub) == len(local) > 0
    np.testing.assert_allclose(from_hub.imbalance, local.imbalance, rtol=1e-12)
    out = tmp_path / "balanced"
    summary = balora.balance_file("user/tiny-lora@main", out)
    assert summary.balanced == len(local)
    assert not any(p.is_symlink() for p in out.rglob("*"))  # real files, not links into the cache
    again = balora.inspect(out)
    assert (again.rel_imbalance < 1e-5).all()


def share_blobs(cache, snapshot_files: list[Path]):
    """Move each file's blob into the cache-wide shared store, as huggingface_hub >= 2.4 does for Xet
    downloads (publish_blob_to_shared_store): <cache>/blobs/<2 hex>/<hash>, marked by a
    .huggingface-shared-blobs file, and the repository's blobs/<etag> a relative link to it."""
    store = cache / "blobs"
    store.mkdir(exist_ok=True)
    (store / ".huggingface-shared-blobs").write_text("1\n")
    for link in snapshot_files:
        blob = link.resolve()
        xet_hash = hashlib.sha256(b"xet" + blob.read_bytes()).hexdigest()
        shared = store / xet_hash[:2] / xet_hash
        shared.parent.mkdir(exist_ok=True)
        os.replace(blob, shared)
        blob.symlink_to(os.path.relpath(shared, blob.parent))


def test_a_cached_hub_id_whose_blobs_are_in_the_shared_store(cached_peft_adapter, offline_cache, tmp_path):
    # Xet downloads live in the cache's shared blob store, outside models--user--name: still the cache's own files.
    import balora

    snap = offline_cache / "models--user--tiny-lora" / "snapshots" / COMMIT
    share_blobs(offline_cache, [snap / "adapter_model.safetensors", snap / "README.md"])
    assert not (snap / "adapter_model.safetensors").resolve().is_relative_to(snap.parent.parent)
    local = balora.inspect(cached_peft_adapter)
    for text in ("user/tiny-lora", "user/tiny-lora/adapter_model.safetensors"):
        from_hub = balora.inspect(text)
        assert len(from_hub) == len(local) > 0 and (from_hub.scaling == 2.0).all(), text
        np.testing.assert_allclose(from_hub.imbalance, local.imbalance, rtol=1e-12)
    out = tmp_path / "balanced"
    summary = balora.balance_file("user/tiny-lora", out)
    assert summary.balanced == len(local) and (out / "README.md").read_bytes() == (cached_peft_adapter / "README.md").read_bytes()
    assert (balora.inspect(out).rel_imbalance < 1e-5).all()


def test_cli_inspect_hub_id_and_missing_id(cached_peft_adapter, capsys):
    from balora.cli import main

    assert main(["inspect", "user/tiny-lora", "--format", "csv"]) == 0
    assert "lin" in capsys.readouterr().out
    assert main(["inspect", "user/not-cached"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not in the Hugging Face cache" in err


def test_dashboard_inspect_page_takes_a_hub_id(cached_peft_adapter, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from balora.dashboard import exposure, settings
    from balora.dashboard.app import page_path

    monkeypatch.setenv(settings.ENV_VAR, str(tmp_path / "runs"))
    monkeypatch.setattr(exposure, "served_address", lambda: ("127.0.0.1", "test"))
    app = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
    at = AppTest.from_file(app, default_timeout=120).run()
    at.switch_page(str(page_path("inspect.py"))).run()
    at.text_input(key="insp_path").set_value("user/not-cached").run()
    assert not at.exception
    assert any("not in the Hugging Face cache" in e.value for e in at.error)
    at.text_input(key="insp_path").set_value("user/tiny-lora").run()
    assert not at.exception and not at.error
    import balora

    n_layers = len(balora.inspect(cached_peft_adapter))
    assert len(at.dataframe) >= 1 and at.metric[0].value == str(n_layers)


def test_dashboard_names_a_hub_adapters_download_after_the_repository(cached_peft_adapter, tmp_path, monkeypatch):
    # The snapshot folder is named by the commit: the user typed user/tiny-lora and must get
    # tiny-lora-balanced.zip (and tiny-lora-layers.csv), never a 40-digit hash.
    from streamlit.testing.v1 import AppTest

    from balora.dashboard import exposure, settings
    from balora.dashboard.app import page_path

    monkeypatch.setenv(settings.ENV_VAR, str(tmp_path / "runs"))
    monkeypatch.setattr(exposure, "served_address", lambda: ("127.0.0.1", "test"))
    at = AppTest.from_file(str(page_path("inspect.py")), default_timeout=120).run()
    at.text_input(key="insp_path").set_value("user/tiny-lora@main").run()
    at.button(key="insp_balance").click().run()
    assert not at.exception and not at.error
    shown = " ".join([b.proto.label for b in at.get("download_button")] + [s.value for s in at.success] + [c.value for c in at.caption])
    assert COMMIT not in shown and "tiny-lora-balanced.zip" in shown


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_cli_honours_the_hub_environment(cached_peft_adapter, offline_cache, tmp_path, variable):
    # A fresh process reads HF_HUB_CACHE / HF_HOME (whose cache is HF_HOME/hub) and HF_HUB_OFFLINE itself.
    import shutil
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    if variable == "HF_HOME":
        home = tmp_path / "hf-home"
        shutil.copytree(offline_cache, home / "hub", symlinks=True)
        env["HF_HOME"] = str(home)
    else:
        env["HF_HUB_CACHE"] = str(offline_cache)
    env["HF_HUB_OFFLINE"] = "1"
    run = subprocess.run([sys.executable, "-m", "balora.cli", "inspect", "user/tiny-lora", "--format", "csv"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-1500:]
    assert "lin" in run.stdout
    missing = subprocess.run([sys.executable, "-m", "balora.cli", "inspect", "user/other"],
                             capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert missing.returncode == 2 and "HF_HUB_OFFLINE" in missing.stderr


def _kohya_bytes(seed: int) -> bytes:
    """A kohya LoRA file (lora_down / lora_up / alpha) as the bytes a Hub repository would hold."""
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in ("lora_unet_a_to_q", "lora_te1_b_q_proj"):
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, 6, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(5, 4, generator=g) * 1e-2
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    return save(tensors, metadata={"ss_network_module": "networks.lora"})


def test_a_hub_repository_holding_one_kohya_file(offline_cache, tmp_path):
    # Most Stable Diffusion LoRAs on the Hub are one kohya/LyCORIS file with any name (the
    # patterns fetch "*.safetensors" for them); the repository's folder must read as that file.
    import balora
    from safetensors.torch import load

    data = _kohya_bytes(0)
    snap = make_cache(offline_cache, "user/style-lora", {"my_style.safetensors": data, "README.md": b"# style"})
    df = balora.inspect("user/style-lora")
    tensors = load(data)
    assert set(df.module) == {"lora_unet_a_to_q", "lora_te1_b_q_proj"} and (df.status == "ok").all()
    for row in df.itertuples():
        A = tensors[f"{row.module}.lora_down.weight"].double().numpy()
        B = tensors[f"{row.module}.lora_up.weight"].double().numpy()
        assert row.scaling == pytest.approx(2.0 / 4)
        ref = np.linalg.svd(0.5 * B @ A, compute_uv=False)
        np.testing.assert_allclose(row.sigma, ref[: len(row.sigma)], rtol=1e-5)
    out = tmp_path / "balanced"
    summary = balora.balance_file(f"user/style-lora@{COMMIT}", out)
    assert summary.balanced == 2 and (out / "my_style.safetensors").is_file()
    assert not (snap / "my_style.safetensors").resolve().samefile(out / "my_style.safetensors")
    assert (balora.inspect(out).rel_imbalance < 1e-5).all()


def test_a_hub_repository_with_several_lora_files_names_them(offline_cache):
    import balora

    snap = make_cache(offline_cache, "user/pack", {"a.safetensors": _kohya_bytes(0), "b.safetensors": _kohya_bytes(1)})
    with pytest.raises(InputError) as err:
        balora.inspect("user/pack")
    msg = str(err.value)
    assert "\n" not in msg and "a.safetensors" in msg and "b.safetensors" in msg
    assert len(balora.inspect(snap / "b.safetensors")) == 2  # the path the message offers reads


def test_balancing_a_one_file_repository_into_a_file_name_writes_that_file(offline_cache, tmp_path):
    # `balora balance user/style-lora style_balanced.safetensors` wrote a folder named
    # style_balanced.safetensors (which LoRA loaders listing *.safetensors files cannot open).
    import balora
    from safetensors.torch import load, load_file

    data = _kohya_bytes(0)
    make_cache(offline_cache, "user/style-lora", {"my_style.safetensors": data, "README.md": b"# style"})
    out = tmp_path / "style_balanced.safetensors"
    summary = balora.balance_file("user/style-lora", out)
    assert out.is_file() and summary.balanced == 2
    before, after = load(data), load_file(out)
    assert before.keys() == after.keys()
    for m in ("lora_unet_a_to_q", "lora_te1_b_q_proj"):
        A0, B0 = before[f"{m}.lora_down.weight"].double(), before[f"{m}.lora_up.weight"].double()
        A1, B1 = after[f"{m}.lora_down.weight"].double(), after[f"{m}.lora_up.weight"].double()
        np.testing.assert_allclose((B1 @ A1).numpy(), (B0 @ A0).numpy(), atol=1e-5 * float((B0 @ A0).abs().max()))


def test_balancing_a_one_file_repository_into_the_other_formats_name_is_refused(offline_cache, tmp_path):
    # The file itself to out.bin is refused (a .bin of safetensors bytes reads as corrupt); the same file
    # through its repository (or folder) wrote a folder named out.bin holding my_style.safetensors instead.
    import balora

    make_cache(offline_cache, "user/style-lora", {"my_style.safetensors": _kohya_bytes(0), "README.md": b"# style"})
    out = tmp_path / "style_balanced.bin"
    with pytest.raises(InputError) as err:
        balora.balance_file("user/style-lora", out)
    msg = str(err.value)
    assert "\n" not in msg and "style_balanced.safetensors" in msg and not out.exists()


def _diffusers_lora_bytes(seed: int, tmp_path: Path) -> bytes:
    """pytorch_lora_weights.safetensors as diffusers' save_lora_weights writes it (r=4, lora_alpha=8)."""
    import torch

    loaders = pytest.importorskip("diffusers.loaders", reason="diffusers not installed (pip install -e '.[wild]')")
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name in ("down.attn.to_q", "down.attn.to_v"):
        layers[f"{name}.lora_A.weight"] = torch.randn(4, 6, generator=g)
        layers[f"{name}.lora_B.weight"] = torch.randn(5, 4, generator=g)
    folder = tmp_path / f"diffusers-{seed}"
    loaders.StableDiffusionLoraLoaderMixin.save_lora_weights(
        folder, unet_lora_layers=layers, unet_lora_adapter_metadata={"r": 4, "lora_alpha": 8})
    return (folder / "pytorch_lora_weights.safetensors").read_bytes()


def test_a_diffusers_training_repository_with_checkpoint_folders_reads_its_final_lora(offline_cache, tmp_path):
    # diffusers' train_*_lora.py scripts push their whole output folder: the final
    # pytorch_lora_weights.safetensors beside checkpoint-N/ folders (accelerate's state, with the LoRA
    # file of that step). balora took the folder for a PEFT Trainer output and refused it ("Trainer
    # output folder whose checkpoints hold no LoRA adapter"); diffusers' load_lora_weights reads the
    # top file, and so must inspect and balance.
    import balora
    from safetensors.torch import load, load_file

    final, step = _diffusers_lora_bytes(0, tmp_path), _diffusers_lora_bytes(1, tmp_path)
    make_cache(offline_cache, "user/dreambooth-lora", {
        "pytorch_lora_weights.safetensors": final, "README.md": b"# lora", "image_0.png": b"\x89PNG",
        "checkpoint-500/pytorch_lora_weights.safetensors": step, "checkpoint-500/optimizer.bin": b"state",
    })
    df = balora.inspect("user/dreambooth-lora")
    tensors = load(final)
    assert len(df) == 2 and (df.status == "ok").all()
    for row in df.itertuples():
        A = tensors[f"{row.module}.lora_A.weight"].double().numpy()
        B = tensors[f"{row.module}.lora_B.weight"].double().numpy()
        assert row.scaling == pytest.approx(8 / 4)
        np.testing.assert_allclose(row.sigma, np.linalg.svd(2.0 * B @ A, compute_uv=False)[:4], rtol=1e-5)
    out = tmp_path / "balanced"
    summary = balora.balance_file("user/dreambooth-lora", out)
    assert summary.balanced == 2 and not (out / "checkpoint-500").exists()
    after = load_file(out / "pytorch_lora_weights.safetensors")
    for m in df.module:
        A0, B0 = tensors[f"{m}.lora_A.weight"].double(), tensors[f"{m}.lora_B.weight"].double()
        A1, B1 = after[f"{m}.lora_A.weight"].double(), after[f"{m}.lora_B.weight"].double()
        np.testing.assert_allclose((B1 @ A1).numpy(), (B0 @ A0).numpy(), atol=1e-5 * float((B0 @ A0).abs().max()))


def test_a_partly_downloaded_repository_offline_is_not_called_absent(offline_cache):
    # An interrupted download leaves the snapshot without some of the files that huggingface_hub's
    # cached tree listing (trees/<commit>.json, written by snapshot_download) names; offline,
    # snapshot_download then raises IncompleteSnapshotError, a LocalEntryNotFoundError. balora said
    # "not in the Hugging Face cache", while the user can see models--user--half in it.
    import json

    errors = pytest.importorskip("huggingface_hub.errors")
    if not hasattr(errors, "IncompleteSnapshotError"):
        pytest.skip("this huggingface_hub has no cached tree listings (IncompleteSnapshotError)")
    snap = make_cache(offline_cache, "user/half", {"adapter_config.json": b"{}"})
    listing = {name: {"size": 2, "blob_id": "0" * 40} for name in ("adapter_config.json", "adapter_model.safetensors")}
    (snap.parent.parent / "trees").mkdir()
    (snap.parent.parent / "trees" / f"{COMMIT}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    with pytest.raises(InputError) as err:
        hub.resolve_source("user/half")
    msg = str(err.value)
    assert "\n" not in msg and "user/half" in msg and str(snap) in msg
    assert "not in the Hugging Face cache" not in msg and "HF_HUB_OFFLINE" in msg


# ---------------------------------------------------------------- online: the download is sized first
@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """Online, with the Hub's answers replaced: model_info lists `files` {name: size}, snapshot_download
    records its calls and returns a snapshot holding a small adapter-like file."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.hf_api import RepoSibling

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv(hub.MAX_DOWNLOAD_ENV, raising=False)
    state = {"files": {}, "downloads": [], "info_error": None, "cache_only": []}

    def model_info(self, repo_id, revision=None, files_metadata=False, timeout=None, **kw):
        if state["info_error"] is not None:
            raise state["info_error"]
        assert files_metadata  # without it the Hub gives no sizes
        return type("Info", (), {"siblings": [RepoSibling(rfilename=n, size=s) for n, s in state["files"].items()]})()

    def snapshot_download(repo_id, **kw):
        state["downloads"].append(repo_id)
        state["cache_only"].append(kw.get("local_files_only", False))
        snap = tmp_path / "snap"
        snap.mkdir(exist_ok=True)
        (snap / "lora.safetensors").write_bytes(b"x")
        return str(snap)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return state


def test_a_base_models_single_file_checkpoint_is_refused_before_downloading(fake_hub):
    """A base model's id typed by mistake (or into a shared dashboard): its single-file checkpoint matches
    "*.safetensors" and would have been downloaded whole, 6.9 GB for SDXL."""
    fake_hub["files"] = {"sd_xl_base_1.0.safetensors": 6_938_078_334, "text_encoder/model.fp16.safetensors": 246_144_152,
                         "unet/diffusion_pytorch_model.safetensors": 10_270_077_736, "README.md": 100}
    with pytest.raises(InputError) as e:
        hub.resolve_source("stabilityai/stable-diffusion-xl-base-1.0")
    msg = str(e.value)
    assert "\n" not in msg and "sd_xl_base_1.0.safetensors (6.9 GB)" in msg and hub.MAX_DOWNLOAD_ENV in msg
    assert "7.2 GB" in msg  # the files it would fetch: the UNet's weights are ignored anyway
    assert fake_hub["downloads"] == []


def test_an_adapter_beside_sharded_base_weights_downloads(fake_hub):
    fake_hub["files"] = {"model-00001-of-00002.safetensors": 9_000_000_000, "model-00002-of-00002.safetensors": 5e9,
                         "adapter_model.safetensors": 50_000_000, "adapter_config.json": 800}
    hub.resolve_source("user/lora")
    assert fake_hub["downloads"] == ["user/lora"]


def test_the_download_limit_can_be_raised(fake_hub, monkeypatch):
    fake_hub["files"] = {"big_lora.safetensors": 7e9}
    with pytest.raises(InputError, match="7.0 GB"):
        hub.resolve_source("user/big")
    monkeypatch.setenv(hub.MAX_DOWNLOAD_ENV, "8")
    hub.resolve_source("user/big")
    assert fake_hub["downloads"] == ["user/big"]
    monkeypatch.setenv(hub.MAX_DOWNLOAD_ENV, "lots")
    with pytest.raises(InputError, match=f"{hub.MAX_DOWNLOAD_ENV}='lots'"):
        hub.resolve_source("user/big")


def test_no_answer_from_the_hub_reads_the_cache_only(fake_hub):
    """Sizing needs the Hub; when its API does not answer (no route, a 10 s timeout, a proxy), nothing unsized
    is downloaded: only the cache is read. The download went ahead, past BALORA_HUB_MAX_GB, when only the API
    call had timed out (docs/SECURITY.md: a base model typed into a shared dashboard cannot fill its disk)."""
    connect_error = type("ConnectError", (Exception,), {})  # as httpx's: not an OSError
    fake_hub["info_error"] = connect_error("no route to host")
    hub.resolve_source("user/lora")
    assert fake_hub["downloads"] == ["user/lora"] and fake_hub["cache_only"] == [True]
    fake_hub["info_error"] = None
    hub.resolve_source("user/lora")  # sized: downloaded
    assert fake_hub["cache_only"] == [True, False]


def test_offline_nothing_is_sized(fake_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fake_hub["info_error"] = AssertionError("model_info called offline")
    hub.resolve_source("user/lora")
    assert fake_hub["downloads"] == ["user/lora"]


def test_a_live_model_given_for_an_adapter_path_is_one_line(tmp_path):
    # balora.inspect(peft_model) stringified the model's repr into a path: "[Errno 36] File name too long".
    import balora
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    for call in (lambda: balora.inspect(model), lambda: balora.balance_file(model, tmp_path / "out")):
        with pytest.raises(TypeError, match=r"^an adapter is read from a folder, a weights file or a Hub id.*got a "
                                            r"Sequential.*balora\.layer_report\(model\)"):
            call()
    assert not (tmp_path / "out").exists()
