"""The Celery app of the workers: `celery -A harmprune.workers.app worker -Q gpu -c 1`.

Settings come from HARMPRUNE_* environment variables. The parent process never imports torch
(CUDA does not survive fork); each job runs in a fresh child (max_tasks_per_child=1), so its
GPU memory goes back to the driver when the child exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

from celery.signals import (
    setup_logging,
    task_failure,
    worker_process_init,
    worker_ready,
    worker_shutting_down,
)
from harmprune.jobs.logs import configure_json_logging, route_library_logs
from harmprune.jobs.store import JobStore
from harmprune.settings import Settings
from harmprune.workers.client import make_celery, recover_lost_jobs

log = logging.getLogger("workers")

settings = Settings()
app = make_celery(settings)


@setup_logging.connect
def _json_logs(loglevel: Any = None, **_: Any) -> None:
    """JSON lines with the job id and the tenant (harmprune.jobs.logs) instead of Celery's."""
    level = loglevel if isinstance(loglevel, int) else logging.getLevelName(loglevel or "INFO")
    configure_json_logging(level if isinstance(level, int) else logging.INFO)


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
    # After the two above (this imports tqdm, which reads TQDM_* once): library warnings as JSON.
    route_library_logs()
    empty = settings.job_work_dir() / ".cwd"
    empty.mkdir(parents=True, exist_ok=True)
    os.chdir(empty)


def on_sigterm_requeue() -> None:
    """In a job process, when its task starts (billiard installs its own SIGTERM handler after
    worker_process_init, so this cannot be done there): SIGTERM (a rollout, a drained node)
    stops the running job at its next batch boundary and puts it back in the queue without
    spending an attempt (harmprune.jobs.runner.SHUTDOWN)."""
    signal.signal(signal.SIGTERM, _job_process_sigterm)


def _job_process_sigterm(signum: int, frame: Any) -> None:
    from harmprune.jobs.runner import SHUTDOWN  # no torch: the runner imports it lazily

    SHUTDOWN.set()


def _children(pid: int) -> list[int]:
    """This worker's job processes (Linux /proc), to pass SIGTERM on: Kubernetes signals PID 1."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[1] == str(pid):
            out.append(int(stat.parent.name))
    return out


@worker_shutting_down.connect
def _pass_sigterm_to_jobs(sig: str | None = None, how: str | None = None, **_: Any) -> None:
    """Warm shutdown (SIGTERM): tell the job processes, so their jobs re-queue cleanly."""
    if how != "Warm":
        return
    for pid in _children(os.getpid()):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)


@task_failure.connect
def _log_failure(sender: Any = None, task_id: str | None = None, exception: Any = None, **_: Any):
    log.error("task %s failed: %r", task_id, exception)
