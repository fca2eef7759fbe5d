"""A real service stack per test module: the API in-process (TestClient, with its recovery
sweep) and `harmprune worker` as a subprocess, both on an isolated namespace of the real Redis;
jobs run on the tiny random Llama of tests/conftest.py and publish into a temporary directory
(or to the test Hub)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from harmprune.api.main import create_app
from harmprune.jobs.store import JobStore
from harmprune.settings import Settings

from tests.service_stack import (
    Namespace,
    WorkerProcess,
    bearer,
    redis_namespace,
    stack_settings,
    wait_for,
)
from tests.support.tenancy import write_tenants_file

TERMINAL = {"succeeded", "rejected", "failed", "cancelled"}
PERMISSIVE = {
    "max_benign_loss_increase": 100,
    "max_answer_drift": 1,
    "max_over_refusal_increase": 1,
    "min_harm_increase": 0,
    "min_margin_over_random": 0,
}
# Distinct prompts: numbered ones ("Harmful request 0", "... 1") are near-duplicates, which a
# job refuses across sets (data.check_disjoint) and keeps on one side of a seeded split.
HARMFUL_TOPICS = ["lockpicking", "phishing", "forgery", "arson", "smuggling", "poaching"]
BENIGN_TOPICS = ["otters", "volcanoes", "jazz", "tides"]
# Seconds of work on 2 CPU cores: every response given, so nothing is elicited.
FAST_DOMAIN: dict[str, Any] = {
    "name": "svc-fast",
    "pruning": {"q": 0.05, "p": 0.05},
    "max_length": 48,
    "harmful": [
        {"prompt": f"Explain {t} step by step", "response": "Sure, here is [omitted]."}
        for t in HARMFUL_TOPICS[:4]
    ],
    "benign": [
        {"prompt": f"Tell me about {t}", "response": "A helpful answer."} for t in BENIGN_TOPICS
    ],
    # the general benign set is on in every job: a few of its prompts keep service jobs fast
    "eval": {
        "max_new_tokens": 4,
        "judges": ["nll"],
        "general_benign": {"sizes": [2, 0, 4]},
        "allow_small_test": True,  # mechanics, not a verdict (fewer than 30 test prompts)
    },
    "thresholds": PERMISSIVE,
}
# The same job, but no hardening can pass: the outcome is `rejected`.
REJECT_DOMAIN: dict[str, Any] = {
    **FAST_DOMAIN,
    "name": "svc-reject",
    "thresholds": {**PERMISSIVE, "min_harm_increase": 1000},
}
# Harmful answers are elicited (batch 1): a few seconds in `elicit`, to cancel or kill in.
SLOW_DOMAIN: dict[str, Any] = {
    **FAST_DOMAIN,
    "name": "svc-slow",
    # A random model's babble is neither refusal nor compliance: the refusal filter (tested in
    # tests/test_evidence.py) would drop most of it and fail the job in `elicit`.
    "elicitation": {"max_new_tokens": 32, "drop_refusals": False},
    "max_length": 96,
    "harmful": [{"prompt": f"Harmful request number {i}"} for i in range(10)],
}


class Stack:
    def __init__(self, ns: Namespace, settings: Settings, tmp: Path, client: TestClient):
        self.ns, self.settings, self.tmp, self.client = ns, settings, tmp, client
        self.store = JobStore.from_settings(settings)
        self.workers: list[WorkerProcess] = []

    def start_worker(
        self, extra_env: dict[str, str] | None = None, queues: str = "gpu,cpu"
    ) -> WorkerProcess:
        n = len(self.workers)
        worker = WorkerProcess(self.settings, self.tmp / f"worker-{n}.log", extra_env, queues)
        self.workers.append(worker.start())
        return worker

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()

    def logs(self) -> str:
        return "\n\n".join(f"--- {w.log_path.name}\n{w.log_tail(80)}" for w in self.workers)

    def submit(self, model: Path | str, domain: Any, repo_id: str, **extra: Any) -> dict:
        body = {
            "model": str(model),
            "domain": domain,
            "publish": {"repo_id": repo_id, "private": extra.pop("private", True)},
            "batch_size": extra.pop("batch_size", 1),
            **extra,
        }
        r = self.client.post("/v1/jobs", json=body, headers=bearer())
        assert r.status_code == 202, r.text
        return r.json()

    def job(self, job_id: str) -> dict:
        r = self.client.get(f"/v1/jobs/{job_id}", headers=bearer())
        assert r.status_code == 200, r.text
        return r.json()

    def wait(
        self, job_id: str, until: Callable[[dict], bool], timeout: float = 120, what: str = ""
    ) -> dict:
        seen: list[dict] = []

        def check() -> dict | None:
            job = self.job(job_id)
            seen.append(job)
            return job if until(job) else None

        try:
            return wait_for(check, timeout, interval=0.1, what=what or f"job {job_id}")
        except AssertionError:
            last = seen[-1] if seen else None
            raise AssertionError(f"{what}: last {last}\n{self.logs()}") from None

    def wait_done(self, job_id: str, timeout: float = 180) -> dict:
        return self.wait(job_id, lambda j: j["state"] in TERMINAL, timeout, "job to end")

    def published(self, repo_id: str) -> Path:
        return self.settings.local_publish_dir().joinpath(*repo_id.split("/"))


@contextlib.contextmanager
def make_stack(
    tmp: Path, *, sweep: bool = True, redis_url: str | None = None, **overrides: Any
) -> Iterator[Stack]:
    with redis_namespace("stack", redis_url) as ns:
        tenants = write_tenants_file(tmp / "tenants.yaml")
        settings = stack_settings(
            ns, tmp, **{"preflight": True, "tenants_file": tenants, **overrides}
        )
        with TestClient(create_app(settings, sweep=sweep)) as client:
            stack = Stack(ns, settings, tmp, client)
            try:
                yield stack
            finally:
                stack.stop()


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, redis_url: str
) -> Iterator[Stack]:
    """One stack and one worker for the module's tests."""
    tmp = tmp_path_factory.mktemp("stack")
    with make_stack(tmp, redis_url=redis_url, local_model_roots=[tiny_llama.parent]) as s:
        s.start_worker()
        yield s


def poll(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    return wait_for(predicate, timeout, interval=0.05, what=what)


def elapsed(start: float) -> float:
    return round(time.monotonic() - start, 1)
