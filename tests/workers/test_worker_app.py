"""The Celery app's contract: the registered task names (queued messages must keep finding
their task across deploys), the settings that make long GPU jobs safe, and no torch in the
worker's parent process."""

from __future__ import annotations

import subprocess
import sys

import pytest
from harmprune.jobs.audits import RUN_AUDIT
from harmprune.settings import Settings
from harmprune.workers.client import QUEUES, RUN_JOB, make_celery

from tests.service_stack import ROOT


def test_registered_task_names_are_pinned() -> None:
    from harmprune.workers.app import app

    app.loader.import_default_modules()
    assert sorted(n for n in app.tasks if not n.startswith("celery.")) == [RUN_AUDIT, RUN_JOB]
    assert RUN_JOB == "harmprune.run_job"
    assert RUN_AUDIT == "harmprune.run_audit"


def test_celery_settings_for_long_gpu_jobs() -> None:
    settings = Settings(key_prefix="hp-x", visibility_timeout_s=9000, job_soft_time_limit_s=7200)
    conf = make_celery(settings).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_max_tasks_per_child == 1 and conf.worker_concurrency == 1
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.task_ignore_result
    assert {q.name for q in conf.task_queues} == set(QUEUES) == {"gpu", "gpu-multi", "cpu"}
    for queue in conf.task_queues:  # one exchange per queue: a job lands in exactly one
        assert queue.exchange.name == queue.routing_key == queue.name
    transport = conf.broker_transport_options
    assert transport["visibility_timeout"] == 9000
    assert transport["global_keyprefix"] == "hp-x:broker:"


def test_task_options() -> None:
    from harmprune.workers.tasks import run_job, settings

    assert run_job.acks_late and run_job.reject_on_worker_lost
    assert run_job.soft_time_limit == settings.job_soft_time_limit_s
    assert run_job.time_limit == settings.job_soft_time_limit_s + settings.job_time_limit_grace_s
    assert run_job.max_retries == settings.publish_max_retries


def test_the_task_refuses_a_payload_that_is_not_a_job_id() -> None:
    from harmprune.workers.tasks import run_job

    for bad in ["", "x" * 32, "../../etc", 42]:
        with pytest.raises(ValueError, match="invalid job id"):
            run_job.run(bad)


def test_worker_parent_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "import harmprune.workers.app, harmprune.workers.tasks, harmprune.cli.service\n"
        "harmprune.workers.app.app.loader.import_default_modules()\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["worker", "--queues", "tpu"], "--queues"),
        (["worker", "--queues", "gpu", "--concurrency", "2"], "one job at a time"),
        (["submit", "--model", "m", "--domain", "cyber", "--repo-id", "a/b"], "HARMPRUNE_API_KEY"),
        (["status", "0" * 32], "HARMPRUNE_API_KEY"),
    ],
)
def test_service_commands_fail_clearly(
    argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from harmprune.cli.main import EXIT_USER_ERROR, main

    monkeypatch.delenv("HARMPRUNE_API_KEY", raising=False)
    assert main(argv) == EXIT_USER_ERROR
    assert message in capsys.readouterr().err
