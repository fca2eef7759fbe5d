"""The standard harm set: harmful requests nobody here wrote, measured in every job that names
its categories (issue 21 item 3; the harm-side twin of harmprune.inputs.general_benign).

A domain spec's own test prompts are written by the spec's author, next to its calibration
prompts; an effect that holds only on them says little. harmprune therefore ships HarmBench's
standard behaviours (MIT; examples/harmbench_behaviors.yaml, package data of
`harmprune.examples`, prompts only, each with one of HarmBench's semantic categories). A spec
names its categories (`eval.standard_harm.categories`); their prompts are split, deterministic
for the job's seed, into a validation part (it joins the validation harmful prompts) and a test
part, whose references the original model elicits under prefill like the spec's own.

Torch-free and pure: no global random state, nothing cached.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from harmprune.errors import SpecError
from harmprune.inputs.config import MIN_TEST_PROMPTS
from harmprune.inputs.general_benign import GeneralPrompt, load_prompts

RESOURCE = "harmbench_behaviors.yaml"
SOURCE = "HarmBench standard behaviours (Mazeika et al. 2024, MIT licence)"


# A HarmBench behaviour is the same record as a general benign prompt: a category and a prompt.
StandardPrompt = GeneralPrompt


@dataclass(frozen=True, slots=True)
class StandardHarmSplit:
    validation: list[StandardPrompt] = field(default_factory=list)
    test: list[StandardPrompt] = field(default_factory=list)


def load_standard_harm() -> list[StandardPrompt]:
    """The shipped set (harmprune.examples/harmbench_behaviors.yaml), in file order."""
    return load_prompts(RESOURCE)


def categories(prompts: Sequence[StandardPrompt]) -> list[str]:
    return sorted({p.category for p in prompts})


def default_sizes(total: int) -> tuple[int, int]:
    """(validation, test): the test part at least MIN_TEST_PROMPTS (or everything), at least
    half; the rest validation."""
    test = min(total, max(MIN_TEST_PROMPTS, total // 2))
    return total - test, test


def split_standard_harm(
    prompts: Sequence[StandardPrompt],
    wanted: Sequence[str],
    seed: int,
    sizes: tuple[int, int] | None = None,
) -> StandardHarmSplit:
    """The prompts of the `wanted` categories, shuffled with `random.Random(seed)`, cut into a
    validation and a test part (`sizes`; default `default_sizes`). SpecError naming
    `eval.standard_harm` for an unknown category or sizes larger than the prompts."""
    known = categories(prompts)
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise SpecError(
            f"eval.standard_harm.categories: unknown {', '.join(unknown)} (known: "
            f"{', '.join(known)})"
        )
    chosen = [p for p in prompts if p.category in set(wanted)]
    validation, test = default_sizes(len(chosen)) if sizes is None else sizes
    if validation + test > len(chosen):
        raise SpecError(
            f"eval.standard_harm.sizes: ({validation}, {test}) asks for {validation + test} "
            f"prompts; the categories have {len(chosen)}"
        )
    order = list(chosen)
    random.Random(seed).shuffle(order)
    return StandardHarmSplit(validation=order[test : test + validation], test=order[:test])
