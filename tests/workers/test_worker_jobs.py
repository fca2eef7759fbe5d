"""Jobs through the whole stack (API -> Redis -> `harmprune worker` -> LocalPublisher): success
with the hardened weights published, rejected and cancelled jobs publishing nothing, and a job
whose process is SIGKILLed mid-run being re-run, never stuck `running`, never half-published."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from harmprune.jobs.store import JobState
from harmprune.method.pruning import MASK_FILE
from harmprune.output.publishing import JOB_MARKER
from transformers import AutoModelForCausalLM

from tests.service_stack import bearer
from tests.support.hardening import assert_hardened_weights
from tests.workers.conftest import FAST_DOMAIN, REJECT_DOMAIN, SLOW_DOMAIN, Stack, poll

pytestmark = pytest.mark.services

CHECKPOINT_FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    MASK_FILE,
    "report.json",
    "README.md",
}


def assert_hardened(original_dir: Path, published: Any, expected_pruned: int) -> None:
    """The published weights are exactly the original with the mask's weights zeroed."""
    original = AutoModelForCausalLM.from_pretrained(original_dir, dtype=torch.float32)
    hardened = AutoModelForCausalLM.from_pretrained(published, dtype=torch.float32)
    assert_hardened_weights(original, hardened, Path(published), expected_pruned)


def scratch_of(stack: Stack, job_id: str) -> Path:
    return stack.settings.job_work_dir() / job_id


def test_tiny_job_succeeds_and_publishes_the_hardened_weights(
    stack: Stack, tiny_llama: Path
) -> None:
    job = stack.submit(tiny_llama, FAST_DOMAIN, "org/tiny-fast")
    stages: set[str] = set()
    progress: list[float] = []

    def done() -> dict | None:
        current = stack.job(job["id"])
        if current["stage"]:
            stages.add(current["stage"])
        progress.append(current["progress"])
        return current if current["state"] in {"succeeded", "rejected", "failed"} else None

    final = poll(done, 120, "tiny job to finish")
    assert final["state"] == "succeeded", (final, stack.logs())
    assert progress == sorted(progress) and final["progress"] == 1.0
    assert stages & {"load", "attribute", "save", "publish"}
    result = final["result"]
    assert result["repo_id"] == "org/tiny-fast" and len(result["commit_sha"]) == 64
    assert result["url"] == f"local://org/tiny-fast@{result['commit_sha']}"  # no worker path
    assert result["report"]["outcome"] == "accepted"
    assert final["attempts"] == 1 and final["error"] is None
    assert final["started_at"] <= final["finished_at"]

    target = stack.published("org/tiny-fast")
    assert {p.name for p in target.iterdir()} >= CHECKPOINT_FILES
    assert (target / JOB_MARKER).read_text().strip() == job["id"]
    assert_hardened(tiny_llama, target, result["report"]["pruned_count"])
    assert not scratch_of(stack, job["id"]).exists()  # scratch space is cleaned up

    report = stack.client.get(f"/v1/jobs/{job['id']}/report", headers=bearer()).json()
    assert report["job_id"] == job["id"] and report["outcome"] == "accepted"
    assert report["pruned_count"] == result["report"]["pruned_count"]
    assert str(stack.tmp) not in str(report)  # no local paths in the report


def test_rejected_job_publishes_nothing(stack: Stack, tiny_llama: Path) -> None:
    job = stack.submit(tiny_llama, REJECT_DOMAIN, "org/tiny-rejected")
    final = stack.wait_done(job["id"])
    assert final["state"] == "rejected", (final, stack.logs())
    assert final["result"]["repo_id"] is None and final["result"]["commit_sha"] is None
    assert final["result"]["report"]["outcome"] == "rejected"
    assert "harm" in final["result"]["report"]["outcome_reason"]
    assert not stack.published("org/tiny-rejected").exists()
    report = stack.client.get(f"/v1/jobs/{job['id']}/report", headers=bearer())
    assert report.status_code == 200 and report.json()["outcome"] == "rejected"


def test_cancel_a_running_job_stops_it_and_publishes_nothing(
    stack: Stack, tiny_llama: Path
) -> None:
    job = stack.submit(tiny_llama, SLOW_DOMAIN, "org/tiny-cancelled")
    stack.wait(job["id"], lambda j: j["stage"] == "elicit", 60, "the job to be eliciting")
    r = stack.client.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer())
    assert r.status_code == 202 and r.json()["state"] == "running"
    assert r.json()["cancel_requested"]
    final = stack.wait_done(job["id"], 60)
    assert final["state"] == "cancelled", (final, stack.logs())
    assert final["result"] is None
    assert not stack.published("org/tiny-cancelled").exists()
    assert not scratch_of(stack, job["id"]).exists()


def test_sigkilled_job_process_is_rerun_and_nothing_partial_is_published(
    stack: Stack, tiny_llama: Path
) -> None:
    job = stack.submit(tiny_llama, SLOW_DOMAIN, "org/tiny-killed")
    running = stack.wait(job["id"], lambda j: j["stage"] == "elicit", 60, "the job to be eliciting")
    assert running["state"] == "running" and running["attempts"] == 1
    owner = stack.store.get(job["id"]).owner
    assert owner is not None and owner.pid != stack.workers[0].pid  # the job's own process
    os.kill(owner.pid, signal.SIGKILL)

    seen_states: set[str] = set()

    def finished() -> dict | None:
        current = stack.job(job["id"])
        seen_states.add(current["state"])
        target = stack.published("org/tiny-killed")
        if target.exists():  # only ever the re-run's complete checkpoint, at its publish stage
            assert current["attempts"] == 2, current
            assert current["stage"] == "publish" or current["state"] == "succeeded", current
            assert (target / JOB_MARKER).is_file() and (target / "model.safetensors").is_file()
        return current if current["state"] in {"succeeded", "failed"} else None

    final = poll(finished, 120, "the killed job to be re-run")
    assert final["state"] == "succeeded", (final, stack.logs())
    assert final["attempts"] == 2
    record = stack.store.get(job["id"])
    assert any("was lost" in note for note in record.notes), record.notes
    assert record.state == JobState.succeeded and record.owner is None
    target = stack.published("org/tiny-killed")
    assert (target / JOB_MARKER).read_text().strip() == job["id"]
    assert_hardened(tiny_llama, target, final["result"]["report"]["pruned_count"])
    assert not scratch_of(stack, job["id"]).exists()  # the dead attempt's partial output too
    assert stack.workers[0].proc.poll() is None  # the worker itself lived on
    time.sleep(0.5)
    assert stack.job(job["id"])["state"] == "succeeded"
