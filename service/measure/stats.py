"""Uncertainty over prompts: paired BCa bootstrap intervals. Pure Python, no torch.

Every headline number of a report compares two models on the same test prompts (hardened vs
original, control vs original). The interval resamples PROMPTS with replacement, the same
indices for both models (a paired bootstrap), recomputes the statistic on each resample and
reads the bias-corrected and accelerated (BCa, Efron 1987) quantiles of the resampled values
(linear interpolation between order statistics, as numpy's default): the bias correction comes
from the share of resamples below the estimate, the acceleration from the jackknife (each prompt
left out once). The plain percentile interval under-covers a ratio of means at small n (~87% at
n=8, ~90% at n=16 in a simulation); BCa reaches >= 93% at the minimum test size, 30 prompts
(tests/test_evidence.py). Seeded: the same inputs give the same interval. Every interval carries
its n, and an interval whose resamples never vary says so (`no_variation`) instead of reading as
certainty.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

from harmprune.results import Interval

T = TypeVar("T")
U = TypeVar("U")

RESAMPLES = 1000
LEVEL = 0.95
STUDENTIZED_MIN_N = 10


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
    if pos == low or sorted_values[low] == sorted_values[high]:  # also exact for infinities
        return sorted_values[low]
    return sorted_values[low] + (pos - low) * (sorted_values[high] - sorted_values[low])


@functools.lru_cache(maxsize=16)
def resample_indices(n: int, resamples: int, seed: int) -> tuple[tuple[int, ...], ...]:
    """`resamples` tuples of n prompt indices drawn with replacement (seeded; cached: a report
    resamples the same n many times)."""
    rng = random.Random(seed)
    return tuple(tuple(rng.randrange(n) for _ in range(n)) for _ in range(resamples))


def normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def normal_quantile(p: float) -> float:
    """Inverse of the standard normal CDF (bisection on erf: exact to ~1e-12, no scipy)."""
    if p <= 0:
        return -math.inf
    if p >= 1:
        return math.inf
    low, high = -40.0, 40.0
    for _ in range(200):
        mid = (low + high) / 2
        if normal_cdf(mid) < p:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def bca_levels(
    estimate: float, resampled: Sequence[float], jackknife: Sequence[float], level: float
) -> tuple[float, float]:
    """The two quantile levels of the BCa interval (Efron & Tibshirani 1993, ch. 14.3): z0 from
    the share of resamples below the estimate (ties count half), the acceleration from the
    jackknife values' skewness. Degenerate inputs fall back to the percentile levels."""
    tail = (1 - level) / 2
    below = sum(v < estimate for v in resampled) + 0.5 * sum(v == estimate for v in resampled)
    share = below / len(resampled)
    if not 0 < share < 1:
        return tail, 1 - tail
    z0 = normal_quantile(share)
    finite = [v for v in jackknife if math.isfinite(v)]
    centre = mean(finite) if finite else float("nan")
    spread = sum((centre - v) ** 2 for v in finite)
    accel = sum((centre - v) ** 3 for v in finite) / (6 * spread**1.5) if spread > 0 else 0.0
    levels = []
    for z_alpha in (normal_quantile(tail), normal_quantile(1 - tail)):
        shifted = z0 + z_alpha
        denominator = 1 - accel * shifted
        if denominator <= 0:
            return tail, 1 - tail
        levels.append(normal_cdf(z0 + shifted / denominator))
    return levels[0], levels[1]


def relative_change_influence(new: Sequence[float], old: Sequence[float]) -> list[float]:
    """Per-prompt linear influence of `relative_change_of_means` (delta method): its standard
    error is sd(influence) / sqrt(n)."""
    centre, rise = mean(old), relative_change_of_means(new, old)
    return [(a - b - rise * b) / centre for a, b in zip(new, old, strict=True)]


def margin_influence(pairs: Sequence[tuple[float, float]], old: Sequence[float]) -> list[float]:
    """Per-prompt linear influence of `margin_of_relative_rises` (delta method)."""
    centre, margin = mean(old), margin_of_relative_rises(pairs, old)
    return [(a - b - margin * o) / centre for (a, b), o in zip(pairs, old, strict=True)]


def standard_error(influence: Sequence[float]) -> float:
    n = len(influence)
    if n < 2:
        return math.nan
    centre = mean(influence)
    return math.sqrt(sum((x - centre) ** 2 for x in influence) / (n - 1) / n)


