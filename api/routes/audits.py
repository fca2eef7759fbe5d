"""/v1/audits: `harmprune audit` of a Hub repo as a job on a CPU worker (harmprune.jobs.audits).

A tenant audits only repos it may read: the worker applies the tenant's policy to the repo and
to its base model before fetching either (an audit of a repo the tenant may not read ends
`failed` with `not_permitted`, whether the repo exists or not; the API itself asks the Hub
nothing). A tenant sees only its own audits (another tenant's id answers 404, like an unknown
one)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from harmprune.api.deps import SettingsDep, TenantDep, get_tenant
from harmprune.api.errors import ApiError
from harmprune.api.logs import audit
from harmprune.api.routes.jobs import model_response
from harmprune.api.schemas import REQUEST_ERRORS, ErrorOut, JobErrorOut, error_responses
from harmprune.jobs.audits import AUDIT_QUEUE, RUN_AUDIT, AuditCreate, AuditRecord, AuditStore
from harmprune.jobs.store import JobState
from harmprune.vocabulary import JOB_ID_PATTERN
from pydantic import BaseModel, Field

router = APIRouter(
    prefix="/v1/audits",
    tags=["audits"],
    dependencies=[Depends(get_tenant)],
    responses=error_responses(
        {
            **REQUEST_ERRORS,
            429: "Over the API key's request rate.",
            503: "The store, queue or Hub is unavailable.",
        }
    ),
)


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None


class AuditOut(BaseModel):
    id: str
    state: JobState = Field(
        description="queued, running, succeeded (every check held), rejected (a check failed) "
        "or failed (the audit could not run)."
    )
    repo_id: str
    revision: str | None
    created_at: str
    finished_at: str | None
    passed: bool | None = Field(None, description="The verdict, once there is one.")
    verdict: dict[str, Any] | None = Field(
        None, description="Every check with its detail (as `harmprune audit --json` writes it)."
    )
    error: JobErrorOut | None = None

    @classmethod
    def from_record(cls, record: AuditRecord) -> AuditOut:
        verdict = record.verdict
        return cls(
            id=record.id,
            state=record.state,
            repo_id=record.request.repo_id,
            revision=record.request.revision,
            created_at=_iso(record.created_at) or "",
            finished_at=_iso(record.finished_at),
            passed=bool(verdict["passed"]) if verdict is not None else None,
            verdict=verdict,
            error=JobErrorOut(**record.error.model_dump()) if record.error else None,
        )


async def get_audits(request: Request) -> AuditStore:
    store = request.app.state.store
    return AuditStore(store.r, store.p, store.record_ttl_s)


AuditsDep = Annotated[AuditStore, Depends(get_audits)]


def _headers(record: AuditRecord, retry_after_s: int) -> dict[str, str]:
    return {} if record.state.terminal else {"Retry-After": str(retry_after_s)}


@router.post("", status_code=202, response_model=AuditOut, summary="Audit a hardened Hub repo")
def submit_audit(
    body: AuditCreate,
    tenant: TenantDep,
    settings: SettingsDep,
    audits: AuditsDep,
    request: Request,
) -> Response:
    record = audits.create(tenant, body)
    request.app.state.celery.send_task(RUN_AUDIT, args=[record.id], queue=AUDIT_QUEUE)
    audit("audit", tenant, audit_id=record.id, repo=body.repo_id)
    headers = {"Location": f"/v1/audits/{record.id}", **_headers(record, settings.retry_after_s)}
    return model_response(AuditOut.from_record(record), 202, headers)


@router.get(
    "/{audit_id}",
    response_model=AuditOut,
    responses={404: {"model": ErrorOut, "description": "No such audit for this API key."}},
    summary="Read an audit and its verdict",
)
def get_audit(
    audit_id: str, tenant: TenantDep, settings: SettingsDep, audits: AuditsDep
) -> Response:
    record = audits.get(audit_id, tenant) if JOB_ID_PATTERN.match(audit_id) else None
    if record is None:
        raise ApiError(404, "audit_not_found", f"no audit {audit_id[:64]!r} for this API key")
    return model_response(
        AuditOut.from_record(record), headers=_headers(record, settings.retry_after_s)
    )
