"""The job store against the real Redis (an isolated key prefix on db 15): records, indexes,
idempotency, atomic transitions and what a re-delivered task decides; and records surviving a
Redis restart (a redis-server this test starts itself, with an append-only file)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from harmprune.jobs.store import (
    IdempotencyConflict,
    JobError,
    JobRecord,
    JobResult,
    JobState,
    JobStore,
    NotCancellable,
    Owner,
    QuotaRefusal,
    ReportSummary,
    fingerprint,
    new_job_id,
)

from tests.service_stack import Namespace, RedisServer, redis_namespace
from tests.support.job_records import job_record

pytestmark = pytest.mark.services

LEASE = 30.0


@pytest.fixture
def ns(redis_url: str) -> Iterator[Namespace]:
    with redis_namespace("jobs", redis_url) as namespace:
        yield namespace


@pytest.fixture
def store(ns: Namespace) -> JobStore:
    return JobStore(ns.client, ns.prefix)


def make_record(
    tenant: str = "alpha", body: object = None, created: float | None = None
) -> JobRecord:
    now = created or time.time()
    return job_record(
        tenant=tenant,
        created_at=now,
        updated_at=now,
        queue="cpu",
        config={"model": "org/model", "revision": None},
        fingerprint=fingerprint(body if body is not None else {"n": 1}),
    )


def dead_owner() -> Owner:
    """An owner on this host whose process has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return Owner(host=Owner.current().host, pid=proc.pid, started=None, token="gone")


def remote_owner() -> Owner:
    return Owner(host="another-host.invalid", pid=1, token="far")


def summary() -> ReportSummary:
    return ReportSummary(outcome="accepted", scored_count=100, pruned_count=3, pruned_fraction=0.03)


def test_create_get_and_tenant_isolation(store: JobStore) -> None:
    rec, created = store.create(make_record("alpha"))
    assert created
    assert store.get(rec.id) == rec
    assert store.get(rec.id, "alpha") == rec
    assert store.get(rec.id, "beta") is None  # another tenant's job does not exist for it
    assert store.get(new_job_id()) is None
    assert store.list_jobs("beta") == ([], 0)


def test_idempotency_same_body_same_job_other_body_conflict(store: JobStore) -> None:
    first, created = store.create(make_record(body={"a": 1}), "key-1")
    again, created_again = store.create(make_record(body={"a": 1}), "key-1")
    assert created and not created_again
    assert again.id == first.id
    with pytest.raises(IdempotencyConflict) as info:
        store.create(make_record(body={"a": 2}), "key-1")
    assert info.value.job_id == first.id
    other_tenant, created_other = store.create(make_record("beta", body={"a": 1}), "key-1")
    assert created_other and other_tenant.id != first.id  # keys are per tenant
    assert store.get(first.id).idempotency_key != "key-1"  # only its hash is stored


def test_admit_is_create_within_the_quotas_in_one_round_trip(store: JobStore) -> None:
    limits = {"concurrent_jobs": 2, "jobs_per_day": 3}
    first, created = store.admit(make_record(body={"a": 1}), **limits, idempotency_key="k")
    assert created and store.get(first.id) == first
    assert store.active_count("alpha") == 1 and store.list_jobs("alpha")[1] == 1
    # A replay of the same key and body: the same job, no quota taken; another body: refused.
    again, created_again = store.admit(make_record(body={"a": 1}), **limits, idempotency_key="k")
    assert (again.id, created_again) == (first.id, False)
    with pytest.raises(IdempotencyConflict) as conflict:
        store.admit(make_record(body={"a": 2}), **limits, idempotency_key="k")
    assert conflict.value.job_id == first.id
    second, _ = store.admit(make_record(), **limits)
    with pytest.raises(QuotaRefusal) as busy:  # two active: the concurrent quota
        store.admit(make_record(), **limits)
    assert (busy.value.kind, busy.value.active) == ("concurrent", 2)
    assert store.active_count("alpha") == 2  # nothing stored for the refused one
    store.request_cancel(first.id, "alpha")
    store.admit(make_record(), **limits)  # job 3 of the day
    store.request_cancel(second.id, "alpha")
    with pytest.raises(QuotaRefusal) as daily:
        store.admit(make_record(), **limits)
    assert daily.value.kind == "daily"
    assert store.take_daily_job("alpha", 4)  # the refused one was not counted: 3, now 4
    assert not store.take_daily_job("alpha", 4)
    assert store.admit(make_record("beta"), **limits)[1]  # quotas are per tenant


