"""One file (or folder) of a Hub repository as an adapter source: user/name[@revision]/path, hf://...,
and a copied https://huggingface.co/... address. Offline with a hand-built Hugging Face cache (as
test_hub.py builds it), and online with huggingface_hub's functions replaced: never the network."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_hub import COMMIT, _kohya_bytes, make_cache  # noqa: E402

from balora.adapters import hub  # noqa: E402
from balora.adapters.hub_names import HubRef, cache_name  # noqa: E402
from balora.errors import InputError  # noqa: E402

EPOCHS = ("style-000005.safetensors", "style.safetensors")  # kohya's epoch snapshot beside the final file


@pytest.mark.parametrize("text, expected", [
    ("user/name/style.safetensors", HubRef("user/name", None, "style.safetensors", True)),
    ("user/name@v2/sub/x.bin", HubRef("user/name", "v2", "sub/x.bin", True)),
    (f"user/name@{COMMIT}/x.safetensors", HubRef("user/name", COMMIT, "x.safetensors", True)),
    ("user/name@refs/pr/3/x.safetensors", HubRef("user/name", "refs/pr/3", "x.safetensors", True)),
    ("user/name@feature%2Fx/x.safetensors", HubRef("user/name", "feature/x", "x.safetensors", True)),
    ("hf://user/name@main/x.safetensors", HubRef("user/name", "main", "x.safetensors", True)),
    ("hf://models/user/name", HubRef("user/name")),
    ("https://huggingface.co/user/name/blob/main/d/x.safetensors", HubRef("user/name", "main", "d/x.safetensors", True)),
    ("https://huggingface.co/user/name/resolve/v2/x.safetensors?download=true", HubRef("user/name", "v2", "x.safetensors", True)),
    ("https://hf.co/user/name/tree/feature%2Fx/checkpoint-500", HubRef("user/name", "feature/x", "checkpoint-500")),
    ("https://huggingface.co/user/name", HubRef("user/name")),
    ("user/name/checkpoint-500", HubRef("user/name", None, "checkpoint-500")),
    ("user/name/v1.5", HubRef("user/name", None, "v1.5")),  # .5 is no file suffix: a folder
    ("user/name/sd.v1/", HubRef("user/name", None, "sd.v1")),  # a trailing / says folder
    ("user/name/a//b.safetensors", None),
    ("user/name/../x.safetensors", None),
])
def test_parse_a_path_in_a_hub_repository(text, expected):
    ref = hub.parse_hub_ref(text)
    assert (ref if ref is None else HubRef(ref.repo_id, ref.revision, ref.path, ref.is_file)) == expected


@pytest.mark.parametrize("text", [
    "user/name@..", "user/name@.", "user/name@../x.safetensors", "user/name@..%2F..%2Fx/x.safetensors",
    "https://huggingface.co/user/name/blob/%2e%2e/x.safetensors", "user/name@.hidden", "user/name@main.lock",
    "user/name@main\n", "user/name@main\n/x.safetensors", "user/name\n", "hf://user/name@a%2F%2Fb",
])
def test_a_revision_git_refuses_is_no_hub_source(text):
    # git refuses these ref names, so no Hub revision has them; `..` even reached the Hub as another
    # address (/revision/.. is /api/models/user/name: main's files), and offline named folders above refs/.
    try:
        ref = hub.parse_hub_ref(text)
    except InputError as e:  # a Hub address: refused in one line
        assert "\n" not in str(e).replace(text, "")
    else:
        assert ref is None


def test_a_slash_branch_written_as_before_is_the_fallback():
    # Before paths, user/name@feature/x meant the branch feature/x; it is tried when "feature" is not one.
    ref = hub.parse_hub_ref("user/name@feature/x")
    assert (ref.revision, ref.path, ref.fallback) == ("feature", "x", HubRef("user/name", "feature/x"))
    assert hub.parse_hub_ref("user/name@feature/x.safetensors").fallback is None
    assert hub.parse_hub_ref("https://huggingface.co/user/name/tree/main/x").fallback is None  # a URL is exact


@pytest.mark.parametrize("text, words", [
    ("user/name/README.md", "README.md"),
    ("user/name@main/sub/model.ckpt", ".safetensors or .bin"),
    ("hf://datasets/user/name/x.safetensors", "dataset repository"),
    ("https://huggingface.co/spaces/user/name", "space repository"),
    ("https://huggingface.co/user/name/discussions/3", "names no file or folder"),
    ("hf://user", "not a Hub model repository"),
    # Another site's address is no local path either ("https:/civitai.com/...: no such file" before): name its host.
    ("https://civitai.com/models/12345", "(its host is civitai.com)"),
    ("https://huggingface.co@evil.com/user/name/blob/main/x.safetensors", "(its host is evil.com)"),
    ("HTTP://evil.com/huggingface.co/user/name", "download the file and give its path"),
    ("https://[huggingface.co/user/name", "(its host is not readable)"),  # urlsplit: "Invalid IPv6 URL" (exit 1)
])
def test_what_cannot_be_read_from_the_hub_is_one_line(text, words, offline_cache):
    with pytest.raises(InputError) as err:
        hub.resolve_source(text)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(text) and words in msg


@pytest.mark.parametrize("text, shown", [
    ("https://alice:hf_secret123@huggingface.co/user/name/blob/main/x.safetensors",
     "https://***@huggingface.co/user/name/blob/main/x.safetensors: a Hub address with credentials"),
    ("https://hf_secret123@hf.co/user/name", "https://***@hf.co/user/name: a Hub address with credentials"),
    ("https://alice:hf_secret123@evil.com/user/name", "https://alice:***@evil.com/user/name: not an address on the Hugging Face Hub"),
])
def test_credentials_in_a_hub_address_are_refused_and_never_shown(text, shown, offline_cache):
    # https://user:token@huggingface.co/... was accepted, the token silently dropped, and echoed in every message.
    with pytest.raises(InputError) as err:
        hub.resolve_source(text)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(shown) and "hf_secret123" not in msg


def _factors(data: bytes, module: str):
    from safetensors.torch import load

    t = load(data)
    return t[f"{module}.lora_down.weight"].double().numpy(), t[f"{module}.lora_up.weight"].double().numpy()


def _check_kohya_report(df, data: bytes):
    """inspect's rows against float64 numpy on the file's own factors (alpha 2, r 4: scaling 0.5)."""
    assert set(df.module) == {"lora_unet_a_to_q", "lora_te1_b_q_proj"} and (df.status == "ok").all()
    for row in df.itertuples():
        A, B = _factors(data, row.module)
        assert row.scaling == pytest.approx(0.5)
        np.testing.assert_allclose(row.sigma, np.linalg.svd(0.5 * B @ A, compute_uv=False)[: len(row.sigma)], rtol=1e-5)


@pytest.mark.parametrize("form", [
    "user/pack/{f}", "user/pack@main/{f}", f"user/pack@{COMMIT}/{{f}}", "hf://user/pack/{f}",
    "https://huggingface.co/user/pack/blob/main/{f}", "https://huggingface.co/user/pack/resolve/main/{f}?download=true",
])
def test_one_file_of_a_repository_of_several_reads_that_file(offline_cache, form):
    import balora

    files = {name: _kohya_bytes(i) for i, name in enumerate(EPOCHS)}
    make_cache(offline_cache, "user/pack", {**files, "README.md": b"# style"})
    df = balora.inspect(form.format(f=EPOCHS[0]))
    _check_kohya_report(df, files[EPOCHS[0]])
    assert {Path(s).name for s in df.source} == {EPOCHS[0]}


def test_several_files_refused_with_the_syntax_that_picks_one(offline_cache):
    import balora

    files = {name: _kohya_bytes(i) for i, name in enumerate(EPOCHS)}
    make_cache(offline_cache, "user/pack", files)
    with pytest.raises(InputError) as err:
        balora.inspect("user/pack")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("user/pack: ") and f"e.g. user/pack/{EPOCHS[0]}" in msg
    assert str(offline_cache) not in msg  # the cache's path is not what the user typed
    _check_kohya_report(balora.inspect(f"user/pack/{EPOCHS[0]}"), files[EPOCHS[0]])  # the offered form reads


@pytest.mark.parametrize("files", [("loras/a.safetensors",), ("loras/a.safetensors", "v2/b.safetensors")])
def test_lora_files_only_in_folders_of_the_repository_are_named(offline_cache, files):
    # A repository keeping its LoRA files in a folder (loras/x.safetensors) was fetched, then refused as
    # "<cache snapshot path>: not a LoRA adapter: expected a PEFT adapter folder ...": neither the name the user
    # typed nor the form that reads a file of it.
    import balora

    data = {name: _kohya_bytes(i) for i, name in enumerate(files)}
    make_cache(offline_cache, "user/nested", data)
    with pytest.raises(InputError) as err:
        balora.inspect("user/nested")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("user/nested: ") and str(offline_cache) not in msg
    assert all(n in msg for n in files) and f"e.g. user/nested/{files[0]}" in msg
    _check_kohya_report(balora.inspect(f"user/nested/{files[0]}"), data[files[0]])  # the offered form reads


def test_offline_a_file_the_cached_repository_lacks_lists_its_cached_files(offline_cache):
    # user/pack/styel.safetensors (a typo) with user/pack cached said "not a local path, and not in the Hugging Face
    # cache ...; download it where there is network access", as if the repository were missing; online the
    # message lists the repository's weights files.
    import balora

    make_cache(offline_cache, "user/pack", {n: _kohya_bytes(i) for i, n in enumerate(EPOCHS)})
    with pytest.raises(InputError) as err:
        balora.inspect("user/pack/styel.safetensors")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("user/pack/styel.safetensors: ") and all(n in msg for n in EPOCHS)
    with pytest.raises(InputError, match="not in the Hugging Face cache"):  # nothing of it cached: as before
        balora.inspect("user/other/styel.safetensors")


def test_the_refusal_keeps_a_revision_other_than_main(offline_cache):
    import balora

    other = "fedcba9876543210fedcba9876543210fedcba98"
    make_cache(offline_cache, "user/pack", {"a.safetensors": _kohya_bytes(0)})  # main: one file
    snap = make_cache(offline_cache, "user/pack", {n: _kohya_bytes(i) for i, n in enumerate(EPOCHS)}, commit=other, ref="v2")
    assert cache_name(snap / EPOCHS[0]) == f"user/pack@v2/{EPOCHS[0]}"
    with pytest.raises(InputError, match=f"e.g. user/pack@v2/{EPOCHS[0]}"):
        balora.inspect("user/pack@v2")
    assert cache_name(snap.parent.parent) is None and cache_name(Path("/tmp")) is None


def test_balancing_one_file_of_a_repository_writes_that_file(offline_cache, tmp_path, capsys):
    import balora
    from balora.cli import main
    from safetensors.torch import load_file

    files = {name: _kohya_bytes(i) for i, name in enumerate(EPOCHS)}
    snap = make_cache(offline_cache, "user/pack", files)
    out = tmp_path / "balanced.safetensors"
    assert main(["balance", f"user/pack/{EPOCHS[0]}", str(out)]) == 0, capsys.readouterr().err
    assert out.is_file() and not out.is_symlink()
    after = load_file(out)
    assert after.keys() == load_file(snap / EPOCHS[0]).keys()
    for m in ("lora_unet_a_to_q", "lora_te1_b_q_proj"):
        A0, B0 = _factors(files[EPOCHS[0]], m)
        A1, B1 = after[f"{m}.lora_down.weight"].double().numpy(), after[f"{m}.lora_up.weight"].double().numpy()
        np.testing.assert_allclose(B1 @ A1, B0 @ A0, atol=1e-5 * np.abs(B0 @ A0).max())
        np.testing.assert_allclose(B1.T @ B1, A1 @ A1.T, atol=1e-5 * np.abs(A1 @ A1.T).max())
    assert (snap / EPOCHS[0]).read_bytes() == files[EPOCHS[0]]  # the cache is untouched
    # Into a folder name, as for the local file: refused, naming the file to give.
    with pytest.raises(InputError, match=f"name the output file, e.g. {tmp_path / 'dir' / EPOCHS[0]}"):
        balora.balance_file(f"user/pack/{EPOCHS[0]}", str(tmp_path / "dir") + "/")


def test_a_peft_checkpoint_folder_and_its_weights_file_in_a_repository(offline_cache, tmp_path, make_tiny_net):
    import balora
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_net(), LoraConfig(r=4, lora_alpha=8, target_modules=["lin"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "saved")
    files = {f"checkpoint-500/{p.name}": p.read_bytes() for p in (tmp_path / "saved").iterdir() if p.is_file()}
    make_cache(offline_cache, "user/run", {**files, **{n: _kohya_bytes(i) for i, n in enumerate(EPOCHS)}})
    local = balora.inspect(tmp_path / "saved")
    for text in ("user/run/checkpoint-500", "user/run/checkpoint-500/adapter_model.safetensors"):
        df = balora.inspect(text)
        assert len(df) == len(local) > 0 and (df.scaling == 2.0).all(), text  # the config beside the file was read
        np.testing.assert_allclose(df.imbalance, local.imbalance, rtol=1e-12)
    with pytest.raises(InputError, match="has no folder checkpoint-9"):
        balora.inspect("user/run/checkpoint-9")


def test_a_named_file_whose_cache_entry_links_out_of_the_cache_is_refused(offline_cache, tmp_path):
    # The repository folder is the boundary of a cache snapshot (docs/SECURITY.md), for a folder of it
    # and for one file of it alike: a snapshot entry planted as a link elsewhere is not read.
    import balora

    snap = make_cache(offline_cache, "user/pack", {EPOCHS[1]: _kohya_bytes(0)})
    outside = tmp_path / "elsewhere" / "secret.safetensors"
    outside.parent.mkdir()
    outside.write_bytes(_kohya_bytes(1))
    (snap / "sub").mkdir()
    for link in (snap / EPOCHS[0], snap / "sub" / EPOCHS[0]):
        link.symlink_to(os.path.relpath(outside, link.parent))
    for text in (f"user/pack/{EPOCHS[0]}", f"user/pack/sub/{EPOCHS[0]}", "user/pack/sub"):
        with pytest.raises(InputError) as err:
            balora.inspect(text)
        msg = str(err.value)
        assert "\n" not in msg and f"symbolic link to {outside}" in msg and "outside the folder" in msg, text
    _check_kohya_report(balora.inspect(f"user/pack/{EPOCHS[1]}"), _kohya_bytes(0))  # the cache's own file reads


def test_a_file_not_in_the_cache_offline_is_one_line(offline_cache):
    make_cache(offline_cache, "user/pack", {EPOCHS[1]: _kohya_bytes(0)})
    with pytest.raises(InputError) as err:
        hub.resolve_source("user/pack/other.safetensors")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("user/pack/other.safetensors: ") and "HF_HUB_OFFLINE" in msg


def test_a_slash_branch_as_typed_before_still_reads(offline_cache):
    snap = make_cache(offline_cache, "user/pack", {EPOCHS[1]: _kohya_bytes(0)}, ref="feature/x")
    assert hub.resolve_source("user/pack@feature/x").path == snap
    assert hub.resolve_source("user/pack@feature%2Fx").path == snap
    assert hub.resolve_source(f"user/pack@feature%2Fx/{EPOCHS[1]}").path == snap / EPOCHS[1]


@pytest.mark.parametrize("text", ["données/run1/checkpoint-500", "données/modèle", "モデル/lora/x.safetensors",
                                  # validate_repo_id's other rules: a name neither starts nor ends with . or -, nor ends .git
                                  "outputs/.cache/adapter", "runs/run-/checkpoint-500", "user/name.git", "a./b"])
def test_a_missing_local_path_that_no_hub_id_can_be_is_no_hub_id(offline_cache, tmp_path, monkeypatch, text):
    # Hub ids are ASCII (huggingface_hub's validate_repo_id), Python's \w is not: such a path that does not
    # exist got "not a valid Hub id (Repo id must use alphanumeric chars ...)" instead of its own message.
    import balora

    monkeypatch.chdir(tmp_path)
    assert hub.parse_hub_ref(text) is None
    with pytest.raises(InputError, match=f"^{text}: no such file or directory$"):
        balora.inspect(text)


@pytest.mark.parametrize("text", ["~.cache/adapter", "~no-such-user-h92/lora.safetensors"])
def test_a_tilde_naming_no_user_is_one_line(offline_cache, tmp_path, monkeypatch, capsys, text):
    # ~.cache/x (for ~/.cache/x) asks for the home of a user ".cache": "RuntimeError: Could not determine home
    # directory" (exit 1), and a traceback on the Inspect page.
    from streamlit.testing.v1 import AppTest

    from balora.cli import main
    from balora.dashboard import exposure, settings
    from balora.dashboard.app import page_path

    monkeypatch.chdir(tmp_path)
    assert main(["inspect", text]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and text in err and "~/" in err
    monkeypatch.setenv(settings.ENV_VAR, str(tmp_path / "runs"))
    monkeypatch.setattr(exposure, "served_address", lambda: ("127.0.0.1", "test"))
    at = AppTest.from_file(str(page_path("inspect.py")), default_timeout=120).run()
    at.text_input(key="insp_path").set_value(text).run()
    assert not at.exception and any("~/" in e.value for e in at.error)


def test_a_local_file_wins_over_the_hub_path(offline_cache, tmp_path, monkeypatch):
    make_cache(offline_cache, "user/pack", {EPOCHS[1]: _kohya_bytes(0)})
    local = tmp_path / "user" / "pack" / EPOCHS[1]
    local.parent.mkdir(parents=True)
    local.write_bytes(_kohya_bytes(1))
    monkeypatch.chdir(tmp_path)
    assert hub.resolve_source(f"user/pack/{EPOCHS[1]}") == Path("user/pack") / EPOCHS[1]


# ---------------------------------------------------------------- online: huggingface_hub replaced
@pytest.fixture
def online_hub(tmp_path, monkeypatch):
    """model_info lists `files` {name: size}; hf_hub_download and snapshot_download record their calls."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError
    from huggingface_hub.hf_api import RepoSibling

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv(hub.MAX_DOWNLOAD_ENV, raising=False)
    state = {"files": {}, "file_calls": [], "snapshot_calls": []}
    snap = tmp_path / "models--user--pack" / "snapshots" / COMMIT

    def model_info(self, repo_id, revision=None, files_metadata=False, timeout=None, **kw):
        assert files_metadata
        return type("Info", (), {"siblings": [RepoSibling(rfilename=n, size=s) for n, s in state["files"].items()]})()

    def hf_hub_download(repo_id, filename, revision=None, local_files_only=False, **kw):
        state["file_calls"].append((repo_id, filename, revision))
        if filename not in state["files"]:
            raise EntryNotFoundError(f"{filename} not found")
        (snap / filename).parent.mkdir(parents=True, exist_ok=True)
        (snap / filename).write_bytes(_kohya_bytes(0))
        return str(snap / filename)

    def snapshot_download(repo_id, **kw):
        state["snapshot_calls"].append(repo_id)
        snap.mkdir(parents=True, exist_ok=True)
        (snap / "lora.safetensors").write_bytes(_kohya_bytes(0))
        return str(snap)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return state


