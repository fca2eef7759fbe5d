"""The one entry point: `run(config, settings, out_dir, on_progress, should_cancel) -> Report`.

Lifecycle of a job (each stage reports progress as (stage, done, total)):
  load       resolve the model reference, check config and tokenizer, then load the weights
  elicit     hold out evaluation prompts; complete missing harmful (prefilled) and benign
             responses, and the held-out reference answers, with the original model
  evaluate   measure the original model on the held-out prompts
  attribute  harm scores on the harmful set, preserve scores on the benign set (in process, or
             on N FSDP2 ranks with `attribution_processes=N`: a multi-GPU worker)
  search     for each candidate q: select, prune, measure, undo (one attribution for all)
  select     the operating point: the largest harm rise that keeps every benign threshold
  prune      zero the selection, keep the sparse mask
  verify     measure the hardened model and the random-pruning control; decide the outcome
  tamper     optional: fine-tune original, hardened and control identically, measure again
  attacks    optional (`attacks:`): abliteration and a fine-tuning grid on the three models
  save       checkpoint + mask + report.json + model card + plots, atomically into out_dir;
             a rejected job writes the report, card and plots but no weights

Used in-process by the CLI (the embedded default) and by the Celery workers alike.
"""

from __future__ import annotations

import gc
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from harmprune import (
    attacks,
    attribution,
    card,
    data,
    evaluation,
    preflight,
    selection,
    tamper,
    verification,
)
from harmprune.checkpoint import save_checkpoint, staged_output, write_json
from harmprune.config import HardenConfig, Pair
from harmprune.errors import CalibrationError, JobCancelled, SpecError
from harmprune.loading import LoadedModel, load_model
from harmprune.pruning import MASK_FILE, PruneMask, apply_pruning, save_mask
from harmprune.report import (
    CalibrationSummary,
    HeldoutSummary,
    Metrics,
    Report,
    ReportInputs,
    library_versions,
    module_counts,
)
from harmprune.settings import Settings
from harmprune.vocabulary import REPORT_FILE

ProgressFn = Callable[[str, int, int], None]
CancelFn = Callable[[], bool]


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
    selector: selection.RankedScores | selection.FullScores  # .select(q) -> per-matrix selections


def _noop_progress(stage: str, done: int, total: int) -> None:
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def split_sets(config: HardenConfig) -> tuple[list[Pair], list[Pair], list[Pair], list[Pair], str]:
    """(harmful, benign, held-out harmful, held-out benign, source). Held-out prompts never reach
    attribution: either the spec's eval sets, or a seeded share split off the calibration sets."""
    spec = config.domain
    harmful, benign = data.calibration_sets(spec)
    eval_harmful, eval_benign = (
        data.load_sources(spec.eval.harmful),
        data.load_sources(spec.eval.benign),
    )
    source = "spec"
    if not eval_harmful or not eval_benign:
        source = "split"
        for name, pairs in (("harmful", harmful), ("benign", benign)):
            if len(pairs) < 2:
                raise SpecError(
                    f"{name}: give eval.{name} or at least 2 {name} examples (one is held out)"
                )
        frac, seed = spec.eval.heldout_fraction, config.seed
        if not eval_harmful:
            harmful, eval_harmful = evaluation.split_heldout(harmful, frac, seed)
        if not eval_benign:
            benign, eval_benign = evaluation.split_heldout(benign, frac, seed + 1)
    return harmful, benign, eval_harmful, eval_benign, source


