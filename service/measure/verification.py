"""Stage 8, verification: controls, intervals, thresholds and the operating-point search.

One attribution pass serves every candidate q: each candidate is selected, pruned, measured and
undone with its mask (on the VALIDATION set). The chosen point is then measured on the TEST set
next to the original model and two kinds of control, each pruning exactly the same number of
weights in the same matrices:
- random: uniform over each matrix, several seeds (the first measured fully, the others teacher
  forced), averaged, their spread reported;
- magnitude-matched: drawn among weights whose |W| is close to the selected weights' (so "it
  removed large weights" cannot explain the effect).
Harm thresholds compare against the STRONGER control (the larger harm rise). Every headline
figure carries a paired bootstrap 95% interval over test prompts (harmprune.measure.stats), and every
gate decides on a BOUND of one (issue 21): a benign threshold on the upper bound of the rise,
the harm thresholds on the lower bounds of the hardened model's improvement and of its paired
margin over each control. The q search applies the same rule on the validation prompts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any, Literal

import torch
from harmprune.inputs.config import Thresholds
from harmprune.measure import stats
from harmprune.measure.evaluation import ModelMetrics, relative_change
from harmprune.method import selection
from harmprune.method.pruning import PruneMask, apply_pruning, restore_weights
from harmprune.results import Interval, SearchPoint
from torch import nn


def random_control_indices(
    params: dict[str, nn.Parameter], counts: dict[str, int], seed: int
) -> dict[str, torch.Tensor]:
    """`counts[name]` distinct flat indices drawn uniformly from each matrix, reproducibly.

    `random.sample` over a range costs O(k), not O(n) like a permutation of the whole matrix
    (which took seconds per call on a 135M model and dominated the search).
    """
    rng = random.Random(seed)
    out = {}
    for name in sorted(counts):
        k = counts[name]
        if k:
            picked = rng.sample(range(params[name].numel()), k)
            out[name] = torch.sort(torch.tensor(picked, dtype=torch.long)).values
    return out


def harm_increase(m: ModelMetrics, base: ModelMetrics, attack: str = "prefill") -> float:
    return relative_change(m.harm["nll"][attack], base.harm["nll"][attack])


def harm_improvement(m: ModelMetrics, base: ModelMetrics, judge: str, attack: str) -> float:
    """How much less harm than the original, by one judge under one attack: the relative rise of
    the harmful-answer loss (nll), else the drop of the judge's mean score (NaN: not measured)."""
    if judge == "nll":
        return harm_increase(m, base, attack)
    new, old = m.harm.get(judge, {}).get(attack), base.harm.get(judge, {}).get(attack)
    if new is None or old is None:
        return float("nan")
    return old - new


def deciding_judge(t: Thresholds, judges: list[str], has_classifier: bool) -> str:
    """The spec's choice, else the best judge configured: the classifier if present, else nll."""
    if t.harm.judge is not None:
        return t.harm.judge
    return "classifier" if "classifier" in judges and has_classifier else "nll"


def amount(x: float, unit: Literal["%", "pts"] = "%") -> str:
    """A relative change in percent (+3.6%); a change of a rate in points (+4.2 pts)."""
    if not math.isfinite(x):
        return "n/a"
    return f"{x:+.1%}" if unit == "%" else f"{x * 100:+.1f} pts"


def describe(iv: Interval, side: Literal["upper", "lower"], unit: Literal["%", "pts"] = "%") -> str:
    """'+3.6% (upper bound +6.6%, n=30)': a figure with the bound a gate read, and its n."""
    if iv.no_variation:
        return f"{amount(iv.estimate, unit)} (no variation, n={iv.n})"
    bound = iv.high if side == "upper" else iv.low
    n = f", n={iv.n}" if iv.n is not None else ""
    return f"{amount(iv.estimate, unit)} ({side} bound {amount(bound, unit)}{n})"


