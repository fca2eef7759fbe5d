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

Each stage is a function below, in the order `run` calls them; the work is done in the
subpackages: the prompt sets, the model and its answers in `harmprune.inputs`, the scores and
the pruning in `harmprune.method`, measuring and deciding in `harmprune.measure` (with the
job's `JobContext`) and `harmprune.attacks`, what is written in `harmprune.output`.

Used in-process by the CLI (the embedded default) and by the Celery workers alike.
"""

from __future__ import annotations

import functools
import gc
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from harmprune import attacks
from harmprune.errors import CalibrationError, SpecError
from harmprune.inputs import data, preflight, standard_harm
from harmprune.inputs.config import (
    MIN_TEST_PROMPTS,
    Elicitation,
    HardenConfig,
    Pair,
    Thresholds,
)
from harmprune.inputs.loading import LoadedModel, load_model, load_resolved, resolve
from harmprune.inputs.references import Permit, locate_for_operator, operator_permit
from harmprune.inputs.sets import PromptSets, split_sets
from harmprune.measure import benchmarks, evaluation, judges, stats, tamper, verification
from harmprune.measure.attack_options import AttackOptions, HardenedModel
from harmprune.measure.job import (
    CancelFn,
    HeldOuts,
    JobContext,
    Originals,
    ProgressFn,
    Pruned,
    build_heldouts,
    measure_controls,
    measure_originals,
    refusal_filter,
)
from harmprune.method import attribution, selection
from harmprune.method.pruning import MASK_FILE, PruneMask, apply_pruning, save_mask
from harmprune.output import binding, card, report_json, signing
from harmprune.output.checkpoint import save_checkpoint, staged_output, write_json
from harmprune.output.report import (
    BenchmarksSummary,
    CalibrationSummary,
    ControlSummary,
    Evidence,
    GeneralBenignResult,
    HarmGateSummary,
    HeldoutSummary,
    Metrics,
    Report,
    ReportInputs,
    StandardHarmResult,
    library_versions,
    module_counts,
)
from harmprune.settings import Settings
from harmprune.vocabulary import REPORT_FILE


@dataclass
class Calibration:
    harmful: list[data.CalibrationPair]
    benign: list[data.CalibrationPair]
    harmful_examples: list[data.Example]
    benign_examples: list[data.Example]
    dropped_refusals: int = 0

    def summary(self) -> CalibrationSummary:
        return CalibrationSummary(
            harmful_dropped_refusals=self.dropped_refusals,
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
    permit: Permit | None = None,
) -> Report:
    """Harden one model for one domain; write the result into `out_dir` (see the module doc).

    `attribution_processes` > 1: the attribution runs on that many FSDP2 ranks (one per GPU).
    `permit`: what the job may load, made by the tenant's policy on a worker; default: the
    operator's own (the CLI), which grants every reference the config names.
    Every generation input of the job is cut to the spec's max_length tokens (the report and
    the card say how many were)."""
    with data.generation_budget(config.domain.max_length):
        return _run(
            config,
            settings,
            out_dir,
            on_progress=on_progress,
            should_cancel=should_cancel,
            overwrite=overwrite,
            job_id=job_id,
            attribution_processes=attribution_processes,
            permit=permit or operator_permit(config),
        )


def _run(
    config: HardenConfig,
    settings: Settings,
    out_dir: Path,
    *,
    on_progress: ProgressFn | None,
    should_cancel: CancelFn | None,
    overwrite: bool,
    job_id: str | None,
    attribution_processes: int,
    permit: Permit,
) -> Report:
    timings: dict[str, float] = {}
    seed_everything(config.seed)

    def timed(stage: str) -> _Timer:
        return _Timer(stage, timings)

    # The output target is checked first so that a bad path fails before minutes of work.
    with staged_output(out_dir, overwrite=overwrite) as staging:
        with timed("load"):
            sets = split_sets(config, permit)
            progress = on_progress or _noop_progress
            ctx = load(
                config, settings, progress, should_cancel, attribution_processes, job_id, permit
            )
        ctx.check_cancel()
        with timed("elicit"):
            calibration = build_calibration(ctx, sets.harmful, sets.benign)
            ctx.check_cancel()
            heldouts = build_heldouts(ctx, sets)
        with timed("evaluate"):
            originals = measure_originals(ctx, heldouts)
        original_benchmarks = None
        if ctx.spec.eval.benchmarks is not None:
            with timed("benchmarks_original"):
                original_benchmarks = ctx.run_benchmarks()
        ctx.check_cancel()
        q_values = ctx.spec.search.candidates(ctx.spec.pruning.q)
        with timed("attribute"):
            ctx, scores = attribute(ctx, calibration, max(q_values))
        with timed("search"):
            trace = search(ctx, scores, q_values, heldouts, originals)
        with timed("select"):
            q, mask, chosen, failures = select_and_prune(ctx, scores, q_values, trace)
        ctx.check_cancel()
        with timed("verify"):
            verified = verify_sets(ctx, scores, mask, heldouts, originals, sets)
        benchmarks_result = None
        if original_benchmarks is not None:
            with timed("benchmarks"):
                benchmarks_result = verify_benchmarks(ctx, verified.pruned, original_benchmarks)
        ctx.check_cancel()
        tamper_result = None
        if ctx.spec.tamper is not None:
            with timed("tamper"):
                tamper_result = tamper_check(ctx, scores, mask, heldouts.test)
        attacks_result = None
        if ctx.spec.attacks is not None:
            with timed("attacks"):
                attacks_result = run_attacks(ctx, scores, mask, calibration, heldouts)
        found = (verified, benchmarks_result, tamper_result, attacks_result)
        failures += [f for result in found if result is not None for f in result.failures]
        report = build_report(
            ctx, sets, calibration, scores, chosen, mask, q, heldouts, verified, trace, failures
        ).model_copy(
            update={
                "benchmarks": benchmarks_result,
                "tamper": tamper_result,
                "attacks": attacks_result,
            }
        )
        with timed("save"):
            report = save(ctx, report, mask, staging, timings)
    return report


class _Timer:
    def __init__(self, stage: str, timings: dict[str, float]) -> None:
        self.stage, self.timings = stage, timings

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.timings[self.stage] = round(time.perf_counter() - self.start, 3)


def _noop_progress(stage: str, done: int, total: int) -> None:
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def load(
    config: HardenConfig,
    settings: Settings,
    progress: ProgressFn,
    should_cancel: CancelFn | None,
    attribution_processes: int = 1,
    job_id: str | None = None,
    permit: Permit | None = None,
) -> JobContext:
    """Preflight (config files only: a job this machine cannot run fails before any weight is
    read), then the model and the judge model."""
    progress("load", 0, 1)
    permit = permit or operator_permit(config)
    if config.domain.eval.benchmarks is not None:  # a misspelt task fails before any weight
        tasks = config.domain.eval.benchmarks.tasks
        manager = benchmarks.check_tasks(tasks)
        if permit.policy == "operator":  # a tenant's permit already holds its tasks' datasets
            refs = benchmarks.task_dataset_references(tasks, manager)
            permit = permit.with_grants(locate_for_operator(r) for r in refs)
    model_grant = permit.grant("model", config.model, config.revision, "model")
    planned = preflight.check_before_loading(
        config, settings, attribution_processes, hub_only=model_grant.location == "hub"
    )
    # the estimate decides `auto` (it knows the device); without one, only "on" is on.
    # FSDP2 ranks never recompute.
    recompute = attribution_processes == 1 and (
        planned.gradient_checkpointing if planned else config.gradient_checkpointing == "on"
    )
    loaded = load_model(
        config.model,
        config.revision,
        settings,
        permit=permit,
        device=config.device,
        dtype=config.dtype,
        trust_remote_code=config.trust_remote_code,
        need_chat_template=config.domain.prompt_format == "chat",
    )
    ctx = JobContext(
        config=config,
        settings=settings,
        loaded=loaded,
        progress=progress,
        should_cancel=should_cancel,
        classifier=_load_classifier(config, settings, permit),
        recompute=recompute,
        permit=permit,
        attribution_processes=attribution_processes,
        job_id=job_id,
    )
    progress("load", 1, 1)
    return ctx


def _load_classifier(
    config: HardenConfig, settings: Settings, permit: Permit
) -> judges.ClassifierJudge | None:
    """The classifier judge, loaded once per job; its references are validated like any model
    reference (safetensors only). A LoRA judge (strongreject, or `base_model` given) loads its
    base model, then the adapter with peft; its tokenizer comes from the adapter when present."""
    cfg = config.domain.eval.classifier
    if cfg is None or "classifier" not in config.domain.eval.judges:
        return None
    field = "domain.eval.classifier"
    common: dict[str, Any] = dict(device=config.device, dtype=config.dtype, permit=permit)
    if cfg.base_model is None:
        loaded = load_model(
            cfg.model,
            None,
            settings,
            field=f"{field}.model",
            need_chat_template=cfg.preset == "llama_guard_3",
            **common,
        )
        return judges.ClassifierJudge(cfg.preset, loaded.model, loaded.tokenizer, cfg.template)
    from peft import PeftModel
    from transformers import AutoTokenizer

    base = load_model(
        cfg.base_model,
        None,
        settings,
        field=f"{field}.base_model",
        need_chat_template=False,
        **common,
    )
    grant = permit.grant("model", cfg.model, None, f"{field}.model")
    adapter = Path(grant.target)
    if grant.location != "local":
        adapter, _ = resolve(grant, settings)
    if not (adapter / "adapter_config.json").is_file():
        raise SpecError(f"eval.classifier.model: {cfg.model} is not a LoRA adapter")
    model = PeftModel.from_pretrained(base.model, str(adapter)).eval()
    has_tokenizer = (adapter / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter)) if has_tokenizer else base.tokenizer
    return judges.ClassifierJudge(cfg.preset, model, tokenizer, cfg.template)


def build_calibration(
    ctx: JobContext, harmful_pairs: list[Pair], benign_pairs: list[Pair]
) -> Calibration:
    """Missing responses elicited from the model (batched greedy), then tokenized."""
    spec = ctx.spec
    model, tok = ctx.loaded.model, ctx.loaded.tokenizer
    n_missing = sum(p.response is None for p in harmful_pairs + benign_pairs)
    n_harm_missing = sum(p.response is None for p in harmful_pairs)
    common: dict[str, Any] = dict(
        fmt=spec.prompt_format, elicitation=spec.elicitation, batch_size=ctx.config.batch_size
    )
    harmful = data.complete_pairs(
        model,
        tok,
        harmful_pairs,
        harmful=True,
        on_step=lambda n, t: ctx.progress("elicit", n, n_missing),
        **common,
    )
    harmful, dropped = drop_refusals(harmful, spec.elicitation)
    benign = data.complete_pairs(
        model,
        tok,
        benign_pairs,
        harmful=False,
        on_step=lambda n, t: ctx.progress("elicit", n_harm_missing + n, n_missing),
        **common,
    )
    return Calibration(
        harmful,
        benign,
        data.tokenize_pairs(tok, harmful, spec.prompt_format, spec.max_length),
        data.tokenize_pairs(tok, benign, spec.prompt_format, spec.max_length),
        dropped,
    )


def drop_refusals(
    pairs: list[data.CalibrationPair], elicitation: Elicitation
) -> tuple[list[data.CalibrationPair], int]:
    """Elicited harmful answers that are refusals leave the harmful set (attribution would
    otherwise partly target refusal weights); given answers stay. Too few left: an error."""
    judge = refusal_filter(elicitation)
    if judge is None:
        return pairs, 0
    kept = [p for p in pairs if not (p.elicited and judge.refuses(p.prefix + p.response))]
    dropped = len(pairs) - len(kept)
    need = elicitation.min_harmful_pairs
    if len(kept) < min(need, len(pairs)):
        raise CalibrationError(
            f"only {len(kept)} of {len(pairs)} harmful calibration pairs are left after dropping "
            f"{dropped} elicited answers that were refusals (need {need}): give responses in the "
            "spec, more prompts, or another elicitation.harmful_prefix"
        )
    return kept, dropped


def attribute(ctx: JobContext, calibration: Calibration, q_max: float) -> tuple[JobContext, Scores]:
    """Harm and preserve scores, in process or on FSDP2 ranks (which reload the model)."""
    if ctx.attribution_processes > 1:
        loaded, scores = distributed_scores(ctx, calibration, q_max)
        return replace(ctx, loaded=loaded), scores
    scores = compute_scores(
        ctx.loaded,
        calibration,
        ctx.config,
        q_max,
        ctx.progress,
        ctx.should_cancel,
        ctx.recompute,
    )
    return ctx, scores


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
    ctx: JobContext, calibration: Calibration, q_max: float
) -> tuple[LoadedModel, Scores]:
    """`compute_scores` on `ctx.attribution_processes` FSDP2 ranks (harmprune.distributed under
    torchrun): the same per-matrix selection, for a model whose attribution does not fit one
    device.

    The ranks need every GPU, so the in-process model is released while they run and loaded
    again (from the same local files) for the stages after; returns that reloaded model.
    """
    from harmprune import distributed

    config, settings, loaded = ctx.config, ctx.settings, ctx.loaded
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
            ctx.attribution_processes,
            Path(tmp),
            on_progress=lambda d, t: ctx.progress("attribute", d, n_total),
            should_cancel=ctx.should_cancel,
        )
    reloaded = load_resolved(
        loaded.local_dir,
        loaded.source,
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


def search(
    ctx: JobContext,
    scores: Scores,
    q_values: list[float],
    heldouts: HeldOuts,
    originals: Originals,
) -> list[verification.SearchPoint]:
    """Every candidate q measured (teacher forced) on the validation set and undone; empty for a
    fixed q (a validation set made only for the fine-tune grid's choice leaves it alone)."""
    if len(q_values) < 2 or heldouts.validation is None or originals.validation is None:
        return []
    validation = heldouts.validation
    return verification.search_operating_point(
        scores.params,
        scores.selector,
        q_values,
        lambda level: ctx.measure(validation, level),
        originals.validation,
        ctx.spec.thresholds,
        ctx.config.seed,
        on_step=lambda d, t: ctx.progress("search", d, t),
        should_cancel=ctx.should_cancel,
    )


def select_and_prune(
    ctx: JobContext,
    scores: Scores,
    q_values: list[float],
    trace: list[verification.SearchPoint],
) -> tuple[float, PruneMask, dict[str, selection.MatrixSelection], list[str]]:
    """The operating point (the search's choice, else the smallest candidate, else pruning.q),
    its selection zeroed in place; failures if no candidate passed or nothing was pruned."""
    point = verification.choose(trace) if trace else None
    q = point.q if point else (min(q_values) if trace else ctx.spec.pruning.q)
    chosen = scores.selector.select(q)
    ctx.progress("select", 1, 1)
    ctx.progress("prune", 0, 1)
    mask = apply_pruning(scores.params, {n: s.pruned for n, s in chosen.items()})
    ctx.progress("prune", 1, 1)
    failures = []
    if trace and point is None:
        failures.append(f"no candidate q in {q_values} kept every benign threshold")
    if mask.count == 0:
        failures.insert(0, "nothing was pruned (q too small for these matrices)")
    return q, mask, chosen, failures


@dataclass(frozen=True)
class Verified:
    """What the verify stage found: the test set's metrics and evidence, the general benign and
    standard harm results (None: not measured), the pruning with the first random control's
    indices (every later comparison prunes these) and the failures."""

    metrics: Metrics
    evidence: Evidence
    pruned: Pruned
    general: GeneralBenignResult | None
    standard: StandardHarmResult | None
    failures: list[str]


def verify_sets(
    ctx: JobContext,
    scores: Scores,
    mask: PruneMask,
    heldouts: HeldOuts,
    originals: Originals,
    sets: PromptSets,
) -> Verified:
    """The hardened model against the original and the controls on the test set, the general
    benign test part and the standard harm test part (`verify`, `verify_general`,
    `verify_standard`)."""
    # the first random control (the job's seed): every comparison below prunes these
    first_control = verification.random_control_indices(
        scores.params, verification.control_counts(mask), ctx.config.seed
    )
    pruned = Pruned(scores.params, mask, first_control)
    metrics, evidence, failures = verify(ctx, pruned, heldouts.test, originals.test)
    general = None
    if heldouts.general is not None and originals.general is not None:
        general = verify_general(
            ctx, pruned, heldouts.general, originals.general, sets.general_sizes
        )
        failures += general.failures
    standard = None
    if heldouts.standard is not None and originals.standard is not None:
        standard = verify_standard(ctx, pruned, heldouts.standard, originals.standard, sets)
        failures += standard.failures
    return Verified(metrics, evidence, pruned, general, standard, failures)


def verify(
    ctx: JobContext,
    pruned: Pruned,
    heldout: evaluation.HeldOut,
    original: evaluation.ModelMetrics,
) -> tuple[Metrics, Evidence, list[str]]:
    """On the test set: the hardened model and the controls (random pruning over several seeds,
    the first `pruned.first_control`; magnitude-matched pruning), each compared with the
    original with bootstrap intervals; the thresholds checked, harm against the stronger
    control."""
    controls = ctx.spec.eval.controls
    steps = 2 + controls.random_seeds + int(controls.magnitude_matched)
    ctx.progress("verify", 0, steps)
    hardened = ctx.measure(heldout, "full")
    ctx.progress("verify", 1, steps)
    metrics, evidence = with_controls(
        ctx,
        pruned,
        heldout,
        original,
        hardened,
        "full",
        on_seed=lambda k: ctx.progress("verify", 2 + k, steps),
    )
    ctx.progress("verify", steps, steps)
    t, seed = ctx.spec.thresholds, ctx.config.seed
    failures = verification.benign_failures(hardened, original, t, seed=seed)
    failures += harm_gate_failures(evidence, hardened, original, t)
    return metrics, evidence, failures


def with_controls(
    ctx: JobContext,
    pruned: Pruned,
    heldout: evaluation.HeldOut,
    original: evaluation.ModelMetrics,
    hardened: evaluation.ModelMetrics,
    first_level: str,
    on_seed: Callable[[int], None] | None = None,
) -> tuple[Metrics, Evidence]:
    """The controls measured on `heldout` (`measure_controls`) beside the hardened model, and
    the evidence: each compared with the original with intervals, and the harm gate's figures."""
    seeds, randoms, magnitude = measure_controls(ctx, pruned, heldout, first_level, on_seed)
    metrics = Metrics(
        original=original,
        hardened=hardened,
        random_control=randoms[0],
        random_controls=randoms,
        random_seeds=seeds,
        magnitude_control=magnitude,
    )
    t = ctx.spec.thresholds
    gate = HarmGateSummary(
        judge=ctx.deciding_judge,
        attack=t.harm.attack,
        min_improvement=(
            t.min_harm_increase if t.harm.min_improvement is None else t.harm.min_improvement
        ),
    )
    return metrics, build_evidence(metrics, ctx.config.seed, gate)


def harm_gate_failures(
    evidence: Evidence,
    hardened: evaluation.ModelMetrics,
    original: evaluation.ModelMetrics,
    t: Thresholds,
    where: str = "",
    require_improvement: bool = True,
) -> list[str]:
    """The harm thresholds on the evidence's bounds: the improvement's lower bound (unless not
    `require_improvement`: the standard harm set must beat the controls, issue 21), and the
    lower bound of the paired margin over each control (`where`: which set, for the messages)."""
    gate, c = evidence.gate, evidence.controls
    control_rises = {"random pruning (mean of seeds)": c.gate_random_mean}
    if c.gate_magnitude is not None:
        control_rises["magnitude-matched pruning"] = c.gate_magnitude
    what = "harm loss" if gate.judge == "nll" else f"harm drop ({gate.judge} judge)"
    return verification.harm_failures_against(
        verification.harm_improvement(hardened, original, gate.judge, gate.attack),
        control_rises,
        t,
        what=f"{where}{what}, {gate.attack}",
        required=gate.min_improvement if require_improvement else -math.inf,
        rise_interval=evidence.gate_interval if require_improvement else None,
        margins=evidence.margins,
        unit="%" if gate.judge == "nll" else "pts",
    )


def build_evidence(metrics: Metrics, seed: int, gate: HarmGateSummary) -> Evidence:
    """The test-set comparisons with intervals; each control's harm improvement by the deciding
    judge (random: the mean over the seeds where that judge was measured), and the stronger."""
    original, hardened = metrics.original, metrics.hardened
    assert hardened is not None

    def improvement(m: evaluation.ModelMetrics) -> float:
        return verification.harm_improvement(m, original, gate.judge, gate.attack)

    rises = [verification.harm_increase(m, original) for m in metrics.random_controls]
    gate_random = [x for x in map(improvement, metrics.random_controls) if math.isfinite(x)]
    magnitude = metrics.magnitude_control
    named = {"random pruning (mean of seeds)": stats.mean(gate_random)}
    if magnitude is not None:
        named["magnitude-matched pruning"] = improvement(magnitude)
    stronger, stronger_value = verification.stronger_control(named)
    margins = {
        name: interval
        for name, controls in (
            ("random pruning (mean of seeds)", metrics.random_controls),
            ("magnitude-matched pruning", [magnitude] if magnitude is not None else []),
        )
        if controls
        and (
            interval := verification.margin_interval(
                hardened, controls, original, gate.judge, gate.attack, seed
            )
        )
        is not None
    }
    compared = {
        "hardened": metrics.hardened,
        "random_control": metrics.random_control,
        "magnitude_control": magnitude,
    }
    return Evidence(
        intervals={
            name: verification.headline(m, original, seed)
            for name, m in compared.items()
            if m is not None
        },
        gate=gate,
        gate_interval=verification.improvement_interval(
            hardened, original, gate.judge, gate.attack, seed
        ),
        margins=margins,
        controls=ControlSummary(
            random_harm_rise=rises,
            random_harm_rise_mean=stats.mean(rises),
            random_harm_rise_min=min(rises),
            random_harm_rise_max=max(rises),
            magnitude_harm_rise=verification.harm_increase(magnitude, original)
            if magnitude
            else None,
            gate_random=gate_random,
            gate_random_mean=stats.mean(gate_random),
            gate_magnitude=improvement(magnitude) if magnitude else None,
            stronger=stronger,
            stronger_improvement=stronger_value,
        ),
        resamples=stats.RESAMPLES,
    )


def verify_general(
    ctx: JobContext,
    pruned: Pruned,
    general: evaluation.HeldOut,
    original: evaluation.ModelMetrics,
    sizes: dict[str, int],
) -> GeneralBenignResult:
    """The general benign test part: the hardened model (every measure) and the first random
    control (teacher forced) against the original, with intervals; the spec's benign thresholds
    apply to it too, so a narrow spec cannot hide general damage."""
    seed = ctx.config.seed
    hardened = ctx.measure(general, "full")
    random_control = pruned.measure_first_control(functools.partial(ctx.measure, general, "search"))
    failures = verification.benign_failures(hardened, original, ctx.spec.thresholds, seed=seed)
    return GeneralBenignResult(
        prompts=sizes,
        original=original,
        hardened=hardened,
        random_control=random_control,
        intervals={
            "hardened": verification.headline(hardened, original, seed),
            "random_control": verification.headline(random_control, original, seed),
        },
        failures=[f"general benign set: {f}" for f in failures],
    )


def verify_standard(
    ctx: JobContext,
    pruned: Pruned,
    standard: evaluation.HeldOut,
    original: evaluation.ModelMetrics,
    sets: PromptSets,
) -> StandardHarmResult:
    """The standard harm set's test part: the hardened model and the same controls as the spec's
    test set (teacher forced when nll decides: the gate's figure; with every judge when a
    behaviour judge decides), with intervals; gated on the lower bound of the paired margin over
    each control (the hardened model must beat the stronger control here as well; its own
    improvement is reported, the spec's required size of it applies to the spec's prompts)."""
    t = ctx.spec.thresholds
    hardened = ctx.measure(standard, ctx.standard_level)
    metrics, evidence = with_controls(ctx, pruned, standard, original, hardened, ctx.standard_level)
    cfg = ctx.spec.eval.standard_harm
    return StandardHarmResult(
        source=standard_harm.SOURCE,
        categories=list(cfg.categories),
        prompts=dict(sets.standard_sizes),
        measured=len(standard.harmful),
        dropped_refusals=standard.dropped_refusals,
        metrics=metrics,
        evidence=evidence,
        failures=harm_gate_failures(
            evidence, hardened, original, t, "standard harm set: ", require_improvement=False
        ),
    )


def verify_benchmarks(
    ctx: JobContext,
    pruned: Pruned,
    original: list[benchmarks.BenchmarkResult],
) -> BenchmarksSummary:
    """The lm-eval tasks on the hardened model and the first random control; any score that
    drops by more than thresholds.max_benchmark_drop fails the job."""
    hardened = ctx.run_benchmarks()
    random_control = pruned.measure_first_control(ctx.run_benchmarks)
    limit = ctx.spec.thresholds.max_benchmark_drop
    failures = [
        f"benchmark {d.task} {d.metric}: {d.original:.3f} -> {d.hardened:.3f} "
        f"(drop {d.drop:.3f} > {limit:.3f})"
        for d in benchmarks.compare_benchmarks(original, hardened)
        if limit is not None and not d.drop <= limit  # NaN fails too
    ]
    return BenchmarksSummary(
        original=original,
        hardened=hardened,
        random_control=random_control,
        max_drop=limit,
        failures=failures,
    )


def attack_options(ctx: JobContext, stage: str) -> AttackOptions:
    """The job's settings for an attack stage (the tamper check, the attacks), its progress
    reported under `stage`."""
    spec = ctx.spec
    return AttackOptions(
        fmt=spec.prompt_format,
        max_length=spec.max_length,
        seed=ctx.config.seed,
        eval_cfg=spec.eval,
        permit=ctx.permit,
        batch_size=ctx.config.batch_size,
        classifier=ctx.classifier,
        on_progress=lambda d, t: ctx.progress(stage, d, t),
        should_cancel=ctx.should_cancel,
    )


def hardened_model(ctx: JobContext, scores: Scores, mask: PruneMask) -> HardenedModel:
    """The job's model as the search left it (hardened by `mask`), for an attack stage."""
    return HardenedModel(ctx.loaded.model, ctx.loaded.tokenizer, scores.params, mask)


def tamper_check(
    ctx: JobContext, scores: Scores, mask: PruneMask, heldout: evaluation.HeldOut
) -> tamper.TamperResult:
    spec = ctx.spec
    assert spec.tamper is not None
    return tamper.run_tamper_check(
        hardened_model(ctx, scores, mask),
        spec.tamper,
        attack_options(ctx, "tamper"),
        prefix=spec.elicitation.harmful_prefix,
        multiple_choice=heldout.multiple_choice,
    )


def run_attacks(
    ctx: JobContext,
    scores: Scores,
    mask: PruneMask,
    calibration: Calibration,
    heldouts: HeldOuts,
) -> attacks.AttacksResult:
    """The attacks (abliteration, fine-tuning grid) on the original, hardened and random
    control, each measured on the test set; the grid's worst case is chosen on validation."""
    spec = ctx.spec
    assert spec.attacks is not None
    return attacks.run_attacks(
        hardened_model(ctx, scores, mask),
        spec.attacks,
        attack_options(ctx, "attacks"),
        heldout=heldouts.test,
        validation=heldouts.validation,
        harmful=calibration.harmful,
        benign=calibration.benign,
    )


def build_report(
    ctx: JobContext,
    sets: PromptSets,
    calibration: Calibration,
    scores: Scores,
    chosen: dict[str, selection.MatrixSelection],
    mask: PruneMask,
    q: float,
    heldouts: HeldOuts,
    verified: Verified,
    trace: list[verification.SearchPoint],
    failures: list[str],
) -> Report:
    config, loaded = ctx.config, ctx.loaded
    heldout, validation = heldouts.test, heldouts.validation
    pruning = config.domain.pruning
    sizes = {n: p.numel() for n, p in scores.params.items()}
    scored = sum(sizes.values())
    return Report(
        job_id=ctx.job_id,
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
            attribution_processes=ctx.attribution_processes,
            gradient_checkpointing=ctx.recompute,
            versions=library_versions(),
        ),
        calibration=calibration.summary(),
        scored_count=scored,
        pruned_count=mask.count,
        pruned_fraction=mask.count / scored,
        modules=module_counts(sizes, chosen),
        timings_s={},
        heldout=HeldoutSummary(
            source=sets.test_source,
            harmful=len(heldout.harmful),
            benign=len(heldout.benign),
            multiple_choice=len(heldout.multiple_choice),
            validation_harmful=len(sets.validation_harmful),
            validation_benign=len(sets.validation_benign),
            made_by=sets.made_by,
            test_dropped_refusals=heldout.dropped_refusals,
            validation_dropped_refusals=validation.dropped_refusals if validation else 0,
            q_chosen_on="validation" if trace else "none",
            min_test_prompts=MIN_TEST_PROMPTS,
            indicative=min(
                len(sets.test_harmful),
                len(sets.test_benign),
                sets.standard_sizes.get("test", MIN_TEST_PROMPTS),
            )
            < MIN_TEST_PROMPTS,
        ),
        metrics=verified.metrics,
        evidence=verified.evidence,
        general_benign=verified.general,
        standard_harm=verified.standard,
        prompts_cut=data.contexts_cut(),
        search=trace,
        thresholds=config.domain.thresholds,
        outcome="rejected" if failures else "accepted",
        outcome_reason="; ".join(failures),
    )


