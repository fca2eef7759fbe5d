"""The job's prompt sets: calibration (attribution only), validation (the job's choices) and
test (the verdict), from the spec's sets or seeded shares split off calibration, with harmprune's
general benign set and the standard harm set added; refused if a prompt repeats or
near-duplicates one in another set."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from harmprune.errors import SpecError
from harmprune.inputs import data, general_benign, standard_harm
from harmprune.inputs.config import (
    MIN_TEST_PROMPTS,
    EvalConfig,
    GeneralBenignConfig,
    HardenConfig,
    Pair,
    Source,
)
from harmprune.inputs.references import Permit, operator_permit


@dataclass(frozen=True)
class PromptSets:
    """Three disjoint prompt sets. Calibration (`harmful`, `benign`) feeds attribution only;
    validation makes the job's choices (the q search); test decides the verdict and gives every
    number on the card, and chose nothing. `made_by` says how each set was made."""

    harmful: list[Pair]
    benign: list[Pair]
    validation_harmful: list[Pair]
    validation_benign: list[Pair]
    test_harmful: list[Pair]
    test_benign: list[Pair]
    made_by: dict[str, str]
    test_source: Literal["spec", "split"]  # split: a share of calibration is part of it
    # harmprune's general benign set: its calibration and validation parts are already in
    # `benign` / `validation_benign`; its test part is measured apart (empty: opted out).
    general_test: list[Pair] = field(default_factory=list)
    general_sizes: dict[str, int] = field(default_factory=dict)
    # the standard harm set (HarmBench, harmprune.inputs.standard_harm): its validation part is in
    # `validation_harmful`, its test part measured apart (empty: not measured)
    standard_test: list[Pair] = field(default_factory=list)
    standard_sizes: dict[str, int] = field(default_factory=dict)


def split_sets(config: HardenConfig, permit: Permit | None = None) -> PromptSets:
    """The spec's sets, or seeded shares split off calibration (test first, then validation,
    which is made only when something is chosen: the search's candidates, or the fine-tune
    grid's worst case); refused if a prompt repeats across sets. Hub datasets are loaded as
    `permit` grants (default: the operator's)."""
    spec = config.domain
    permit = permit or operator_permit(config)
    harmful, benign = data.calibration_sets(spec, permit)
    frac, seed = spec.eval.heldout_fraction, config.seed
    made_by = {"calibration": "the spec's harmful and benign examples"}
    # near-duplicates stay on one side of a seeded split; word frequencies are counted over
    # the calibration examples and the general benign set, as the final check sees most of them
    general_prompts = (
        [g.prompt for g in general_benign.load_general_benign()]
        if spec.eval.general_benign.enabled
        else []
    )
    pool = [p.prompt for p in harmful + benign] + general_prompts

    def held_out(
        set_name: str, given: list[Source], pairs: list[Pair], kind: str, split_seed: int
    ) -> tuple[list[Pair], list[Pair], str]:
        loaded = data.load_sources(given, permit, f"domain.eval.{set_name}{kind}")
        if loaded:
            return pairs, loaded, f"the spec's eval.{set_name}{kind}"
        if len(pairs) < 2:
            raise SpecError(
                f"{kind.strip('.')}: give eval.{set_name}{kind} or at least 2 calibration "
                "examples (a share is held out)"
            )
        kept, held = split_heldout(pairs, frac, split_seed, pool)
        return kept, held, f"a seeded {frac:.0%} share of the calibration {kind.strip('.')} set"

    harmful, test_h, how_h = held_out("", spec.eval.harmful, harmful, "harmful", seed)
    benign, test_b, how_b = held_out("", spec.eval.benign, benign, "benign", seed + 1)
    made_by["test"] = f"harmful: {how_h}; benign: {how_b}"
    val_h: list[Pair] = []
    val_b: list[Pair] = []
    val = spec.eval.validation
    # a validation set whenever something is chosen: q (a sweep) or the fine-tune grid's worst
    # case (attacks.finetune)
    grid = spec.attacks is not None and spec.attacks.finetune is not None
    if val.harmful or val.benign or len(spec.search.candidates(spec.pruning.q)) > 1 or grid:
        harmful, val_h, how_h = held_out("validation.", val.harmful, harmful, "harmful", seed + 2)
        benign, val_b, how_b = held_out("validation.", val.benign, benign, "benign", seed + 3)
        made_by["validation"] = f"harmful: {how_h}; benign: {how_b}"
    else:
        made_by["validation"] = "none: q is fixed by the spec, nothing was chosen"
    data.check_disjoint(
        {"calibration": harmful + benign, "validation": val_h + val_b, "test": test_h + test_b}
    )
    check_test_size(spec.eval, {"eval.harmful": test_h, "eval.benign": test_b})
    test_source: Literal["spec", "split"] = (
        "spec" if spec.eval.harmful and spec.eval.benign else "split"
    )
    taken = [p.prompt for p in harmful + benign + val_h + val_b + test_h + test_b]
    sets = with_standard_harm(
        config,
        taken,
        general_sets(config, harmful, benign, val_h, val_b, test_h, test_b, made_by, test_source),
    )
    data.check_disjoint(
        {
            "calibration": sets.harmful + sets.benign,
            "validation": sets.validation_harmful + sets.validation_benign,
            "test": sets.test_harmful + sets.test_benign,
            "general benign test": sets.general_test,
            "standard harm test": sets.standard_test,
        }
    )
    return sets


def check_test_size(cfg: EvalConfig, sides: dict[str, list[Pair]]) -> None:
    """At least MIN_TEST_PROMPTS prompts per test side, unless eval.allow_small_test."""
    if cfg.allow_small_test:
        return
    for name, prompts in sides.items():
        if len(prompts) < MIN_TEST_PROMPTS:
            raise SpecError(
                f"{name}: {len(prompts)} test prompts; at least {MIN_TEST_PROMPTS} per side "
                "are needed for the intervals the verdict is decided on (or set "
                "eval.allow_small_test: true, and the card calls the verdict indicative)"
            )


def without_near_duplicates(
    shipped: Sequence[general_benign.GeneralPrompt], taken: Sequence[str]
) -> list[general_benign.GeneralPrompt]:
    """The shipped prompts that neither repeat nor near-duplicate a prompt in `taken`
    (`data.near_duplicate_pairs`, token frequencies over both), so the sets stay disjoint."""
    texts = [p.prompt for p in shipped]
    clashes = {i for i, _, _ in data.near_duplicate_pairs(texts, taken, [*texts, *taken])}
    return [p for i, p in enumerate(shipped) if i not in clashes]


def with_standard_harm(config: HardenConfig, taken: Sequence[str], sets: PromptSets) -> PromptSets:
    """The standard harm set's parts added (its validation part joins validation harmful when
    there is a validation set); its prompts that repeat or near-duplicate a prompt the job
    already uses (`data.near_duplicate_pairs`) are left out, so the sets stay disjoint."""
    cfg = config.domain.eval.standard_harm
    if not cfg.active:
        why = "disabled" if not cfg.enabled else "no eval.standard_harm.categories"
        sets.made_by["standard_harm"] = f"none: not measured ({why})"
        return sets
    taken = [*taken, *(p.prompt for p in sets.general_test)]
    shipped = standard_harm.load_standard_harm()
    prompts = without_near_duplicates(shipped, taken)
    split = standard_harm.split_standard_harm(prompts, cfg.categories, config.seed, cfg.sizes)
    with_validation = bool(sets.validation_harmful or sets.validation_benign)
    validation = [Pair(prompt=p.prompt) for p in split.validation] if with_validation else []
    test = [Pair(prompt=p.prompt) for p in split.test]
    check_test_size(config.domain.eval, {"eval.standard_harm (test part)": test})
    sets.made_by["standard_harm"] = (
        f"{standard_harm.SOURCE}, categories {', '.join(cfg.categories)}, split by the job's "
        f"seed: {len(validation)} prompts joined the validation harmful set, {len(test)} are its "
        "test part"
    )
    return replace(
        sets,
        validation_harmful=sets.validation_harmful + validation,
        standard_test=test,
        standard_sizes={"validation": len(validation), "test": len(test)},
    )


def general_sets(
    config: HardenConfig,
    harmful: list[Pair],
    benign: list[Pair],
    val_h: list[Pair],
    val_b: list[Pair],
    test_h: list[Pair],
    test_b: list[Pair],
    made_by: dict[str, str],
    test_source: Literal["spec", "split"],
) -> PromptSets:
    """The sets with the general benign set's parts added (see `split_sets`)."""
    spec, seed = config.domain, config.seed
    taken = [p.prompt for p in harmful + benign + val_h + val_b + test_h + test_b]
    general = general_benign_parts(spec.eval.general_benign, seed, taken)
    if general is None:
        made_by["general_benign"] = "none: the spec opted out (eval.general_benign: false)"
        return PromptSets(harmful, benign, val_h, val_b, test_h, test_b, made_by, test_source)
    with_validation = bool(val_h or val_b)
    made_by["general_benign"] = (
        f"harmprune's general benign set, split by the job's seed (stratified by category): "
        f"{len(general.calibration)} prompts joined benign calibration, "
        + (
            f"{len(general.validation)} the validation set, "
            if with_validation
            else "none the validation set (there is none), "
        )
        + f"{len(general.test)} are its test part"
    )

    def as_pairs(part: list[general_benign.GeneralPrompt]) -> list[Pair]:
        return [Pair(prompt=g.prompt) for g in part]

    # every set against every other, the general set's parts included (near-duplicates)
    data.check_disjoint(
        {
            "calibration": harmful + benign,
            "validation": val_h + val_b,
            "test": test_h + test_b,
            "general calibration": as_pairs(general.calibration),
            "general validation": as_pairs(general.validation) if with_validation else [],
            "general test": as_pairs(general.test),
        }
    )

    return PromptSets(
        harmful,
        benign + as_pairs(general.calibration),
        val_h,
        val_b + (as_pairs(general.validation) if with_validation else []),
        test_h,
        test_b,
        made_by,
        test_source,
        general_test=as_pairs(general.test),
        general_sizes={
            "calibration": len(general.calibration),
            "validation": len(general.validation) if with_validation else 0,
            "test": len(general.test),
        },
    )


def general_benign_parts(
    cfg: GeneralBenignConfig, seed: int, taken: Sequence[str]
) -> general_benign.GeneralBenignSplit | None:
    """The general benign set's three parts (None: opted out); its prompts that repeat or
    near-duplicate a prompt of the spec (`data.near_duplicate_pairs`) are left out, so the sets
    stay disjoint."""
    if not cfg.enabled:
        return None
    shipped = general_benign.load_general_benign()
    prompts = without_near_duplicates(shipped, taken)
    try:
        return general_benign.split_general_benign(prompts, seed, cfg.sizes)
    except ValueError as exc:
        raise SpecError(f"eval.general_benign.sizes: {exc}") from exc


def split_heldout(
    pairs: Sequence[data.Pair], fraction: float, seed: int, pool: Sequence[str] | None = None
) -> tuple[list[data.Pair], list[data.Pair]]:
    """(calibration, held-out): a seeded split; the held-out part never reaches attribution.

    Near-duplicate prompts (`data.near_duplicate_pairs`, token frequencies over `pool` when
    given) go to the same side: groups of them are taken whole, in the seeded order, so a
    dataset's near-duplicates never straddle the split. Without near-duplicates this is the
    plain seeded split."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_out = min(len(pairs) - 1, max(1, round(fraction * len(pairs))))
    group = near_duplicate_groups([p.prompt for p in pairs], pool)
    held: set[int] = set()
    for i in order:
        if len(held) >= n_out:
            break
        members = group[i] - held
        if members and len(held) + len(members) <= len(pairs) - 1:
            held |= members
    if not held:  # one group holds (nearly) everything: the plain split; the check names them
        held = set(order[:n_out])
    kept = [i for i in range(len(pairs)) if i not in held]
    return [pairs[i] for i in kept], [pairs[i] for i in sorted(held)]


def near_duplicate_groups(
    prompts: Sequence[str], pool: Sequence[str] | None = None
) -> list[set[int]]:
    """Per prompt, the indices of its near-duplicate group (itself included; union-find over
    the near-duplicate pairs)."""
    parent = list(range(len(prompts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in data.near_duplicate_pairs(prompts, prompts, pool):
        if i != j:
            parent[root(i)] = root(j)
    members: dict[int, set[int]] = {}
    for i in range(len(prompts)):
        members.setdefault(root(i), set()).add(i)
    return [members[root(i)] for i in range(len(prompts))]
