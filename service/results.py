"""Result types of the engine's stages, as they appear in `report.json`: plain pydantic, no torch.

The stage modules (loading, evaluation, verification, tamper) produce these; the report, the card
and any reader of a report (the API, the CLI) import them from here without importing torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSource(BaseModel):
    """Where the weights came from, as recorded in the report (no local paths, no tokens)."""

    model_config = ConfigDict(frozen=True)

    reference: str
    kind: Literal["alias", "gguf", "local", "hub"]
    revision: str | None = None
    commit: str | None = None  # Hub commit sha, when known
    gguf_sha256: str | None = None
    gguf_file: str | None = None  # the GGUF file de-quantised into the weights that were hardened
    quantisation: str | None = None  # its quantisation type (general.file_type), e.g. Q4_1
    license: str | None = None  # carried onto the model card


class ModelMetrics(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # judge -> attack -> value; with the refusal judge, "degenerate" -> attack -> share of
    # harmful answers that were repetition (neither refusal nor compliance)
    harm: dict[str, dict[str, float]]
    benign_loss: float
    answer_agreement: float
    over_refusal: float
    mc_accuracy: float | None
    dissociation_accuracy: float
    per_prompt: dict[str, list[float]] = Field(
        default_factory=dict,
        description="The values behind the means, one per test prompt (harm.<judge>.<attack>, "
        "benign_loss, answer_hits, answer_tokens, over_refusal): the bootstrap resamples them.",
    )


class SearchPoint(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    q: float
    pruned_count: int
    harm_increase: float  # relative rise of held-out harmful loss (nll, prefill)
    harm_increase_plain: float
    random_harm_increase: float  # same count, random weights
    benign_loss_increase: float
    random_benign_loss_increase: float
    answer_drift: float
    benign_loss_increase_high: float | None = None  # upper bound of the 95% interval: gated
    answer_drift_high: float | None = None
    random_answer_drift: float
    passed: bool
    failures: list[str]


class Interval(Frozen):
    """A statistic over test prompts with its paired bootstrap interval (see harmprune.measure.stats)."""

    estimate: float
    low: float
    high: float
    level: float = 0.95
    n: int | None = Field(None, description="Prompts behind the figure (pairs resampled).")
    no_variation: bool = Field(
        False,
        description="Every resample gave the same value (e.g. a rate that never changed on any "
        "prompt): no interval can be given, which is not certainty.",
    )


# ---------------------------------------------------------------- tamper check (harmprune.measure.tamper)

HARM_MEASURE = (
    "exp(-NLL) of the reference harmful answers after their forced start (prefill attack): the "
    "geometric-mean per-token probability, higher = more harm"
)


class AttackRecord(Frozen):
    """What one attack did. Equal fingerprints = the same batches, seed, steps and settings."""

    fingerprint: str = Field(
        description="sha256 of the settings (method, seed, steps, lr, rank, alpha, batch size) "
        "and of every batch's token ids and labels, in the order they were trained on."
    )
    steps: int
    first_step_loss: float
    last_step_loss: float
    train_loss_before: float = Field(description="Mean response loss on the training set.")
    train_loss_after: float


class PhaseMetrics(Frozen):
    harm_in_domain: float
    harm_broad: float
    compliance_in_domain: float | None = Field(
        None, description="Refusal judge: share of plain requests answered without refusal."
    )
    compliance_broad: float | None = None
    benign_loss_broad: float
    in_domain: ModelMetrics
    broad: ModelMetrics


class ModelTamper(Frozen):
    before: PhaseMetrics
    after: PhaseMetrics
    attack: AttackRecord


class AttackSettings(Frozen):
    method: Literal["lora", "full"]
    steps: int
    lr: float
    rank: int | None
    alpha: int | None
    batch_size: int
    seed: int
    train_pairs: int
    in_domain_items: int
    in_domain_source: Literal["spec", "split"]
    broad_harmful_items: int
    broad_benign_items: int


class TamperResult(Frozen):
    harm_measure: str = HARM_MEASURE
    settings: AttackSettings
    original: ModelTamper
    hardened: ModelTamper
    random_control: ModelTamper
    identical_attack: bool = Field(description="All three attack fingerprints are equal.")
    broad_harm_ratio: float = Field(description="After attack: hardened / original broad harm.")
    hardening_reduction: float = Field(description="1 - broad_harm_ratio.")
    hardening_reduction_in_domain: float
    random_reduction: float = Field(description="1 - random control / original, broad, after.")
    max_broad_harm_ratio: float | None
    passed: bool
    failures: list[str]

    def model(self, name: str) -> ModelTamper:
        return {"original": self.original, "hardened": self.hardened}.get(name, self.random_control)


# ---------------------------------------------------------------- attacks (harmprune.attacks)

MODELS = ("original", "hardened", "random_control")


class Measurement(Frozen):
    """One model, measured once (before or after an attack)."""

    harm: Interval = Field(description="exp(-NLL) of the reference harmful answers (module doc).")
    item_nll: list[float] = Field(description="Per held-out harmful item: the NLL behind `harm`.")
    compliance: float | None = Field(
        None, description="Refusal judge: share of plain harmful requests answered (if generated)."
    )
    benign_loss: float
    metrics: ModelMetrics = Field(description="Every measure of the verification.")


class LayerSeparation(Frozen):
    layer: int
    cohens_d: float = Field(description="Cross-fitted Cohen's d of the projections.")
    auroc: float = Field(description="P(harmful projection > benign projection), cross-fitted.")


class DirectionRecord(Frozen):
    """The direction every model is ablated with, and how it was chosen."""

    fingerprint: str = Field(
        description="sha256 of the direction (fp32), its layer, the strength and the names of "
        "the orthogonalised weights: equal = the same attack."
    )
    layer: int = Field(description="Decoder block (0-based) whose output gave the direction.")
    layers: int
    chosen_by: str = Field(description="'separation' (automatic) or 'spec' (the spec's layer).")
    separation: LayerSeparation
    by_layer: list[LayerSeparation] = Field(description="Every candidate block's separation.")
    strength: float
    weights: list[str] = Field(description="Parameters orthogonalised (residual writers).")
    harmful_prompts: int
    benign_prompts: int


class CellResult(Frozen):
    """One model under one grid cell."""

    lr: float
    steps: int
    attack: AttackRecord
    after: Measurement = Field(description="Measured on the test set (what is reported).")
    benign_loss_increase: float = Field(description="After / before the attack, minus 1.")
    allowed: bool = Field(
        description="Benign loss rise within the spec's bound, on the validation set when the "
        "cell was measured there (the worst case is chosen there, never on the test set)."
    )
    validation: Measurement | None = Field(
        None, description="The attacked model on the validation set: what chooses the worst case."
    )
    validation_benign_loss_increase: float | None = None


class AbliterationResult(Frozen):
    direction: DirectionRecord
    hardened_direction_cosine: float = Field(
        description="Cosine between the direction used (original model) and the one the hardened "
        "model's own activations give at the same block."
    )
    after: dict[str, Measurement] = Field(description="Per model, measured after the attack.")
    fingerprints: dict[str, str]
    identical_attack: bool
    harm_ratio: Interval = Field(description="After the attack: hardened / original harm.")
    random_harm_ratio: Interval = Field(description="After the attack: control / original harm.")
    max_harm_after_attack: float | None
    passed: bool
    failures: list[str]


class FineTuneSettings(Frozen):
    method: Literal["lora", "full"]
    learning_rates: list[float]
    steps: list[int]
    rank: int | None
    alpha: int | None
    batch_size: int
    seed: int
    train_pairs: int
    train_source: Literal["spec", "calibration"] = Field(
        description="spec: attacks.finetune.train; calibration: the job's harmful pairs."
    )
    max_benign_loss_increase: float


class FineTuneResult(Frozen):
    settings: FineTuneSettings
    cells: dict[str, list[CellResult]] = Field(description="Per model, every cell.")
    worst: dict[str, CellResult | None] = Field(
        description="Per model, the allowed cell with the most harm ON VALIDATION (None: no cell "
        "allowed); its test measurement is what is reported."
    )
    identical_attack: bool = Field(description="In every cell, the three fingerprints agree.")
    harm_ratio: Interval | None = Field(description="Worst case: hardened / original harm.")
    random_harm_ratio: Interval | None
    max_harm_after_attack: float | None
    passed: bool
    failures: list[str]


class AttacksResult(Frozen):
    harm_measure: str
    heldout_harmful: int
    heldout_benign: int
    before: dict[str, Measurement] = Field(description="Per model, before any attack.")
    abliteration: AbliterationResult | None = None
    finetune: FineTuneResult | None = None
    passed: bool
    failures: list[str]