def build_calibration(
    loaded: LoadedModel,
    config: HardenConfig,
    harmful_pairs: list[Pair],
    benign_pairs: list[Pair],
    on_progress: ProgressFn,
) -> Calibration:
    spec = config.domain
    n_missing = sum(p.response is None for p in harmful_pairs + benign_pairs)
    n_harm_missing = sum(p.response is None for p in harmful_pairs)
    common: dict[str, Any] = dict(
        fmt=spec.prompt_format, elicitation=spec.elicitation, batch_size=config.batch_size
    )
    harmful = data.complete_pairs(
        loaded.model,
        loaded.tokenizer,
        harmful_pairs,
        harmful=True,
        on_step=lambda n, t: on_progress("elicit", n, n_missing),
        **common,
    )
    benign = data.complete_pairs(
        loaded.model,
        loaded.tokenizer,
        benign_pairs,
        harmful=False,
        on_step=lambda n, t: on_progress("elicit", n_harm_missing + n, n_missing),
        **common,
    )
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
    q_max: float,
    on_progress: ProgressFn,
    should_cancel: CancelFn | None,
    recompute: bool = False,
    sum_abs_strategy: attribution.SumAbsStrategy = "batched",
) -> Scores:
    """Harm pass, then preserve pass. Per-matrix selection reduces each score map as soon as it
    is computed (harm: ranked top-q_max; preserve: top-p indices), so at most one fp32
    score-sized buffer is alive at any time; global selection keeps both maps. `recompute`:
    gradient checkpointing of the decoder blocks (chosen by the preflight estimate);
    `sum_abs_strategy`: how the sum_abs preserve pass gets per-sample gradients (benchmarks)."""
    pruning = config.domain.pruning
    params = attribution.scored_parameters(loaded.model)
    n_h, n_b = len(calibration.harmful_examples), len(calibration.benign_examples)
    common = dict(
        batch_size=config.batch_size,
        max_tokens=config.max_backward_tokens,
        recompute=recompute,
        pad_id=loaded.tokenizer.pad_token_id,
        should_cancel=should_cancel,
    )
    harm = attribution.score_harm(
        loaded.model,
        params,
        calibration.harmful_examples,
        on_step=lambda d, t: on_progress("attribute", d, n_h + n_b),
        **common,
    )
    if pruning.selection == "per_matrix":
        ranked = {
            n: selection.ranked_top(s, selection.count_for(q_max, s.numel()))
            for n, s in harm.items()
        }
        del harm
    keep = attribution.score_preserve(
        loaded.model,
        params,
        calibration.benign_examples,
        pruning.preserve_score,
        sum_abs_strategy=sum_abs_strategy,
        on_step=lambda d, t: on_progress("attribute", n_h + d, n_h + n_b),
        **common,
    )
    if pruning.selection == "global":
        return Scores(params, selection.FullScores(harm, keep, pruning.p, "global"))
    protected = {
        n: selection.top_k_indices(s, selection.count_for(pruning.p, s.numel()))
        for n, s in keep.items()
    }
    del keep
    sizes = {n: p.numel() for n, p in params.items()}
    return Scores(params, selection.RankedScores(sizes, ranked, protected, q_max))


def distributed_scores(
    loaded: LoadedModel,
    calibration: Calibration,
    config: HardenConfig,
    settings: Settings,
    q_max: float,
    processes: int,
    on_progress: ProgressFn,
    should_cancel: CancelFn | None,
) -> tuple[LoadedModel, Scores]:
    """`compute_scores` on `processes` FSDP2 ranks (harmprune.distributed under torchrun): the
    same per-matrix selection, for a model whose attribution does not fit one device.

    The ranks need every GPU, so the in-process model is released while they run and loaded
    again (from the same local files) for the stages after; returns that reloaded model.
    """
    from harmprune import distributed

    pruning = config.domain.pruning
    if pruning.selection != "per_matrix":
        raise SpecError("pruning.selection: distributed attribution supports per_matrix only")
    if config.trust_remote_code:
        raise SpecError(
            "trust_remote_code: distributed attribution runs built-in architectures only"
        )
    n_total = len(calibration.harmful_examples) + len(calibration.benign_examples)
    job = distributed.DistributedJob(
        model=str(loaded.local_dir),
        harmful=calibration.harmful_examples,
        benign=calibration.benign_examples,
        q=q_max,
        p=pruning.p,
        q_max=q_max,
        preserve=pruning.preserve_score,
        batch_size=config.batch_size,
        pad_id=loaded.tokenizer.pad_token_id,
        dtype=str(loaded.dtype).removeprefix("torch."),
        threads=1 if loaded.device.type == "cpu" else None,
    )
    on_gpu = loaded.device.type == "cuda"
    loaded.model.to("meta")  # frees its memory; the object is replaced below
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    work = settings.job_work_dir()
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="attribution-", dir=work) as tmp:
        result = distributed.run_torchrun(
            job,
            processes,
            Path(tmp),
            on_progress=lambda d, t: on_progress("attribute", d, n_total),
            should_cancel=should_cancel,
        )
    reloaded = load_model(
        str(loaded.local_dir),
        None,
        settings,
        device=str(loaded.device),
        dtype=str(loaded.dtype).removeprefix("torch."),
        trust_remote_code=False,
        need_chat_template=False,
    )
    reloaded = LoadedModel(
        reloaded.model,
        loaded.tokenizer,
        loaded.source,
        loaded.local_dir,
        loaded.device,
        loaded.dtype,
    )
    return reloaded, Scores(attribution.scored_parameters(reloaded.model), result.scores)


