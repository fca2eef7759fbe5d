"""Request and response bodies. Inputs are strict (`extra="forbid"`: a typo is a 422 naming the
field); outputs are built from the job record and never carry local paths, owners or tokens."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from harmprune.inputs.preflight import Estimate
from harmprune.jobs.store import JobRecord, JobState
from harmprune.jobs.submission import JobRequest
from harmprune.jobs.submission import PublishIn as PublishIn
from pydantic import BaseModel, ConfigDict, Field

# The request body is the job layer's (harmprune.jobs.submission): one schema for the API and
# `harmprune submit`, composed of the engine's own fields.
JobCreate = JobRequest


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the field, e.g. `domain.harmful`.")
    message: str


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. `invalid_request`.")
    message: str
    fields: list[FieldError] | None = None


class ErrorOut(BaseModel):
    error: ErrorBody


# What any authenticated route that reads a request body may answer, besides its own errors.
REQUEST_ERRORS = {
    400: "The body is not readable (not UTF-8 JSON).",
    401: "Missing or invalid API key.",
    413: "Request body over the limit.",
    422: "Invalid request; `fields` names each problem.",
}


def error_responses(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """A router's OpenAPI `responses`: each status, in order, answered with ErrorOut."""
    return {
        status: {"model": ErrorOut, "description": descriptions[status]}
        for status in sorted(descriptions)
    }


class JobErrorOut(BaseModel):
    code: str
    message: str
    stage: str | None = None


class ReportSummaryOut(BaseModel):
    outcome: Literal["accepted", "rejected"]
    outcome_reason: str
    scored_count: int
    pruned_count: int
    pruned_fraction: float


class JobResultOut(BaseModel):
    repo_id: str | None = Field(None, description="Published repository; null when rejected.")
    commit_sha: str | None = None
    url: str | None = None
    report: ReportSummaryOut


class PublishOut(BaseModel):
    repo_id: str
    private: bool


class JobLinks(BaseModel):
    self: str
    report: str
    cancel: str


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


class JobOut(BaseModel):
    id: str
    state: JobState
    stage: str | None = Field(None, description="Current or last pipeline stage.")
    progress: float = Field(ge=0, le=1)
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    model: str
    revision: str | None
    domain: str
    spec_hash: str
    hardware: str = Field(
        description="The queue it runs on (preflight may route gpu to gpu-multi)."
    )
    preflight: Estimate | None = Field(
        None,
        description="What the model needs, from its config files: parameters, peak memory per "
        "device, estimated attribution time. None: not checked (built-in model, GGUF file).",
    )
    publish: PublishOut
    attempts: int = Field(description="Runs started (a run is repeated if its worker was lost).")
    cancel_requested: bool
    error: JobErrorOut | None = None
    result: JobResultOut | None = None
    links: JobLinks

    @classmethod
    def from_record(cls, rec: JobRecord) -> JobOut:
        base = f"/v1/jobs/{rec.id}"
        result = None
        if rec.result is not None:
            result = JobResultOut(
                repo_id=rec.result.repo_id,
                commit_sha=rec.result.commit_sha,
                url=rec.result.url,
                report=ReportSummaryOut(**rec.result.report.model_dump()),
            )
        return cls(
            id=rec.id,
            state=rec.state,
            stage=rec.stage,
            progress=rec.progress,
            created_at=_ts(rec.created_at),  # type: ignore[arg-type]
            updated_at=_ts(rec.updated_at),  # type: ignore[arg-type]
            started_at=_ts(rec.started_at),
            finished_at=_ts(rec.finished_at),
            model=rec.model,
            revision=rec.revision,
            domain=rec.domain,
            spec_hash=rec.spec_hash,
            hardware=rec.queue,
            preflight=Estimate.model_validate(rec.preflight) if rec.preflight else None,
            publish=PublishOut(repo_id=rec.publish.repo_id, private=rec.publish.private),
            attempts=rec.attempts,
            cancel_requested=rec.cancel_requested,
            error=JobErrorOut(**rec.error.model_dump()) if rec.error else None,
            result=result,
            links=JobLinks(self=base, report=f"{base}/report", cancel=f"{base}/cancel"),
        )


class JobListOut(BaseModel):
    items: list[JobOut]
    total: int = Field(description="Jobs matching the filter.")
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page.")


class ReportOut(BaseModel):
    """report.json of a finished job (see the report schema; more fields than listed here)."""

    model_config = ConfigDict(extra="allow")

    schema_version: str
    job_id: str | None = None
    outcome: Literal["accepted", "rejected"]
    outcome_reason: str = ""
    scored_count: int
    pruned_count: int


class HealthOut(BaseModel):
    status: Literal["ok"]


class ReadyOut(BaseModel):
    status: Literal["ready", "unavailable"]
    redis: str