def test_online_only_the_named_file_is_fetched(online_hub):
    online_hub["files"] = {"style-000005.safetensors": 150e6, "style.safetensors": 150e6, "sd_xl_base.safetensors": 6.9e9}
    src = hub.resolve_source("user/pack@v2/style-000005.safetensors")
    assert src.path.name == "style-000005.safetensors" and src.path.is_file()
    assert online_hub["file_calls"] == [("user/pack", "style-000005.safetensors", "v2")]
    assert online_hub["snapshot_calls"] == []  # the 6.9 GB file beside it is neither counted nor fetched


def test_online_the_size_limit_applies_to_the_named_file(online_hub, monkeypatch):
    online_hub["files"] = {"sd_xl_base_1.0.safetensors": 6_938_078_334, "lora.safetensors": 1e6}
    with pytest.raises(InputError) as err:
        hub.resolve_source("https://huggingface.co/user/pack/blob/main/sd_xl_base_1.0.safetensors")
    msg = str(err.value)
    assert "\n" not in msg and "sd_xl_base_1.0.safetensors (6.9 GB)" in msg and hub.MAX_DOWNLOAD_ENV in msg
    assert online_hub["file_calls"] == []
    monkeypatch.setenv(hub.MAX_DOWNLOAD_ENV, "8")
    assert hub.resolve_source("user/pack/sd_xl_base_1.0.safetensors").path.name == "sd_xl_base_1.0.safetensors"


