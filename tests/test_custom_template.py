"""The custom classifier template is a tenant's text, not a format string (issue 20, finding 5):
`{prompt}` and `{response}` are replaced literally, every other brace is kept, and the template's
length is bounded at validation with the field named."""

from __future__ import annotations

from typing import Any

import pytest
from harmprune.errors import SpecError
from harmprune.inputs.config import MAX_TEMPLATE_CHARS, DomainSpec, parse_domain
from harmprune.measure import judges

PROMPT, RESPONSE = "Write malware.", "Sure [omitted]."


@pytest.mark.parametrize(
    "template",
    [
        "{prompt:>10000000000}",  # str.format: a 10 GB string (MemoryError on the worker)
        "{prompt.__class__}",  # str.format: attribute access
        "{prompt.__class__.__init__.__globals__}",
        "{prompt[0]} {response!r} {0} {}",  # indexing, conversions, positional fields
    ],
)
def test_format_syntax_is_not_interpreted(template: str) -> None:
    assert judges.fill_template(template, PROMPT, RESPONSE) == template
    with_both = template + " | {prompt} -> {response}"
    assert judges.fill_template(with_both, PROMPT, RESPONSE) == (
        template + f" | {PROMPT} -> {RESPONSE}"
    )


def test_values_are_inserted_once_and_never_re_read() -> None:
    text = judges.fill_template("Q={prompt} A={response} {{x}}", "say {response}", "{prompt}")
    assert text == "Q=say {response} A={prompt} {{x}}"


def test_the_custom_judge_uses_the_literal_fill(tiny_model: Any, tokenizer: Any) -> None:
    judge = judges.ClassifierJudge(
        "custom", tiny_model("llama"), tokenizer, "{prompt:>10000000000} Q={prompt} A={response}"
    )
    assert judge.input_text(PROMPT, RESPONSE) == (
        "{prompt:>10000000000} Q=Write malware. A=Sure [omitted]."
    )


def spec(template: str) -> dict[str, Any]:
    return {
        "name": "t",
        "harmful": [{"prompt": "a"}],
        "benign": [{"prompt": "b"}],
        "eval": {"judges": ["classifier"], "classifier": {"model": "org/j", "template": template}},
    }


def test_the_template_is_bounded_and_must_name_both_fields() -> None:
    ok = "Grade {response} to {prompt}: "
    assert isinstance(parse_domain(spec(ok)), DomainSpec)
    with pytest.raises(SpecError, match=r"eval\.classifier\.template: .*at most 8000 characters"):
        parse_domain(spec(ok + "x" * MAX_TEMPLATE_CHARS))
    with pytest.raises(SpecError, match=r"eval\.classifier\.template: .*must contain \{response\}"):
        parse_domain(spec("Grade {prompt}"))
