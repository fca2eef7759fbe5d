"""What a worker does with one job id: claim it, run the pipeline, publish, record the outcome.

    claim      the job record decides (see harmprune.jobs.store): run, resume a publish retry, re-run
               after a lost worker, or do nothing (duplicate delivery, finished, cancelled)
    run        harmprune.pipeline.run into a fresh scratch directory; progress and a lease
               heartbeat go to the job store; should_cancel reads the cancel flag
    publish    only an accepted report, only while this process still owns the job, and only
               if no cancel was asked for; transient Hub errors are retried by the task
    finish     succeeded / rejected / failed / cancelled, with result or error, and the report

Called by the Celery task (workers/tasks.py) in the worker's child process; no Celery here.
Nothing partial is ever published: the pipeline writes its checkpoint atomically, a killed
process leaves only a scratch directory (removed by the next attempt), and publishing happens
after the checkpoint is complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harmprune.errors import AttributionError, HarmpruneError, JobCancelled, PublishError
from harmprune.inputs.references import Permit
from harmprune.jobs.logs import JOB_ID, TENANT
from harmprune.jobs.store import (
    Claim,
    JobError,
    JobRecord,
    JobResult,
    JobState,
    JobStore,
    Owner,
    ReportSummary,
)
from harmprune.settings import Settings
from harmprune.vocabulary import REPORT_FILE, overall_progress

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"

# Set in a job process when its worker is shutting down (SIGTERM): the running job stops at the
# next batch boundary and goes back to the queue without spending an attempt.
SHUTDOWN = threading.Event()


def _store_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.RedisError, OSError)


class PublishRetry(Exception):
    """A transient publishing error: the task should retry after `countdown` seconds."""

    def __init__(self, countdown: float, message: str) -> None:
        super().__init__(message)
        self.countdown = countdown


class PatientStore:
    """The job store for a running job's own writes (checkpoint, outcome): a store that does
    not answer is retried for up to one lease, so a short Redis restart at the end of a job
    does not fail it. Reads and everything else go straight through."""

    def __init__(self, store: JobStore, patience_s: float) -> None:
        self._store, self._patience_s = store, patience_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def _retry(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + self._patience_s
        while True:
            try:
                return fn(*args, **kwargs)
            except _store_errors():
                if time.monotonic() > deadline:
                    raise
                log.warning("job store unreachable; retrying %s", fn.__name__)
                time.sleep(0.5)

    def finish(self, *args: Any, **kwargs: Any) -> bool:
        return bool(self._retry(self._store.finish, *args, **kwargs))

    def set_checkpoint(self, *args: Any, **kwargs: Any) -> bool:
        return bool(self._retry(self._store.set_checkpoint, *args, **kwargs))


class JobRunner:
    """Holds one claimed job: lease heartbeat, progress, cancel flag, ownership."""

    def __init__(self, store: JobStore, record: JobRecord, owner: Owner, settings: Settings):
        self.store: Any = PatientStore(store, settings.lease_s)
        self.record, self.owner, self.settings = record, owner, settings
        self.job_id = record.id
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._last_cancel_check = 0.0
        self._progress: tuple[str, int, int] = ("load", 0, 0)
        self.requeue: Callable[[JobRecord], None] | None = None
        self.scratch = settings.job_work_dir() / record.id
        self.attempt_dir = self.scratch / f"attempt-{record.attempts}"
        self._thread = threading.Thread(
            target=self._beat, name=f"lease-{self.job_id[:8]}", daemon=True
        )

    def __enter__(self) -> JobRunner:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _beat(self) -> None:
        interval = self.settings.lease_s / 4
        while not self._stop.wait(interval):
            try:
                if not self._send_progress():
                    log.warning("job %s: lease lost; stopping without publishing", self.job_id)
                    self.lost.set()
                    return
                if self.store.cancel_requested(self.job_id):
                    self.cancelled.set()
            except _store_errors():  # Redis blip: keep working, the next beat retries
                log.warning("job %s: job store unreachable; progress buffered", self.job_id)

    def _send_progress(self) -> bool:
        """Extend the lease with the latest progress (the buffered one after an outage)."""
        stage, done, total = self._progress
        return self.store.heartbeat(
            self.job_id,
            self.owner,
            self.settings.lease_s,
            stage=stage,
            done=done,
            total=total,
            progress=overall_progress(stage, done, total),
        )

    def on_progress(self, stage: str, done: int, total: int) -> None:
        """Called by the pipeline's thread. A store that does not answer never stops the job:
        the progress is kept and the heartbeat thread sends it once the store is back."""
        self._progress = (stage, done, total)
        try:
            ok = self._send_progress()
        except _store_errors():
            log.warning("job %s: job store unreachable; progress buffered", self.job_id)
            return
        if not ok:
            self.lost.set()

    def cleanup(self) -> None:
        """Remove this run's scratch space only: after a lost lease, another run may own the
        job (and its own attempt directory) by now."""
        shutil.rmtree(self.attempt_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.scratch.rmdir()  # only when no other attempt is there

    @property
    def stage(self) -> str:
        """The last stage the pipeline reported."""
        return self._progress[0]

    def should_cancel(self) -> bool:
        """Checked by the pipeline at batch boundaries; reads Redis at most 4 times a second.
        A store that does not answer means "not cancelled" (the job keeps running)."""
        if self.cancelled.is_set() or self.lost.is_set() or SHUTDOWN.is_set():
            return True
        now = time.monotonic()
        if now - self._last_cancel_check >= 0.25:
            self._last_cancel_check = now
            try:
                if self.store.cancel_requested(self.job_id):
                    self.cancelled.set()
            except _store_errors():
                log.warning("job %s: job store unreachable; not cancelled", self.job_id)
        return self.cancelled.is_set() or self.lost.is_set() or SHUTDOWN.is_set()


PublisherFactory = Callable[[Settings], Any]


def make_publisher(settings: Settings) -> Any:
    """HubPublisher when the operator enabled the Hub (HF_ENDPOINT picks the server), else a
    LocalPublisher into `publish_dir`. The token comes from the worker's environment only."""
    import os

    from harmprune.output.publishing import HubPublisher, LocalPublisher

    if settings.hub_enabled:
        return HubPublisher(token=settings.token_value(), endpoint=os.environ.get("HF_ENDPOINT"))
    return LocalPublisher(settings.local_publish_dir())