def test_online_a_folder_named_with_glob_characters_is_that_folder(online_hub):
    # The folder goes into fnmatch patterns: run[1] matched run1/ (and * every folder), never run[1]/ itself.
    online_hub["files"] = {"run[1]/adapter_model.safetensors": 6e9, "run1/adapter_model.safetensors": 1e6}
    with pytest.raises(InputError, match=r"run\[1\]/adapter_model\.safetensors \(6\.0 GB\)"):
        hub.resolve_source("user/pack/run[1]")
    ref = hub.parse_hub_ref("user/pack/*")
    assert hub._fetched(ref, [hub_sibling(n) for n in ("a/x.safetensors", "*/x.safetensors")]) == [hub_sibling("*/x.safetensors")]
    assert online_hub["snapshot_calls"] == []


def hub_sibling(name: str):
    from huggingface_hub.hf_api import RepoSibling

    return RepoSibling(rfilename=name, size=1)


def test_online_a_missing_file_lists_the_weights_files_there(online_hub):
    online_hub["files"] = {n: 1e6 for n in EPOCHS} | {"README.md": 10}
    with pytest.raises(InputError) as err:
        hub.resolve_source("user/pack/styel.safetensors")
    msg = str(err.value)
    assert "\n" not in msg and "has no file styel.safetensors" in msg and all(n in msg for n in EPOCHS)
    assert online_hub["file_calls"] == []