def paired_interval(
    new: Sequence[T],
    old: Sequence[U],
    statistic: Callable[[Sequence[T], Sequence[U]], float],
    *,
    indices: Sequence[Sequence[int]] | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    method: Literal["auto", "studentized", "bca", "percentile"] = "auto",
) -> Interval:
    """The statistic on all prompts, with its paired bootstrap interval.

    `new[i]` and `old[i]` are the two models' values on prompt i (a number, or a tuple such as
    (greedy hits, tokens) for a ratio of sums, or (hardened, control) for a margin). `indices`
    (the resamples) may be given explicitly; by default they are drawn with
    `resample_indices(len(new), resamples, seed)`. Resamples whose statistic is not finite are
    left out. The interval records its n and whether the resamples varied at all.

    `method`: `studentized` (bootstrap-t with the delta-method standard error: for the loss
    ratios, `relative_change_of_means` and `margin_of_relative_rises`, whose skew the percentile
    and BCa intervals under-cover at n=30), `bca` (every other statistic: rates, whose resamples
    can have no spread, and ratios of sums), `percentile`; `auto` picks studentized where the
    statistic has an influence function (`INFLUENCE`), else BCa."""
    if len(new) != len(old):
        raise ValueError(f"paired values differ in length: {len(new)} vs {len(old)}")
    estimate = statistic(new, old)
    n = len(new)
    if not new:
        return Interval(estimate=estimate, low=math.nan, high=math.nan, level=level, n=0)
    draws = indices if indices is not None else resample_indices(n, resamples, seed)
    influence = INFLUENCE.get(statistic)  # type: ignore[call-overload]
    if method == "auto":
        # below ~10 prompts the delta-method standard error of a resample is often zero
        method = "studentized" if influence is not None and n >= STUDENTIZED_MIN_N else "bca"
    values = []
    pivots = []
    for idx in draws:
        new_i, old_i = [new[i] for i in idx], [old[i] for i in idx]
        value = statistic(new_i, old_i)
        if not math.isfinite(value):
            continue
        values.append(value)
        if method == "studentized" and influence is not None:
            spread = standard_error(influence(new_i, old_i))
            if spread > 0:
                pivots.append((value - estimate) / spread)
            elif value != estimate:
                pivots.append(math.copysign(math.inf, value - estimate))
    values.sort()
    if (
        values
        and values[0] == values[-1]
        and (not math.isfinite(estimate) or estimate == values[0])
    ):
        return Interval(
            estimate=estimate, low=values[0], high=values[0], level=level, n=n, no_variation=True
        )
    tail = (1 - level) / 2
    if method == "studentized" and influence is not None and math.isfinite(estimate):
        spread = standard_error(influence(new, old))
        if pivots and math.isfinite(spread) and spread > 0:
            pivots.sort()
            low = estimate - quantile(pivots, 1 - tail) * spread
            high = estimate - quantile(pivots, tail) * spread
            if math.isfinite(low) and math.isfinite(high):
                return Interval(estimate=estimate, low=low, high=high, level=level, n=n)
        method = "bca"  # no usable pivot: the BCa interval instead
    low_q, high_q = tail, 1 - tail
    if method == "bca" and values and math.isfinite(estimate) and n > 2:
        jackknife = [
            statistic(
                [v for i, v in enumerate(new) if i != k], [v for i, v in enumerate(old) if i != k]
            )
            for k in range(n)
        ]
        low_q, high_q = bca_levels(estimate, values, jackknife, level)
    return Interval(
        estimate=estimate,
        low=quantile(values, low_q),
        high=quantile(values, high_q),
        level=level,
        n=n,
    )


def margin_of_relative_rises(pairs: Sequence[tuple[float, float]], old: Sequence[float]) -> float:
    """(mean(a) - mean(b)) / |mean(old)|: the relative loss rise of a minus that of b, both vs
    the same original (`pairs[i]` = (a_i, b_i)). For the harm margin over a control (nll)."""
    a = [x for x, _ in pairs]
    b = [y for _, y in pairs]
    return relative_change_of_means(a, old) - relative_change_of_means(b, old)


def margin_of_score_drops(pairs: Sequence[tuple[float, float]], old: Sequence[float]) -> float:
    """mean(b) - mean(a): how much further a's judge score dropped than b's (the original's mean
    cancels). For the harm margin over a control (refusal, classifier)."""
    return mean([y for _, y in pairs]) - mean([x for x, _ in pairs])


# statistic -> its per-prompt influence (delta method): these get studentized intervals
INFLUENCE: dict[Callable[..., float], Callable[..., list[float]]] = {
    relative_change_of_means: relative_change_influence,
    margin_of_relative_rises: margin_influence,
}