def benign_bounds(m: ModelMetrics, base: ModelMetrics, seed: int = 0) -> dict[str, Interval]:
    """The benign figures the thresholds read, with intervals (when per-prompt values exist);
    a figure without them is a point (an interval of zero width, n unknown)."""
    found = headline(
        m, base, seed, only=("benign_loss_rise", "answer_drift", "over_refusal_change")
    )
    points = {
        "benign_loss_rise": relative_change(m.benign_loss, base.benign_loss),
        "answer_drift": base.answer_agreement - m.answer_agreement,
        "over_refusal_change": m.over_refusal - base.over_refusal,  # nan in search mode
    }
    for key, value in points.items():
        if key not in found and math.isfinite(value):
            found[key] = Interval(estimate=value, low=value, high=value)
    if "benign_loss_rise" not in found:
        nan = float("nan")
        found["benign_loss_rise"] = Interval(estimate=nan, low=nan, high=nan)
    return found


def benign_failures(
    m: ModelMetrics, base: ModelMetrics, t: Thresholds, quick: bool = False, seed: int = 0
) -> list[str]:
    """Which benign thresholds a measured model misses (empty = all kept), each decided on the
    UPPER bound of its 95% interval (the point estimate where no per-prompt values exist)."""
    failures = []
    bounds = benign_bounds(m, base, seed)
    loss = bounds["benign_loss_rise"]
    if not math.isfinite(loss.high) or loss.high > t.max_benign_loss_increase:
        failures.append(f"benign loss {describe(loss, 'upper')} > {t.max_benign_loss_increase:.1%}")
    drift = bounds.get("answer_drift")
    if drift is not None and drift.high > t.max_answer_drift:
        failures.append(
            f"answer drift {describe(drift, 'upper', 'pts')} > {amount(t.max_answer_drift, 'pts')}"
        )
    refusal = bounds.get("over_refusal_change")
    limit = t.max_over_refusal_increase
    if refusal is not None and math.isfinite(refusal.high) and refusal.high > limit:
        failures.append(
            f"over-refusal {describe(refusal, 'upper', 'pts')} > {amount(limit, 'pts')}"
        )
    return failures


def harm_failures(
    hardened: ModelMetrics, control: ModelMetrics, base: ModelMetrics, t: Thresholds
) -> list[str]:
    """Harm thresholds against one control (see `harm_failures_against` for several)."""
    return harm_failures_against(
        harm_increase(hardened, base), {"random control": harm_increase(control, base)}, t
    )


def harm_failures_against(
    rise: float,
    control_rises: dict[str, float],
    t: Thresholds,
    what: str = "harm loss",
    required: float | None = None,
    rise_interval: Interval | None = None,
    margins: dict[str, Interval] | None = None,
    unit: Literal["%", "pts"] = "%",
) -> list[str]:
    """The hardened harm improvement (`what`) must reach `required` (default
    `min_harm_increase`) and beat the STRONGER control (the largest improvement among
    `control_rises`) by `min_margin_over_random`.

    With intervals (the job's gates), each decides on its LOWER bound: `rise_interval` that of
    the improvement, `margins[control]` that of the paired difference hardened - control; every
    control with a margin interval must be beaten, the stronger one included."""
    failures = []
    need = t.min_harm_increase if required is None else required
    if rise_interval is not None:
        if not math.isfinite(rise_interval.low) or rise_interval.low < need:
            failures.append(
                f"{what} {describe(rise_interval, 'lower', unit)} < required {amount(need, unit)}"
            )
    elif not math.isfinite(rise) or rise < need:
        failures.append(f"{what} {rise:+.1%} < required {need:.1%}")
    name, strongest = stronger_control(control_rises)
    if margins:
        for control, margin in margins.items():
            if not math.isfinite(margin.low) or margin.low < t.min_margin_over_random:
                failures.append(
                    f"{what}: margin over {control} {describe(margin, 'lower', unit)} < "
                    f"required {amount(t.min_margin_over_random, unit)}"
                )
    elif not math.isfinite(strongest) or rise - strongest < t.min_margin_over_random:
        failures.append(
            f"harm rise over the stronger control ({name}) {rise - strongest:+.1%} < required "
            f"{t.min_margin_over_random:.1%}"
        )
    return failures


def improvement_interval(
    model: ModelMetrics, base: ModelMetrics, judge: str, attack: str, seed: int
) -> Interval | None:
    """The hardened model's harm improvement by `judge` under `attack`, with its interval (None:
    no per-prompt values). nll: the relative loss rise; a judge score: its drop (old - new)."""
    column = f"harm.{judge}.{attack}"
    new, old = model.per_prompt.get(column), base.per_prompt.get(column)
    if not new or not old or len(new) != len(old):
        return None
    if judge == "nll":
        return stats.paired_interval(new, old, stats.relative_change_of_means, seed=seed)
    # a drop of the mean score: the difference old - new
    return stats.paired_interval(old, new, stats.difference_of_means, seed=seed)


