"""What a job may load: typed references, the walk that finds them, and the permit the loader
checks.

Every field of a request that names something to load is one of three types (never a plain
`str`): `ModelRef` (a model, a judge, a judge's base model), `DatasetRef` (a Hub dataset in any
list of the spec) and `TaskRef` (an lm-eval task). `references(config)` walks a validated
request for those types, so a field added later is covered by the access policy without anyone
listing it (tests/test_references.py walks the JSON schema and fails on any string field that
could name a repo or a path but is not such a type).

A policy (the operator's own CLI: `operator_permit`; a tenant's: `harmprune.jobs.access`) turns
the references into a `Permit`: each reference with where it resolved (`hub`, `local`,
`alias`, `task`). The loaders (`harmprune.inputs.loading`, `harmprune.inputs.data`, `harmprune.measure.benchmarks`)
take the permit and load only what it grants, from the location it granted: a Hub id is never
looked up as a path in the worker's working directory, and a reference the policy never saw
(a preset's default judge, a dataset an lm-eval task names) raises before any byte is fetched.

Torch-free: the API imports this.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from harmprune.errors import NotPermitted
from harmprune.vocabulary import SMOLLM2_ALIAS
from pydantic import BaseModel, Field

RefKind = Literal["model", "dataset", "task"]
Location = Literal["hub", "local", "alias", "task"]
SCHEMA_KEY = "x-harmprune-reference"

# The one answer for a reference that may not be read: private, gated, missing, outside the
# operator's roots or malformed all read the same, so the answer tells nothing about which.
NOT_READABLE = "not found, or this API key may not read it"

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
TASK_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class RefMarker:
    """Annotated metadata that makes a string field a reference; `revision` names the sibling
    field holding its revision, if any."""

    kind: RefKind
    revision: str | None = None


def _ref_type(kind: RefKind, revision: str | None, description: str) -> Any:
    return Annotated[
        str,
        RefMarker(kind, revision),
        Field(
            min_length=1,
            max_length=512,
            description=description,
            json_schema_extra={SCHEMA_KEY: kind},
        ),
    ]


MODEL_DESCRIPTION = (
    "A model reference: Hub repo id, smollm2-135m-instruct, a local directory or .gguf file "
    "(tenants: absolute paths under the operator's model roots only)."
)
ModelRef = _ref_type("model", None, MODEL_DESCRIPTION)
# The job's own model: its revision sits in the sibling field `revision`.
RevisionedModelRef = _ref_type("model", "revision", MODEL_DESCRIPTION)
DatasetRef = _ref_type(
    "dataset", "revision", "A Hub dataset id (org/name), pinned by the sibling `revision`."
)
TaskRef = _ref_type(
    "task",
    None,
    "An lm-eval task name: one of harmprune's local tasks or an lm-eval built-in task (the "
    "datasets a built-in task reads are checked like any dataset reference).",
)


@dataclass(frozen=True)
class Reference:
    """One thing a job names to load, and where in the request it was named."""

    kind: RefKind
    name: str
    revision: str | None
    field: str

    @property
    def key(self) -> tuple[str, str, str | None]:
        return (self.kind, self.name, self.revision)


def _marker(info: Any) -> RefMarker | None:
    """The field's RefMarker: in its own metadata (`x: ModelRef`) or inside its annotation
    (`list[TaskRef]`, `ModelRef | None`)."""
    found = next((m for m in info.metadata if isinstance(m, RefMarker)), None)
    return found or _marker_in(info.annotation)


def _marker_in(annotation: Any) -> RefMarker | None:
    if get_origin(annotation) is Annotated:
        base, *extras = get_args(annotation)
        found = next((m for m in extras if isinstance(m, RefMarker)), None)
        return found or _marker_in(base)
    for arg in get_args(annotation):
        if (found := _marker_in(arg)) is not None:
            return found
    return None


def references(obj: BaseModel, prefix: str = "") -> list[Reference]:
    """Every reference in a validated request, found by type (not by a list of field names)."""
    return list(_walk(obj, prefix))


def _walk(value: Any, path: str) -> Iterator[Reference]:
    if isinstance(value, BaseModel):
        for name, info in type(value).model_fields.items():
            field_value = getattr(value, name)
            here = f"{path}.{name}" if path else name
            marker = _marker(info)
            if marker is None:
                yield from _walk(field_value, here)
                continue
            revision = getattr(value, marker.revision) if marker.revision else None
            values = field_value if isinstance(field_value, list | tuple) else [field_value]
            indexed = isinstance(field_value, list | tuple)
            for i, item in enumerate(values):
                if item is not None:
                    where = f"{here}.{i}" if indexed else here
                    yield Reference(marker.kind, item, revision, where)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _walk(item, f"{path}.{i}")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{path}.{key}")


# ---------------------------------------------------------------- the permit


@dataclass(frozen=True)
class Grant:
    """A reference the policy allowed, and where the loader must take it from: `target` is the
    Hub id (hub), an absolute path (local), the alias, or the task name."""

    reference: Reference
    location: Location
    target: str


class Permit:
    """What one job may load. Made by a policy; the loaders ask it before fetching anything."""

    def __init__(self, grants: Iterable[Grant], *, policy: str) -> None:
        self.policy = policy
        self._grants = {g.reference.key: g for g in grants}

    def grant(self, kind: RefKind, name: str, revision: str | None, field: str) -> Grant:
        """The grant for this reference, or the one 'may not read' answer."""
        found = self._grants.get((kind, name, revision))
        if found is None:
            raise not_readable(field)
        return found

    def with_grants(self, more: Iterable[Grant]) -> Permit:
        """This permit plus `more` (the datasets the job's lm-eval tasks read, once the worker
        has looked them up and the same policy allowed them)."""
        return Permit([*self._grants.values(), *more], policy=self.policy)


def not_readable(field: str) -> NotPermitted:
    return NotPermitted(field, NOT_READABLE)


# ---------------------------------------------------------------- where a reference points


def under_roots(path: str, roots: Iterable[Path]) -> bool:
    """An absolute path, with no `..`, inside one of `roots` (compared after normalising)."""
    if not path.startswith("/") or ".." in path.split("/"):
        return False
    normal = os.path.normpath(path)
    return any(normal.startswith(os.path.normpath(str(root)).rstrip("/") + "/") for root in roots)


def is_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and ".." not in name and "--" not in name


def locate_for_operator(ref: Reference) -> Grant:
    """Where a reference points on the operator's own machine (the CLI): an existing path is
    local (made absolute, so a later working directory does not matter), anything else a Hub
    id. The operator's token and files are the operator's own: nothing is refused here."""
    if ref.kind == "task":
        return Grant(ref, "task", ref.name)
    if ref.kind == "model" and ref.name == SMOLLM2_ALIAS:
        return Grant(ref, "alias", ref.name)
    path = Path(ref.name).expanduser()
    if path.exists() or path.suffix == ".gguf" or ref.name.startswith(("/", ".", "~")):
        return Grant(ref, "local", str(path.resolve()))
    return Grant(ref, "hub", ref.name)


def operator_permit(config: BaseModel) -> Permit:
    """The operator's CLI: every reference the config names, as it resolves on this machine."""
    return Permit([locate_for_operator(r) for r in references(config)], policy="operator")


