"""The general benign test set: everyday requests measured in every job (issue #11 item 6).

A domain spec brings its own benign prompts, close to its domain; a narrow spec could hide
general damage. harmprune therefore ships examples/general_benign.yaml (package data of
`harmprune.examples`): short everyday requests in several categories, prompts only (the model's
own greedy answers become the references). This module loads it and splits it, stratified by
category and deterministic for a seed, into calibration, validation and test parts.

Torch-free and pure: no global random state, nothing cached.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources

import yaml
from harmprune.errors import SpecError

RESOURCE = "general_benign.yaml"


@dataclass(frozen=True, slots=True)
class GeneralPrompt:
    """A shipped prompt and its category (the standard harm set's records are these too)."""

    category: str
    prompt: str


@dataclass(frozen=True, slots=True)
class GeneralBenignSplit:
    """Three disjoint parts of the general benign set."""

    calibration: list[GeneralPrompt] = field(default_factory=list)
    validation: list[GeneralPrompt] = field(default_factory=list)
    test: list[GeneralPrompt] = field(default_factory=list)


def parse_general_benign(data: object, source: str = RESOURCE) -> list[GeneralPrompt]:
    """The prompts of a parsed shipped prompt file (this set's or the standard harm set's):
    `prompts:` a list of {category, prompt}, both non-empty text."""
    if not isinstance(data, dict) or not isinstance(data.get("prompts"), list):
        raise SpecError(f"invalid {source}: expected a top-level 'prompts:' list")
    prompts: list[GeneralPrompt] = []
    for index, item in enumerate(data["prompts"]):
        if not isinstance(item, dict) or set(item) != {"category", "prompt"}:
            raise SpecError(
                f"invalid {source}: prompts[{index}] must have category and prompt only"
            )
        category, prompt = item["category"], item["prompt"]
        if not isinstance(category, str) or not category.strip():
            raise SpecError(f"invalid {source}: prompts[{index}].category must be a non-empty text")
        if not isinstance(prompt, str) or not prompt.strip():
            raise SpecError(f"invalid {source}: prompts[{index}].prompt must be a non-empty text")
        prompts.append(GeneralPrompt(category=category.strip(), prompt=prompt.strip()))
    return prompts


def load_prompts(resource: str) -> list[GeneralPrompt]:
    """The prompts of the file `resource` shipped in harmprune.examples, in file order."""
    path = resources.files("harmprune.examples") / resource
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise SpecError(f"cannot read {resource}: {err}") from None
    return parse_general_benign(data, resource)


def load_general_benign() -> list[GeneralPrompt]:
    """The shipped general benign set (harmprune.examples/general_benign.yaml), in file order."""
    return load_prompts(RESOURCE)


def _default_sizes(total: int) -> tuple[int, int, int]:
    """Equal thirds; a remainder of one or two goes to calibration first, then validation."""
    base, extra = divmod(total, 3)
    return (base + (extra > 0), base + (extra > 1), base)


def split_general_benign(
    prompts: Sequence[GeneralPrompt],
    seed: int,
    sizes: tuple[int, int, int] | None = None,
) -> GeneralBenignSplit:
    """Disjoint calibration, validation and test parts, stratified by category.

    Each category's prompts are shuffled with `random.Random(seed)` and spread evenly over one
    sequence (systematic stratified sampling: the i-th of n prompts of a category sits at
    (i + 0.5) / n, ties between categories in a seeded order); consecutive slices of `sizes`
    prompts of that sequence are the parts, so each part holds every category's proportional
    share to within a prompt or two (exactly, for the shipped set's equal thirds). `sizes` defaults to equal thirds of all prompts; a smaller total leaves the rest
    of the sequence unused. Deterministic for a seed and the prompts' order.
    """
    if sizes is None:
        sizes = _default_sizes(len(prompts))
    if len(sizes) != 3 or any(size < 0 for size in sizes):
        raise ValueError(f"sizes must be three counts >= 0, got {sizes}")
    if sum(sizes) > len(prompts):
        raise ValueError(f"sizes {sizes} ask for {sum(sizes)} prompts; only {len(prompts)} given")
    rng = random.Random(seed)
    by_category: dict[str, list[GeneralPrompt]] = {}
    for item in prompts:
        by_category.setdefault(item.category, []).append(item)
    categories = sorted(by_category)
    tie_order = {
        category: rank for rank, category in enumerate(rng.sample(categories, k=len(categories)))
    }
    placed: list[tuple[float, int, int, GeneralPrompt]] = []
    for category in categories:
        members = list(by_category[category])
        rng.shuffle(members)
        n = len(members)
        placed.extend(
            ((i + 0.5) / n, tie_order[category], i, item) for i, item in enumerate(members)
        )
    placed.sort(key=lambda entry: entry[:3])
    sequence = [entry[3] for entry in placed]
    first, second, third = sizes
    return GeneralBenignSplit(
        calibration=sequence[:first],
        validation=sequence[first : first + second],
        test=sequence[first + second : first + second + third],
    )
