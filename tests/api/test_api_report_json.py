"""GET /v1/jobs/{id}/report returns the stored report.json as it is: strict JSON, figures that
are not finite numbers as null with their reasons (issue 21 item 7), with the real Redis."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from harmprune.jobs.store import JobState, JobStore, Owner
from harmprune.output.report_json import UNDEFINED_FIGURES, finite_only, loads_strict

from tests.api.test_api_jobs import ALPHA, submit

pytestmark = pytest.mark.services


def test_the_report_route_returns_the_stored_strict_report(
    client: TestClient, store: JobStore
) -> None:
    job = submit(client).json()
    owner = Owner.current()
    store.claim(job["id"], owner, 30, 2)
    report, undefined = finite_only(
        {
            "schema_version": "1.0",
            "job_id": job["id"],
            "outcome": "rejected",
            "outcome_reason": "harm did not rise",
            "scored_count": 1000,
            "pruned_count": 7,
            "metrics": {"hardened": {"over_refusal": float("nan"), "benign_loss": 2.5}},
        }
    )
    report[UNDEFINED_FIGURES] = undefined
    store.finish(job["id"], owner, JobState.rejected, report=report)
    got = client.get(f"/v1/jobs/{job['id']}/report", headers=ALPHA)
    assert got.status_code == 200
    body = loads_strict(got.text)  # no NaN / Infinity tokens
    assert body == report
    assert body["metrics"]["hardened"]["over_refusal"] is None
    assert "/metrics/hardened/over_refusal" in body[UNDEFINED_FIGURES]