def summarize(report: dict[str, Any]) -> ReportSummary:
    return ReportSummary(
        outcome=report["outcome"],
        outcome_reason=report.get("outcome_reason", ""),
        scored_count=report["scored_count"],
        pruned_count=report["pruned_count"],
        pruned_fraction=report["pruned_fraction"],
    )


def execute_job(
    job_id: str,
    settings: Settings,
    *,
    store: JobStore | None = None,
    publisher_factory: PublisherFactory = make_publisher,
    publish_retries_left: int = 0,
    timeout_errors: tuple[type[BaseException], ...] = (),
    requeue: Callable[[JobRecord], None] | None = None,
) -> str:
    """Run one delivered job to its end; returns what happened (for the task's log line).

    Raises PublishRetry for a transient publishing error while retries are left. `requeue`
    re-sends a job put back in the queue because this worker is shutting down.
    """
    store = store or JobStore.from_settings(settings)
    owner = Owner.current()
    JOB_ID.set(job_id)
    claim: Claim = store.claim(job_id, owner, settings.lease_s, settings.max_attempts)
    if claim.record is not None:
        TENANT.set(claim.record.tenant)
    if not claim.should_run:
        log.info("job %s: %s (%s)", job_id, claim.kind, claim.reason or "-")
        return claim.kind
    assert claim.record is not None
    if claim.kind == "rerun":
        log.warning("job %s: re-running: %s", job_id, claim.reason)
    runner = JobRunner(store, claim.record, owner, settings)
    runner.requeue = requeue
    with runner:
        try:
            return _run_claimed(runner, claim, publisher_factory, publish_retries_left)
        except PublishRetry:
            raise
        except Exception as err:
            _fail_unexpected(runner, err, timeout_errors)
            return "failed"


