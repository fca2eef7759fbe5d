"""Preflight before queueing: the API reads the model's config files (a local directory under the
allowed roots, or a repo of the test Hub), routes a job by the GPUs it needs, and refuses what
no worker can run with a 422 naming the field; nothing is queued for a refused job."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from harmprune.api.main import create_app
from harmprune.inputs.references import NOT_READABLE
from harmprune.jobs.store import JobStore
from harmprune.settings import Settings
from huggingface_hub import HfApi

from tests.api.conftest import TINY_SPEC, job_body
from tests.service_stack import Namespace, bearer, stack_settings
from tests.support.fixtures import hub_server  # noqa: F401  (fixture)
from tests.support.hub_server import HubServer
from tests.support.tenancy import write_tenants_file

pytestmark = pytest.mark.services

CONFIGS = Path(__file__).parents[1] / "fixtures" / "configs"
CHAT = '{"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}'


def model_dir(root: Path, name: str, chat: bool = True) -> Path:
    """config.json (+ a tokenizer_config.json with a chat template): all preflight reads, and
    an empty weights file (a model directory without safetensors weights is refused)."""
    d = root / f"{name}-{'chat' if chat else 'plain'}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.safetensors").touch()
    (d / "config.json").write_text((CONFIGS / f"{name}.json").read_text())
    (d / "tokenizer_config.json").write_text(CHAT if chat else "{}")
    return d


def app_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, sweep=False)) as c:
        yield c


@pytest.fixture
def multi(ns: Namespace, tmp_path: Path) -> Iterator[tuple[TestClient, Settings]]:
    """Preflight on; GPU workers of 80 GB; multi-GPU workers with 4 GPUs each."""
    settings = stack_settings(
        ns,
        tmp_path,
        local_model_roots=[tmp_path / "models"],
        preflight=True,
        default_hardware="gpu",
        gpu_memory_gb=80.0,
        multi_gpu_count=4,
        tenants_file=write_tenants_file(tmp_path / "tenants.yaml"),
    )
    yield from ((c, settings) for c in app_client(settings))


def submit(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/jobs", json=job_body(**body), headers=bearer())


def test_jobs_are_routed_by_the_gpus_they_need(
    multi: tuple[TestClient, Settings], tmp_path: Path
) -> None:
    client, settings = multi
    models = settings.local_model_roots[0]
    small = submit(client, model=str(model_dir(models, "llama-3.1-8b-instruct")))
    assert small.status_code == 202, small.text
    job = small.json()
    assert job["hardware"] == "gpu"
    assert job["preflight"]["devices"] == 1 and job["preflight"]["model_type"] == "llama"
    assert 0 < job["preflight"]["peak_memory_gb"] < 80
    big = submit(client, model=str(model_dir(models, "qwen2.5-14b")))
    assert big.status_code == 202, big.text
    assert big.json()["hardware"] == "gpu-multi"
    assert big.json()["preflight"]["devices"] == 4
    # the message went to the multi-GPU queue (read back through the job record)
    store = JobStore.from_settings(settings)
    assert store.get(big.json()["id"], "alpha").queue == "gpu-multi"  # type: ignore[union-attr]
    # the built-in model is planned from its GGUF file's metadata like any other
    alias = submit(client, model="smollm2-135m-instruct", domain="cyber")
    assert alias.status_code == 202, alias.text
    assert alias.json()["preflight"]["model_type"] == "llama"
    assert alias.json()["preflight"]["job_seconds"] > 0


@pytest.mark.parametrize(
    ("name", "extra", "field", "message"),
    [
        ("llama-3.1-70b-instruct", {}, "model", "do not fit one 80 GB device"),
        ("t5-small", {}, "model", "unsupported"),
        ("gpt2-plain", {}, "domain.prompt_format", "no chat template"),
        (
            "qwen2.5-14b",
            {"domain": {**TINY_SPEC, "pruning": {"selection": "global"}}},
            "domain.pruning.selection",
            "per_matrix",
        ),
    ],
)
def test_impossible_jobs_are_refused_before_queueing(
    multi: tuple[TestClient, Settings], name: str, extra: dict, field: str, message: str
) -> None:
    client, settings = multi
    models = settings.local_model_roots[0]
    directory = model_dir(models, name.removesuffix("-plain"), chat=not name.endswith("-plain"))
    r = submit(client, model=str(directory), **extra)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["fields"][0]["field"] == field and message in error["message"]
    assert JobStore.from_settings(settings).list_jobs("alpha") == ([], 0)  # nothing queued


def test_without_multi_gpu_workers_a_14b_job_is_refused(ns: Namespace, tmp_path: Path) -> None:
    settings = stack_settings(
        ns,
        tmp_path,
        local_model_roots=[tmp_path / "models"],
        preflight=True,
        gpu_memory_gb=80.0,
        tenants_file=write_tenants_file(tmp_path / "tenants.yaml"),
    )
    for client in app_client(settings):
        d = model_dir(tmp_path / "models", "qwen2.5-14b")
        r = submit(client, model=str(d), hardware="gpu")
        assert r.status_code == 422
        assert "needs about" in r.json()["error"]["message"]
        r = submit(client, model=str(d), hardware="gpu-multi")
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "hardware"


def test_hub_models_are_checked_from_their_config_files(
    hub_server: HubServer,  # noqa: F811
    ns: Namespace,
    tmp_path: Path,
) -> None:
    api = HfApi(token=hub_server.token)
    api.create_repo("org/llama-8b", private=True)
    api.upload_folder(
        repo_id="org/llama-8b", folder_path=str(model_dir(tmp_path / "m", "llama-3.1-8b-instruct"))
    )
    settings = stack_settings(
        ns,
        tmp_path,
        preflight=True,
        default_hardware="gpu",
        hf_token=hub_server.token,
        tenants_file=write_tenants_file(tmp_path / "tenants.yaml"),  # alpha reads private repos
    )
    for client in app_client(settings):
        ok = submit(client, model="org/llama-8b")
        assert ok.status_code == 202, ok.text
        assert ok.json()["preflight"]["layers"] == 32
        missing = submit(client, model="org/no-such-model")
        assert missing.status_code == 403, missing.text
        error = missing.json()["error"]
        assert error["fields"][0]["field"] == "model"
        assert error["message"] == f"model: {NOT_READABLE}"
        assert hub_server.token not in missing.text
