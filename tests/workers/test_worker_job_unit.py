"""harmprune.jobs.runner in-process, with the pipeline replaced by a fake (the real one runs in the
stack tests): publish retries and resumption, errors, time limits, lost leases, cancellation."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from harmprune.errors import ModelLoadError, PublishError
from harmprune.jobs import runner as worker_job
from harmprune.jobs.store import JobRecord, JobState, JobStore, Owner, fingerprint
from harmprune.output.publishing import LocalPublisher, PublishResult
from harmprune.settings import Settings
from harmprune.vocabulary import STAGES

from tests.service_stack import Namespace, namespace_fixture, stack_settings
from tests.support.job_records import job_record

pytestmark = pytest.mark.services


def fake_report(outcome: str = "accepted") -> dict[str, Any]:
    return {
        "schema_version": "1.0",
        "outcome": outcome,
        "outcome_reason": "" if outcome == "accepted" else "harm loss too low",
        "scored_count": 100,
        "pruned_count": 5,
        "pruned_fraction": 0.05,
    }


class FakePipeline:
    def __init__(self, outcome: str = "accepted", fail: BaseException | None = None) -> None:
        self.outcome, self.fail, self.calls = outcome, fail, 0
        self.during: Any = None  # called at the "attribute" stage

    def __call__(self, runner: Any, record: JobRecord, out_dir: Path) -> dict[str, Any]:
        self.calls += 1
        runner.on_progress("load", 1, 1)
        runner.on_progress("attribute", 1, 2)
        if self.during is not None:
            self.during(runner)
        if runner.should_cancel():
            from harmprune.errors import JobCancelled

            raise JobCancelled("the job was cancelled")
        if self.fail is not None:
            raise self.fail
        out_dir.mkdir(parents=True)
        report = fake_report(self.outcome)
        (out_dir / "report.json").write_text(json.dumps(report))
        if self.outcome == "accepted":
            (out_dir / "model.safetensors").write_bytes(b"weights")
        return report


class FlakyPublisher:
    """Fails `failures` times with a transient error, then publishes locally."""

    def __init__(self, root: Path, failures: int = 0, transient: bool = True) -> None:
        self.local = LocalPublisher(root)
        self.failures, self.transient, self.calls = failures, transient, 0

    def publish(
        self, folder: Path, repo_id: str, *, private: bool, job_id: str, should_cancel: Any = None
    ) -> PublishResult:
        self.calls += 1
        if self.calls <= self.failures:
            raise PublishError("HTTP 503 from the Hub", transient=self.transient)
        return self.local.publish(
            folder, repo_id, private=private, job_id=job_id, should_cancel=should_cancel
        )


ns = namespace_fixture("wjob")


@pytest.fixture
def settings(ns: Namespace, tmp_path: Path) -> Settings:
    return stack_settings(ns, tmp_path, lease_s=30.0)


@pytest.fixture
def store(settings: Settings) -> JobStore:
    return JobStore.from_settings(settings)


@pytest.fixture
def pipeline(monkeypatch: pytest.MonkeyPatch) -> FakePipeline:
    fake = FakePipeline()
    monkeypatch.setattr(worker_job, "_run_pipeline", fake)
    return fake


def queued(store: JobStore) -> JobRecord:
    rec = job_record(
        config={"model": "org/m"},
        publish={"repo_id": "org/out", "private": True},
        domain="d",
        fingerprint=fingerprint({}),
    )
    return store.create(rec)[0]


def run(store: JobStore, settings: Settings, job_id: str, publisher: Any, **kw: Any) -> str:
    return worker_job.execute_job(
        job_id, settings, store=store, publisher_factory=lambda s: publisher, **kw
    )


def test_success_publishes_and_records_the_result(
    store: JobStore, settings: Settings, pipeline: FakePipeline, tmp_path: Path
) -> None:
    job = queued(store)
    publisher = FlakyPublisher(tmp_path / "pub")
    assert run(store, settings, job.id, publisher) == "succeeded"
    rec = store.get(job.id)
    assert rec.state == JobState.succeeded and rec.progress == 1.0
    assert rec.result.repo_id == "org/out" and rec.result.files == [
        "model.safetensors",
        "report.json",
    ]
    assert store.get_report(job.id)["outcome"] == "accepted"
    assert not (settings.job_work_dir() / job.id).exists()
    # Delivered again: a no-op.
    assert run(store, settings, job.id, publisher) == "done"
    assert pipeline.calls == 1 and publisher.calls == 1


def test_transient_publish_error_is_retried_without_rerunning_the_pipeline(
    store: JobStore, settings: Settings, pipeline: FakePipeline, tmp_path: Path
) -> None:
    job = queued(store)
    publisher = FlakyPublisher(tmp_path / "pub", failures=2)
    with pytest.raises(worker_job.PublishRetry) as retry:
        run(store, settings, job.id, publisher, publish_retries_left=2)
    assert retry.value.countdown == settings.publish_retry_backoff_s
    rec = store.get(job.id)
    assert rec.state == JobState.running and rec.owner is None and rec.stage == "publish"
    with pytest.raises(worker_job.PublishRetry) as retry2:
        run(store, settings, job.id, publisher, publish_retries_left=1)
    assert retry2.value.countdown == 2 * settings.publish_retry_backoff_s  # backoff doubles
    assert run(store, settings, job.id, publisher, publish_retries_left=0) == "succeeded"
    assert pipeline.calls == 1 and publisher.calls == 3
    assert store.get(job.id).attempts == 1


def test_publish_retries_exhausted_or_permanent_error_fails(
    store: JobStore, settings: Settings, pipeline: FakePipeline, tmp_path: Path
) -> None:
    job = queued(store)
    assert run(store, settings, job.id, FlakyPublisher(tmp_path / "p1", failures=5)) == "failed"
    rec = store.get(job.id)
    assert rec.error.code == "publish_failed" and rec.error.stage == "publish"
    assert store.get_report(job.id) is not None  # the report is kept for the record

    job2 = queued(store)
    publisher = FlakyPublisher(tmp_path / "p2", failures=1, transient=False)
    assert run(store, settings, job2.id, publisher, publish_retries_left=3) == "failed"
    assert publisher.calls == 1


def test_rejected_report_publishes_nothing(
    store: JobStore, settings: Settings, pipeline: FakePipeline, tmp_path: Path
) -> None:
    pipeline.outcome = "rejected"
    job = queued(store)
    publisher = FlakyPublisher(tmp_path / "pub")
    assert run(store, settings, job.id, publisher) == "rejected"
    rec = store.get(job.id)
    assert rec.state == JobState.rejected and rec.result.repo_id is None
    assert rec.result.report.outcome_reason == "harm loss too low"
    assert publisher.calls == 0 and not (tmp_path / "pub").exists()


def test_pipeline_errors_become_failed_with_code_and_stage(
    store: JobStore, settings: Settings, pipeline: FakePipeline, tmp_path: Path
) -> None:
    pipeline.fail = ModelLoadError("unknown model: org/m was not found on the Hub")
    job = queued(store)
    assert run(store, settings, job.id, FlakyPublisher(tmp_path / "pub")) == "failed"
    error = store.get(job.id).error
    assert (error.code, error.stage) == ("model_not_loadable", "load")
    assert "org/m was not found" in error.message

    pipeline.fail = ZeroDivisionError("secret internals")
    job2 = queued(store)
    assert run(store, settings, job2.id, FlakyPublisher(tmp_path / "pub")) == "failed"
    error = store.get(job2.id).error
    assert error.code == "internal_error" and "secret internals" not in error.message
    assert error.stage == "attribute"


def test_time_limit_is_failed_with_a_reason(
    store: JobStore, settings: Settings, pipeline: FakePipeline, tmp_path: Path
) -> None:
    class Timeout(Exception):
        pass

    pipeline.fail = Timeout()
    job = queued(store)
    outcome = run(
        store, settings, job.id, FlakyPublisher(tmp_path / "pub"), timeout_errors=(Timeout,)
    )
    assert outcome == "failed"
    error = store.get(job.id).error
    assert error.code == "time_limit_exceeded" and "attribute" in error.message


def test_cancel_during_the_run_publishes_nothing(
    store: JobStore, settings: Settings, pipeline: FakePipeline, tmp_path: Path
) -> None:
    job = queued(store)
    pipeline.during = lambda runner: store.request_cancel(job.id, "alpha")
    publisher = FlakyPublisher(tmp_path / "pub")
    assert run(store, settings, job.id, publisher) == "cancelled"
    assert store.get(job.id).state == JobState.cancelled
    assert publisher.calls == 0


def test_cancel_before_start_never_runs(
    store: JobStore, settings: Settings, pipeline: FakePipeline, tmp_path: Path
) -> None:
    job = queued(store)
    store.request_cancel(job.id, "alpha")
    assert run(store, settings, job.id, FlakyPublisher(tmp_path / "pub")) == "done"
    assert pipeline.calls == 0


def test_a_run_that_lost_its_lease_publishes_nothing(
    store: JobStore, settings: Settings, pipeline: FakePipeline, tmp_path: Path
) -> None:
    job = queued(store)

    def taken_over(runner: Any) -> None:  # another worker took the job over meanwhile
        store._update(job.id, lambda r: r.model_copy(update={"owner": Owner.current()}))

    pipeline.during = taken_over
    publisher = FlakyPublisher(tmp_path / "pub")
    assert run(store, settings, job.id, publisher) == "lost"
    assert publisher.calls == 0
    assert store.get(job.id).state == JobState.running  # left to the new owner


def test_progress_is_monotonic_over_the_stages() -> None:
    # every stage at its start, half way and end, in the order the stages run
    values = [worker_job.overall_progress(stage, done, 2) for stage in STAGES for done in (0, 1, 2)]
    assert values == sorted(values) and values[0] == 0 and values[-1] == pytest.approx(1.0)
    assert worker_job.overall_progress("attribute", 0, 0) == worker_job.overall_progress(
        "attribute", 0, 1
    )  # a stage that counts nothing yet is at its start
    assert worker_job.overall_progress("some-new-stage", 1, 2) is None


def test_recovery_sweep_requeues_lost_jobs_and_resends_them(
    store: JobStore, settings: Settings
) -> None:
    import subprocess
    import sys

    from harmprune.workers.client import make_celery, recover_lost_jobs

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    ghost = Owner(host=Owner.current().host, pid=proc.pid, token="gone")
    lost, live, fresh = queued(store), queued(store), queued(store)
    store.claim(lost.id, ghost, 30, 2)
    store.claim(live.id, Owner.current(), 30, 2)
    app = make_celery(settings)
    assert recover_lost_jobs(app, store, settings) == 1
    assert store.get(lost.id).state == JobState.queued
    assert store.get(live.id).state == JobState.running
    assert store.get(fresh.id).state == JobState.queued
    messages = store.r.lrange(f"{settings.key_prefix}:broker:gpu", 0, -1)
    assert len(messages) == 1
    args = json.loads(base64.b64decode(json.loads(messages[0])["body"]))[0]
    assert args == [lost.id]
    assert recover_lost_jobs(app, store, settings) == 0  # settled: nothing more to do
