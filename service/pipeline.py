"""The one entry point: `run(config, settings, out_dir, on_progress, should_cancel) -> Report`.

Lifecycle of a job (each stage reports progress as (stage, done, total)):
  load       resolve the model reference, check config and tokenizer, then load the weights
  elicit     complete missing harmful (prefilled) and benign responses with the model itself
  attribute  harm scores on the harmful set, preserve scores on the benign set
  select     per-matrix (or global) top-q harm minus top-p preserve
  prune      zero the selection, keep the sparse mask
  save       checkpoint + mask + report.json, written atomically into out_dir

Used in-process by the CLI (the embedded default) and by the Celery workers alike.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service import attribution, data, selection
from service.checkpoint import REPORT_FILE, save_checkpoint, staged_output, write_json
from service.config import HardenConfig
from service.errors import JobCancelled
from service.loading import LoadedModel, load_model
from service.pruning import MASK_FILE, PruneMask, apply_pruning, save_mask
from service.report import CalibrationSummary, Report, ReportInputs, library_versions, module_counts
from service.settings import Settings

ProgressFn = Callable[[str, int, int], None]
CancelFn = Callable[[], bool]

STAGES = ("load", "elicit", "attribute", "select", "prune", "save")


@dataclass
class Calibration:
    harmful: list[data.CalibrationPair]
    benign: list[data.CalibrationPair]
    harmful_examples: list[data.Example]
    benign_examples: list[data.Example]

    def summary(self) -> CalibrationSummary:
        return CalibrationSummary(
            harmful_pairs=len(self.harmful),
            benign_pairs=len(self.benign),
            harmful_elicited=sum(p.elicited for p in self.harmful),
            benign_elicited=sum(p.elicited for p in self.benign),
            harmful_tokens=sum(len(e.input_ids) for e in self.harmful_examples),
            benign_tokens=sum(len(e.input_ids) for e in self.benign_examples),
        )


@dataclass
class Scores:
    params: dict[str, torch.nn.Parameter]
    harm: dict[str, torch.Tensor]
    keep: dict[str, torch.Tensor]


def _noop_progress(stage: str, done: int, total: int) -> None:
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_calibration(
    loaded: LoadedModel, config: HardenConfig, on_progress: ProgressFn
) -> Calibration:
    spec = config.domain
    harmful_pairs, benign_pairs = data.calibration_sets(spec)
    n_missing = sum(p.response is None for p in harmful_pairs + benign_pairs)
    done = 0

    def step(n: int, total: int) -> None:
        on_progress("elicit", done + n, n_missing)

    common = dict(
        fmt=spec.prompt_format, elicitation=spec.elicitation, batch_size=config.batch_size
    )
    harmful = data.complete_pairs(
        loaded.model, loaded.tokenizer, harmful_pairs, harmful=True, on_step=step, **common
    )
    done = sum(p.response is None for p in harmful_pairs)
    benign = data.complete_pairs(
        loaded.model, loaded.tokenizer, benign_pairs, harmful=False, on_step=step, **common
    )
    on_progress("elicit", n_missing, n_missing)
    tok = loaded.tokenizer
    return Calibration(
        harmful,
        benign,
        data.tokenize_pairs(tok, harmful, spec.prompt_format, spec.max_length),
        data.tokenize_pairs(tok, benign, spec.prompt_format, spec.max_length),
    )


def compute_scores(
    loaded: LoadedModel,
    calibration: Calibration,
    config: HardenConfig,
    on_progress: ProgressFn,
    should_cancel: CancelFn | None,
) -> Scores:
    params = attribution.scored_parameters(loaded.model)
    n_h, n_b = len(calibration.harmful_examples), len(calibration.benign_examples)
    pad_id = loaded.tokenizer.pad_token_id
    harm = attribution.score_harm(
        loaded.model,
        params,
        calibration.harmful_examples,
        batch_size=config.batch_size,
        pad_id=pad_id,
        should_cancel=should_cancel,
        on_step=lambda d, t: on_progress("attribute", d, n_h + n_b),
    )
    keep = attribution.score_preserve(
        loaded.model,
        params,
        calibration.benign_examples,
        config.domain.pruning.preserve_score,
        batch_size=config.batch_size,
        pad_id=pad_id,
        should_cancel=should_cancel,
        on_step=lambda d, t: on_progress("attribute", n_h + d, n_h + n_b),
    )
    return Scores(params, harm, keep)


def run(
    config: HardenConfig,
    settings: Settings,
    out_dir: Path,
    *,
    on_progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    overwrite: bool = False,
    job_id: str | None = None,
) -> Report:
    """Harden one model for one domain; write checkpoint, mask and report into `out_dir`."""
    progress = on_progress or _noop_progress
    timings: dict[str, float] = {}
    seed_everything(config.seed)

    def check_cancel() -> None:
        if should_cancel and should_cancel():
            raise JobCancelled("the job was cancelled")

    def timed(stage: str) -> _Timer:
        return _Timer(stage, timings)

    # The output target is checked first so that a bad path fails before minutes of work.
    with staged_output(out_dir, overwrite=overwrite) as staging:
        with timed("load"):
            progress("load", 0, 1)
            loaded = load_model(
                config.model,
                config.revision,
                settings,
                device=config.device,
                dtype=config.dtype,
                trust_remote_code=config.trust_remote_code,
                need_chat_template=config.domain.prompt_format == "chat",
            )
            progress("load", 1, 1)
        check_cancel()
        with timed("elicit"):
            calibration = build_calibration(loaded, config, progress)
        check_cancel()
        with timed("attribute"):
            scores = compute_scores(loaded, calibration, config, progress, should_cancel)
        with timed("select"):
            progress("select", 0, 1)
            pruning = config.domain.pruning
            chosen = selection.select(
                scores.harm, scores.keep, pruning.q, pruning.p, pruning.selection
            )
            progress("select", 1, 1)
        check_cancel()
        with timed("prune"):
            mask = apply_pruning(scores.params, {n: s.pruned for n, s in chosen.items()})
            progress("prune", 1, 1)
        report = build_report(config, loaded, calibration, scores, chosen, mask, timings, job_id)
        with timed("save"):
            progress("save", 0, 1)
            save_checkpoint(loaded.model, loaded.tokenizer, staging, settings.max_shard_size)
            save_mask(
                mask,
                staging / MASK_FILE,
                {"spec_hash": report.inputs.spec_hash, "q": pruning.q, "p": pruning.p},
            )
            check_cancel()
            progress("save", 1, 1)
        report = report.model_copy(update={"timings_s": dict(timings)})
        write_json(staging / REPORT_FILE, report.model_dump(mode="json"))
    return report


def build_report(
    config: HardenConfig,
    loaded: LoadedModel,
    calibration: Calibration,
    scores: Scores,
    chosen: dict[str, selection.MatrixSelection],
    mask: PruneMask,
    timings: dict[str, float],
    job_id: str | None,
) -> Report:
    pruning = config.domain.pruning
    sizes = {n: p.numel() for n, p in scores.params.items()}
    scored = sum(sizes.values())
    return Report(
        job_id=job_id,
        inputs=ReportInputs(
            model=loaded.source,
            domain=config.domain.name,
            spec_hash=config.domain.spec_hash(),
            q=pruning.q,
            p=pruning.p,
            selection=pruning.selection,
            preserve_score=pruning.preserve_score,
            prompt_format=config.domain.prompt_format,
            seed=config.seed,
            dtype=str(loaded.dtype).removeprefix("torch."),
            device=loaded.device.type,
            versions=library_versions(),
        ),
        calibration=calibration.summary(),
        scored_count=scored,
        pruned_count=mask.count,
        pruned_fraction=mask.count / scored,
        modules=module_counts(sizes, chosen),
        timings_s=dict(timings),
    )


class _Timer:
    def __init__(self, stage: str, timings: dict[str, float]) -> None:
        self.stage, self.timings = stage, timings

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.timings[self.stage] = round(time.perf_counter() - self.start, 3)
