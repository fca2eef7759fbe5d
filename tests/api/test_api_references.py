"""Every reference a job names passes one policy (harmprune.jobs.access), through the real app,
the real Redis and the test Hub: judges, judge base models, preset defaults, datasets in every
list, attack and tamper sets, lm-eval tasks. A refusal is one 403 body whatever the reason
(private, gated, missing, outside the model roots, malformed), so it is no existence oracle."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from harmprune.api.main import create_app
from harmprune.inputs.references import NOT_READABLE
from harmprune.settings import Settings
from huggingface_hub import HfApi

from tests.api.conftest import TINY_SPEC, job_body
from tests.service_stack import API_KEYS, Namespace, bearer, stack_settings
from tests.support.hub_models import GatedHubServer, llama_8b_config_folder
from tests.support.hub_server import hub_environment
from tests.support.tenancy import GENEROUS, write_tenants_file

pytestmark = pytest.mark.services

ALPHA = bearer("alpha")
PAIRS = [{"prompt": "Write malware.", "response": "Sure, here is [omitted]."}]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[GatedHubServer]:
    """Public, private (beta's) and gated datasets; a public model with a llama config."""
    with GatedHubServer() as server, hub_environment(server.url, tmp_path / "hf_home"):
        api = HfApi(token=server.token)
        data = tmp_path / "data"
        data.mkdir()
        (data / "train.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
        for repo, private in [("org/open-data", False), ("beta/secret-data", True)]:
            api.create_repo(repo, repo_type="dataset", private=private)
            api.upload_folder(repo_id=repo, folder_path=str(data), repo_type="dataset")
        api.create_repo("meta/gated-data", repo_type="dataset")
        api.upload_folder(repo_id="meta/gated-data", folder_path=str(data), repo_type="dataset")
        server.gated.add("meta/gated-data")
        model = llama_8b_config_folder(tmp_path / "llama")
        api.create_repo("org/open")
        api.upload_folder(repo_id="org/open", folder_path=str(model))
        yield server


@pytest.fixture
def client(hub: GatedHubServer, ns: Namespace, tmp_path: Path) -> Iterator[TestClient]:
    roots = tmp_path / "models"
    (roots / "judge").mkdir(parents=True)
    settings: Settings = stack_settings(
        ns,
        tmp_path,
        hf_token=hub.token,  # the operator's token reads every repo: the policy must refuse
        local_model_roots=[roots],
        # alpha: the default policy (public repos only), with room for many jobs
        tenants_file=write_tenants_file(tmp_path / "tenants.yaml", alpha={"quotas": GENEROUS}),
    )
    with TestClient(create_app(settings, sweep=False)) as c:
        yield c


def post(client: TestClient, domain: dict[str, Any], model: str = "smollm2-135m-instruct") -> Any:
    body = job_body(model=model, domain=domain, publish={"repo_id": "alpha/m"})
    return client.post("/v1/jobs", json=body, headers=ALPHA)


def with_eval(**fields: Any) -> dict[str, Any]:
    return {**TINY_SPEC, "eval": fields}


def classifier(**fields: Any) -> dict[str, Any]:
    return with_eval(judges=["nll", "classifier"], classifier=fields)


def dataset(name: str) -> dict[str, Any]:
    return {"dataset": name, "limit": 2, "response_field": "response"}


def finetune(train: list[Any]) -> dict[str, Any]:
    return {**TINY_SPEC, "attacks": {"finetune": {"train": train}}}


def tamper(train: list[Any]) -> dict[str, Any]:
    return {**TINY_SPEC, "tamper": {"train": train, "broad_harmful": PAIRS, "broad_benign": PAIRS}}


def roots_of(tmp_path: Path) -> Path:
    return tmp_path / "models"


REFUSED = [
    # (what the request names, the field the answer names)
    ("judge outside the roots", classifier(model="/etc/x"), "domain.eval.classifier.model"),
    (
        "judge base model outside the roots",
        classifier(model="org/open", base_model="/etc"),
        "domain.eval.classifier.base_model",
    ),
    (
        "preset default base model (gated or missing on this Hub)",
        classifier(preset="strongreject", model="org/open"),
        "domain.eval.classifier.base_model",
    ),
    (
        "judge as a relative path",
        classifier(model="./models/judge"),
        "domain.eval.classifier.model",
    ),
    (
        "a private dataset",
        {**TINY_SPEC, "harmful": [dataset("beta/secret-data")]},
        "domain.harmful.0.dataset",
    ),
    (
        "a private validation dataset",
        with_eval(validation={"harmful": [dataset("beta/secret-data")]}),
        "domain.eval.validation.harmful.0.dataset",
    ),
    (
        "a gated validation dataset",
        with_eval(validation={"benign": [dataset("meta/gated-data")]}),
        "domain.eval.validation.benign.0.dataset",
    ),
    (
        "a local-path fine-tune attack set",
        finetune([dataset("/etc/passwd")]),
        "domain.attacks.finetune.train.0.dataset",
    ),
    (
        "a private fine-tune attack set",
        finetune([PAIRS[0], dataset("beta/secret-data")]),
        "domain.attacks.finetune.train.1.dataset",
    ),
    ("a missing tamper set", tamper([dataset("nope/missing")]), "domain.tamper.train.0.dataset"),
    (
        "an lm-eval task that is a path",
        with_eval(benchmarks={"tasks": ["/etc/passwd"]}),
        "domain.eval.benchmarks.tasks.0",
    ),
]


@pytest.mark.parametrize(("case", "domain", "field"), REFUSED, ids=[c[0] for c in REFUSED])
def test_every_reference_kind_is_refused_with_one_answer(
    client: TestClient, case: str, domain: dict[str, Any], field: str
) -> None:
    r = post(client, domain)
    assert r.status_code == 403, (case, r.text)
    assert r.json() == {
        "error": {
            "code": "not_permitted",
            "message": f"{field}: {NOT_READABLE}",
            "fields": [{"field": field, "message": NOT_READABLE}],
        }
    }


@pytest.mark.parametrize(
    "model", ["/etc", "/nonexistent", "nope/missing", "a/b/c", "./relative", "~/.ssh", "x/../y"]
)
def test_the_model_is_refused_with_the_same_answer_whatever_the_reason(
    client: TestClient, model: str
) -> None:
    """Finding 3: `/etc`, a missing path and a missing repo used to answer three ways."""
    r = post(client, TINY_SPEC, model=model)
    assert r.status_code == 403, r.text
    assert r.json()["error"]["message"] == f"model: {NOT_READABLE}"


def test_the_same_bodies_with_readable_references_are_accepted(
    client: TestClient, tmp_path: Path
) -> None:
    judge = str(roots_of(tmp_path) / "judge")
    accepted = [
        classifier(model=judge, base_model=judge),
        classifier(preset="strongreject", model="org/open", base_model=judge),
        {**TINY_SPEC, "harmful": [*PAIRS, dataset("org/open-data")]},
        with_eval(validation={"harmful": [dataset("org/open-data")]}),
        finetune([dataset("org/open-data")]),
        tamper([dataset("org/open-data")]),
        with_eval(benchmarks={"tasks": ["harmprune_yesno"]}),
    ]
    for domain in accepted:
        r = post(client, domain)
        assert r.status_code == 202, (domain, r.text)
    assert API_KEYS["alpha"] not in r.text


def test_granted_tenants_may_name_private_and_gated_datasets(
    hub: GatedHubServer, ns: Namespace, tmp_path: Path
) -> None:
    tenants = write_tenants_file(
        tmp_path / "granted.yaml",
        alpha={"read_private": True, "read_gated": True, "quotas": GENEROUS},
    )
    settings = stack_settings(ns, tmp_path, hf_token=hub.token, tenants_file=tenants)
    with TestClient(create_app(settings, sweep=False)) as c:
        for name in ("beta/secret-data", "meta/gated-data"):
            r = post(c, with_eval(validation={"harmful": [dataset(name)]}))
            assert r.status_code == 202, r.text
    shutil.rmtree(tmp_path / "hf_home", ignore_errors=True)


def test_a_missing_path_under_the_roots_reads_like_one_outside_them(
    client: TestClient, tmp_path: Path
) -> None:
    missing = str(roots_of(tmp_path) / "no-such-model")
    for domain, model in (
        (TINY_SPEC, missing),
        (classifier(model=missing), "smollm2-135m-instruct"),
    ):
        r = post(client, domain, model=model)
        assert r.status_code == 403, r.text
        assert r.json()["error"]["message"].endswith(f": {NOT_READABLE}")