def _run_claimed(
    runner: JobRunner,
    claim: Claim,
    publisher_factory: PublisherFactory,
    publish_retries_left: int,
) -> str:
    store, owner, settings, job_id = runner.store, runner.owner, runner.settings, runner.job_id
    record = claim.record
    assert record is not None
    checkpoint = Path(record.checkpoint_dir) if record.checkpoint_dir else None
    if claim.kind == "resume" and checkpoint and (checkpoint / REPORT_FILE).is_file():
        out_dir = checkpoint  # a publish retry: the checkpoint is complete, only publish again
        runner.attempt_dir = checkpoint.parent
        report = json.loads((out_dir / REPORT_FILE).read_text())
    else:
        # A new run starts clean: earlier attempts' partial output is removed, never reused.
        for stale in runner.scratch.glob("attempt-*"):
            shutil.rmtree(stale, ignore_errors=True)
        out_dir = runner.attempt_dir / CHECKPOINT
        runner.attempt_dir.mkdir(parents=True)
        try:
            report = _run_pipeline(runner, record, out_dir)
        except JobCancelled:
            return _end_cancelled(runner)
        except HarmpruneError as err:
            if runner.lost.is_set():
                return _end_lost(runner)
            log.info("job %s: failed [%s] %s", job_id, err.code, err)
            store.finish(
                job_id,
                owner,
                JobState.failed,
                error=JobError(code=err.code, message=str(err), stage=err.stage),
            )
            runner.cleanup()
            return "failed"
        store.set_checkpoint(job_id, owner, str(out_dir))

    summary = summarize(report)
    if summary.outcome != "accepted":
        store.finish(
            job_id,
            owner,
            JobState.rejected,
            result=JobResult(report=summary),
            report=report,
        )
        runner.cleanup()
        log.info("job %s: rejected (%s); nothing published", job_id, summary.outcome_reason)
        return "rejected"

    # Last gate before anything leaves the worker: still ours, and nobody asked to cancel.
    runner.on_progress("publish", 0, 1)
    if runner.should_cancel():
        return _end_cancelled(runner)

    target = record.publish
    try:
        published = publisher_factory(settings).publish(
            out_dir,
            target.repo_id,
            private=target.private,
            job_id=job_id,
            should_cancel=runner.should_cancel,
        )
    except JobCancelled:  # asked for while the files were prepared: nothing was committed
        return _end_cancelled(runner)
    except PublishError as err:
        if getattr(err, "transient", False) and publish_retries_left > 0:
            countdown = min(settings.publish_retry_backoff_s * 2**record.publish_attempts, 600.0)
            store.release(job_id, owner, f"publish failed (transient), retry in {countdown:.0f}s")
            log.warning("job %s: transient publish error, retrying: %s", job_id, err)
            raise PublishRetry(countdown, str(err)) from None
        store.finish(
            job_id,
            owner,
            JobState.failed,
            error=JobError(code=err.code, message=str(err), stage="publish"),
            report=report,
        )
        runner.cleanup()
        return "failed"

    result = JobResult(
        repo_id=published.repo_id,
        commit_sha=published.commit_sha,
        url=published.url,
        reused=bool(getattr(published, "reused", False)),
        files=sorted(getattr(published, "files", []) or []),
        report=summary,
    )
    store.finish(job_id, owner, JobState.succeeded, result=result, report=report)
    runner.cleanup()
    log.info(
        "job %s: published %s@%s",
        job_id,
        result.repo_id,
        result.commit_sha,
        extra={
            "fields": {
                "audit": True,
                "event": "publish",
                "repo": result.repo_id,
                "commit": result.commit_sha,
                "private": target.private,
                "reused": result.reused,
            }
        },
    )
    return "succeeded"


def permit_on_worker(record: JobRecord, settings: Settings) -> Permit:
    """The tenant policy again, on the worker, before any byte is fetched (the policy file may
    have changed since the job was queued, and a repo's visibility too): the permit the
    pipeline's loaders check. Here, where lm-eval is at hand, a built-in task's datasets become
    references too."""
    from harmprune.inputs.config import HardenConfig
    from harmprune.jobs.access import grant, permit_job
    from harmprune.jobs.tenants import TenantPolicies
    from harmprune.measure.benchmarks import task_dataset_references

    policy = TenantPolicies.from_settings(settings).get(record.tenant)
    policy.check_publish(record.publish.repo_id)
    config = HardenConfig.model_validate(record.config)
    permit = permit_job(config, policy, settings)  # task names are checked before lm-eval
    benchmarks = config.domain.eval.benchmarks
    extra = task_dataset_references(benchmarks.tasks) if benchmarks else []
    return permit.with_grants(grant(ref, policy, settings) for ref in extra)


