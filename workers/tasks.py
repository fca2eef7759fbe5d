"""Thin tasks: validate the payload (a job id) and call harmprune.jobs.runner.

New task parameters go last with defaults, so messages queued before a deploy still run.
"""

from __future__ import annotations

from celery.exceptions import SoftTimeLimitExceeded
from harmprune.jobs.audits import RUN_AUDIT
from harmprune.vocabulary import JOB_ID_PATTERN
from harmprune.workers.app import app, on_sigterm_requeue, settings
from harmprune.workers.client import RUN_JOB, enqueue


@app.task(
    name=RUN_JOB,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=settings.job_soft_time_limit_s,
    time_limit=settings.job_soft_time_limit_s + settings.job_time_limit_grace_s,
    max_retries=settings.publish_max_retries,
    ignore_result=True,
)
def run_job(self, job_id: str) -> str:
    """Harden one model as recorded in the job store; retried only for transient Hub errors."""
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.match(job_id):
        raise ValueError(f"invalid job id {job_id!r}")
    from harmprune.jobs.runner import PublishRetry, execute_job  # torch: in the child only

    on_sigterm_requeue()

    try:
        return execute_job(
            job_id,
            settings,
            publish_retries_left=self.max_retries - self.request.retries,
            timeout_errors=(SoftTimeLimitExceeded,),
            requeue=lambda record: enqueue(app, record),
        )
    except PublishRetry as retry:
        raise self.retry(countdown=retry.countdown) from None


@app.task(
    name=RUN_AUDIT,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=settings.job_soft_time_limit_s,
    time_limit=settings.job_soft_time_limit_s + settings.job_time_limit_grace_s,
    ignore_result=True,
)
def run_audit(audit_id: str) -> str:
    """`harmprune audit` of the repo an audit record names (POST /v1/audits); CPU queue."""
    if not isinstance(audit_id, str) or not JOB_ID_PATTERN.match(audit_id):
        raise ValueError(f"invalid audit id {audit_id!r}")
    from harmprune.jobs.audits import execute_audit

    return execute_audit(audit_id, settings)
