"""The Celery app of the workers: `celery -A harmprune.workers.app worker -Q gpu -c 1`.

Settings come from HARMPRUNE_* environment variables. The parent process never imports torch
(CUDA does not survive fork); each job runs in a fresh child (max_tasks_per_child=1), so its
GPU memory goes back to the driver when the child exits.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery.signals import task_failure, worker_process_init, worker_ready
from harmprune.jobs.store import JobStore
from harmprune.settings import Settings
from harmprune.workers.client import make_celery, recover_lost_jobs

log = logging.getLogger("workers")

settings = Settings()
app = make_celery(settings)


@worker_ready.connect
def _recover_on_start(sender: Any = None, **_: Any) -> None:
    """A worker that starts picks up jobs whose worker died (e.g. killed with the machine)."""
    store = JobStore.from_settings(settings)
    try:
        count = recover_lost_jobs(app, store, settings)
        if count:
            log.warning("re-sent %d lost job(s)", count)
    except Exception:
        log.warning("recovery sweep failed at start-up", exc_info=True)
    finally:
        store.r.close()


@worker_process_init.connect
def _child_start(**_: Any) -> None:
    """In each job process: an empty working directory, so that a model reference can never
    resolve to a relative path on the worker (the API accepts Hub ids, not paths)."""
    # Progress goes to the job store; terminal progress bars would only fill the log.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    empty = settings.job_work_dir() / ".cwd"
    empty.mkdir(parents=True, exist_ok=True)
    os.chdir(empty)


@task_failure.connect
def _log_failure(sender: Any = None, task_id: str | None = None, exception: Any = None, **_: Any):
    log.error("task %s failed: %r", task_id, exception)
