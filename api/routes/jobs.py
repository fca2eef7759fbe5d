"""/v1/jobs: submit, read, list, cancel, report, delete. A tenant sees only its own jobs: another
tenant's job id answers 404, exactly like an unknown one."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, Query, Response
from harmprune.api.deps import (
    MetricsDep,
    PolicyDep,
    ServicesDep,
    SettingsDep,
    StoreDep,
    TenantDep,
    get_tenant,
)
from harmprune.api.errors import ApiError
from harmprune.api.logs import audit
from harmprune.api.schemas import (
    REQUEST_ERRORS,
    ErrorOut,
    JobCreate,
    JobListOut,
    JobOut,
    ReportOut,
    error_responses,
)
from harmprune.jobs.store import JobRecord, JobState, NotCancellable
from harmprune.jobs.submission import submit
from harmprune.settings import Settings
from harmprune.vocabulary import JOB_ID_PATTERN
from pydantic import BaseModel

log = logging.getLogger("api")
T = TypeVar("T")

router = APIRouter(
    prefix="/v1/jobs",
    tags=["jobs"],
    dependencies=[Depends(get_tenant)],
    responses=error_responses(
        {
            **REQUEST_ERRORS,
            403: "Not permitted for this API key: a model it may not read (answered the same "
            "whether the repo exists or not), or a namespace it may not publish to.",
            429: "Over the API key's request rate or job quota; see Retry-After.",
            503: "The job store, queue or Hub is unavailable.",
        }
    ),
)
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "No such job for this API key."}
}
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorOut, "description": "Not possible in the job's current state."}
}


def _job_not_found(job_id: str) -> ApiError:
    return ApiError(404, "job_not_found", f"no job {job_id[:64]!r} for this API key")


def _job(store: Any, job_id: str, tenant: str) -> JobRecord:
    record = store.get(job_id, tenant) if JOB_ID_PATTERN.match(job_id) else None
    if record is None:
        raise _job_not_found(job_id)
    return record


def _change_job(job_id: str, change: Callable[[], T | None], code: str, refusal: str) -> T:
    """Run a store change that refuses the job in its state (409 `code`; `refusal` is formatted
    with the state) or finds no job (404: it was deleted since the route read it)."""
    try:
        changed = change()
    except NotCancellable as err:
        raise ApiError(409, code, refusal.format(state=err.state.value)) from None
    if changed is None:
        raise _job_not_found(job_id)
    return changed


def model_response(
    model: BaseModel, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """The model as JSON, sent as is. The route's `response_model` documents it; returning a
    Response skips FastAPI's second validation of what we just built (two thread-pool hops
    for a sync route)."""
    return Response(
        model.model_dump_json(),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )


def _job_headers(record: JobRecord, settings: Settings) -> dict[str, str]:
    return {} if record.state.terminal else {"Retry-After": str(settings.retry_after_s)}


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    responses={**CONFLICT},
    summary="Submit a hardening job",
)
def submit_job(
    body: JobCreate,
    tenant: TenantDep,
    policy: PolicyDep,
    services: ServicesDep,
    metrics: MetricsDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Repeat a request safely: the same key and body return the same job; the "
            "same key with another body is refused (422).",
        ),
    ] = None,
) -> Response:
    """Policy, plan, record and queue: harmprune.jobs.submission."""
    done = submit(body, policy, services, idempotency_key)
    record = done.record
    headers = {"Location": f"/v1/jobs/{record.id}", **_job_headers(record, services.settings)}
    if done.created:
        metrics.submitted.labels(record.queue).inc()
        metrics.tenant_jobs.labels(tenant).inc()
        audit("submit", tenant, job=record.id, model=record.model, repo=record.publish.repo_id)
    else:
        headers["Idempotent-Replayed"] = "true"
    return model_response(JobOut.from_record(record), 202, headers)


@router.get("", response_model=JobListOut, summary="List this tenant's jobs, newest first")
def list_jobs(
    tenant: TenantDep,
    store: StoreDep,
    state: Annotated[JobState | None, Query(description="Only jobs in this state.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[
        str | None,
        Query(pattern=r"^[0-9]{1,9}$", description="`next_cursor` of the previous page."),
    ] = None,
) -> Response:
    offset = int(cursor) if cursor else 0
    records, total = store.list_jobs(tenant, state, offset, limit)
    more = offset + limit < total
    listing = JobListOut(
        items=[JobOut.from_record(r) for r in records],
        total=total,
        next_cursor=str(offset + limit) if more else None,
    )
    return model_response(listing)


@router.get("/{job_id}", response_model=JobOut, responses={**NOT_FOUND}, summary="Read a job")
def get_job(job_id: str, tenant: TenantDep, store: StoreDep, settings: SettingsDep) -> Response:
    record = _job(store, job_id, tenant)
    return model_response(JobOut.from_record(record), headers=_job_headers(record, settings))


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobOut,
    responses={**NOT_FOUND, **CONFLICT},
    summary="Cancel a job (cooperative: it stops at the next batch boundary, publishes nothing)",
)
def cancel_job(job_id: str, tenant: TenantDep, store: StoreDep, settings: SettingsDep) -> Response:
    _job(store, job_id, tenant)
    record = _change_job(
        job_id,
        lambda: store.request_cancel(job_id, tenant),
        "not_cancellable",
        "the job already ended ({state})",
    )
    audit("cancel", tenant, job=job_id, state=record.state.value)
    return model_response(JobOut.from_record(record), 202, headers=_job_headers(record, settings))


@router.get(
    "/{job_id}/report",
    response_model=ReportOut,
    responses={**NOT_FOUND},
    summary="The job's report.json (once it has finished)",
)
def get_report(job_id: str, tenant: TenantDep, store: StoreDep) -> Any:
    record = _job(store, job_id, tenant)
    report = store.get_report(job_id, tenant)
    if report is None:
        if record.state.terminal:
            message = f"the job ended {record.state.value} without a report"
        else:
            message = f"the job is {record.state.value}; its report comes when it ends"
        raise ApiError(404, "report_not_available", message)
    return report


@router.delete(
    "/{job_id}",
    status_code=204,
    response_class=Response,
    responses={**NOT_FOUND, **CONFLICT},
    summary="Delete a finished job's record and report (published models stay)",
)
def delete_job(job_id: str, tenant: TenantDep, store: StoreDep) -> Response:
    _job(store, job_id, tenant)
    _change_job(
        job_id,
        lambda: store.delete(job_id, tenant),
        "job_active",
        "the job is {state}; cancel it first",
    )
    audit("delete", tenant, job=job_id)
    return Response(status_code=204)