def test_a_typo_under_a_local_folder_is_not_sent_to_the_hub(online_hub, tmp_path, monkeypatch):
    # outputs/run1 is a folder here, checkpoint-50O a typo of checkpoint-500: a local path, whose own "no such file"
    # message is due, not a Hub repository "outputs/run1" looked up online (nor "log in" advice).
    import huggingface_hub

    import balora

    (tmp_path / "outputs" / "run1" / "checkpoint-500").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **kw: pytest.fail("asked the Hub"))
    for text in ("outputs/run1/checkpoint-50O", "outputs/run1/adapter_model.safetensors"):
        assert hub.resolve_source(text) == Path(text)
        with pytest.raises(InputError, match=f"^{text}: no such file or directory$"):
            balora.inspect(text)
    assert online_hub["file_calls"] == [] and online_hub["snapshot_calls"] == []


def test_online_a_slash_branch_as_typed_before_still_reads(online_hub, monkeypatch):
    # No revision "feature" on the Hub: user/name@feature/x is the branch feature/x, as before paths.
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub.errors import RevisionNotFoundError

    asked, info = [], huggingface_hub.HfApi.model_info

    def model_info(self, repo_id, revision=None, **kw):
        asked.append(revision)
        if revision == "feature":
            response = SimpleNamespace(headers={}, status_code=404, url="", request=SimpleNamespace(url="", method="GET"))
            raise RevisionNotFoundError("404: no revision feature", response=response)
        return info(self, repo_id, revision=revision, **kw)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    online_hub["files"] = {"lora.safetensors": 1e6}
    hub.resolve_source("user/pack@feature/x")
    assert asked == ["feature", "feature/x"] and online_hub["snapshot_calls"] == ["user/pack"]
    with pytest.raises(InputError, match=r"^user/pack@feature/x\.safetensors: the Hub repository has no revision 'feature'$"):
        hub.resolve_source("user/pack@feature/x.safetensors")  # a file: no fallback to guess