def _run_pipeline(runner: JobRunner, record: JobRecord, out_dir: Path) -> dict[str, Any]:
    from harmprune.inputs.config import HardenConfig
    from harmprune.output.report_json import report_json
    from harmprune.pipeline import run

    permit = permit_on_worker(record, runner.settings)
    config = HardenConfig.model_validate(record.config)
    check_job_time(config, record.queue, runner.settings, permit)
    report = run(
        config,
        runner.settings,
        out_dir,
        on_progress=runner.on_progress,
        should_cancel=runner.should_cancel,
        job_id=record.id,
        attribution_processes=attribution_processes(record.queue, runner.settings),
        permit=permit,
    )
    return report_json(report)  # strict JSON: null and a reason where a figure is undefined


def check_job_time(config: Any, queue: str, settings: Settings, permit: Permit) -> None:
    """Refuse, before any weight is read, a job whose estimate is over this worker's time limit
    (the Celery limit would stop it hours later, its GPU time spent)."""
    from harmprune.jobs.planning import check_time_limit

    devices = 0 if queue == "cpu" else attribution_processes(queue, settings)
    model = permit.grant("model", config.model, config.revision, "model")
    check_time_limit(config, settings, devices, hub_only=model.location == "hub")


def attribution_processes(queue: str, settings: Settings) -> int:
    """FSDP2 ranks for a job of this queue: gpu-multi jobs use every GPU of the node (or the
    operator's `attribution_processes`); the other queues attribute in process."""
    if queue != "gpu-multi":
        return 1
    if settings.attribution_processes:
        return settings.attribution_processes
    import torch

    count = torch.cuda.device_count()
    if count < 2:
        raise AttributionError(
            f"this gpu-multi worker sees {count} GPU(s); it needs at least 2 "
            "(or HARMPRUNE_ATTRIBUTION_PROCESSES)"
        )
    return count


def _end_cancelled(runner: JobRunner) -> str:
    if runner.lost.is_set():
        return _end_lost(runner)
    if SHUTDOWN.is_set() and not runner.cancelled.is_set():
        return _end_shutdown(runner)
    runner.store.finish(runner.job_id, runner.owner, JobState.cancelled)
    runner.cleanup()
    log.info("job %s: cancelled; nothing published", runner.job_id)
    return "cancelled"


def _end_shutdown(runner: JobRunner) -> str:
    """The worker is shutting down: the job goes back to the queue, its attempt not spent."""
    note = f"the worker shut down (SIGTERM) during stage {runner.stage}; re-queued"
    record = runner.store.requeue_for_shutdown(runner.job_id, runner.owner, note)
    runner.cleanup()
    if record is None:
        return _end_lost(runner)
    log.warning("job %s: %s", runner.job_id, note)
    if runner.requeue is not None:
        try:
            runner.requeue(record)
        except Exception:  # the recovery sweep re-sends a queued job whose message was lost
            log.warning("job %s: could not re-send; the recovery sweep will", runner.job_id)
    return "requeued"


def _end_lost(runner: JobRunner) -> str:
    """Another worker took the job over (our lease ran out): leave the record to it."""
    runner.cleanup()
    log.warning("job %s: lease lost to another worker; this run stops", runner.job_id)
    return "lost"


def _fail_unexpected(
    runner: JobRunner, err: Exception, timeout_errors: tuple[type[BaseException], ...]
) -> None:
    stage = runner.stage
    if isinstance(err, timeout_errors):
        error = JobError(
            code="time_limit_exceeded",
            message=f"the job ran past its time limit ({runner.settings.job_soft_time_limit_s}s)"
            f" during stage {stage}; nothing was published",
            stage=stage,
        )
        log.warning("job %s: soft time limit during %s", runner.job_id, stage)
    else:
        log.exception("job %s: internal error during %s", runner.job_id, stage)
        error = JobError(
            code="internal_error",
            message=f"internal error ({type(err).__name__}) during stage {stage}; nothing was "
            f"published; the worker log has the details for job {runner.job_id}",
            stage=stage,
        )
    runner.store.finish(runner.job_id, runner.owner, JobState.failed, error=error)
    runner.cleanup()
