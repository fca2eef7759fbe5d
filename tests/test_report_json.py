"""report.json is strict JSON (issue 21 item 7): no NaN or Infinity anywhere, `null` and a
reason in `undefined_figures` instead, read back to the same values; writing a non-finite number
is an error. (tests/conftest.py also parses every report.json the suite writes strictly.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from harmprune.output.checkpoint import write_json
from harmprune.output.report_json import (
    UNDEFINED_FIGURES,
    dumps,
    finite_only,
    loads_strict,
    restored,
)

NAN, INF = float("nan"), float("inf")


def test_non_finite_figures_become_null_with_a_reason_and_come_back() -> None:
    data = {
        "metrics": {"over_refusal": NAN, "loss": 1.5, "per_prompt": {"a/b~c": [0.1, INF, -INF]}},
        "search": [{"q": 0.1, "drift": NAN}],
        "note": None,
    }
    clean, undefined = finite_only(data)
    text = dumps({**clean, UNDEFINED_FIGURES: undefined})
    assert "NaN" not in text.replace("NaN:", "") and "Infinity," not in text
    parsed = loads_strict(text)
    assert parsed["metrics"]["over_refusal"] is None and parsed["metrics"]["loss"] == 1.5
    assert parsed["metrics"]["per_prompt"]["a/b~c"] == [0.1, None, None]
    assert set(parsed[UNDEFINED_FIGURES]) == {
        "/metrics/over_refusal",
        "/metrics/per_prompt/a~1b~0c/1",
        "/metrics/per_prompt/a~1b~0c/2",
        "/search/0/drift",
    }
    assert parsed[UNDEFINED_FIGURES]["/search/0/drift"].startswith("NaN: not measured")
    back = restored(parsed)
    assert UNDEFINED_FIGURES not in back and back["note"] is None  # a real None stays None
    assert math.isnan(back["metrics"]["over_refusal"]) and math.isnan(back["search"][0]["drift"])
    assert back["metrics"]["per_prompt"]["a/b~c"][1:] == [INF, -INF]


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_the_strict_parser_refuses_non_standard_numbers(token: str) -> None:
    assert not math.isfinite(json.loads(f'{{"x": {token}}}')["x"])  # Python's default takes it
    with pytest.raises(ValueError, match="not strict JSON"):
        loads_strict(f'{{"x": {token}}}')


def test_writing_a_non_finite_number_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_json(tmp_path / "report.json", {"x": NAN})
    with pytest.raises(ValueError):
        dumps({"x": INF})
