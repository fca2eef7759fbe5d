"""Job records for the tests of the job store and the worker: one as submission makes it."""

from __future__ import annotations

import time
from typing import Any

from harmprune.jobs.store import JobRecord, fingerprint, new_job_id


def job_record(**fields: Any) -> JobRecord:
    """A record as submission makes one (a new id; created and updated now) for tenant alpha,
    with a placeholder config, publish target, spec hash, domain and fingerprint; `fields`
    override any of them."""
    now = time.time()
    defaults: dict[str, Any] = dict(
        id=new_job_id(),
        tenant="alpha",
        created_at=now,
        updated_at=now,
        config={"model": "org/model"},
        publish={"repo_id": "org/hardened", "private": True},
        spec_hash="0" * 64,
        domain="tiny",
        fingerprint=fingerprint({"n": 1}),
    )
    return JobRecord(**{**defaults, **fields})
