"""Tenant policy through the real app, the real Redis and the test Hub: who may publish where,
who may read which model (a refusal looks the same for a missing and a forbidden repo), judge
(every other reference: test_api_references.py), request rate (429 + Retry-After), job quotas,
and finished records that expire with their idempotency keys."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from harmprune.api.main import create_app
from harmprune.jobs.store import JobStore
from harmprune.settings import Settings
from huggingface_hub import HfApi

from tests.api.conftest import TINY_SPEC, job_body
from tests.service_stack import API_KEYS, Namespace, bearer, stack_settings
from tests.support.hub_models import GatedHubServer, llama_8b_config_folder
from tests.support.hub_server import hub_environment
from tests.support.tenancy import write_tenants_file

pytestmark = pytest.mark.services

ALPHA, BETA = bearer("alpha"), bearer("beta")


def app(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, sweep=False)) as client:
        yield client


def post(client: TestClient, headers: dict[str, str] = ALPHA, **body: Any) -> Any:
    return client.post("/v1/jobs", json=job_body(**body), headers=headers)


def test_default_policy_publishes_only_under_the_tenants_own_namespace(
    ns: Namespace, tmp_path: Path
) -> None:
    """HARMPRUNE_API_KEYS alone: alpha may publish as alpha/..., never into beta's namespace."""
    settings = stack_settings(ns, tmp_path)
    for client in app(settings):
        into_beta = post(client, model="smollm2-135m-instruct", publish={"repo_id": "beta/m"})
        assert into_beta.status_code == 403, into_beta.text
        error = into_beta.json()["error"]
        assert error["code"] == "not_permitted"
        assert error["fields"][0]["field"] == "publish.repo_id"
        own = post(client, model="smollm2-135m-instruct", publish={"repo_id": "alpha/m"})
        assert own.status_code == 202, own.text
        assert JobStore.from_settings(settings).list_jobs("alpha")[1] == 1  # only the allowed


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[GatedHubServer]:
    """beta's private model, a gated public model, a public model; all with a llama config."""
    with GatedHubServer() as server, hub_environment(server.url, tmp_path / "hf_home"):
        api = HfApi(token=server.token)
        folder = llama_8b_config_folder(tmp_path / "llama")
        for repo, private in [("beta/secret", True), ("meta/gated", False), ("org/open", False)]:
            api.create_repo(repo, private=private)
            api.upload_folder(repo_id=repo, folder_path=str(folder))
        server.gated.add("meta/gated")
        yield server


@pytest.mark.parametrize("preflight", [False, True])
def test_private_and_gated_models_are_refused_like_missing_ones(
    hub: GatedHubServer, ns: Namespace, tmp_path: Path, preflight: bool
) -> None:
    """The operator's token reads everything; alpha (default policy) reads only public models,
    and cannot tell a private or gated repo from one that does not exist."""
    settings = stack_settings(
        ns, tmp_path, preflight=preflight, default_hardware="gpu", hf_token=hub.token
    )
    publish = {"repo_id": "alpha/hardened"}
    for client in app(settings):
        answers = {
            repo: post(client, model=repo, publish=publish)
            for repo in ("beta/secret", "meta/gated", "beta/nothing-here")
        }
        bodies = set()
        for repo, r in answers.items():
            assert r.status_code == 403, (repo, r.text)
            bodies.add(r.text.replace(repo, "<repo>"))
        assert len(bodies) == 1, bodies  # the same answer, whether the repo exists or not
        assert hub.token not in "".join(r.text for r in answers.values())
        ok = post(client, model="org/open", publish=publish)
        assert ok.status_code == 202, ok.text
        # the judge and Hub datasets are checked like the model
        judged = {
            **TINY_SPEC,
            "eval": {"judges": ["nll", "classifier"], "classifier": {"model": "beta/secret"}},
        }
        r = post(client, model="org/open", publish=publish, domain=judged)
        assert r.status_code == 403, r.text
        assert r.json()["error"]["fields"][0]["field"] == "domain.eval.classifier.model"


def test_granted_tenants_read_private_and_gated_models(
    hub: GatedHubServer, ns: Namespace, tmp_path: Path
) -> None:
    tenants = write_tenants_file(
        tmp_path / "tenants.yaml", alpha={"read_private": True, "read_gated": True}
    )
    settings = stack_settings(
        ns, tmp_path, default_hardware="gpu", hf_token=hub.token, tenants_file=tenants
    )
    for client in app(settings):
        for repo in ("beta/secret", "meta/gated"):
            r = post(client, model=repo, publish={"repo_id": "alpha/hardened"})
            assert r.status_code == 202, r.text
        # beta has no entry: the defaults, public models only (even its own private repo)
        for repo in ("beta/secret", "meta/gated"):
            r = post(client, BETA, model=repo, publish={"repo_id": "beta/x"})
            assert r.status_code == 403, r.text


