"""/v1/jobs with the real Redis: submit, validation, auth, tenants, idempotency, listing,
cancel, report, delete, and what goes onto the queue (the job id, nothing else)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from harmprune.api.main import create_app
from harmprune.inputs.references import NOT_READABLE
from harmprune.jobs.store import JobRecord, JobResult, JobState, JobStore, Owner, ReportSummary
from harmprune.settings import Settings

from tests.api.conftest import TINY_SPEC, job_body
from tests.service_stack import API_KEYS, Namespace, bearer

pytestmark = pytest.mark.services

ALPHA, BETA = bearer("alpha"), bearer("beta")


def submit(client: TestClient, headers: dict[str, str] | None = None, **body: Any) -> Any:
    return client.post("/v1/jobs", json=job_body(**body), headers=headers or ALPHA)


def assert_error(response: Any, status: int, code: str, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    if field is not None:
        assert field in [f["field"] for f in error["fields"]], error
        assert field in error["message"]
    return error


# ------------------------------------------------------------------ submit


def test_submit_returns_202_location_and_the_queued_job(client: TestClient) -> None:
    r = submit(client)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}" == job["links"]["self"]
    assert r.headers["retry-after"] == "2"
    assert job["state"] == "queued" and job["progress"] == 0 and job["stage"] is None
    assert job["model"] == "org/tiny-model" and job["domain"] == "api-test"
    assert job["publish"] == {"repo_id": "org/tiny-hardened", "private": True}
    assert job["hardware"] == "cpu" and job["attempts"] == 0
    assert job["error"] is None and job["result"] is None and job["started_at"] is None
    got = client.get(r.headers["location"], headers=ALPHA)
    assert got.status_code == 200 and got.json() == job
    assert got.headers["retry-after"] == "2"


def test_submit_named_example_domain(client: TestClient) -> None:
    r = submit(client, domain="cyber", model="smollm2-135m-instruct")
    assert r.status_code == 202, r.text
    assert r.json()["domain"] == "cyber"


def test_the_queue_message_carries_only_the_job_id(
    client: TestClient, ns: Namespace, settings: Settings
) -> None:
    job = submit(client, hardware="gpu").json()
    messages = ns.client.lrange(f"{settings.key_prefix}:broker:gpu", 0, -1)
    assert len(messages) == 1
    message = json.loads(messages[0])
    body = json.loads(base64.b64decode(message["body"]))
    assert body[0] == [job["id"]] and body[1] == {}  # args, kwargs
    assert message["headers"]["task"] == "harmprune.run_job"
    assert message["content-type"] == "application/json"
    for secret in API_KEYS.values():
        assert secret not in messages[0]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"domain": {**TINY_SPEC, "harmful": []}}, "domain.harmful"),
        ({"domain": {**TINY_SPEC, "pruning": {"q": 2}}}, "domain.pruning.q"),
        ({"domain": {**TINY_SPEC, "harmfull": []}}, "domain.harmfull"),
        ({"domain": "no-such-domain"}, "domain"),
        ({"domain": 7}, "domain"),
        ({"publish": {"repo_id": "no-namespace"}}, "publish.repo_id"),
        ({"publish": {"repo_id": "org/../x"}}, "publish.repo_id"),
        ({"publish": {"repo_id": "a/b", "privte": True}}, "publish.privte"),
        ({"model": ""}, "model"),
        ({"batch_size": 0}, "batch_size"),
        ({"dtype": "int4"}, "dtype"),
        ({"hardware": "tpu"}, "hardware"),
        ({"trust_remote_code": True}, "trust_remote_code"),
        ({"seed": -1}, "seed"),
        ({"modle": "x"}, "modle"),
    ],
)
def test_invalid_input_is_422_naming_the_field(
    client: TestClient, store: JobStore, body: dict, field: str
) -> None:
    assert_error(submit(client, **body), 422, "invalid_request", field)
    assert store.list_jobs("alpha") == ([], 0)  # nothing queued


def test_missing_fields_and_bad_json_are_422(client: TestClient) -> None:
    error = assert_error(client.post("/v1/jobs", json={}, headers=ALPHA), 422, "invalid_request")
    assert {"model", "domain", "publish"} <= {f["field"] for f in error["fields"]}
    r = client.post(
        "/v1/jobs", content=b"{not json", headers={**ALPHA, "content-type": "application/json"}
    )
    assert_error(r, 422, "invalid_request")
    assert_error(client.post("/v1/jobs", json=[1, 2], headers=ALPHA), 422, "invalid_request")
    r = client.post(
        "/v1/jobs", content=b"\xff\xfe{", headers={**ALPHA, "content-type": "application/json"}
    )
    assert_error(r, 400, "invalid_body")


def test_model_paths_only_under_allowed_roots(client: TestClient, settings: Settings) -> None:
    root = settings.local_model_roots[0]
    (root / "tiny").mkdir(parents=True)
    assert submit(client, model=str(root / "tiny")).status_code == 202
    # a path outside the roots, or no reference at all, answers like a repo it may not read
    for model in (
        f"{root}/../x",
        f"{root}-other/tiny",
        "../../etc/passwd",
        "/etc/passwd",
        "relative/dir/model",
    ):
        error = assert_error(submit(client, model=model), 403, "not_permitted", "model")
        assert error["message"] == f"model: {NOT_READABLE}"


def test_request_size_limit(client: TestClient, settings: Settings) -> None:
    big = {**TINY_SPEC, "description": "x" * settings.max_request_bytes}
    assert_error(submit(client, domain=big), 413, "request_too_large")

    def chunks() -> Any:  # no Content-Length: the streamed body is counted
        for _ in range(10):
            yield b" " * (settings.max_request_bytes // 4)

    r = client.post(
        "/v1/jobs", content=chunks(), headers={**ALPHA, "content-type": "application/json"}
    )
    assert_error(r, 413, "request_too_large")


# ------------------------------------------------------------------ auth and tenants


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key-0123456789"},
        {"Authorization": f"Basic {API_KEYS['alpha']}"},
        {"Authorization": "Bearer"},
    ],
)
def test_without_a_valid_key_every_job_route_is_401(client: TestClient, headers: dict) -> None:
    job_id = "0" * 32
    for method, path in [
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", f"/v1/jobs/{job_id}"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("GET", f"/v1/jobs/{job_id}/report"),
        ("DELETE", f"/v1/jobs/{job_id}"),
    ]:
        r = client.request(method, path, headers=headers, json=job_body())
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"


def test_tenants_see_only_their_own_jobs(client: TestClient) -> None:
    job = submit(client, headers=ALPHA).json()
    for method, path in [
        ("GET", f"/v1/jobs/{job['id']}"),
        ("POST", f"/v1/jobs/{job['id']}/cancel"),
        ("GET", f"/v1/jobs/{job['id']}/report"),
        ("DELETE", f"/v1/jobs/{job['id']}"),
    ]:
        assert_error(client.request(method, path, headers=BETA), 404, "job_not_found")
    assert client.get("/v1/jobs", headers=BETA).json() == {
        "items": [],
        "total": 0,
        "next_cursor": None,
    }
    assert client.get(f"/v1/jobs/{job['id']}", headers=ALPHA).json()["state"] == "queued"


def test_unknown_and_malformed_job_ids_are_404(client: TestClient) -> None:
    for job_id in ["0" * 32, "not-a-job", "x" * 500]:
        assert_error(client.get(f"/v1/jobs/{job_id}", headers=ALPHA), 404, "job_not_found")


# ------------------------------------------------------------------ idempotency


def test_idempotency_key(client: TestClient, store: JobStore) -> None:
    key = {"Idempotency-Key": "order-42"}
    first = submit(client, headers={**ALPHA, **key})
    again = submit(client, headers={**ALPHA, **key})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    other = submit(client, headers={**ALPHA, **key}, publish={"repo_id": "org/other"})
    assert_error(other, 422, "idempotency_key_reused", "header:Idempotency-Key")
    beta = submit(client, headers={**BETA, **key})  # keys are per tenant
    assert beta.status_code == 202 and beta.json()["id"] != first.json()["id"]
    assert store.list_jobs("alpha")[1] == 1
    bad = submit(client, headers={**ALPHA, "Idempotency-Key": "x" * 300})
    assert_error(bad, 422, "invalid_request", "header:Idempotency-Key")


# ------------------------------------------------------------------ list, cancel, report, delete


def test_list_paginates_newest_first_and_filters_by_state(client: TestClient) -> None:
    ids = [submit(client).json()["id"] for _ in range(5)]
    page = client.get("/v1/jobs?limit=2", headers=ALPHA).json()
    assert [j["id"] for j in page["items"]] == ids[::-1][:2]
    assert page["total"] == 5 and page["next_cursor"] == "2"
    rest = client.get(f"/v1/jobs?limit=10&cursor={page['next_cursor']}", headers=ALPHA).json()
    assert [j["id"] for j in rest["items"]] == ids[::-1][2:] and rest["next_cursor"] is None
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=ALPHA)
    cancelled = client.get("/v1/jobs?state=cancelled", headers=ALPHA).json()
    assert [j["id"] for j in cancelled["items"]] == [ids[0]]
    assert client.get("/v1/jobs?state=queued", headers=ALPHA).json()["total"] == 4
    assert_error(client.get("/v1/jobs?state=nope", headers=ALPHA), 422, "invalid_request")
    assert_error(client.get("/v1/jobs?limit=1000", headers=ALPHA), 422, "invalid_request")
    assert_error(client.get("/v1/jobs?cursor=-1", headers=ALPHA), 422, "invalid_request")


def test_cancel_a_queued_job_then_again(client: TestClient) -> None:
    job = submit(client).json()
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=ALPHA)
    assert r.status_code == 202
    assert r.json()["state"] == "cancelled" and r.json()["cancel_requested"]
    assert "retry-after" not in r.headers
    assert_error(client.post(f"/v1/jobs/{job['id']}/cancel", headers=ALPHA), 409, "not_cancellable")


def test_cancel_a_running_job_sets_the_flag(client: TestClient, store: JobStore) -> None:
    job = submit(client).json()
    store.claim(job["id"], Owner.current(), 30, 2)
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=ALPHA)
    assert r.status_code == 202
    assert r.json()["state"] == "running" and r.json()["cancel_requested"]
    assert store.cancel_requested(job["id"])


def test_report_and_result_of_a_finished_job(client: TestClient, store: JobStore) -> None:
    job = submit(client).json()
    assert_error(
        client.get(f"/v1/jobs/{job['id']}/report", headers=ALPHA), 404, "report_not_available"
    )
    owner = Owner.current()
    store.claim(job["id"], owner, 30, 2)
    summary = ReportSummary(
        outcome="accepted", scored_count=1000, pruned_count=7, pruned_fraction=0.007
    )
    report = {
        "schema_version": "1.0",
        "job_id": job["id"],
        "outcome": "accepted",
        "outcome_reason": "",
        "scored_count": 1000,
        "pruned_count": 7,
        "modules": [],
    }
    result = JobResult(
        repo_id="org/tiny-hardened",
        commit_sha="abc123",
        url="http://hub/org/tiny-hardened",
        report=summary,
    )
    store.finish(job["id"], owner, JobState.succeeded, result=result, report=report)
    got = client.get(f"/v1/jobs/{job['id']}", headers=ALPHA)
    assert "retry-after" not in got.headers
    body = got.json()
    assert body["state"] == "succeeded" and body["progress"] == 1.0
    assert body["result"]["repo_id"] == "org/tiny-hardened"
    assert body["result"]["commit_sha"] == "abc123"
    assert body["result"]["report"]["pruned_count"] == 7
    assert body["finished_at"] >= body["started_at"] >= body["created_at"]
    r = client.get(f"/v1/jobs/{job['id']}/report", headers=ALPHA)
    assert r.status_code == 200 and r.json() == report


def test_delete(client: TestClient, store: JobStore) -> None:
    job = submit(client).json()
    assert_error(client.delete(f"/v1/jobs/{job['id']}", headers=ALPHA), 409, "job_active")
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=ALPHA)
    r = client.delete(f"/v1/jobs/{job['id']}", headers=ALPHA)
    assert r.status_code == 204 and r.content == b""
    assert_error(client.get(f"/v1/jobs/{job['id']}", headers=ALPHA), 404, "job_not_found")


def test_store_down_is_503_not_500(settings: Settings) -> None:
    broken = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken, sweep=False)) as c:
        assert_error(submit(c), 503, "store_unavailable")
        assert_error(c.get(f"/v1/jobs/{'0' * 32}", headers=ALPHA), 503, "store_unavailable")
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "unavailable"


def test_record_fields_never_reach_the_client(client: TestClient, store: JobStore) -> None:
    job = submit(client).json()
    store.claim(job["id"], Owner.current(), 30, 2)
    body = client.get(f"/v1/jobs/{job['id']}", headers=ALPHA).json()
    internal = set(JobRecord.model_fields) - set(body)
    assert {"owner", "tenant", "checkpoint_dir", "config", "fingerprint"} <= internal
    assert Owner.current().host not in json.dumps(body)


def test_keys_from_a_file_of_hashes(settings: Settings, tmp_path: Path) -> None:
    import hashlib

    keyfile = tmp_path / "keys"
    digest = hashlib.sha256(b"gamma-key-0123456789abcdef").hexdigest()
    keyfile.write_text(f"# tenant:sha256(key)\ngamma:{digest}\n")
    with_file = settings.model_copy(update={"api_keys": None, "api_keys_file": keyfile})
    with TestClient(create_app(with_file, sweep=False)) as c:
        ok = c.get("/v1/jobs", headers={"Authorization": "Bearer gamma-key-0123456789abcdef"})
        assert ok.status_code == 200
        assert c.get("/v1/jobs", headers=ALPHA).status_code == 401
