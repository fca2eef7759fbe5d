"""Models from the Hub (harmprune.inputs.loading `_download_from_hub`), with the real `huggingface_hub`
client against the test Hub (tests/support/hub_server.py): a pinned revision resolves to its
commit and its weights, the card's license is recorded, pickle-only repos are refused before any
weight is read, and private or gated repos need a token that may read them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from harmprune.errors import ModelLoadError
from harmprune.inputs.loading import resolve
from harmprune.inputs.references import operator_grant
from harmprune.settings import Settings
from pydantic import SecretStr
from safetensors.torch import load_file, save_file

from tests.support.fixtures import hub_server  # noqa: F401
from tests.support.hub_server import HubServer

CARD = b"---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# tiny llama\n"


@pytest.fixture
def llama_source(tiny_model_dir: Callable[[str], Path]) -> Path:
    """The saved tiny llama every test here puts on the test Hub."""
    return tiny_model_dir("llama")


def model_files(folder: Path) -> dict[str, bytes]:
    """A saved model directory as the {path: bytes} of a repo, with a model card."""
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    files["README.md"] = CARD
    return files


def changed_weights(folder: Path, tmp: Path) -> bytes:
    """The folder's model.safetensors with every tensor + 1 (a later revision of the model)."""
    tensors = {k: v + 1 for k, v in load_file(folder / "model.safetensors").items()}
    path = tmp / "changed.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path.read_bytes()


def settings(tmp: Path, token: str | None = None) -> Settings:
    return Settings(
        cache_dir=tmp / "cache", hf_token=SecretStr(token) if token else None, hub_enabled=True
    )


def resolved_requests(hub: HubServer, name: str) -> list[tuple[str, str, int]]:
    return [r for r in hub.request_log if "/resolve/" in r[1] and r[1].endswith(name)]


def test_a_pinned_revision_downloads_that_commit_with_its_license(
    hub_server: HubServer,  # noqa: F811
    llama_source: Path,
    tmp_path: Path,
) -> None:
    pinned = hub_server.add_repo("acme/tiny-llama", model_files(llama_source))
    head = hub_server.push(
        "acme/tiny-llama",
        {"model.safetensors": changed_weights(llama_source, tmp_path)},
        "Retrain",
    )
    assert pinned != head
    assert hub_server.lfs_paths("acme/tiny-llama", pinned) == {"model.safetensors"}

    local, src = resolve(operator_grant("acme/tiny-llama", pinned), settings(tmp_path))
    assert (src.kind, src.reference, src.revision) == ("hub", "acme/tiny-llama", pinned)
    assert src.commit == pinned and local.name == pinned
    assert src.license == "apache-2.0"
    got, want = (
        load_file(local / "model.safetensors"),
        load_file(llama_source / "model.safetensors"),
    )
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)

    # without a revision: the head of main, the retrained weights
    local_main, src_main = resolve(operator_grant("acme/tiny-llama", None), settings(tmp_path))
    assert src_main.commit == head and src_main.revision is None
    retrained = load_file(local_main / "model.safetensors")
    assert all(torch.equal(retrained[k], want[k] + 1) for k in want)


def test_a_pickle_only_repo_is_refused_before_any_weight_is_read(
    hub_server: HubServer,  # noqa: F811
    llama_source: Path,
    tmp_path: Path,
) -> None:
    files = {n: b for n, b in model_files(llama_source).items() if n != "model.safetensors"}
    files["pytorch_model.bin"] = b"\x80\x04pickled weights that must never be downloaded"
    hub_server.add_repo("acme/pickled", files)
    with pytest.raises(ModelLoadError, match="pickle checkpoints are refused"):
        resolve(operator_grant("acme/pickled", None), settings(tmp_path))
    assert any(r[1].endswith("/config.json") for r in hub_server.request_log)
    assert resolved_requests(hub_server, "pytorch_model.bin") == []


def test_private_and_gated_repos_need_a_token_that_may_read_them(
    hub_server: HubServer,  # noqa: F811
    llama_source: Path,
    tmp_path: Path,
) -> None:
    files = model_files(llama_source)
    hub_server.add_repo("acme/private", files, private=True)
    gated_sha = hub_server.add_repo("acme/gated", files, gated=True)

    with pytest.raises(ModelLoadError, match="unknown model: acme/private was not found"):
        resolve(operator_grant("acme/private", None), settings(tmp_path))
    local, src = resolve(operator_grant("acme/private", None), settings(tmp_path, hub_server.token))
    assert (local / "model.safetensors").is_file() and src.kind == "hub"

    # a gated repo exists: the message says what to do, not "not found"
    with pytest.raises(
        ModelLoadError, match="acme/gated is gated: accept its conditions"
    ) as refused:
        resolve(operator_grant("acme/gated", None), settings(tmp_path, hub_server.token))
    assert hub_server.token not in str(refused.value)
    # no file of the gated repo was served (downloads run in parallel threads: the first 403
    # may stop the others before they ask, so the weights may not be requested at all)
    gated = [r for r in hub_server.request_log if "/acme/gated/resolve/" in r[1]]
    assert gated and all(status == 403 for _, _, status in gated), gated
    hub_server.grant("acme/gated", hub_server.token)
    local, src = resolve(operator_grant("acme/gated", None), settings(tmp_path, hub_server.token))
    assert src.commit == gated_sha and (local / "model.safetensors").is_file()


def test_gguf_parsed_once_memoises_within_and_restores_after() -> None:
    """The conversion's shortcut (one GGUF parse, one tensor-name map) leaves `gguf` as found,
    also when the conversion fails."""
    import gguf
    from harmprune.inputs.loading import _gguf_parsed_once

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_parsed_once():
        arch = next(iter(gguf.MODEL_ARCH_NAMES))
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
    with pytest.raises(RuntimeError), _gguf_parsed_once():
        raise RuntimeError("a conversion that fails")
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
