"""The Celery configuration and the sending side, shared by the API and the workers.

No torch and no task code here: the API imports this to enqueue jobs; the worker's parent
process imports it too, and must never initialise CUDA (children are forked from it).
"""

from __future__ import annotations

import logging
import time

from celery import Celery
from harmprune.jobs.store import JobRecord, JobState, JobStore
from harmprune.settings import Settings
from kombu import Exchange, Queue

log = logging.getLogger(__name__)

RUN_JOB = "harmprune.run_job"
QUEUES = ("gpu", "gpu-multi", "cpu")  # one queue per worker kind (harmprune.jobs.planning routes)


def make_celery(settings: Settings) -> Celery:
    """A Celery app for these settings. Broker keys live under `{key_prefix}:broker:`, so two
    deployments (or test sessions) on one Redis database never see each other's messages."""
    app = Celery("harmprune", broker=settings.redis_url, include=["harmprune.workers.tasks"])
    transport = {
        # Above the longest job, or a running job's message is handed to a second worker.
        "visibility_timeout": settings.visibility_timeout_s,
        "global_keyprefix": f"{settings.key_prefix}:broker:",
        "unacked_restore_interval": settings.broker_restore_interval_s,
        "unacked_restore_throttle": 1,
        "socket_timeout": 30,
        "socket_connect_timeout": 5,
    }
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # The job store is the record of truth; Celery keeps no results.
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=1,
        worker_concurrency=1,
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES],
        task_default_queue=settings.default_hardware,
        task_create_missing_queues=False,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts_level="INFO",
    )
    limit = settings.job_soft_time_limit_s + settings.job_time_limit_grace_s
    if settings.visibility_timeout_s <= limit:
        log.warning(
            "visibility_timeout_s (%ss) is not above the longest job (%ss): a running job's "
            "message can be delivered to a second worker (the job record stops it re-running)",
            settings.visibility_timeout_s,
            limit,
        )
    return app


def enqueue(app: Celery, record: JobRecord) -> None:
    """Send the job id (the only payload; the worker reads the rest from the store)."""
    app.send_task(RUN_JOB, args=[record.id], queue=record.queue)


def recover_lost_jobs(app: Celery, store: JobStore, settings: Settings) -> int:
    """Settle the jobs whose worker is gone and re-send what may have lost its message.

    A running job whose owner is dead goes back to `queued` and is re-sent (or ends `failed`
    once its attempts are spent, `cancelled` if that was asked for); a job queued (or waiting
    for a publish retry) without news for `requeue_queued_after_s` is re-sent. Safe anywhere,
    any number of times: the job record decides what a delivered message does.
    """
    count = 0
    now = time.time()
    for record in store.needs_requeue(now, settings.requeue_queued_after_s):
        try:
            if record.state == JobState.running and record.owner_lost(now):
                settled = store.requeue_lost(record.id, settings.max_attempts)
                if settled is None:
                    continue  # a worker took it meanwhile
                log.warning("recovery: job %s: %s", record.id, settled.notes[-1])
                if settled.state != JobState.queued:
                    continue  # failed (attempts spent) or cancelled: nothing to send
                record = settled
            enqueue(app, record)
            store.mark_enqueued(record.id)
            count += 1
            log.info("recovery: re-sent job %s (%s)", record.id, record.state.value)
        except Exception:
            log.warning("recovery: could not settle job %s", record.id, exc_info=True)
    return count
