"""What the stages of one job measure with: the job's context (its model, judge model, progress
and cancel callbacks, and `measure`), and the held-out sets with the original model's reference
answers."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from harmprune.errors import CalibrationError, JobCancelled
from harmprune.inputs import data
from harmprune.inputs.config import DomainSpec, Elicitation, HardenConfig, Pair
from harmprune.inputs.loading import LoadedModel
from harmprune.inputs.references import Permit
from harmprune.inputs.sets import PromptSets
from harmprune.measure import benchmarks, evaluation, judges, verification
from harmprune.method.pruning import PruneMask
from harmprune.settings import Settings

ProgressFn = Callable[[str, int, int], None]
CancelFn = Callable[[], bool]


@dataclass(frozen=True)
class JobContext:
    """What the stages of one job share: the job's config and settings, the loaded model, the
    judge model (if any) and the progress and cancel callbacks. Built once by `load`; the
    distributed attribution replaces `loaded` (it reloads the model) via `dataclasses.replace`."""

    config: HardenConfig
    settings: Settings
    loaded: LoadedModel
    progress: ProgressFn
    should_cancel: CancelFn | None
    classifier: judges.ClassifierJudge | None
    recompute: bool  # gradient checkpointing in the attribution (decided by the preflight)
    permit: Permit  # what this job may load (harmprune.inputs.references)
    attribution_processes: int = 1
    job_id: str | None = None

    @property
    def spec(self) -> DomainSpec:
        return self.config.domain

    @property
    def fmt(self) -> data.PromptFormat:
        return self.spec.prompt_format

    def check_cancel(self) -> None:
        if self.should_cancel and self.should_cancel():
            raise JobCancelled("the job was cancelled")

    def run_benchmarks(self) -> list[benchmarks.BenchmarkResult]:
        """The spec's lm-eval tasks on the model as it is now (in memory, no reload)."""
        assert self.spec.eval.benchmarks is not None
        return benchmarks.run_benchmarks(
            self.loaded.model, self.loaded.tokenizer, self.spec.eval.benchmarks, self.permit
        )

    @property
    def deciding_judge(self) -> str:
        return verification.deciding_judge(
            self.spec.thresholds, list(self.spec.eval.judges), self.classifier is not None
        )

    @property
    def standard_level(self) -> str:
        """How far the standard harm set is measured: with every judge when a behaviour judge
        decides harm, teacher forced (its gate's figure, nll) when nll decides."""
        return "search" if self.deciding_judge == "nll" else "full"

    def measure(
        self, heldout: evaluation.HeldOut, level: str = "full", original: bool = False
    ) -> evaluation.ModelMetrics:
        """Every measure of the model as it is now, on `heldout` (`search`: teacher forced only;
        `original`: the unchanged model that made `heldout`'s references, whose answers made
        with them are reused)."""
        return evaluation.evaluate(
            self.loaded.model,
            self.loaded.tokenizer,
            heldout,
            self.spec.eval,
            fmt=self.fmt,
            max_length=self.spec.max_length,
            batch_size=self.config.batch_size,
            classifier=self.classifier,
            level=level,  # type: ignore[arg-type]
            original=original,
        )


def refusal_filter(
    elicitation: Elicitation, max_new_tokens: int | None = None
) -> judges.RefusalJudge | None:
    """The judge that cleans elicited harmful answers (None: the spec turned it off), its word
    limit scaled to the budget the answers were generated with: `max_new_tokens` (held-out
    references: eval.max_new_tokens), else elicitation.max_new_tokens (calibration)."""
    if not elicitation.drop_refusals:
        return None
    return judges.RefusalJudge.for_budget(max_new_tokens or elicitation.max_new_tokens)


def _elicit_references(
    ctx: JobContext,
    harmful: list[Pair],
    benign: list[Pair],
    source: str,
    *,
    multiple_choice: Sequence[evaluation.MultipleChoice] = (),
    refuses: Callable[[str], bool] | None = None,
) -> evaluation.HeldOut:
    """`evaluation.build_heldout` on the job's original model, with the spec's prompt format,
    prefill prefix, judges and the job's batch size."""
    spec = ctx.spec
    return evaluation.build_heldout(
        ctx.loaded.model,
        ctx.loaded.tokenizer,
        harmful,
        benign,
        multiple_choice,
        source=source,
        fmt=spec.prompt_format,
        prefix=spec.elicitation.harmful_prefix,
        cfg=spec.eval,
        batch_size=ctx.config.batch_size,
        refuses=refuses,
    )


def build_heldout(
    ctx: JobContext, harmful: list[Pair], benign: list[Pair], name: str
) -> evaluation.HeldOut | None:
    """Reference answers of the original model for one held-out set (None: the set is empty,
    e.g. no validation for a fixed q). The spec's multiple-choice items belong to the test set."""
    if not harmful and not benign:
        return None
    spec = ctx.spec
    heldout = _elicit_references(
        ctx,
        harmful,
        benign,
        name,
        multiple_choice=[
            evaluation.MultipleChoice(m.question, list(m.choices), m.answer)
            for m in spec.eval.multiple_choice
        ]
        if name == "test"
        else [],
        refuses=judge.refuses
        if (judge := refusal_filter(spec.elicitation, spec.eval.max_new_tokens))
        else None,
    )
    if not heldout.harmful or (not heldout.benign and name != "standard"):
        raise CalibrationError(f"the {name} sets are empty after elicitation")
    return heldout


