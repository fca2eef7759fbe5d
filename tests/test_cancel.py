"""Cancelling a job mid-stage: the pipeline stops at the next step (one backward pass in the
attribution, one candidate in the search) and writes nothing, not even a staging directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from harmprune import pipeline
from harmprune.errors import JobCancelled
from harmprune.inputs.config import HardenConfig, load_domain
from harmprune.settings import Settings

SWEEP = {"mode": "sweep", "q_values": [0.01, 0.02, 0.05, 0.1]}


class CancelAfter:
    """Requests cancellation once `stage` has reported `steps` steps; records every event."""

    def __init__(self, stage: str, steps: int) -> None:
        self.stage, self.steps = stage, steps
        self.events: list[tuple[str, int, int]] = []
        self.requested_at: int | None = None  # index into events

    def on_progress(self, stage: str, done: int, total: int) -> None:
        self.events.append((stage, done, total))
        if self.requested_at is None and stage == self.stage and done >= self.steps:
            self.requested_at = len(self.events)

    def should_cancel(self) -> bool:
        return self.requested_at is not None

    def after_request(self, stage: str) -> list[tuple[str, int, int]]:
        assert self.requested_at is not None, f"the job never reached {stage}: {self.events}"
        return [e for e in self.events[self.requested_at :] if e[0] == stage]


def run_until_cancelled(
    tiny_model_dir: Any, domain_spec_path: Path, tmp_path: Path, cancel: CancelAfter, **spec: Any
) -> Path:
    domain = load_domain(domain_spec_path).model_copy(update=spec)
    config = HardenConfig(
        model=str(tiny_model_dir("llama")),
        domain=domain,
        device="cpu",
        dtype="float32",
        batch_size=1,  # one backward per attribution step
    )
    parent = tmp_path / "outputs"
    parent.mkdir()
    out = parent / "hardened"
    with pytest.raises(JobCancelled):
        pipeline.run(
            config,
            Settings(cache_dir=tmp_path / "cache"),
            out,
            on_progress=cancel.on_progress,
            should_cancel=cancel.should_cancel,
        )
    assert not out.exists()
    assert list(parent.iterdir()) == [], "a cancelled job left files behind"
    return out


def test_cancel_mid_attribution_stops_within_one_backward_pass(
    tiny_model_dir: Any, domain_spec_path: Path, tmp_path: Path
) -> None:
    cancel = CancelAfter("attribute", 2)
    run_until_cancelled(tiny_model_dir, domain_spec_path, tmp_path, cancel)
    steps = [e for e in cancel.events if e[0] == "attribute"]
    total = steps[-1][2]
    assert steps[-1][1] < total, "the attribution ran to the end"
    # at most the backward pass in flight when the request came; here none is in flight
    assert len(cancel.after_request("attribute")) <= 1
    assert not any(e[0] in ("search", "select", "verify", "save") for e in cancel.events)


def test_cancel_mid_search_stops_before_the_next_candidate(
    tiny_model_dir: Any, domain_spec_path: Path, tmp_path: Path
) -> None:
    from harmprune.inputs.config import SearchConfig

    cancel = CancelAfter("search", 1)
    run_until_cancelled(
        tiny_model_dir,
        domain_spec_path,
        tmp_path,
        cancel,
        search=SearchConfig.model_validate(SWEEP),
    )
    searched = [e for e in cancel.events if e[0] == "search"]
    assert searched[-1][2] == len(SWEEP["q_values"])
    assert searched[-1][1] < len(SWEEP["q_values"]), "the search measured every candidate"
    assert len(cancel.after_request("search")) <= 1
    assert not any(e[0] in ("select", "verify", "save") for e in cancel.events)
