"""Uncertainty over prompts: paired percentile-bootstrap intervals. Pure Python, no torch.

Every headline number of a report compares two models on the same test prompts (hardened vs
original, control vs original). The interval resamples PROMPTS with replacement, the same
indices for both models (a paired bootstrap), recomputes the statistic on each resample and
takes the 2.5% and 97.5% quantiles (linear interpolation between order statistics, as numpy's
default). Seeded: the same inputs give the same interval.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

from harmprune.results import Interval

T = TypeVar("T")

RESAMPLES = 1000
LEVEL = 0.95


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def relative_change(new: float, old: float) -> float:
    if not math.isfinite(new) or not math.isfinite(old) or old == 0:
        return float("nan")
    return (new - old) / abs(old)


def relative_change_of_means(new: Sequence[float], old: Sequence[float]) -> float:
    """(mean(new) - mean(old)) / |mean(old)|: the report's 'loss +x%' figures."""
    return relative_change(mean(new), mean(old))


def difference_of_means(new: Sequence[float], old: Sequence[float]) -> float:
    """mean(new) - mean(old): for rates (refusal, compliance, classifier scores)."""
    return mean(new) - mean(old)


def agreement_drop(new: Sequence[tuple[float, float]], old: Sequence[tuple[float, float]]) -> float:
    """Answer drift: agreement(old) - agreement(new), agreement = sum(hits) / sum(tokens)."""

    def agreement(rows: Sequence[tuple[float, float]]) -> float:
        tokens = sum(n for _, n in rows)
        return sum(h for h, _ in rows) / tokens if tokens else float("nan")

    return agreement(old) - agreement(new)


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default 'linear' method)."""
    if not sorted_values:
        return float("nan")
    pos = q * (len(sorted_values) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (pos - low) * (sorted_values[high] - sorted_values[low])


def resample_indices(n: int, resamples: int, seed: int) -> list[list[int]]:
    """`resamples` lists of n prompt indices drawn with replacement (seeded)."""
    rng = random.Random(seed)
    return [[rng.randrange(n) for _ in range(n)] for _ in range(resamples)]


def paired_interval(
    new: Sequence[T],
    old: Sequence[T],
    statistic: Callable[[Sequence[T], Sequence[T]], float],
    *,
    indices: Sequence[Sequence[int]] | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> Interval:
    """The statistic on all prompts, with its paired bootstrap interval.

    `new[i]` and `old[i]` are the two models' values on prompt i (a number, or a tuple such as
    (greedy hits, tokens) for a ratio of sums). `indices` (the resamples) may
    be given explicitly; by default they are drawn with `resample_indices(len(new), resamples,
    seed)`. Resamples whose statistic is not finite are left out."""
    if len(new) != len(old):
        raise ValueError(f"paired values differ in length: {len(new)} vs {len(old)}")
    estimate = statistic(new, old)
    if not new:
        return Interval(estimate=estimate, low=float("nan"), high=float("nan"), level=level)
    draws = indices if indices is not None else resample_indices(len(new), resamples, seed)
    values = []
    for idx in draws:
        value = statistic([new[i] for i in idx], [old[i] for i in idx])
        if math.isfinite(value):
            values.append(value)
    values.sort()
    tail = (1 - level) / 2
    return Interval(
        estimate=estimate, low=quantile(values, tail), high=quantile(values, 1 - tail), level=level
    )