def run(
    config: HardenConfig,
    settings: Settings,
    out_dir: Path,
    *,
    on_progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    overwrite: bool = False,
    job_id: str | None = None,
    attribution_processes: int = 1,
) -> Report:
    """Harden one model for one domain; write the result into `out_dir` (see the module doc).

    `attribution_processes` > 1: the attribution runs on that many FSDP2 ranks (one per GPU)."""
    progress = on_progress or _noop_progress
    timings: dict[str, float] = {}
    spec = config.domain
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
            harmful, benign, eval_harmful, eval_benign, heldout_source = split_sets(config)
            # config files only: a job this machine cannot run fails before any weight is read
            planned = preflight.check_before_loading(config, settings, attribution_processes)
            # the estimate decides `auto` (it knows the device); without one, only "on" is on.
            # FSDP2 ranks never recompute.
            recompute = attribution_processes == 1 and (
                planned.gradient_checkpointing if planned else config.gradient_checkpointing == "on"
            )
            loaded = load_model(
                config.model,
                config.revision,
                settings,
                device=config.device,
                dtype=config.dtype,
                trust_remote_code=config.trust_remote_code,
                need_chat_template=spec.prompt_format == "chat",
            )
            classifier = _load_classifier(config, settings)
            progress("load", 1, 1)
        check_cancel()
        with timed("elicit"):
            calibration = build_calibration(loaded, config, harmful, benign, progress)
            check_cancel()
            heldout = evaluation.build_heldout(
                loaded.model,
                loaded.tokenizer,
                eval_harmful,
                eval_benign,
                [
                    evaluation.MultipleChoice(m.question, list(m.choices), m.answer)
                    for m in spec.eval.multiple_choice
                ],
                source=heldout_source,
                fmt=spec.prompt_format,
                prefix=spec.elicitation.harmful_prefix,
                cfg=spec.eval,
                batch_size=config.batch_size,
            )
            if not heldout.harmful or not heldout.benign:
                raise CalibrationError("the held-out sets are empty after elicitation")

        def measure(level: str = "full") -> evaluation.ModelMetrics:
            return evaluation.evaluate(
                loaded.model,
                loaded.tokenizer,
                heldout,
                spec.eval,
                fmt=spec.prompt_format,
                max_length=spec.max_length,
                batch_size=config.batch_size,
                classifier=classifier,
                level=level,  # type: ignore[arg-type]
            )

        with timed("evaluate"):
            progress("evaluate", 0, 1)
            original = measure("full")
            progress("evaluate", 1, 1)
        check_cancel()
        with timed("attribute"):
            pruning = spec.pruning
            q_values = spec.search.candidates(pruning.q)
            if attribution_processes > 1:
                loaded, scores = distributed_scores(
                    loaded,
                    calibration,
                    config,
                    settings,
                    max(q_values),
                    attribution_processes,
                    progress,
                    should_cancel,
                )
            else:
                scores = compute_scores(
                    loaded, calibration, config, max(q_values), progress, should_cancel, recompute
                )
        trace: list[verification.SearchPoint] = []
        with timed("search"):
            if len(q_values) > 1:
                trace = verification.search_operating_point(
                    scores.params,
                    scores.selector,
                    q_values,
                    measure,
                    original,
                    spec.thresholds,
                    config.seed,
                    on_step=lambda d, t: progress("search", d, t),
                    should_cancel=should_cancel,
                )
        with timed("select"):
            point = verification.choose(trace) if trace else None
            q = point.q if point else (min(q_values) if trace else pruning.q)
            chosen = scores.selector.select(q)
            progress("select", 1, 1)
            progress("prune", 0, 1)
            mask = apply_pruning(scores.params, {n: s.pruned for n, s in chosen.items()})
            progress("prune", 1, 1)
        check_cancel()
        with timed("verify"):
            progress("verify", 0, 2)
            hardened = measure("full")
            progress("verify", 1, 2)
            control = verification.measure_random_control(
                scores.params, mask, config.seed, lambda: measure("full")
            )
            progress("verify", 2, 2)
            failures = verification.benign_failures(hardened, original, spec.thresholds)
            failures += verification.harm_failures(hardened, control, original, spec.thresholds)
            if trace and point is None:
                failures.insert(0, f"no candidate q in {q_values} kept every benign threshold")
            if mask.count == 0:
                failures.insert(0, "nothing was pruned (q too small for these matrices)")
        check_cancel()
        tamper_result = None
        if spec.tamper is not None:
            with timed("tamper"):
                tamper_result = tamper.run_tamper_check(
                    loaded.model,
                    loaded.tokenizer,
                    scores.params,
                    mask,
                    spec.tamper,
                    fmt=spec.prompt_format,
                    max_length=spec.max_length,
                    seed=config.seed,
                    batch_size=config.batch_size,
                    prefix=spec.elicitation.harmful_prefix,
                    eval_cfg=spec.eval,
                    classifier=classifier,
                    multiple_choice=heldout.multiple_choice,
                    on_progress=lambda d, t: progress("tamper", d, t),
                    should_cancel=should_cancel,
                )
                failures += tamper_result.failures
        attacks_result = None
        if spec.attacks is not None:
            with timed("attacks"):
                attacks_result = attacks.run_attacks(
                    loaded.model,
                    loaded.tokenizer,
                    scores.params,
                    mask,
                    spec.attacks,
                    heldout=heldout,
                    harmful=calibration.harmful,
                    benign=calibration.benign,
                    eval_cfg=spec.eval,
                    fmt=spec.prompt_format,
                    max_length=spec.max_length,
                    seed=config.seed,
                    batch_size=config.batch_size,
                    classifier=classifier,
                    on_progress=lambda d, t: progress("attacks", d, t),
                    should_cancel=should_cancel,
                )
                failures += attacks_result.failures
        report = build_report(
            config,
            loaded,
            calibration,
            scores,
            chosen,
            mask,
            q,
            heldout,
            Metrics(original=original, hardened=hardened, random_control=control),
            trace,
            failures,
            job_id,
            attribution_processes,
            recompute,
        ).model_copy(update={"tamper": tamper_result, "attacks": attacks_result})
        with timed("save"):
            progress("save", 0, 1)
            if report.outcome == "accepted":
                save_checkpoint(loaded.model, loaded.tokenizer, staging, settings.max_shard_size)
                save_mask(
                    mask,
                    staging / MASK_FILE,
                    {"spec_hash": report.inputs.spec_hash, "q": q, "p": pruning.p},
                )
            check_cancel()
            report = report.model_copy(update={"timings_s": dict(timings)})
            write_json(staging / REPORT_FILE, report.model_dump(mode="json"))
            card.write_card(report, staging, base_config=loaded.model.config)
            progress("save", 1, 1)
    return report


