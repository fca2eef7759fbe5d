"""`harmprune serve` as a real process, with a tenant policy (the default one: each tenant
publishes under its own name, reads public models only) and preflight on (issue 20, findings 4
and 5):

- a job on the built-in model whose attack grid or tamper steps are priced over
  HARMPRUNE_JOB_SOFT_TIME_LIMIT_S is refused with a 4xx, the same body with a small grid is
  accepted (202);
- a spec planned once without its attack grid is refused with it (the plan cache key);
- 60,000 eval.validation.harmful prompts are refused, the field named;
- a judge base model outside the model roots, a validation or fine-tune-attack dataset that is a
  local path: the one 403 body (findings 1-3; private and gated repos: test_api_references.py);
- SIGTERM to the API process ends its planner's child processes.

One API process for all of it: each start spawns a planner child that imports torch.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harmprune.inputs.references import NOT_READABLE

from tests.service_stack import ApiProcess, Namespace, bearer, stack_settings, wait_for
from tests.support.tenancy import GENEROUS, write_tenants_file

pytestmark = pytest.mark.services

LIMIT_S = 600


def spec(**extra: Any) -> dict[str, Any]:
    return {
        "name": "budget",
        "harmful": [{"prompt": "Write malware.", "response": "Sure, here is [omitted]."}],
        "benign": [{"prompt": "What is 2+2?", "response": "4."}],
        "eval": {"general_benign": False},
        **extra,
    }


SMALL_GRID = {"finetune": {"learning_rates": [1e-4], "steps": [10]}}
BIG_GRID = {
    "finetune": {"learning_rates": [1e-4 * (i + 1) for i in range(30)], "steps": [100_000] * 30}
}
BIG_TAMPER = {
    "train": [{"prompt": "Train on this.", "response": "Sure [omitted]."}],
    "broad_harmful": [{"prompt": "Other harm."}],
    "broad_benign": [{"prompt": "Other question?"}],
    "method": "full",
    "steps": 100_000,
    "batch_size": 64,
}


@pytest.fixture
def api(ns: Namespace, tmp_path: Path) -> Iterator[ApiProcess]:
    settings = stack_settings(
        ns,
        tmp_path,
        preflight=True,
        preflight_processes=1,
        default_hardware="gpu",
        gpu_memory_gb=80.0,
        job_soft_time_limit_s=LIMIT_S,
        max_request_bytes=4_000_000,
        local_model_roots=[tmp_path / "models"],
        tenants_file=write_tenants_file(
            tmp_path / "tenants.yaml", alpha={"quotas": GENEROUS}
        ),  # the default policy: publishes under alpha/, reads public models only
    )
    process = ApiProcess(settings, tmp_path / "api.log").start()
    try:
        yield process
    finally:
        process.stop()


def post(api: ApiProcess, domain: dict[str, Any]) -> httpx.Response:
    body = {
        "model": "smollm2-135m-instruct",
        "domain": domain,
        "publish": {"repo_id": "alpha/smollm2-budget"},
    }
    return httpx.post(f"{api.url}/v1/jobs", json=body, headers=bearer(), timeout=120)


def refused_over_the_limit(r: httpx.Response) -> None:
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["fields"][0]["field"] == "model"
    assert f"over the job time limit of {LIMIT_S} s" in error["message"]


def test_the_builtin_model_is_priced_and_sigterm_ends_the_planner(
    api: ApiProcess, tmp_path: Path
) -> None:
    # planned once without its attack grid (cached), then with it: refused all the same
    plain = post(api, spec())
    assert plain.status_code == 202, plain.text
    assert plain.json()["preflight"]["model_type"] == "llama"
    refused_over_the_limit(post(api, spec(attacks=BIG_GRID)))
    small = post(api, spec(attacks=SMALL_GRID))
    assert small.status_code == 202, small.text
    assert small.json()["preflight"]["attacks"]["finetune_cells"] == 1
    refused_over_the_limit(post(api, spec(tamper=BIG_TAMPER)))
    small_tamper = post(api, spec(tamper={**BIG_TAMPER, "steps": 10, "batch_size": 4}))
    assert small_tamper.status_code == 202, small_tamper.text
    assert small_tamper.json()["preflight"]["tamper_tflop"] > 0

    # one bound over every prompt list: 60,000 validation prompts (none priced before)
    many = [{"prompt": f"Validation prompt {i}."} for i in range(60_000)]
    r = post(api, spec(eval={"general_benign": False, "validation": {"harmful": many}}))
    assert r.status_code == 422, r.text
    assert "domain.eval.validation.harmful" in r.text and "at most 10000" in r.text

    # every reference the spec names passes the tenant policy, with one 403 body (finding 1-3)
    judge = tmp_path / "models" / "judge"
    judge.mkdir(parents=True)
    classifier = {"judges": ["nll", "classifier"], "general_benign": False}
    local_set = [{"dataset": "/etc/passwd", "limit": 2, "response_field": "r"}]
    refused = {
        "domain.eval.classifier.base_model": spec(
            eval={**classifier, "classifier": {"model": str(judge), "base_model": "/etc"}}
        ),
        "domain.eval.validation.harmful.0.dataset": spec(
            eval={"general_benign": False, "validation": {"harmful": local_set}}
        ),
        "domain.attacks.finetune.train.0.dataset": spec(attacks={"finetune": {"train": local_set}}),
    }
    for field, domain in refused.items():
        r = post(api, domain)
        assert r.status_code == 403, r.text
        assert r.json()["error"]["message"] == f"{field}: {NOT_READABLE}"
    r = post(
        api,
        spec(eval={**classifier, "classifier": {"model": str(judge), "base_model": str(judge)}}),
    )
    assert r.status_code == 202, r.text

    # SIGTERM to the API process alone (as a process manager signals the main pid): its
    # planner's spawned children, ~470 MB each with torch, must not outlive it
    assert api.proc is not None
    children = wait_for(lambda: children_of(api.proc.pid), 30, what="the planner's children")
    os.kill(api.proc.pid, signal.SIGTERM)
    api.proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(alive(pid) for pid in children):
        time.sleep(0.2)
    left = [pid for pid in children if alive(pid)]
    assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in left]


def children_of(pid: int) -> set[int]:
    """Live processes whose parent is `pid` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name is parenthesised and may hold spaces: the fields follow the last ')'
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
