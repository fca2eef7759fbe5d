"""Audit jobs (`POST /v1/audits`): `harmprune audit` of a Hub repo, run by a CPU worker.

An audit has its own small record beside the job store's (same Redis, same prefix):

    {p}:audit:{id}    the AuditRecord as JSON; expires `record_ttl_s` after it ends

States as a hardening job's: `queued` -> `running` -> `succeeded` (every check held),
`rejected` (a check failed: the verdict says which) or `failed` (the audit could not run). The
worker is the only writer after the API creates the record; a re-delivered message re-runs an
audit that has not ended (an audit only reads, so running it twice changes nothing).

No torch, no Celery: the API imports this module.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis
from harmprune.inputs.references import RevisionedModelRef
from harmprune.jobs.store import JobError, JobState
from harmprune.settings import Settings
from pydantic import BaseModel, ConfigDict, Field

RUN_AUDIT = "harmprune.run_audit"
AUDIT_QUEUE = "cpu"  # reading and comparing weights needs no GPU
REPO_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"
REVISION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$"
MAX_PUBLIC_KEY_CHARS = 4096


class AuditCreate(BaseModel):
    """What to audit. The public key is the signer's, PEM text (public keys are not secrets)."""

    model_config = ConfigDict(extra="forbid")

    repo_id: RevisionedModelRef = Field(
        pattern=REPO_ID_PATTERN, description="The hardened model's Hub repo."
    )
    revision: str | None = Field(
        None, pattern=REVISION_PATTERN, description="Commit, branch or tag (default: main)."
    )
    public_key: str | None = Field(
        None,
        max_length=MAX_PUBLIC_KEY_CHARS,
        pattern=r"^-----BEGIN PUBLIC KEY-----[A-Za-z0-9+/=\r\n]+-----END PUBLIC KEY-----\s*$",
        description="The signer's PEM public key; without it a signed repo fails the audit.",
    )
    allow_unsigned: bool = Field(False, description="Pass a repo without model.sig.")


class AuditRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    tenant: str
    state: JobState = JobState.queued
    created_at: float
    updated_at: float
    finished_at: float | None = None
    request: AuditCreate
    verdict: dict[str, Any] | None = Field(
        None, description="harmprune.audit.checks.Verdict as JSON: every check, and `passed`."
    )
    error: JobError | None = None


class AuditStore:
    def __init__(self, client: redis.Redis, prefix: str, record_ttl_s: int | None = None) -> None:
        self.r, self.p, self.record_ttl_s = client, prefix, record_ttl_s

    @classmethod
    def from_settings(cls, settings: Settings) -> AuditStore:
        client = redis.Redis.from_url(
            settings.redis_url, decode_responses=True, socket_connect_timeout=5, socket_timeout=10
        )
        return cls(client, settings.key_prefix, settings.job_record_ttl_s)

    def _key(self, audit_id: str) -> str:
        return f"{self.p}:audit:{audit_id}"

    def _save(self, record: AuditRecord) -> None:
        ttl = self.record_ttl_s if record.state.terminal else None
        self.r.set(self._key(record.id), record.model_dump_json(), ex=ttl)

    def create(self, tenant: str, request: AuditCreate) -> AuditRecord:
        now = time.time()
        record = AuditRecord(
            id=uuid.uuid4().hex, tenant=tenant, created_at=now, updated_at=now, request=request
        )
        self._save(record)
        return record

    def load(self, audit_id: str) -> AuditRecord | None:
        raw = self.r.get(self._key(audit_id))
        return AuditRecord.model_validate_json(raw) if raw else None

    def get(self, audit_id: str, tenant: str) -> AuditRecord | None:
        """The tenant's own audit; another tenant's reads as missing."""
        record = self.load(audit_id)
        return record if record is not None and record.tenant == tenant else None

    def start(self, audit_id: str) -> AuditRecord | None:
        """Mark it running; None when there is nothing to run (unknown, or already ended)."""
        record = self.load(audit_id)
        if record is None or record.state.terminal:
            return None
        record = record.model_copy(update={"state": JobState.running, "updated_at": time.time()})
        self._save(record)
        return record

    def finish(
        self,
        record: AuditRecord,
        state: JobState,
        *,
        verdict: dict[str, Any] | None = None,
        error: JobError | None = None,
    ) -> AuditRecord:
        now = time.time()
        done = record.model_copy(
            update={
                "state": state,
                "updated_at": now,
                "finished_at": now,
                "verdict": verdict,
                "error": error,
            }
        )
        self._save(done)
        return done


def execute_audit(audit_id: str, settings: Settings, store: AuditStore | None = None) -> str:
    """Run one queued audit on this worker and record its verdict; returns the end state.

    The tenant's read policy is applied again here, to the audited repo and to the base model
    the report names, before either is fetched with the operator's token."""
    import logging
    import tempfile
    from pathlib import Path

    from harmprune.errors import HarmpruneError
    from harmprune.inputs.references import Grant, Reference
    from harmprune.jobs.access import grant
    from harmprune.jobs.tenants import TenantPolicies

    log = logging.getLogger(__name__)
    store = store or AuditStore.from_settings(settings)
    record = store.start(audit_id)
    if record is None:
        return "nothing to run"
    request = record.request
    policy = TenantPolicies.from_settings(settings).get(record.tenant)

    def base_grant(reference: str, revision: str | None) -> Grant:
        return grant(Reference("model", reference, revision, "base model"), policy, settings)

    try:
        from harmprune.audit.checks import run_audit  # the engine: in the worker's job process only

        grant(Reference("model", request.repo_id, request.revision, "repo_id"), policy, settings)
        with tempfile.TemporaryDirectory(prefix="harmprune-audit-") as tmp:
            key = None
            if request.public_key is not None:
                key = Path(tmp) / "signer.pub"
                key.write_text(request.public_key)
            verdict = run_audit(
                request.repo_id,
                revision=request.revision,
                public_key=key,
                allow_unsigned=request.allow_unsigned,
                settings=settings,
                base_grant=base_grant,
            )
    except HarmpruneError as err:
        store.finish(
            record,
            JobState.failed,
            error=JobError(code=err.code, message=str(err), stage=err.stage),
        )
        return "failed"
    except Exception as err:  # never a traceback in a record: the type, and the log has the rest
        log.exception("audit %s: unexpected error", audit_id)
        message = f"internal error ({type(err).__name__})"
        store.finish(record, JobState.failed, error=JobError(code="audit_error", message=message))
        return "failed"
    state = JobState.succeeded if verdict.passed else JobState.rejected
    store.finish(record, state, verdict=verdict.as_json())
    return state.value
