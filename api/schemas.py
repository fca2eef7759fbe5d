"""Request and response bodies. Inputs are strict (`extra="forbid"`: a typo is a 422 naming the
field); outputs are built from the job record and never carry local paths, owners or tokens."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import yaml
from harmprune.config import DomainSpec, example_domain_path
from harmprune.jobs.store import JobRecord, JobState
from harmprune.preflight import Estimate
from pydantic import BaseModel, ConfigDict, Field, field_validator

REPO_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"
EXAMPLE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


class StrictIn(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PublishIn(StrictIn):
    repo_id: Annotated[
        str,
        Field(
            pattern=REPO_ID_PATTERN,
            description="Where the hardened model goes: `namespace/name` on the Hub (or under the "
            "local publishing directory when no Hub is configured).",
            examples=["my-org/smollm2-cyber-hardened"],
        ),
    ]
    private: bool = Field(True, description="Create the Hub repository as private.")

    @field_validator("repo_id")
    @classmethod
    def _no_dot_segments(cls, v: str) -> str:
        if ".." in v or "--" in v or v.endswith((".git", ".")):
            raise ValueError("not a valid repository name ('..', '--', a trailing '.' or '.git')")
        return v


def _domain_schema(schema: dict[str, Any]) -> None:
    ref = dict(schema)
    schema.clear()
    schema["anyOf"] = [
        ref,
        {"type": "string", "pattern": EXAMPLE_NAME_PATTERN, "description": "An example domain."},
    ]
    schema["description"] = "A domain spec object (as in the CLI's YAML), or the name of an "
    schema["description"] += "example domain shipped with the service, e.g. `cyber`."


class JobCreate(StrictIn):
    model: Annotated[
        str,
        Field(
            min_length=1,
            max_length=512,
            description="Hub repo id (`org/name`), `smollm2-135m-instruct`, or an absolute path "
            "under a model directory the operator allows.",
            examples=["smollm2-135m-instruct"],
        ),
    ]
    revision: Annotated[str | None, Field(max_length=128, pattern=r"^[\w./-]+$")] = Field(
        None, description="Hub revision (commit, branch or tag)."
    )
    domain: Annotated[DomainSpec, Field(json_schema_extra=_domain_schema)]
    publish: PublishIn
    hardware: Literal["gpu", "gpu-multi", "cpu"] | None = Field(
        None,
        description="Queue to run on; default: the operator's (usually gpu). A gpu job whose "
        "attribution does not fit one GPU is routed to gpu-multi (FSDP2) when the deployment "
        "has multi-GPU workers.",
    )
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    batch_size: Annotated[int, Field(gt=0, le=256)] = 8
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = Field(
        False, description="Run the model repo's own code; refused unless the operator allows it."
    )

    @field_validator("domain", mode="before")
    @classmethod
    def _example_domain(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        path = example_domain_path(v) if len(v) <= 64 else None
        if path is None:
            raise ValueError(
                f"unknown example domain {v[:64]!r}; give a spec object or a known name"
            )
        return yaml.safe_load(path.read_text())


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the field, e.g. `domain.harmful`.")
    message: str


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. `invalid_request`.")
    message: str
    fields: list[FieldError] | None = None


class ErrorOut(BaseModel):
    error: ErrorBody


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