@pytest.mark.parametrize("text", ["user/pack/style.safetensors", "user/pack"])
def test_online_a_gated_repository_says_to_accept_its_conditions(online_hub, monkeypatch, text):
    # Its metadata is public, its files need the conditions accepted: "no such model repository" was wrong.
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*a, **kw):
        response = SimpleNamespace(headers={}, status_code=403, url="", request=SimpleNamespace(url="", method="GET"))
        raise GatedRepoError("403 Client Error. Cannot access gated repo for url ...", response=response)

    online_hub["files"] = {"style.safetensors": 1e6}
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(InputError) as err:
        hub.resolve_source(text)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{text}: ") and "gated" in msg and "https://huggingface.co/user/pack" in msg
    assert "no such model repository" not in msg


def test_online_a_peft_weights_file_brings_its_config(online_hub):
    online_hub["files"] = {"ck/adapter_model.safetensors": 1e6, "ck/adapter_config.json": 500}
    hub.resolve_source("user/pack/ck/adapter_model.safetensors")
    assert [c[1] for c in online_hub["file_calls"]] == ["ck/adapter_model.safetensors", "ck/adapter_config.json"]
    online_hub["files"] = {"adapter_model.safetensors": 1e6}  # no config there: the weights still read (bare)
    hub.resolve_source("user/pack/adapter_model.safetensors")


