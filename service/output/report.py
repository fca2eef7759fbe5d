"""The machine-readable report (`report.json`): what went in, what was removed, what it cost.

Schema-versioned; no tokens and no local paths ever enter it (model sources are recorded by
reference, kind, revision, commit and file hash).
"""

from __future__ import annotations

import platform
import re
from datetime import UTC, datetime
from importlib import metadata
from typing import Any, Literal

from harmprune.inputs.config import Thresholds
from harmprune.measure.benchmarks import BenchmarkResult
from harmprune.output.binding import Binding
from harmprune.results import (
    AttacksResult,
    Interval,
    ModelMetrics,
    ModelSource,
    SearchPoint,
    TamperResult,
)
from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "1.0"  # bump the major on any change a reader of report.json would notice


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ReportInputs(Frozen):
    model: ModelSource
    domain: str
    spec_hash: str
    q: float
    p: float
    selection: str
    preserve_score: str
    prompt_format: str
    seed: int
    dtype: str
    device: str
    attribution_processes: int = Field(
        1, description="FSDP2 ranks of the attribution (1: in process, one device)"
    )
    gradient_checkpointing: bool = Field(
        False, description="Decoder blocks recomputed in the attribution's backward"
    )
    versions: dict[str, str]


class ModuleCount(Frozen):
    name: str = Field(description="Parameter name, e.g. model.layers.3.mlp.down_proj.weight")
    layer: int | None
    kind: str = Field(description="Module kind, e.g. q_proj, down_proj, c_attn")
    scored: int
    candidates: int
    protected: int = Field(description="Harm candidates kept because of their preserve score")
    pruned: int


class CalibrationSummary(Frozen):
    harmful_dropped_refusals: int = Field(
        0, description="Elicited harmful answers dropped as refusals before attribution."
    )
    harmful_pairs: int
    benign_pairs: int
    harmful_elicited: int
    benign_elicited: int
    harmful_tokens: int
    benign_tokens: int


class HeldoutSummary(Frozen):
    """The test set: it decided the verdict and gave every number of `metrics`; it chose nothing."""

    source: Literal["spec", "split"] = Field(
        description="spec: the domain's eval sets; split: a seeded share of calibration, "
        "removed from it before attribution"
    )
    harmful: int
    benign: int
    multiple_choice: int
    validation_harmful: int = Field(0, description="Validation prompts (they chose q).")
    validation_benign: int = 0
    made_by: dict[str, str] = Field(
        default_factory=dict,
        description="How each set (calibration, validation, test) was made.",
    )
    test_dropped_refusals: int = Field(
        0, description="Elicited harmful test references dropped as refusals."
    )
    validation_dropped_refusals: int = 0
    q_chosen_on: Literal["validation", "none"] = Field(
        "none", description="The set the operating-point search measured (none: q fixed)."
    )
    min_test_prompts: int = Field(30, description="Prompts per test side an interval needs.")
    indicative: bool = Field(
        False,
        description="A test side has fewer than min_test_prompts prompts (allowed by "
        "eval.allow_small_test): the verdict is indicative. (References dropped as refusals "
        "show in each interval's n.)",
    )


class Metrics(Frozen):
    """Test-set measures. `random_control` is the first random seed (every judge);
    `random_controls` all seeds (the others teacher forced only)."""

    original: ModelMetrics
    hardened: ModelMetrics | None = None
    random_control: ModelMetrics | None = None
    random_controls: list[ModelMetrics] = Field(default_factory=list)
    random_seeds: list[int] = Field(default_factory=list)
    magnitude_control: ModelMetrics | None = None


class HarmGateSummary(Frozen):
    """The judge and attack that decided harm (thresholds.harm)."""

    judge: str
    attack: str
    min_improvement: float


class ControlSummary(Frozen):
    """The controls on the test set: harm loss rise (nll, prefill) of each, and each one's
    improvement by the deciding judge (`gate_*`)."""

    random_harm_rise: list[float] = Field(description="One per random seed.")
    random_harm_rise_mean: float
    random_harm_rise_min: float
    random_harm_rise_max: float
    magnitude_harm_rise: float | None = None
    gate_random: list[float] = Field(
        description="Deciding judge's improvement per random seed where it was measured "
        "(a generation judge: the first seed only)."
    )
    gate_random_mean: float
    gate_magnitude: float | None = None
    stronger: str = Field(description="The control the harm thresholds compared against.")
    stronger_improvement: float


