"""The job's settings that the attack stages run under (the tamper check in
harmprune.measure.tamper, the attacks in harmprune.attacks): one object instead of a long list
of keyword arguments. It lives in measure, below attacks, so both can take it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from harmprune.inputs import data
from harmprune.inputs.config import EvalConfig
from harmprune.inputs.references import Permit
from harmprune.measure import evaluation
from harmprune.method.pruning import PruneMask
from torch import nn


class HardenedModel(NamedTuple):
    """What an attack stage starts from and leaves as it found it: `model` with `mask` applied
    to `params` (the scored weights), and the model's tokenizer."""

    model: nn.Module
    tokenizer: Any
    params: dict[str, nn.Parameter]
    mask: PruneMask


@dataclass(frozen=True)
class AttackOptions:
    """The job's settings that the attack stages (the tamper check, the attacks) run under:
    prompt format and length, seed, judges, the permit for the spec's sources, batch size, and
    the job's classifier, progress and cancel hooks."""

    fmt: data.PromptFormat
    max_length: int
    seed: int
    eval_cfg: EvalConfig
    permit: Permit
    batch_size: int = 8
    classifier: evaluation.ClassifierScorer | None = None
    on_progress: Callable[[int, int], None] | None = None
    should_cancel: Callable[[], bool] | None = None

    def judging(self, tokenizer: Any) -> Judging:
        """How the stage measures every model it compares, with the model's `tokenizer`."""
        return Judging(
            tokenizer, self.fmt, self.max_length, self.batch_size, self.eval_cfg, self.classifier
        )


@dataclass(frozen=True)
class Judging:
    """How the attack stages measure a model, the same for every model they compare: the job's
    tokenizer, prompt format, length and batch limits, judges and classifier."""

    tokenizer: Any
    fmt: data.PromptFormat
    max_length: int
    batch_size: int
    eval_cfg: EvalConfig
    classifier: evaluation.ClassifierScorer | None

    def evaluate(
        self, model: nn.Module, heldout: evaluation.HeldOut, level: Literal["full", "search"]
    ) -> evaluation.ModelMetrics:
        """`evaluation.evaluate` of `model` as it is now on `heldout`, with these settings."""
        return evaluation.evaluate(
            model,
            self.tokenizer,
            heldout,
            self.eval_cfg,
            fmt=self.fmt,
            max_length=self.max_length,
            batch_size=self.batch_size,
            classifier=self.classifier,
            level=level,
        )