def test_a_burst_over_the_rate_answers_429_with_retry_after(ns: Namespace, tmp_path: Path) -> None:
    tenants = write_tenants_file(
        tmp_path / "tenants.yaml", alpha={"quotas": {"requests_per_second": 0.5, "burst": 5}}
    )
    settings = stack_settings(ns, tmp_path, tenants_file=tenants)
    for client in app(settings):
        codes = [client.get("/v1/jobs", headers=ALPHA).status_code for _ in range(8)]
        assert codes[:5] == [200] * 5 and codes[5:] == [429] * 3, codes
        r = client.get("/v1/jobs", headers=ALPHA)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "quota_exceeded"
        assert client.get("/v1/jobs", headers=BETA).status_code == 200  # others unaffected


def test_concurrent_and_daily_job_quotas(ns: Namespace, tmp_path: Path) -> None:
    quotas = {"concurrent_jobs": 2, "jobs_per_day": 3}
    tenants = write_tenants_file(tmp_path / "tenants.yaml", alpha={"quotas": quotas})
    settings = stack_settings(ns, tmp_path, tenants_file=tenants)
    body = {"model": "smollm2-135m-instruct", "publish": {"repo_id": "alpha/m"}}
    for client in app(settings):
        first, second = (post(client, **body).json() for _ in range(2))
        third = post(client, **body)
        assert third.status_code == 429 and "retry-after" in third.headers, third.text
        assert "queued or running" in third.json()["error"]["message"]
        client.post(f"/v1/jobs/{first['id']}/cancel", headers=ALPHA)
        assert post(client, **body).status_code == 202  # one slot free again: job 3 of the day
        client.post(f"/v1/jobs/{second['id']}/cancel", headers=ALPHA)
        fourth = post(client, **body)
        assert fourth.status_code == 429 and "today" in fourth.json()["error"]["message"]


def test_finished_records_expire_with_their_idempotency_keys(ns: Namespace, tmp_path: Path) -> None:
    settings = stack_settings(
        ns, tmp_path, job_record_ttl_s=2, tenants_file=write_tenants_file(tmp_path / "t.yaml")
    )
    key = {"Idempotency-Key": "expiring-key"}
    for client in app(settings):
        job = post(client, {**ALPHA, **key}).json()
        live = post(client, model="smollm2-135m-instruct").json()  # stays queued: never expires
        assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=ALPHA).status_code == 202
        ttl = ns.client.ttl(f"{settings.key_prefix}:job:{job['id']}")
        assert 0 < ttl <= 2
        time.sleep(3)
        assert client.get(f"/v1/jobs/{job['id']}", headers=ALPHA).status_code == 404
        listing = client.get("/v1/jobs", headers=ALPHA).json()
        assert [j["id"] for j in listing["items"]] == [live["id"]] and listing["total"] == 1
        leftover = [k for k in ns.keys() if job["id"] in k and ":broker:" not in k]  # noqa: SIM118
        assert not leftover
        again = post(client, {**ALPHA, **key})  # the key expired with the record: a new job
        assert again.status_code == 202 and again.json()["id"] != job["id"]
        assert "idempotent-replayed" not in again.headers
        store = JobStore.from_settings(settings)
        assert store.prune_expired() == 0  # the listing already dropped the index entries
        assert json.loads(json.dumps(store.counts()))  # the counts still read


def test_audit_lines_are_json_with_the_request_id_and_tenant(client: TestClient) -> None:
    import io
    import logging

    from harmprune.jobs.logs import ContextFilter, JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    audit = logging.getLogger("harmprune.audit")
    audit.addHandler(handler)
    audit.setLevel(logging.INFO)
    try:
        r = client.post(
            "/v1/jobs", json=job_body(), headers={**ALPHA, "X-Request-ID": "req-audit-1"}
        )
        assert r.status_code == 202 and r.headers["x-request-id"] == "req-audit-1"
        client.post(f"/v1/jobs/{r.json()['id']}/cancel", headers=ALPHA)
        client.delete(f"/v1/jobs/{r.json()['id']}", headers=ALPHA)
    finally:
        audit.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["submit", "cancel", "delete"]
    assert all(line["audit"] and line["tenant"] == "alpha" for line in lines)
    assert lines[0]["request_id"] == "req-audit-1" and lines[0]["job"] == r.json()["id"]
    assert lines[1]["request_id"] and lines[1]["request_id"] != "req-audit-1"
    text = stream.getvalue()
    assert API_KEYS["alpha"] not in text
