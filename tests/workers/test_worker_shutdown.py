"""Operations that must not cost a healthy job anything, with real worker processes:

- SIGTERM to a worker (a rollout): the running job stops at its next batch boundary, goes back
  to the queue WITHOUT spending an attempt, and another worker runs it to the end.
- A Redis restart mid-job, shorter than the lease (a private redis-server with an append-only
  file, killed and started again on the same port): progress is buffered and flushed, cancel
  checks read "not cancelled", and the job succeeds on its first attempt.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from harmprune.api.main import create_app
from harmprune.output.publishing import JOB_MARKER

from tests.service_stack import RedisServer, redis_namespace, stack_settings
from tests.support.tenancy import write_tenants_file
from tests.workers.conftest import SLOW_DOMAIN, Stack, make_stack, poll
from tests.workers.test_worker_jobs import assert_hardened

pytestmark = pytest.mark.services


def test_sigterm_requeues_the_running_job_without_spending_an_attempt(
    tmp_path: Path, tiny_llama: Path
) -> None:
    with make_stack(tmp_path, sweep=False, local_model_roots=[tiny_llama.parent]) as stack:
        first = stack.start_worker()
        job = stack.submit(tiny_llama, SLOW_DOMAIN, "org/tiny-rollout")
        stack.wait(job["id"], lambda j: j["stage"] == "elicit", 90, "the job to be eliciting")
        assert stack.job(job["id"])["attempts"] == 1
        first.stop(timeout=60)  # SIGTERM: Celery's warm shutdown
        assert first.proc is not None and first.proc.returncode is not None
        record = stack.store.get(job["id"])
        assert record is not None
        assert record.state.value == "queued" and record.attempts == 0, record
        assert any("SIGTERM" in note for note in record.notes), record.notes
        assert not stack.published("org/tiny-rollout").exists()

        stack.start_worker()  # the next worker takes the re-sent message
        final = stack.wait_done(job["id"], 180)
        assert final["state"] == "succeeded", (final, stack.logs())
        assert final["attempts"] == 1  # the rollout cost the job nothing
        target = stack.published("org/tiny-rollout")
        assert (target / JOB_MARKER).read_text().strip() == job["id"]
        assert_hardened(tiny_llama, target, final["result"]["report"]["pruned_count"])


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


def test_a_redis_restart_mid_job_does_not_fail_it(
    private_redis: RedisServer, tmp_path: Path, tiny_llama: Path
) -> None:
    with redis_namespace("outage", f"redis://127.0.0.1:{private_redis.port}/0") as ns:
        settings = stack_settings(
            ns,
            tmp_path,
            preflight=True,
            local_model_roots=[tiny_llama.parent],
            tenants_file=write_tenants_file(tmp_path / "tenants.yaml"),
            lease_s=20.0,  # the outage below is a few seconds: shorter than the lease
            visibility_timeout_s=600,
        )
        with TestClient(create_app(settings, sweep=False)) as client:
            stack = Stack(ns, settings, tmp_path, client)
            try:
                stack.start_worker()
                job = stack.submit(tiny_llama, SLOW_DOMAIN, "org/tiny-outage")
                stack.wait(job["id"], lambda j: j["stage"] == "elicit", 90, "eliciting")
                private_redis.kill()  # SIGKILL: only the append-only file survives
                time.sleep(3)
                private_redis.start()  # same port, same data directory

                def settled() -> dict | None:
                    with contextlib.suppress(AssertionError):
                        current = stack.job(job["id"])
                        if current["state"] in {"succeeded", "failed", "cancelled"}:
                            return current
                    return None

                final = poll(settled, 240, "the job to end after the Redis restart")
                assert final["state"] == "succeeded", (final, stack.logs())
                assert final["attempts"] == 1 and final["progress"] == 1.0
                assert "unreachable" in stack.logs()  # the outage was seen, and ridden out
                assert (stack.published("org/tiny-outage") / JOB_MARKER).is_file()
            finally:
                stack.stop()
