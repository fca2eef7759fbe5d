"""The tenant policy is checked again on the worker, before any weight is read: a job queued
while its tenant could publish into a namespace, run after the operator withdrew it, fails with
`not_permitted` and publishes nothing (a real worker process, the real API and Redis)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from harmprune.inputs.references import NOT_READABLE

from tests.support.tenancy import write_tenants_file
from tests.workers.conftest import FAST_DOMAIN, make_stack

pytestmark = pytest.mark.services


def test_the_worker_checks_the_policy_again_before_loading(
    tmp_path: Path, tiny_llama: Path
) -> None:
    with make_stack(tmp_path, sweep=False, local_model_roots=[tiny_llama.parent]) as stack:
        job = stack.submit(tiny_llama, FAST_DOMAIN, "org/tiny-withdrawn")  # allowed now
        assert stack.settings.tenants_file is not None
        write_tenants_file(  # the operator withdraws alpha's grant of the `org` namespace
            stack.settings.tenants_file, alpha={"publish_namespaces": ["alpha"]}
        )
        stack.start_worker()
        final = stack.wait_done(job["id"], 120)
        assert final["state"] == "failed", (final, stack.logs())
        assert final["error"]["code"] == "not_permitted"
        assert "publish.repo_id" in final["error"]["message"]
        assert final["attempts"] == 1
        assert not stack.published("org/tiny-withdrawn").exists()


def test_the_worker_refuses_a_judge_base_model_outside_its_roots_before_loading(
    tmp_path: Path, tiny_llama: Path
) -> None:
    """The worker's permit is the guarantee: a judge base model the API could see (a second
    model root) but this worker's operator does not allow fails the job with the API's own
    answer, `not_permitted` on the field, before any model is loaded; nothing is published."""
    models, judges = tmp_path / "models", tmp_path / "judges"
    model = models / "tiny"
    shutil.copytree(tiny_llama, model)
    shutil.copytree(tiny_llama, judges / "judge")
    domain = {
        **FAST_DOMAIN,
        "eval": {
            **FAST_DOMAIN["eval"],
            "judges": ["nll", "classifier"],
            "classifier": {"model": str(model), "base_model": str(judges / "judge")},
        },
    }
    with make_stack(tmp_path, sweep=False, local_model_roots=[models, judges]) as stack:
        job = stack.submit(model, domain, "org/tiny-judged")  # the API's roots allow it
        stack.start_worker({"HARMPRUNE_LOCAL_MODEL_ROOTS": json.dumps([str(models)])})
        final = stack.wait_done(job["id"], 120)
        assert final["state"] == "failed", (final, stack.logs())
        field = "domain.eval.classifier.base_model"
        assert final["error"] == {
            "code": "not_permitted",
            "message": f"{field}: {NOT_READABLE}",
            "stage": final["error"]["stage"],
        }
        assert final["stage"] == "load" and final["progress"] == 0, final
        assert not stack.published("org/tiny-judged").exists()
