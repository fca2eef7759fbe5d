"""The multi-GPU worker kind, on CPU: a real `harmprune worker --queues gpu-multi` process runs a
job the API routed to gpu-multi, with its attribution on 2 FSDP2 ranks (gloo) under torchrun,
and publishes the same pruned weights as the in-process pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from harmprune import pipeline
from harmprune.inputs.config import HardenConfig
from harmprune.method.pruning import MASK_FILE, load_mask
from harmprune.settings import Settings

from tests.service_stack import bearer
from tests.workers.conftest import FAST_DOMAIN, make_stack

pytestmark = pytest.mark.services


def test_a_gpu_multi_job_runs_on_two_ranks_and_publishes_the_single_process_mask(
    tmp_path: Path, tiny_llama: Path
) -> None:
    with make_stack(
        tmp_path,
        local_model_roots=[tiny_llama.parent],
        multi_gpu_count=2,
        attribution_processes=2,
    ) as stack:
        stack.start_worker(queues="gpu-multi")
        job = stack.submit(tiny_llama, FAST_DOMAIN, "org/tiny-multi", hardware="gpu-multi")
        assert job["hardware"] == "gpu-multi"
        final = stack.wait_done(job["id"], timeout=240)
        assert final["state"] == "succeeded", (final, stack.logs())
        report = stack.client.get(f"/v1/jobs/{job['id']}/report", headers=bearer()).json()
        assert report["inputs"]["attribution_processes"] == 2
        published = load_mask(stack.published("org/tiny-multi") / MASK_FILE)
        record = stack.store.get(job["id"], "alpha")
        assert record is not None

    # the same job, in process, on one device
    config = HardenConfig.model_validate(record.config)
    local = pipeline.run(config, Settings(cache_dir=tmp_path / "cache"), tmp_path / "local")
    assert local.pruned_count == report["pruned_count"] > 0
    expected = load_mask(tmp_path / "local" / MASK_FILE)
    assert published.entries.keys() == expected.entries.keys()
    for name, (idx, values) in expected.entries.items():
        assert torch.equal(published.entries[name][0], idx), name
        assert torch.equal(published.entries[name][1], values), name