def test_online_the_config_fetched_beside_a_peft_weights_file_counts_toward_the_limit(online_hub):
    # The adapter_config.json fetched with a named adapter_model.* is the repository author's file too:
    # a 6 GB one must be refused before anything is downloaded, as it is in the folder form.
    online_hub["files"] = {"ck/adapter_model.safetensors": 1e6, "ck/adapter_config.json": 6e9}
    for text in ("user/pack/ck/adapter_model.safetensors", "user/pack/ck"):
        with pytest.raises(InputError) as err:
            hub.resolve_source(text)
        msg = str(err.value)
        assert "\n" not in msg and "ck/adapter_config.json (6.0 GB)" in msg and hub.MAX_DOWNLOAD_ENV in msg, text
    assert online_hub["file_calls"] == [] and online_hub["snapshot_calls"] == []


def test_dashboard_inspects_and_balances_one_file_of_a_repository(offline_cache, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from balora.dashboard import exposure, settings
    from balora.dashboard.app import page_path

    make_cache(offline_cache, "user/pack", {n: _kohya_bytes(i) for i, n in enumerate(EPOCHS)})
    monkeypatch.setenv(settings.ENV_VAR, str(tmp_path / "runs"))
    monkeypatch.setattr(exposure, "served_address", lambda: ("127.0.0.1", "test"))
    at = AppTest.from_file(str(page_path("inspect.py")), default_timeout=120).run()
    at.text_input(key="insp_path").set_value("user/pack/README.md").run()
    assert not at.exception and any("README.md" in e.value and ".safetensors" in e.value for e in at.error)
    at.text_input(key="insp_path").set_value("user/pack").run()
    assert not at.exception and any("user/pack/style-000005.safetensors" in e.value for e in at.error)
    at.text_input(key="insp_path").set_value(f"https://huggingface.co/user/pack/blob/main/{EPOCHS[0]}").run()
    assert not at.exception and not at.error and at.metric[0].value == "2"
    at.button(key="insp_balance").click().run()
    assert not at.exception and not at.error
    assert [b.proto.label for b in at.get("download_button")][-1] == "Download style-000005-balanced.safetensors"