def model_permit(name: str, revision: str | None = None) -> Permit:
    """The operator's permit for one model (bench scripts, `harmprune audit`)."""
    return Permit(
        [locate_for_operator(Reference("model", name, revision, "model"))], policy="operator"
    )


def operator_grant(name: str, revision: str | None = None) -> Grant:
    """The operator's grant for one model reference."""
    return locate_for_operator(Reference("model", name, revision, "model"))


# ---------------------------------------------------------------- the schema's view


def schema_string_fields(schema: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(request path, reference kind or None) of every free-text string field of a JSON schema,
    e.g. `("domain.eval.validation.harmful[].dataset", "dataset")`: what docs/service.md's "Tenants"
    list is generated from, and what tests/test_references.py checks for untyped references."""
    defs = schema.get("$defs", {})
    found: set[tuple[str, str | None]] = set()

    def visit(node: dict[str, Any], path: str, seen: frozenset[str]) -> None:
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            if name not in seen:  # a recursive schema is walked once per branch
                visit(defs[name], path, seen | {name})
            return
        for sub in node.get("anyOf", []) + node.get("allOf", []) + node.get("oneOf", []):
            visit(sub, path, seen)
        for name, sub in node.get("properties", {}).items():
            visit(sub, f"{path}.{name}" if path else name, seen)
        if isinstance(node.get("items"), dict):
            visit(node["items"], f"{path}[]", seen)
        for sub in node.get("prefixItems", []):
            visit(sub, f"{path}[]", seen)
        if node.get("type") == "string" and "enum" not in node and "const" not in node:
            found.add((path, node.get(SCHEMA_KEY)))

    visit(schema, "", frozenset())
    return sorted(found, key=lambda f: f[0])


def tenants_section(schema: dict[str, Any]) -> str:
    """docs/service.md's list of every reference the access policy covers, from the request schema."""
    rows = [f"- `{path}`: {kind}" for path, kind in schema_string_fields(schema) if kind]
    return "\n".join(rows)
