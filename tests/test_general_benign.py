"""The shipped general benign test set (issue #11 item 6) and its stratified, seeded split.

Torch-free: reads examples/ and tests/conftest.py as text (conftest is parsed, not imported).
"""

from __future__ import annotations

import ast
import tomllib
from collections import Counter
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml
from harmprune.errors import SpecError
from harmprune.inputs.general_benign import (
    GeneralBenignSplit,
    GeneralPrompt,
    load_general_benign,
    parse_general_benign,
    split_general_benign,
)
from harmprune.vocabulary import normalise_prompt

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = {
    "cooking",
    "science",
    "writing",
    "code",
    "maths",
    "advice",
    "trivia",
    "language",
    "health",
    "travel",
    "household",
    "history",
    "technology",
}


def _yaml_prompts(node: Any) -> list[str]:
    """Every `prompt:` text anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        found = [node["prompt"]] if isinstance(node.get("prompt"), str) else []
        return found + [p for value in node.values() for p in _yaml_prompts(value)]
    if isinstance(node, list):
        return [p for value in node for p in _yaml_prompts(value)]
    return []


def _conftest_prompts() -> list[str]:
    """Every string literal under a "prompt" key in tests/conftest.py."""
    tree = ast.parse((ROOT / "tests" / "conftest.py").read_text())
    return [
        value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Dict)
        for key, value in zip(node.keys, node.values, strict=True)
        if isinstance(key, ast.Constant)
        and key.value == "prompt"
        and isinstance(value, ast.Constant)
        and isinstance(value.value, str)
    ]


@pytest.fixture(scope="module")
def prompts() -> list[GeneralPrompt]:
    return load_general_benign()


def _parts(split: GeneralBenignSplit) -> list[list[GeneralPrompt]]:
    return [split.calibration, split.validation, split.test]


def test_the_set_is_large_and_every_category_is_well_filled(prompts: list[GeneralPrompt]) -> None:
    assert len(prompts) >= 144
    counts = Counter(p.category for p in prompts)
    assert set(counts) == CATEGORIES, counts
    assert min(counts.values()) >= 8, counts
    # Spread evenly: no category more than twice as large as another.
    assert max(counts.values()) <= 2 * min(counts.values()), counts


def test_prompts_are_short_and_distinct_after_normalisation(prompts: list[GeneralPrompt]) -> None:
    normalised = [normalise_prompt(p.prompt) for p in prompts]
    duplicates = [text for text, n in Counter(normalised).items() if n > 1]
    assert not duplicates, duplicates
    assert all(0 < len(p.prompt) <= 120 for p in prompts), [
        p.prompt for p in prompts if len(p.prompt) > 120
    ]


def test_no_prompt_repeats_an_example_domain_or_test_prompt(prompts: list[GeneralPrompt]) -> None:
    domain_files = sorted((ROOT / "examples" / "domains").glob("*.yaml"))
    assert domain_files
    others = [p for f in domain_files for p in _yaml_prompts(yaml.safe_load(f.read_text()))]
    conftest = _conftest_prompts()
    assert "What is the capital of France?" in others and conftest  # the readers find prompts
    taken = {normalise_prompt(text) for text in [*others, *conftest]}
    clashes = [p.prompt for p in prompts if normalise_prompt(p.prompt) in taken]
    assert not clashes, clashes


def test_normalise_prompt() -> None:
    assert normalise_prompt("  What's   the\tTIME?! ") == "what s the time"
    assert normalise_prompt("a-b, c.") == "a b c"


def test_the_split_is_disjoint_covers_everything_and_is_stratified(
    prompts: list[GeneralPrompt],
) -> None:
    split = split_general_benign(prompts, seed=0)
    parts = _parts(split)
    assert [len(part) for part in parts] == [
        len(prompts) // 3 + (len(prompts) % 3 > i) for i in range(3)
    ]
    joined = [p for part in parts for p in part]
    assert sorted(joined, key=str) == sorted(prompts, key=str)  # disjoint and covering
    counts = Counter(p.category for p in prompts)
    for part in parts:
        in_part = Counter(p.category for p in part)
        assert set(in_part) == CATEGORIES
        for category, n in counts.items():
            share = n * len(part) / len(prompts)
            assert abs(in_part[category] - share) <= 1, (category, in_part[category], share)


def test_the_split_is_deterministic_per_seed_and_changes_with_the_seed(
    prompts: list[GeneralPrompt],
) -> None:
    assert split_general_benign(prompts, seed=7) == split_general_benign(prompts, seed=7)
    assert split_general_benign(prompts, seed=7) != split_general_benign(prompts, seed=8)
    other = split_general_benign(prompts, seed=8)
    assert set(split_general_benign(prompts, seed=7).test) != set(other.test)


def test_sizes_override_is_respected_and_stratified(prompts: list[GeneralPrompt]) -> None:
    split = split_general_benign(prompts, seed=3, sizes=(39, 26, 52))
    parts = _parts(split)
    assert [len(part) for part in parts] == [39, 26, 52]
    joined = [p for part in parts for p in part]
    assert len(set(joined)) == len(joined)
    for part in parts:
        assert {p.category for p in part} == CATEGORIES
    # An uneven total still fills exactly and keeps the parts disjoint.
    uneven = split_general_benign(prompts, seed=3, sizes=(len(prompts) - 2, 1, 1))
    assert [len(part) for part in _parts(uneven)] == [len(prompts) - 2, 1, 1]
    assert len({p for part in _parts(uneven) for p in part}) == len(prompts)


def test_bad_sizes_are_refused(prompts: list[GeneralPrompt]) -> None:
    with pytest.raises(ValueError, match="only"):
        split_general_benign(prompts, seed=0, sizes=(len(prompts), 1, 0))
    with pytest.raises(ValueError, match=">= 0"):
        split_general_benign(prompts, seed=0, sizes=(-1, 2, 3))


def test_a_malformed_file_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="prompts"):
        parse_general_benign({"items": []})
    with pytest.raises(SpecError, match="category and prompt only"):
        parse_general_benign({"prompts": [{"prompt": "Hi"}]})
    with pytest.raises(SpecError, match="non-empty"):
        parse_general_benign({"prompts": [{"category": "x", "prompt": " "}]})


def test_the_file_is_package_data_of_harmprune_examples() -> None:
    assert (ROOT / "examples" / "general_benign.yaml").is_file()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["harmprune.examples"]
    assert any(fnmatch("general_benign.yaml", pattern) for pattern in patterns), patterns
    assert pyproject["tool"]["setuptools"]["package-dir"]["harmprune.examples"] == "examples"


# ---------------------------------------------------------------- in a job


def _job(model: str, raw: dict[str, Any]) -> Any:
    from harmprune.inputs.config import DomainSpec, HardenConfig

    return HardenConfig(
        model=model, domain=DomainSpec.model_validate(raw), device="cpu", dtype="float32"
    )


def test_a_job_splits_the_general_set_into_its_three_sets() -> None:
    from harmprune import pipeline

    from tests.evidence_fixtures import disjoint_domain

    raw = disjoint_domain()
    raw["eval"]["general_benign"] = {"sizes": [5, 6, 7]}
    sets = pipeline.split_sets(_job("m", raw))
    general = {normalise_prompt(p.prompt) for p in load_general_benign()}
    in_general = lambda pairs: [p for p in pairs if normalise_prompt(p.prompt) in general]  # noqa: E731
    assert len(in_general(sets.benign)) == 5
    assert len(in_general(sets.validation_benign)) == 6
    assert len(sets.general_test) == 7 and len(in_general(sets.general_test)) == 7
    assert sets.general_sizes == {"calibration": 5, "validation": 6, "test": 7}
    assert not in_general(sets.test_benign + sets.harmful + sets.test_harmful)
    assert "general benign set" in sets.made_by["general_benign"]


def test_a_spec_prompt_that_is_also_a_general_prompt_stays_the_specs() -> None:
    from harmprune import pipeline

    from tests.evidence_fixtures import disjoint_domain

    shared = load_general_benign()[0].prompt
    raw = disjoint_domain()
    raw["eval"]["benign"] = [*raw["eval"]["benign"], {"prompt": shared.upper()}]
    raw["eval"]["general_benign"] = {"sizes": [60, 60, 60]}
    sets = pipeline.split_sets(_job("m", raw))  # no disjointness error: left out of the parts
    everywhere = sets.benign + sets.validation_benign + sets.general_test
    assert shared not in {p.prompt for p in everywhere}


def test_sizes_beyond_the_set_are_a_spec_error() -> None:
    from harmprune import pipeline

    from tests.evidence_fixtures import disjoint_domain

    raw = disjoint_domain()
    raw["eval"]["general_benign"] = {"sizes": [100, 100, 100]}
    with pytest.raises(SpecError, match=r"eval\.general_benign\.sizes"):
        pipeline.split_sets(_job("m", raw))


def test_opting_out_leaves_the_spec_alone_and_the_card_says_so(
    tmp_path: Path, tiny_model_dir: Any
) -> None:
    from harmprune import pipeline
    from harmprune.output import card
    from harmprune.settings import Settings

    from tests.evidence_fixtures import disjoint_domain

    raw = disjoint_domain()
    raw["eval"]["general_benign"] = False
    model = str(tiny_model_dir("llama"))
    sets = pipeline.split_sets(_job(model, raw))
    assert sets.general_test == [] and "opted out" in sets.made_by["general_benign"]
    report = pipeline.run(_job(model, raw), Settings(cache_dir=tmp_path / "c"), tmp_path / "o")
    assert report.general_benign is None
    assert "the spec opted out" in card.render_card(report)


def test_a_job_measures_and_gates_the_general_test_part(
    tmp_path: Path, tiny_model_dir: Any
) -> None:
    from harmprune import pipeline
    from harmprune.measure.evaluation import relative_change
    from harmprune.output import card
    from harmprune.settings import Settings

    from tests.evidence_fixtures import disjoint_domain

    raw = disjoint_domain()
    raw["eval"]["general_benign"] = {"sizes": [3, 0, 6]}
    # Any benign loss rise on the general prompts fails the job; the spec's own benign prompts
    # get the same threshold, so the outcome is checked against both measured rises.
    raw["thresholds"] = {**raw["thresholds"], "max_benign_loss_increase": 0.0}
    model = str(tiny_model_dir("llama"))
    report = pipeline.run(_job(model, raw), Settings(cache_dir=tmp_path / "c"), tmp_path / "o")
    g = report.general_benign
    assert g is not None and g.prompts["test"] == 6
    assert len(g.original.per_prompt["benign_loss"]) == 6
    rise = relative_change(g.hardened.benign_loss, g.original.benign_loss)
    assert g.intervals["hardened"]["benign_loss_rise"].estimate == pytest.approx(rise)
    assert bool(g.failures) == (rise > 0)
    assert all(f.startswith("general benign set: ") for f in g.failures)
    if g.failures:
        assert report.outcome == "rejected" and "general benign set" in report.outcome_reason
    assert "## General benign set" in card.render_card(report)
