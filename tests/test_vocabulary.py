"""One vocabulary: every stage the pipeline reports is a stage the worker weighs, in order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from harmprune import pipeline
from harmprune.settings import Settings
from harmprune.vocabulary import STAGES, overall_progress

from tests.conftest import tiny_job_config
from tests.test_attacks_pipeline import TINY_ATTACKS
from tests.test_tamper import TINY_TAMPER


def test_the_pipeline_reports_only_known_stages_in_order(
    tiny_model_dir: Any, domain_spec_path: Path, tmp_path: Path
) -> None:
    raw = yaml.safe_load(domain_spec_path.read_text())
    # The fine-tuning attack and the search too, so that every pipeline stage runs.
    raw["tamper"] = {**TINY_TAMPER, "steps": 1}
    raw["search"] = {"mode": "sweep", "q_values": [0.02, 0.05]}
    raw["attacks"] = TINY_ATTACKS
    config = tiny_job_config(tiny_model_dir("llama"), raw)
    seen: list[str] = []

    def on_progress(stage: str, done: int, total: int) -> None:
        if not seen or seen[-1] != stage:
            seen.append(stage)

    pipeline.run(
        config, Settings(cache_dir=tmp_path / "cache"), tmp_path / "out", on_progress=on_progress
    )
    assert seen == [s for s in STAGES if s != "publish"], seen
    progress = [overall_progress(s, 1, 1) for s in seen]
    assert progress == sorted(progress)