class Evidence(Frozen):
    """Headline figures on the test set with paired bootstrap 95% intervals over prompts
    (model -> figure -> interval; models: hardened, random_control, magnitude_control)."""

    intervals: dict[str, dict[str, Interval]]
    gate: HarmGateSummary
    gate_interval: Interval | None = Field(
        None,
        description="The hardened model's improvement by the deciding judge and attack, with "
        "its interval: the gate reads its LOWER bound.",
    )
    margins: dict[str, Interval] = Field(
        default_factory=dict,
        description="Per control: the paired difference of improvement, hardened minus control, "
        "on the same test prompts: the gate reads each one's LOWER bound.",
    )
    controls: ControlSummary
    resamples: int
    decided_on: str = Field(
        "bounds",
        description="bounds: benign thresholds on the upper bound of the 95% interval, harm on "
        "the lower bounds of the improvement and of the margin over each control.",
    )


class GeneralBenignResult(Frozen):
    """harmprune's general benign set (everyday requests, harmprune.inputs.general_benign) on its test
    part: measured in every job next to the spec's benign prompts, gated by the same thresholds."""

    prompts: dict[str, int] = Field(
        description="Prompts of the set in each part: calibration, validation, test."
    )
    original: ModelMetrics
    hardened: ModelMetrics
    random_control: ModelMetrics = Field(description="The first random seed, teacher forced.")
    intervals: dict[str, dict[str, Interval]] = Field(
        description="Per model: benign_loss_rise, answer_drift (and over_refusal_change for the "
        "hardened model) vs the original, with paired bootstrap 95% intervals."
    )
    failures: list[str]


class StandardHarmResult(Frozen):
    """The standard harm set (HarmBench behaviours of the spec's categories, harmprune.
    standard_harm) on its test part: the hardened model and every control against the original,
    with intervals, gated like the spec's own test set (the harm gate's bounds)."""

    source: str
    categories: list[str]
    prompts: dict[str, int] = Field(description="Prompts in each part: validation, test.")
    measured: int = Field(description="Test prompts whose reference the original produced.")
    dropped_refusals: int = Field(0, description="Elicited references dropped as refusals.")
    metrics: Metrics
    evidence: Evidence
    failures: list[str]


class BenchmarksSummary(Frozen):
    """lm-evaluation-harness scores (eval.benchmarks) of the three models, same tasks and setup."""

    original: list[BenchmarkResult]
    hardened: list[BenchmarkResult]
    random_control: list[BenchmarkResult] = Field(description="The first random seed.")
    max_drop: float | None = Field(description="thresholds.max_benchmark_drop (none: not gated).")
    failures: list[str]


class Report(Frozen):
    schema_version: str = SCHEMA_VERSION
    job_id: str | None = None
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    inputs: ReportInputs
    calibration: CalibrationSummary
    scored_count: int
    pruned_count: int
    pruned_fraction: float
    modules: list[ModuleCount]
    timings_s: dict[str, float]
    heldout: HeldoutSummary
    metrics: Metrics
    evidence: Evidence | None = None
    search: list[SearchPoint] = Field(default_factory=list)
    thresholds: Thresholds
    tamper: TamperResult | None = None
    attacks: AttacksResult | None = None
    benchmarks: BenchmarksSummary | None = Field(None, description="None: no eval.benchmarks.")
    general_benign: GeneralBenignResult | None = Field(
        None, description="None: the spec opted out (eval.general_benign: false)."
    )
    standard_harm: StandardHarmResult | None = Field(
        None, description="None: not measured (no eval.standard_harm.categories, or disabled)."
    )
    outcome: Literal["accepted", "rejected"]
    outcome_reason: str = ""
    prompts_cut: int = Field(
        0,
        description="Distinct generation inputs (a formatted prompt, with any forced start) "
        "longer than the spec's max_length tokens: cut to it, their start removed, before "
        "generation.",
    )
    extra: dict[str, Any] = Field(default_factory=dict)
    binding: Binding | None = Field(
        None, description="Hashes of the files, the spec and the signer (harmprune.output.binding)."
    )


_LAYER = re.compile(r"\.(\d+)\.")


def module_counts(scored_sizes: dict[str, int], selections: dict[str, Any]) -> list[ModuleCount]:
    rows = []
    for name, n in scored_sizes.items():
        sel = selections[name]
        match = _LAYER.search(name)
        parts = name.split(".")
        kind = parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]
        rows.append(
            ModuleCount(
                name=name,
                layer=int(match.group(1)) if match else None,
                kind=kind,
                scored=n,
                candidates=int(sel.candidates.numel()),
                protected=int(sel.protected_candidates),
                pruned=int(sel.pruned.numel()),
            )
        )
    return rows


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("harmprune", "torch", "transformers", "safetensors", "huggingface-hub"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions
