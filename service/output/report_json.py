"""`report.json` as strict JSON: no NaN or Infinity (JavaScript's `JSON.parse` and other strict
parsers reject them).

A figure that is not a finite number (not measured at a level, e.g. over-refusal in the search's
loss-only measurements; or undefined, e.g. a change relative to zero) is written as `null`, and
`undefined_figures` maps its JSON Pointer (RFC 6901) to the reason, e.g.
    "undefined_figures": {"/metrics/hardened/over_refusal": "NaN: not measured ..."}
`load_report` reads such a file back into a `Report` with the same values (NaN where null was
written for NaN). Torch-free: the API and the CLI read reports with it.
"""

from __future__ import annotations

import json
import math
from typing import Any

from harmprune.output.report import Report

UNDEFINED_FIGURES = "undefined_figures"
REASONS = {
    "NaN": "NaN: not measured at this level (e.g. a loss-only measurement has no generated "
    "answers), or undefined (e.g. a change relative to zero, a mean over no prompts)",
    "Infinity": "Infinity: unbounded (e.g. a ratio over zero)",
    "-Infinity": "-Infinity: unbounded (e.g. a ratio over zero)",
}


def _pointer(path: tuple[str | int, ...]) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def _parts(pointer: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]


def finite_only(data: Any) -> tuple[Any, dict[str, str]]:
    """`data` (JSON-shaped: dicts, lists, scalars) with every non-finite float replaced by None,
    and {JSON Pointer: reason} for each."""
    undefined: dict[str, str] = {}

    def walk(value: Any, path: tuple[str | int, ...]) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            kind = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
            undefined[_pointer(path)] = REASONS[kind]
            return None
        if isinstance(value, dict):
            return {k: walk(v, (*path, k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [walk(v, (*path, i)) for i, v in enumerate(value)]
        return value

    return walk(data, ()), undefined


def report_json(report: Report) -> dict[str, Any]:
    """The report as strict-JSON-ready data (what report.json, the job store and the API hold)."""
    data, undefined = finite_only(report.model_dump(mode="json"))
    data[UNDEFINED_FIGURES] = undefined
    return data


def dumps(data: Any, **kw: Any) -> str:
    """json.dumps that refuses NaN and Infinity (a non-finite number left anywhere is a bug)."""
    return json.dumps(data, allow_nan=False, **kw)


def _no_constants(name: str) -> Any:
    raise ValueError(f"not strict JSON: {name} (report.json writes null and a reason instead)")


def loads_strict(text: str | bytes) -> Any:
    """json.loads that refuses NaN, Infinity and -Infinity."""
    return json.loads(text, parse_constant=_no_constants)


def restored(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of strict report data without `undefined_figures`, each listed figure set back to
    its non-finite value."""
    out = json.loads(json.dumps(data))
    for pointer, reason in out.pop(UNDEFINED_FIGURES, {}).items():
        *parents, last = _parts(pointer)
        target = out
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        value = float(reason.split(":", 1)[0].replace("Infinity", "inf"))
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return out


def load_report(source: str | bytes | dict[str, Any]) -> Report:
    """A Report from report.json's text (parsed strictly) or data; the figures listed in
    `undefined_figures` get their non-finite values back."""
    data = loads_strict(source) if isinstance(source, str | bytes) else source
    return Report.model_validate(restored(data))
