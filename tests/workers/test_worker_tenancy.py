"""The tenant policy is checked again on the worker, before any weight is read: a job queued
while its tenant could publish into a namespace, run after the operator withdrew it, fails with
`not_permitted` and publishes nothing (a real worker process, the real API and Redis)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