def test_idempotency_under_concurrency_creates_one_job(store: JobStore) -> None:
    ids: list[str] = []
    lock = threading.Lock()

    def submit() -> None:
        rec, _ = store.create(make_record(body={"same": True}), "race")
        with lock:
            ids.append(rec.id)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1
    assert store.list_jobs("alpha")[1] == 1


def test_list_newest_first_paginated_and_filtered(store: JobStore) -> None:
    base = time.time()
    recs = [store.create(make_record(created=base + i))[0] for i in range(5)]
    page, total = store.list_jobs("alpha", limit=2)
    assert total == 5 and [r.id for r in page] == [recs[4].id, recs[3].id]
    page2, _ = store.list_jobs("alpha", offset=2, limit=2)
    assert [r.id for r in page2] == [recs[2].id, recs[1].id]
    store.request_cancel(recs[0].id, "alpha")
    cancelled, n = store.list_jobs("alpha", JobState.cancelled)
    assert n == 1 and cancelled[0].id == recs[0].id
    assert store.list_jobs("alpha", JobState.queued)[1] == 4
    assert store.counts()[JobState.queued] == 4


def test_claim_queued_runs_and_redelivery_of_live_job_is_a_duplicate(store: JobStore) -> None:
    rec, _ = store.create(make_record())
    me = Owner.current()
    claim = store.claim(rec.id, me, LEASE, max_attempts=2)
    assert claim.kind == "run" and claim.should_run
    assert claim.record.state == JobState.running and claim.record.attempts == 1
    # The same message delivered again while this process holds a live lease: drop it.
    again = store.claim(rec.id, Owner.current(), LEASE, max_attempts=2)
    assert again.kind == "duplicate" and not again.should_run
    assert store.get(rec.id).owner == me
    # A remote owner with a live lease is trusted too.
    rec2, _ = store.create(make_record())
    store.claim(rec2.id, remote_owner(), LEASE, max_attempts=2)
    assert store.claim(rec2.id, me, LEASE, max_attempts=2).kind == "duplicate"


def test_claim_missing_and_terminal_are_noops(store: JobStore) -> None:
    assert store.claim(new_job_id(), Owner.current(), LEASE, 2).kind == "missing"
    rec, _ = store.create(make_record())
    owner = Owner.current()
    store.claim(rec.id, owner, LEASE, 2)
    assert store.finish(rec.id, owner, JobState.succeeded, result=JobResult(report=summary()))
    claim = store.claim(rec.id, Owner.current(), LEASE, 2)
    assert claim.kind == "done" and claim.record.state == JobState.succeeded


def test_dead_owner_on_this_host_is_rerun_then_failed_with_reason(store: JobStore) -> None:
    rec, _ = store.create(make_record())
    ghost = dead_owner()
    store.claim(rec.id, ghost, LEASE, max_attempts=2)  # lease still valid, but the pid is gone
    store.heartbeat(rec.id, ghost, LEASE, stage="attribute", done=3, total=10, progress=0.4)
    claim = store.claim(rec.id, Owner.current(), LEASE, max_attempts=2)
    assert claim.kind == "rerun", claim.reason
    assert claim.record.attempts == 2 and claim.record.progress == 0.0
    assert "lost" in claim.record.notes[-1] and "attribute" in claim.record.notes[-1]

    # The second attempt dies too: no attempts left -> failed, with the reason.
    store._update(rec.id, lambda r: r.model_copy(update={"owner": dead_owner()}))
    final = store.claim(rec.id, Owner.current(), LEASE, max_attempts=2)
    assert final.kind == "failed"
    assert final.record.state == JobState.failed
    assert final.record.error.code == "worker_lost"
    assert "nothing was published" in final.record.error.message
    assert final.record.owner is None