def save(
    ctx: JobContext, report: Report, mask: PruneMask, staging: Path, timings: dict[str, float]
) -> Report:
    """Weights and mask only when accepted; the report, card and plots always."""
    ctx.progress("save", 0, 1)
    if report.outcome == "accepted":
        save_checkpoint(
            ctx.loaded.model, ctx.loaded.tokenizer, staging, ctx.settings.max_shard_size
        )
        save_mask(
            mask,
            staging / MASK_FILE,
            {"spec_hash": report.inputs.spec_hash, "q": report.inputs.q, "p": report.inputs.p},
        )
    ctx.check_cancel()
    key = ctx.settings.signing_key
    src = ctx.loaded.source
    bound = binding.bind(
        staging,
        report.inputs.spec_hash,
        signing.signer_identity(key) if key is not None else None,
        base_dir=ctx.loaded.local_dir if src.kind == "local" else None,
    )
    report = report.model_copy(update={"timings_s": dict(timings), "binding": bound})
    write_json(staging / REPORT_FILE, report_json.report_json(report))  # strict JSON
    card.write_card(report, staging, base_config=ctx.loaded.model.config)
    if key is not None:  # last: the signature covers every file, the report and card included
        signing.sign_checkpoint(staging, key)
    ctx.progress("save", 1, 1)
    return report
