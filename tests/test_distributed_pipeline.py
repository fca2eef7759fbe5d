"""The multi-GPU worker's path on CPU: the pipeline's attribution on 2 FSDP2 ranks (gloo) under
torchrun, as `run(..., attribution_processes=2)` does on a gpu-multi worker; and the launcher's
progress, cancel and failure handling."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from harmprune import pipeline
from harmprune.distributed import DistributedJob, run_torchrun
from harmprune.errors import AttributionError, JobCancelled
from harmprune.inputs.config import HardenConfig, load_domain
from harmprune.method.pruning import MASK_FILE, load_mask
from harmprune.settings import Settings

from tests.test_distributed import make_examples, save_random_model


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                pids.append(int(entry.name))
    return pids


def harden(model_dir: Path, spec: Path, out: Path, processes: int) -> tuple[Any, list]:
    events: list[tuple[str, int, int]] = []
    config = HardenConfig(
        model=str(model_dir), domain=load_domain(spec), device="cpu", dtype="float32", batch_size=2
    )
    report = pipeline.run(
        config,
        Settings(cache_dir=out.parent / "cache", work_dir=out.parent / "work"),
        out,
        on_progress=lambda s, d, t: events.append((s, d, t)),
        attribution_processes=processes,
    )
    return report, events


def test_two_fsdp_ranks_prune_what_one_process_prunes(
    tiny_model_dir: Any, domain_spec_path: Path, tmp_path: Path
) -> None:
    model_dir = tiny_model_dir("llama")
    one, _ = harden(model_dir, domain_spec_path, tmp_path / "one", 1)
    two, events = harden(model_dir, domain_spec_path, tmp_path / "two", 2)
    assert one.outcome == two.outcome == "accepted", (one.outcome_reason, two.outcome_reason)
    assert (one.inputs.attribution_processes, two.inputs.attribution_processes) == (1, 2)
    assert two.pruned_count == one.pruned_count > 0
    mask_one = load_mask(tmp_path / "one" / MASK_FILE)
    mask_two = load_mask(tmp_path / "two" / MASK_FILE)
    assert mask_one.entries.keys() == mask_two.entries.keys()
    for name, (idx, values) in mask_one.entries.items():
        assert torch.equal(idx, mask_two.entries[name][0]), name
        assert torch.equal(values, mask_two.entries[name][1]), name
    # the ranks' progress reached the job's progress, ending at every calibration sample
    attribute = [(d, t) for s, d, t in events if s == "attribute"]
    assert attribute and attribute[-1][0] == attribute[-1][1] > 0
    # the scratch files of the ranks are gone
    assert not any((tmp_path / "two" / ".." / "work").resolve().glob("attribution-*"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_random_model(tmp_path_factory.mktemp("random-llama"))


def slow_job(model: str, **kw: Any) -> DistributedJob:
    """Enough samples at batch 1 to run for a while on 2 CPU processes."""
    return DistributedJob(
        model,
        make_examples(1, 400),
        make_examples(2, 400),
        q=0.05,
        p=0.02,
        batch_size=1,
        pad_id=0,
        threads=1,
        **kw,
    )


def test_cancel_stops_every_rank(tmp_path: Path, model_dir: str) -> None:
    seen: list[tuple[int, int]] = []
    work = tmp_path / "ranks"

    def cancel_once_running() -> bool:
        return bool(seen)  # after the first progress report: the ranks are attributing

    started = time.monotonic()
    with pytest.raises(JobCancelled):
        run_torchrun(
            slow_job(model_dir),
            2,
            work,
            on_progress=lambda d, t: seen.append((d, t)),
            should_cancel=cancel_once_running,
            poll_s=0.2,
        )
    assert seen and seen[0][0] < seen[0][1] == 800  # stopped part-way
    assert time.monotonic() - started < 120
    assert processes_mentioning(str(work / "job.json")) == []  # launcher and ranks are gone
    assert not (work / "result.safetensors").exists()


def test_a_failing_rank_is_an_attribution_error_with_the_log_tail(tmp_path: Path) -> None:
    job = slow_job(str(tmp_path / "no-such-model"))
    with pytest.raises(AttributionError, match="failed on 2 processes") as err:
        run_torchrun(job, 2, tmp_path / "ranks", poll_s=0.2)
    assert "no-such-model" in str(err.value)  # the ranks' own error, from the log
    assert processes_mentioning(str(tmp_path / "ranks" / "job.json")) == []


def test_ranks_get_no_hub_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_dir: str
) -> None:
    """The launcher strips credentials from the ranks' environment."""
    monkeypatch.setenv("HF_TOKEN", "hf_secret_never_in_ranks")
    monkeypatch.setenv("HARMPRUNE_HF_TOKEN", "hf_secret_never_in_ranks")
    env_seen: list[str] = []

    def look(done: int, total: int) -> None:
        for pid in processes_mentioning(str(tmp_path / "ranks" / "job.json")):
            with contextlib.suppress(OSError):
                env_seen.append(Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace"))

    with pytest.raises(JobCancelled):
        run_torchrun(
            slow_job(model_dir),
            2,
            tmp_path / "ranks",
            on_progress=look,
            should_cancel=lambda: bool(env_seen),
            poll_s=0.2,
        )
    assert env_seen and not any("hf_secret_never_in_ranks" in e for e in env_seen)
    assert os.environ["HF_TOKEN"] == "hf_secret_never_in_ranks"  # only the children's copy