def test_expired_lease_of_a_remote_owner_is_rerun(store: JobStore) -> None:
    rec, _ = store.create(make_record())
    store.claim(rec.id, remote_owner(), lease_s=0.05, max_attempts=3)
    time.sleep(0.1)
    assert store.claim(rec.id, Owner.current(), LEASE, max_attempts=3).kind == "rerun"


def test_only_the_owner_moves_a_running_job(store: JobStore) -> None:
    rec, _ = store.create(make_record())
    owner, other = Owner.current(), remote_owner()
    store.claim(rec.id, owner, LEASE, 2)
    assert not store.heartbeat(rec.id, other, LEASE, stage="elicit", progress=0.5)
    assert not store.finish(rec.id, other, JobState.succeeded)
    assert store.heartbeat(rec.id, owner, LEASE, stage="elicit", done=1, total=2, progress=0.2)
    assert store.heartbeat(rec.id, owner, LEASE, stage="elicit", done=0, total=2, progress=0.1)
    got = store.get(rec.id)
    assert (got.stage, got.stage_done, got.stage_total) == ("elicit", 0, 2)
    assert got.progress == 0.2  # never goes backwards
    assert store.finish(rec.id, owner, JobState.failed, error=JobError(code="x", message="boom"))
    assert not store.finish(rec.id, owner, JobState.succeeded)  # terminal stays terminal
    assert store.get(rec.id).state == JobState.failed


def test_cancel_queued_running_and_finished(store: JobStore) -> None:
    queued, _ = store.create(make_record())
    got = store.request_cancel(queued.id, "alpha")
    assert got.state == JobState.cancelled and got.finished_at is not None
    assert store.claim(queued.id, Owner.current(), LEASE, 2).kind == "done"
    assert store.request_cancel(queued.id, "beta") is None  # not visible to another tenant
    with pytest.raises(NotCancellable):
        store.request_cancel(queued.id, "alpha")

    running, _ = store.create(make_record())
    owner = Owner.current()
    store.claim(running.id, owner, LEASE, 2)
    assert not store.cancel_requested(running.id)
    got = store.request_cancel(running.id, "alpha")
    assert got.state == JobState.running and got.cancel_requested
    assert store.cancel_requested(running.id)
    # A cancelled job whose worker died is cancelled, not re-run.
    store._update(running.id, lambda r: r.model_copy(update={"owner": dead_owner()}))
    assert store.claim(running.id, Owner.current(), LEASE, 2).kind == "cancelled"
    assert store.get(running.id).state == JobState.cancelled


def test_release_then_resume(store: JobStore) -> None:
    rec, _ = store.create(make_record())
    owner = Owner.current()
    store.claim(rec.id, owner, LEASE, 2)
    assert store.set_checkpoint(rec.id, owner, "/scratch/x")
    assert store.release(rec.id, owner, "publish failed (transient)")
    got = store.get(rec.id)
    assert got.state == JobState.running and got.owner is None and got.publish_attempts == 1
    claim = store.claim(rec.id, Owner.current(), LEASE, 2)
    assert claim.kind == "resume" and claim.record.checkpoint_dir == "/scratch/x"
    assert claim.record.attempts == 1  # a publish retry is not a new run


