"""The job's settings that the attack stages run under (the tamper check in
harmprune.measure.tamper, the attacks in harmprune.attacks): one object instead of a long list
of keyword arguments. It lives in measure, below attacks, so both can take it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from harmprune.inputs import data
from harmprune.inputs.config import EvalConfig
from harmprune.inputs.references import Permit
from harmprune.measure import evaluation


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
