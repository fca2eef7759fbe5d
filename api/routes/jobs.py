"""/v1/jobs: submit, read, list, cancel, report, delete. A tenant sees only its own jobs: another
tenant's job id answers 404, exactly like an unknown one."""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Response
from harmprune.api.deps import CeleryDep, MetricsDep, SettingsDep, StoreDep, TenantDep, get_tenant
from harmprune.api.errors import ApiError, field_errors
from harmprune.api.schemas import ErrorOut, JobCreate, JobListOut, JobOut, ReportOut
from harmprune.config import HardenConfig
from harmprune.errors import HarmpruneError
from harmprune.jobs.store import (
    IdempotencyConflict,
    JobError,
    JobRecord,
    JobState,
    NotCancellable,
    PublishTarget,
    fingerprint,
    new_job_id,
)
from harmprune.preflight import HubUnreachable, Plan, PreflightRefused, plan_job
from harmprune.settings import Settings
from harmprune.vocabulary import JOB_ID_PATTERN, SMOLLM2_ALIAS
from harmprune.workers.client import enqueue
from pydantic import BaseModel, ValidationError

log = logging.getLogger("api")

router = APIRouter(
    prefix="/v1/jobs",
    tags=["jobs"],
    dependencies=[Depends(get_tenant)],
    responses={
        400: {"model": ErrorOut, "description": "The body is not readable (not UTF-8 JSON)."},
        401: {"model": ErrorOut, "description": "Missing or invalid API key."},
        413: {"model": ErrorOut, "description": "Request body over the limit."},
        422: {"model": ErrorOut, "description": "Invalid request; `fields` names each problem."},
        503: {"model": ErrorOut, "description": "The job store or queue is unavailable."},
    },
)
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "No such job for this API key."}
}
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorOut, "description": "Not possible in the job's current state."}
}

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(
        422, "invalid_request", f"{field}: {message}", fields=[{"field": field, "message": message}]
    )


def check_model_reference(model: str, settings: Settings) -> None:
    """Only references a tenant may name: the SmolLM2 alias, a Hub id, or an absolute path under
    a directory the operator allows. Never another path on the worker."""
    if model == SMOLLM2_ALIAS:
        return
    if model.startswith("/"):
        normal = os.path.normpath(model)
        roots = [os.path.normpath(str(r)) for r in settings.local_model_roots]
        if ".." not in model.split("/") and any(
            normal.startswith(root.rstrip("/") + "/") for root in roots
        ):
            return
        raise _invalid("model", "this path is not under a model directory the operator allows")
    if HUB_ID.match(model) and ".." not in model and "--" not in model:
        return
    raise _invalid(
        "model",
        f"expected a Hub repo id (org/name), {SMOLLM2_ALIAS}, or an allowed absolute path",
    )


def preflight(config: HardenConfig, hardware: str, settings: Settings) -> Plan | None:
    """Refuse a job no worker can run, before it is queued; choose its queue (harmprune.preflight).

    Reads config.json and tokenizer files only (a Hub repo's, with the operator's token)."""
    if not settings.preflight:
        return None
    try:
        return plan_job(config, settings, hardware)
    except PreflightRefused as err:
        raise _invalid(err.field, str(err).removeprefix(f"{err.field}: ")) from None
    except HubUnreachable as err:
        raise ApiError(503, "hub_unreachable", str(err), headers={"Retry-After": "30"}) from None
    except HarmpruneError as err:  # unknown model, unsupported architecture, unreadable config
        raise _invalid("model", str(err)) from None


def _job(store: Any, job_id: str, tenant: str) -> JobRecord:
    record = store.get(job_id, tenant) if JOB_ID_PATTERN.match(job_id) else None
    if record is None:
        raise ApiError(404, "job_not_found", f"no job {job_id[:64]!r} for this API key")
    return record


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
    settings: SettingsDep,
    store: StoreDep,
    celery: CeleryDep,
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
    if idempotency_key is not None and not IDEMPOTENCY_KEY.match(idempotency_key):
        raise _invalid("header:Idempotency-Key", "1 to 255 printable ASCII characters")
    check_model_reference(body.model, settings)
    if body.trust_remote_code and not settings.allow_remote_code:
        raise _invalid("trust_remote_code", "the operator does not allow remote code")
    hardware = body.hardware or settings.default_hardware
    try:
        config = HardenConfig(
            model=body.model,
            revision=body.revision,
            domain=body.domain,
            seed=body.seed,
            device="cpu" if hardware == "cpu" else None,
            dtype=body.dtype,
            trust_remote_code=body.trust_remote_code,
            batch_size=body.batch_size,
        )
    except ValidationError as err:
        fields = field_errors(err.errors())
        raise ApiError(422, "invalid_request", fields[0]["message"], fields=fields) from None
    plan = preflight(config, hardware, settings)
    now = time.time()
    request_json = body.model_dump(mode="json")
    record = JobRecord(
        id=new_job_id(),
        tenant=tenant,
        created_at=now,
        updated_at=now,
        enqueued_at=now,
        queue=plan.queue if plan else hardware,
        preflight=plan.estimate.model_dump(mode="json") if plan and plan.estimate else None,
        config=config.model_dump(mode="json"),
        publish=PublishTarget(**body.publish.model_dump()),
        spec_hash=config.domain.spec_hash(),
        domain=config.domain.name,
        fingerprint=fingerprint(request_json),
    )
    try:
        record, created = store.create(record, idempotency_key)
    except IdempotencyConflict as err:
        raise ApiError(
            422,
            "idempotency_key_reused",
            f"header:Idempotency-Key: this key was used for another request (job "
            f"{err.job_id}); use a new key for a new job",
            fields=[{"field": "header:Idempotency-Key", "message": "used with another body"}],
        ) from None
    if created:
        try:
            enqueue(celery, record)
        except Exception as err:
            log.warning("cannot queue job %s: %s", record.id, type(err).__name__)
            store.finish(
                record.id,
                None,
                JobState.failed,
                error=JobError(code="queue_unavailable", message="the job could not be queued"),
            )
            raise ApiError(
                503,
                "queue_unavailable",
                "the job queue is unavailable; try again shortly",
                headers={"Retry-After": "5"},
            ) from None
        metrics.submitted.labels(record.queue).inc()
    headers = {"Location": f"/v1/jobs/{record.id}", **_job_headers(record, settings)}
    if not created:
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
    try:
        record = store.request_cancel(job_id, tenant)
    except NotCancellable as err:
        raise ApiError(
            409, "not_cancellable", f"the job already ended ({err.state.value})"
        ) from None
    if record is None:
        raise ApiError(404, "job_not_found", f"no job {job_id!r} for this API key")
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
    try:
        deleted = store.delete(job_id, tenant)
    except NotCancellable as err:
        raise ApiError(
            409, "job_active", f"the job is {err.state.value}; cancel it first"
        ) from None
    if deleted is None:
        raise ApiError(404, "job_not_found", f"no job {job_id!r} for this API key")
    return Response(status_code=204)