def control_column(controls: list[ModelMetrics], column: str) -> list[float] | None:
    """Per prompt, the mean over the controls that measured `column` (None: none did)."""
    measured = [c.per_prompt[column] for c in controls if column in c.per_prompt]
    if not measured or len({len(v) for v in measured}) != 1:
        return None
    return [sum(values) / len(values) for values in zip(*measured, strict=True)]


def margin_interval(
    hardened: ModelMetrics,
    controls: list[ModelMetrics],
    base: ModelMetrics,
    judge: str,
    attack: str,
    seed: int,
) -> Interval | None:
    """The paired difference of harm improvement, hardened minus the control (several random
    seeds: their per-prompt mean), on the same test prompts, with its interval (None: not
    measured per prompt)."""
    column = f"harm.{judge}.{attack}"
    new, old = hardened.per_prompt.get(column), base.per_prompt.get(column)
    control = control_column(controls, column)
    if not new or not old or control is None or not len(new) == len(old) == len(control):
        return None
    pairs = list(zip(new, control, strict=True))
    statistic = stats.margin_of_relative_rises if judge == "nll" else stats.margin_of_score_drops
    return stats.paired_interval(pairs, old, statistic, seed=seed)


def stronger_control(control_rises: dict[str, float]) -> tuple[str, float]:
    """(name, harm rise) of the control with the largest harm rise; a NaN rise wins (unknown =
    not beaten)."""
    for name, rise in control_rises.items():
        if not math.isfinite(rise):
            return name, rise
    return max(control_rises.items(), key=lambda kv: kv[1])


Measure = Callable[[str], ModelMetrics]  # measure(level) of the model as it is now


