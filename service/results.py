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
    license: str | None = None  # carried onto the model card


class ModelMetrics(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    harm: dict[str, dict[str, float]]  # judge -> attack -> value
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
    random_answer_drift: float
    passed: bool
    failures: list[str]


class Interval(Frozen):
    """A statistic over test prompts with its paired bootstrap interval (see harmprune.stats)."""

    estimate: float
    low: float
    high: float
    level: float = 0.95


# ---------------------------------------------------------------- tamper check (harmprune.tamper)

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
