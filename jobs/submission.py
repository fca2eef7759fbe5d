"""A job request, from its body to a queued record: the one place that builds a `HardenConfig`
from a request (the API, `harmprune submit`).

    JobRequest     the request body: the engine's own fields (DomainSpec, seed, batch_size,
                   max_backward_tokens, gradient_checkpointing, ...; same types and bounds),
                   plus where to publish and which hardware
    build_config   the request's references checked (model paths, remote code), the HardenConfig
    submit         tenant policy (publish namespace, readable models, quotas), the plan
                   (harmprune.jobs.planning), the record (harmprune.jobs.store), the queue

Errors are `harmprune.errors` (RequestRefused & co.): the API maps them to statuses in one place.
Torch-free.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from harmprune.errors import QuotaExceeded, RequestRefused, ServiceUnavailable
from harmprune.inputs.config import (
    RUN_OPTIONS,
    DomainSpec,
    HardenConfig,
    HubDataset,
    example_domain_path,
    harden_config,
    load_domain,
)
from harmprune.inputs.references import RevisionedModelRef
from harmprune.jobs.access import permit_job
from harmprune.jobs.planning import Plan, Planner, item_lists
from harmprune.jobs.store import (
    IdempotencyConflict,
    JobError,
    JobRecord,
    JobState,
    JobStore,
    PublishTarget,
    QuotaRefusal,
    fingerprint,
    new_job_id,
)
from harmprune.jobs.tenants import TenantPolicy
from harmprune.settings import Settings
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

REPO_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"
EXAMPLE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
# The largest request body (a domain spec with its inline examples) the API reads; the
# OpenAPI schema states it (`x-max-body-bytes`), the API's body limit enforces it.
# Prompt items a job may hold in all: every list of pairs, Hub datasets (by their `limit`) or
# multiple-choice items anywhere in the spec, together (harmprune.inputs.preflight prices each list).
MAX_SPEC_ITEMS = 10_000


def engine_field(name: str) -> Any:
    """HardenConfig's own field (bounds, default, description) for a request schema."""
    return copy.deepcopy(HardenConfig.model_fields[name])


# HardenConfig's annotation where the bound sits inside it (`Annotated[int, Field(ge=16)] | None`)
MaxBackwardTokens = HardenConfig.model_fields["max_backward_tokens"].annotation


class PublishIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_id: Annotated[
        str,
        Field(
            pattern=REPO_ID_PATTERN,
            description="Where the hardened model goes: `namespace/name` on the Hub (or under the "
            "local publishing directory when no Hub is configured). The namespace must be one "
            "the API key is granted.",
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
    schema["description"] = (
        "A domain spec object (as in the CLI's YAML), or the name of an example domain shipped "
        f"with the service, e.g. `cyber`. At most {MAX_SPEC_ITEMS} items across all its lists (a "
        "Hub dataset counts as its `limit`, which the service requires)."
    )


def example_domain(name: str) -> DomainSpec:
    """A shipped example domain by name (never a path: a request cannot name files)."""
    path = example_domain_path(name) if re.fullmatch(EXAMPLE_NAME_PATTERN, name) else None
    if path is None:
        raise ValueError(
            f"unknown example domain {name[:64]!r}; give a spec object or a known name"
        )
    return load_domain(path)


class JobRequest(BaseModel):
    """POST /v1/jobs. The run options are HardenConfig's fields, with its types and bounds."""

    model_config = ConfigDict(extra="forbid")

    model: RevisionedModelRef = Field(
        description="Hub repo id (`org/name`), `smollm2-135m-instruct`, or an absolute path "
        "under a model directory the operator allows.",
        examples=["smollm2-135m-instruct"],
    )
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
    seed: int = engine_field("seed")
    batch_size: int = engine_field("batch_size")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = engine_field("dtype")
    trust_remote_code: bool = engine_field("trust_remote_code")
    max_backward_tokens: MaxBackwardTokens = engine_field("max_backward_tokens")  # type: ignore[valid-type]
    gradient_checkpointing: Literal["auto", "on", "off"] = engine_field("gradient_checkpointing")

    @field_validator("domain", mode="before")
    @classmethod
    def _example_domain(cls, v: Any) -> Any:
        return example_domain(v) if isinstance(v, str) else v

    @field_validator("domain")
    @classmethod
    def _bounded(cls, v: DomainSpec) -> DomainSpec:
        check_item_bound(v)
        return v


def check_item_bound(spec: DomainSpec) -> None:
    """One bound on the items of every list together; a Hub dataset counts as its `limit`,
    and one without a `limit` is refused (its size is unknown until a worker loads it)."""
    total, largest = 0, ("", 0)
    for path, items in item_lists(spec):
        count = 0
        for i, item in enumerate(items):
            if isinstance(item, HubDataset):
                if item.limit is None:
                    raise ValueError(
                        f"{path}.{i}.limit: a Hub dataset needs a limit (rows to use) on the "
                        f"service; at most {MAX_SPEC_ITEMS} items in all"
                    )
                count += item.limit
            else:
                count += 1
        total += count
        largest = max(largest, (path, count), key=lambda x: x[1])
    if total > MAX_SPEC_ITEMS:
        raise ValueError(
            f"{largest[0]}: the spec holds {total} prompt items in all ({largest[1]} here); "
            f"at most {MAX_SPEC_ITEMS} across every list (a Hub dataset counts as its limit)"
        )


def build_config(request: JobRequest, settings: Settings) -> HardenConfig:
    """The job's HardenConfig (its references are the tenant policy's to judge: `submit`)."""
    if request.trust_remote_code and not settings.allow_remote_code:
        raise RequestRefused("trust_remote_code", "the operator does not allow remote code")
    hardware = request.hardware or settings.default_hardware
    try:
        return harden_config(
            request.model,
            request.domain,
            revision=request.revision,
            device="cpu" if hardware == "cpu" else None,
            **{name: getattr(request, name) for name in RUN_OPTIONS},
        )
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(body)"
        raise RequestRefused(field, str(first["msg"])) from None


def request_from_cli(
    model: str, domain: str, repo_id: str, *, private: bool, **options: Any
) -> JobRequest:
    """`harmprune submit`'s request: the domain read by `load_domain` (a file or a name), the
    same validation as the API's, before anything is sent."""
    spec = load_domain(domain)
    body = {
        "model": model,
        "domain": spec,
        "publish": {"repo_id": repo_id, "private": private},
        **{k: v for k, v in options.items() if v is not None},
    }
    try:
        return JobRequest.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(body)"
        raise RequestRefused(field, str(first["msg"])) from None


# ---------------------------------------------------------------- submit


@dataclass
class Services:
    """What submitting needs: the operator's settings, the store, the planner, the queue."""

    settings: Settings
    store: JobStore
    planner: Planner | None  # None: preflight off (jobs are queued unplanned)
    enqueue: Callable[[JobRecord], None]


@dataclass(frozen=True)
class Submitted:
    record: JobRecord
    created: bool  # False: an idempotent replay of an earlier request


def quota_exceeded(refusal: QuotaRefusal, policy: TenantPolicy) -> QuotaExceeded:
    """The 429 for a quota `JobStore.admit` refused."""
    quotas = policy.quotas
    if refusal.kind == "concurrent":
        return QuotaExceeded(
            "(quota)",
            f"{refusal.active} jobs are queued or running for this API key (at most "
            f"{quotas.concurrent_jobs}); wait for one to end",
            retry_after_s=30,
        )
    return QuotaExceeded(
        "(quota)",
        f"this API key has submitted {quotas.jobs_per_day} jobs today (UTC)",
        retry_after_s=max(1, int(86400 - time.time() % 86400)),
    )


def submit(
    request: JobRequest,
    policy: TenantPolicy,
    services: Services,
    idempotency_key: str | None = None,
) -> Submitted:
    settings, store = services.settings, services.store
    if idempotency_key is not None and not IDEMPOTENCY_KEY.match(idempotency_key):
        raise RequestRefused("header:Idempotency-Key", "1 to 255 printable ASCII characters")
    config = build_config(request, settings)
    policy.check_publish(request.publish.repo_id)
    hardware = request.hardware or settings.default_hardware
    request_fingerprint = fingerprint(request.model_dump(mode="json"))
    replay = store.find_idempotent(policy.name, idempotency_key) if idempotency_key else None
    if replay is not None:
        if replay.fingerprint != request_fingerprint:
            raise _idempotency_conflict(replay.id)
        return Submitted(replay, False)
    plan: Plan | None = None
    if services.planner is not None:  # the model's Hub facts come with its config files
        permit_job(config, policy, settings, hub_checked=frozenset({"model"}))
        plan = services.planner.plan(config, hardware, policy)
    else:
        permit_job(config, policy, settings)
    now = time.time()
    record = JobRecord(
        id=new_job_id(),
        tenant=policy.name,
        created_at=now,
        updated_at=now,
        enqueued_at=now,
        queue=plan.queue if plan else hardware,
        preflight=plan.estimate.model_dump(mode="json") if plan and plan.estimate else None,
        config=config.model_dump(mode="json"),
        publish=PublishTarget(**request.publish.model_dump()),
        spec_hash=config.domain.spec_hash(),
        domain=config.domain.name,
        fingerprint=request_fingerprint,
    )
    try:  # quotas, idempotency key and record: one atomic round trip
        record, created = store.admit(
            record,
            concurrent_jobs=policy.quotas.concurrent_jobs,
            jobs_per_day=policy.quotas.jobs_per_day,
            idempotency_key=idempotency_key,
        )
    except IdempotencyConflict as err:
        raise _idempotency_conflict(err.job_id) from None
    except QuotaRefusal as refusal:
        raise quota_exceeded(refusal, policy) from None
    if created:
        try:
            services.enqueue(record)
        except Exception as err:
            store.finish(
                record.id,
                None,
                JobState.failed,
                error=JobError(code="queue_unavailable", message="the job could not be queued"),
            )
            raise ServiceUnavailable(
                f"the job queue is unavailable ({type(err).__name__}); try again shortly",
                code="queue_unavailable",
            ) from None
    return Submitted(record, created)


def _idempotency_conflict(job_id: str) -> RequestRefused:
    return RequestRefused(
        "header:Idempotency-Key",
        f"this key was used for another request (job {job_id}); use a new key for a new job",
        code="idempotency_key_reused",
    )