def _load_classifier(
    config: HardenConfig, settings: Settings
) -> evaluation.ClassifierScorer | None:
    judge = config.domain.eval.classifier
    if judge is None or "classifier" not in config.domain.eval.judges:
        return None

    def load(reference: str) -> tuple[Any, Any]:
        loaded = load_model(
            reference,
            None,
            settings,
            device=config.device,
            dtype=config.dtype,
            need_chat_template=False,
        )
        return loaded.model, loaded.tokenizer

    return evaluation.ClassifierScorer(judge, load)


def build_report(
    config: HardenConfig,
    loaded: LoadedModel,
    calibration: Calibration,
    scores: Scores,
    chosen: dict[str, selection.MatrixSelection],
    mask: PruneMask,
    q: float,
    heldout: evaluation.HeldOut,
    metrics: Metrics,
    trace: list[verification.SearchPoint],
    failures: list[str],
    job_id: str | None,
    attribution_processes: int = 1,
    gradient_checkpointing: bool = False,
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
            q=q,
            p=pruning.p,
            selection=pruning.selection,
            preserve_score=pruning.preserve_score,
            prompt_format=config.domain.prompt_format,
            seed=config.seed,
            dtype=str(loaded.dtype).removeprefix("torch."),
            device=loaded.device.type,
            attribution_processes=attribution_processes,
            gradient_checkpointing=gradient_checkpointing,
            versions=library_versions(),
        ),
        calibration=calibration.summary(),
        scored_count=scored,
        pruned_count=mask.count,
        pruned_fraction=mask.count / scored,
        modules=module_counts(sizes, chosen),
        timings_s={},
        heldout=HeldoutSummary(
            source=heldout.source,  # type: ignore[arg-type]
            harmful=len(heldout.harmful),
            benign=len(heldout.benign),
            multiple_choice=len(heldout.multiple_choice),
        ),
        metrics=metrics,
        search=trace,
        thresholds=config.domain.thresholds,
        outcome="rejected" if failures else "accepted",
        outcome_reason="; ".join(failures),
    )


class _Timer:
    def __init__(self, stage: str, timings: dict[str, float]) -> None:
        self.stage, self.timings = stage, timings

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.timings[self.stage] = round(time.perf_counter() - self.start, 3)