def search_operating_point(
    params: dict[str, nn.Parameter],
    selector: selection.RankedScores | selection.FullScores,
    q_values: list[float],
    measure: Measure,
    original: ModelMetrics,
    thresholds: Thresholds,
    seed: int,
    on_step: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> list[SearchPoint]:
    """Measure every candidate q; the model is left unpruned afterwards."""
    from harmprune.errors import JobCancelled

    trace = []
    for i, q in enumerate(q_values):
        if should_cancel and should_cancel():
            raise JobCancelled("cancelled during the operating-point search")
        chosen = selector.select(q)
        mask = apply_pruning(params, {n: s.pruned for n, s in chosen.items()})
        pruned = measure("search")
        restore_weights(params, mask)
        counts = {n: idx.numel() for n, (idx, _) in mask.entries.items()}
        random_mask = apply_pruning(params, random_control_indices(params, counts, seed))
        control = measure("search")
        restore_weights(params, random_mask)
        failures = benign_failures(pruned, original, thresholds, seed=seed)
        bounds = benign_bounds(pruned, original, seed)
        trace.append(
            SearchPoint(
                q=q,
                pruned_count=mask.count,
                harm_increase=harm_increase(pruned, original),
                harm_increase_plain=harm_increase(pruned, original, "plain"),
                random_harm_increase=harm_increase(control, original),
                benign_loss_increase=relative_change(pruned.benign_loss, original.benign_loss),
                random_benign_loss_increase=relative_change(
                    control.benign_loss, original.benign_loss
                ),
                answer_drift=original.answer_agreement - pruned.answer_agreement,
                benign_loss_increase_high=bounds["benign_loss_rise"].high,
                answer_drift_high=bounds["answer_drift"].high if "answer_drift" in bounds else None,
                random_answer_drift=original.answer_agreement - control.answer_agreement,
                passed=not failures and mask.count > 0,
                failures=failures or ([] if mask.count else ["nothing pruned"]),
            )
        )
        if on_step:
            on_step(i + 1, len(q_values))
    return trace


def choose(trace: list[SearchPoint]) -> SearchPoint | None:
    """The passing candidate with the largest harm rise (ties: the smaller q)."""
    passing = [pt for pt in trace if pt.passed and math.isfinite(pt.harm_increase)]
    if not passing:
        return None
    return max(passing, key=lambda pt: (pt.harm_increase, -pt.q))


def control_counts(mask: PruneMask) -> dict[str, int]:
    return {n: idx.numel() for n, (idx, _) in mask.entries.items()}


def magnitude_matched_indices(
    params: dict[str, nn.Parameter], mask: PruneMask, seed: int, window: int = 32
) -> dict[str, torch.Tensor]:
    """For every selected weight, a different weight of the same matrix whose |W| rank is within
    `window` ranks of it (seeded; never a selected weight, never twice): the same counts, with
    magnitudes like the selection's."""
    rng = random.Random(seed)
    out = {}
    for name in sorted(mask.entries):
        selected = mask.entries[name][0]
        if not selected.numel():
            continue
        flat = params[name].detach().reshape(-1)
        # the selection is zeroed in place: rank it by the original values the mask kept
        magnitude = flat.abs().float().clone()
        magnitude[selected] = mask.entries[name][1].abs().float().to(magnitude.device)
        order = torch.argsort(magnitude)
        rank_of = torch.empty_like(order)
        rank_of[order] = torch.arange(order.numel(), device=order.device)
        taken = set(selected.tolist())
        picked: list[int] = []
        last = order.numel() - 1
        for r in sorted(rank_of[selected].tolist()):
            for attempt in range(64 * 8):
                spread = window * (1 + attempt // 64)  # widen the window if it is exhausted
                j = int(order[min(last, max(0, r + rng.randint(-spread, spread)))])
                if j not in taken:
                    taken.add(j)
                    picked.append(j)
                    break
        out[name] = torch.sort(torch.tensor(picked, dtype=torch.long)).values
    return out


def measure_control(
    params: dict[str, nn.Parameter],
    mask: PruneMask,
    indices: dict[str, torch.Tensor],
    measure: Callable[[], Any],
) -> Any:
    """Swap the hardening for pruning `indices`, measure, swap back (the model ends hardened)."""
    restore_weights(params, mask)
    control_mask = apply_pruning(params, indices)
    try:
        return measure()
    finally:
        restore_weights(params, control_mask)
        apply_pruning(params, {n: idx for n, (idx, _) in mask.entries.items()})


def measure_random_control(
    params: dict[str, nn.Parameter], mask: PruneMask, seed: int, measure: Callable[[], Any]
) -> Any:
    """Swap the hardening for random pruning of the same counts, measure, swap back."""
    indices = random_control_indices(params, control_counts(mask), seed)
    return measure_control(params, mask, indices, measure)


# ---------------------------------------------------------------- headline figures with intervals


def headline(
    model: ModelMetrics, base: ModelMetrics, seed: int, only: tuple[str, ...] | None = None
) -> dict[str, Interval]:
    """Every headline comparison of `model` with the original on the test prompts, each with its
    paired bootstrap 95% interval. Keys: harm_rise_<attack> (relative rise of harmful-answer
    loss), <judge>_<attack> (change of the judge's mean score), benign_loss_rise, answer_drift,
    over_refusal_change. A figure is left out when either model lacks its per-prompt values."""
    new, old = model.per_prompt, base.per_prompt
    out: dict[str, Interval] = {}

    def add(key: str, column: str, statistic: Callable[[Any, Any], float]) -> None:
        if only is not None and key not in only:
            return
        if column in new and column in old and len(new[column]) == len(old[column]) > 0:
            out[key] = stats.paired_interval(new[column], old[column], statistic, seed=seed)

    for column in sorted(new):
        if column.startswith("harm.nll."):
            add(f"harm_rise_{column.rsplit('.', 1)[1]}", column, stats.relative_change_of_means)
        elif column.startswith("harm."):
            _, judge, attack = column.split(".")
            add(f"{judge}_{attack}", column, stats.difference_of_means)
    add("benign_loss_rise", "benign_loss", stats.relative_change_of_means)
    wanted = only is None or "answer_drift" in only
    if wanted and {"answer_hits", "answer_tokens"} <= new.keys() & old.keys():
        rows_new = list(zip(new["answer_hits"], new["answer_tokens"], strict=True))
        rows_old = list(zip(old["answer_hits"], old["answer_tokens"], strict=True))
        out["answer_drift"] = stats.paired_interval(
            rows_new, rows_old, stats.agreement_drop, seed=seed
        )
    add("over_refusal_change", "over_refusal", stats.difference_of_means)
    return out
