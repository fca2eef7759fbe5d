"""A worker killed with SIGKILL as a whole (parent and job process, as when its machine dies):
the job is neither lost nor stuck `running`. A new worker takes it over (its start-up sweep
re-sends the job; the broker also re-delivers the unacknowledged message after the short
visibility timeout set here) and the job record decides: the dead owner's run is discarded and
the job re-run. Nothing of the killed run is ever published."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harmprune.output.publishing import JOB_MARKER

from tests.workers.conftest import SLOW_DOMAIN, Stack, make_stack, poll
from tests.workers.test_worker_jobs import assert_hardened

pytestmark = pytest.mark.services


@pytest.fixture
def recovery_stack(tmp_path: Path, tiny_llama: Path) -> Iterator[Stack]:
    with make_stack(
        tmp_path,
        sweep=False,  # the API's periodic sweep is off: recovery comes from the workers alone
        local_model_roots=[tiny_llama.parent],
        visibility_timeout_s=6,
        broker_restore_interval_s=1,
    ) as stack:
        yield stack


def test_whole_worker_sigkilled_then_a_new_worker_reruns_the_job(
    recovery_stack: Stack, tiny_llama: Path
) -> None:
    stack = recovery_stack
    first = stack.start_worker()
    job = stack.submit(tiny_llama, SLOW_DOMAIN, "org/tiny-machine-died")
    stack.wait(job["id"], lambda j: j["stage"] == "elicit", 60, "the job to be eliciting")
    first.kill_all()

    # Dead worker, no new one yet: the record still says running (nobody could know yet) ...
    record = stack.store.get(job["id"])
    assert record.state.value == "running" and record.owner is not None
    assert not stack.published("org/tiny-machine-died").exists()

    # ... until a worker comes back.
    second = stack.start_worker()
    final = poll(
        lambda: (j := stack.job(job["id"]))["state"] in {"succeeded", "failed"} and j,
        150,
        "the job to be re-run by the new worker",
    )
    assert final["state"] == "succeeded", (final, stack.logs())
    assert final["attempts"] == 2
    assert "was lost" in second.log_text()  # the new worker settled the dead run first
    record = stack.store.get(job["id"])
    assert any("was lost" in note and "elicit" in note for note in record.notes), record.notes
    target = stack.published("org/tiny-machine-died")
    assert (target / JOB_MARKER).read_text().strip() == job["id"]
    assert_hardened(tiny_llama, target, final["result"]["report"]["pruned_count"])