def build_general(ctx: JobContext, prompts: list[Pair]) -> evaluation.HeldOut | None:
    """The general benign test part with the original's greedy answers as references (None:
    the spec opted out)."""
    if not prompts:
        return None
    general = _elicit_references(ctx, [], prompts, "general")
    if not general.benign:
        raise CalibrationError("the general benign test part is empty after elicitation")
    return general


def build_standard(ctx: JobContext, prompts: list[Pair]) -> evaluation.HeldOut | None:
    """The standard harm set's test part, its references elicited from the original under
    prefill exactly like the spec's own (`build_heldout`: the same refusal filter); None: not
    measured."""
    return build_heldout(ctx, prompts, [], "standard") if prompts else None


@dataclass(frozen=True)
class HeldOuts:
    """The job's held-out sets with the original's reference answers: test (the verdict),
    validation (the job's choices; None: nothing is chosen), the general benign test part and the
    standard harm test part (None: not measured)."""

    test: evaluation.HeldOut
    validation: evaluation.HeldOut | None
    general: evaluation.HeldOut | None
    standard: evaluation.HeldOut | None


def build_heldouts(ctx: JobContext, sets: PromptSets) -> HeldOuts:
    test = build_heldout(ctx, sets.test_harmful, sets.test_benign, "test")
    assert test is not None  # split_sets always makes a test set
    return HeldOuts(
        test=test,
        validation=build_heldout(
            ctx, sets.validation_harmful, sets.validation_benign, "validation"
        ),
        general=build_general(ctx, sets.general_test),
        standard=build_standard(ctx, sets.standard_test),
    )


@dataclass(frozen=True)
class Originals:
    """The original model measured on each held-out set (None where there is no such set)."""

    test: evaluation.ModelMetrics
    validation: evaluation.ModelMetrics | None
    general: evaluation.ModelMetrics | None
    standard: evaluation.ModelMetrics | None


def measure_originals(ctx: JobContext, heldouts: HeldOuts) -> Originals:
    """Every held-out set on the original model: test and general with every measure, validation
    teacher forced (the search's level), the standard harm set at `ctx.standard_level`."""
    ctx.progress("evaluate", 0, 1)
    test, validation = heldouts.test, heldouts.validation
    general, standard = heldouts.general, heldouts.standard
    originals = Originals(
        test=ctx.measure(test, "full", original=True),
        validation=ctx.measure(validation, "search") if validation else None,
        general=ctx.measure(general, "full", original=True) if general else None,
        standard=ctx.measure(standard, ctx.standard_level, original=True) if standard else None,
    )
    ctx.progress("evaluate", 1, 1)
    return originals


@dataclass(frozen=True)
class Pruned:
    """The job's pruning as every comparison after the search sees it: `mask` applied to
    `params` (the scored weights), and the first random control's indices (the job's seed),
    which the test set, the general and standard sets and the benchmarks all prune."""

    params: dict[str, torch.nn.Parameter]
    mask: PruneMask
    first_control: dict[str, torch.Tensor]

    def measure_with(self, indices: dict[str, torch.Tensor], measure: Callable[[], Any]) -> Any:
        """`measure()` with pruning of `indices` (a control) in place of the hardening (the
        model ends hardened)."""
        return verification.measure_control(self.params, self.mask, indices, measure)

    def measure_first_control(self, measure: Callable[[], Any]) -> Any:
        return self.measure_with(self.first_control, measure)


def measure_controls(
    ctx: JobContext,
    pruned: Pruned,
    heldout: evaluation.HeldOut,
    first_level: str,
    on_seed: Callable[[int], None] | None = None,
) -> tuple[list[int], list[evaluation.ModelMetrics], evaluation.ModelMetrics | None]:
    """(seeds, random controls, magnitude-matched control) on `heldout`: random pruning of the
    mask's count per matrix over eval.controls.random_seeds seeds (the first: the job's seed and
    `pruned.first_control`, measured at `first_level`; the others teacher forced only), and
    magnitude-matched pruning (None unless eval.controls.magnitude_matched) measured as far as
    the harm gate needs: with every judge when the deciding judge generates (refusal,
    classifier), teacher forced when it is nll. `on_seed(k)` after each random seed."""
    seed = ctx.config.seed
    controls = ctx.spec.eval.controls
    seeds = [seed + 1000 * k for k in range(controls.random_seeds)]  # the first: the job's seed
    counts = verification.control_counts(pruned.mask)
    randoms = []
    for k, s in enumerate(seeds):
        indices = (
            pruned.first_control
            if k == 0
            else verification.random_control_indices(pruned.params, counts, s)
        )
        level = first_level if k == 0 else "search"  # extra seeds: teacher forced only
        randoms.append(pruned.measure_with(indices, functools.partial(ctx.measure, heldout, level)))
        if on_seed is not None:
            on_seed(k)
    magnitude = None
    if controls.magnitude_matched:
        indices = verification.magnitude_matched_indices(pruned.params, pruned.mask, seed)
        magnitude = pruned.measure_with(
            indices, functools.partial(ctx.measure, heldout, ctx.standard_level)
        )
    return seeds, randoms, magnitude