def test_report_and_delete(store: JobStore, ns: Namespace) -> None:
    rec, _ = store.create(make_record(), "del-key")
    owner = Owner.current()
    store.claim(rec.id, owner, LEASE, 2)
    with pytest.raises(NotCancellable):
        store.delete(rec.id, "alpha")
    assert store.get_report(rec.id) is None
    store.finish(
        rec.id, owner, JobState.succeeded, result=JobResult(report=summary()), report={"a": 1}
    )
    assert store.get_report(rec.id, "alpha") == {"a": 1}
    assert store.get_report(rec.id, "beta") is None
    assert store.delete(rec.id, "beta") is None
    assert store.delete(rec.id, "alpha").id == rec.id
    assert store.get(rec.id) is None and store.get_report(rec.id) is None
    assert store.list_jobs("alpha") == ([], 0)
    assert sum(store.counts().values()) == 0
    assert ns.keys() == []  # nothing left behind, the idempotency key included
    again, created = store.create(make_record(), "del-key")
    assert created and again.id != rec.id


def test_needs_requeue_finds_lost_jobs_only(store: JobStore) -> None:
    old, _ = store.create(make_record(created=time.time() - 7200))
    fresh, _ = store.create(make_record())
    live, _ = store.create(make_record())
    store.claim(live.id, Owner.current(), LEASE, 2)
    lost, _ = store.create(make_record())
    store.claim(lost.id, dead_owner(), LEASE, 2)
    found = {r.id for r in store.needs_requeue(time.time(), queued_after_s=3600)}
    assert found == {old.id, lost.id}
    store.mark_enqueued(old.id)
    assert {r.id for r in store.needs_requeue(time.time(), 3600)} == {lost.id}
    assert fresh.id not in found and live.id not in found


def test_requeue_lost_settles_a_dead_run(store: JobStore) -> None:
    rec, _ = store.create(make_record())
    live, _ = store.create(make_record())
    store.claim(live.id, Owner.current(), LEASE, 2)
    assert store.requeue_lost(live.id, max_attempts=2) is None  # not lost: untouched
    ghost = dead_owner()
    store.claim(rec.id, ghost, LEASE, 2)
    store.heartbeat(rec.id, ghost, LEASE, stage="elicit", done=1, total=4, progress=0.1)
    requeued = store.requeue_lost(rec.id, max_attempts=2)
    assert requeued.state == JobState.queued and requeued.owner is None
    assert requeued.progress == 0 and requeued.stage is None and requeued.attempts == 1
    assert "elicit" in requeued.notes[-1]
    claim = store.claim(rec.id, Owner.current(), LEASE, 2)
    assert claim.kind == "run" and claim.record.attempts == 2
    store._update(rec.id, lambda r: r.model_copy(update={"owner": dead_owner()}))
    failed = store.requeue_lost(rec.id, max_attempts=2)
    assert failed.state == JobState.failed and failed.error.code == "worker_lost"


def test_records_survive_a_redis_restart(tmp_path: Path) -> None:
    """Job records (and their indexes) are kept by a Redis with an append-only file, even when
    the server is killed without a chance to save."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        with redis_namespace("restart", f"redis://127.0.0.1:{server.port}/0") as ns:
            store = JobStore(ns.client, ns.prefix)
            queued, _ = store.create(make_record(), "restart-key")
            done, _ = store.create(make_record())
            owner = Owner.current()
            store.claim(done.id, owner, LEASE, 2)
            store.finish(
                done.id,
                owner,
                JobState.succeeded,
                result=JobResult(report=summary()),
                report={"r": 1},
            )
            server.kill()
            with pytest.raises(redis.ConnectionError):
                store.get(queued.id)
            server.start()
            assert store.get(queued.id).state == JobState.queued
            assert store.get(done.id).state == JobState.succeeded
            assert store.get_report(done.id) == {"r": 1}
            assert store.list_jobs("alpha")[1] == 2
            assert store.create(make_record(), "restart-key")[0].id == queued.id
            assert store.claim(queued.id, Owner.current(), LEASE, 2).kind == "run"
    finally:
        server.stop()
