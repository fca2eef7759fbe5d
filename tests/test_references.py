"""References are types, found by walking the request (harmprune.inputs.references), and the loaders
load only what a permit grants. The schema test is the guard against the old flaw (a hand-kept
list of fields that every new field slipped past): a new string field that could name a repo or
a path fails here until it is a reference type or listed below with the reason it is not."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from harmprune.errors import ModelLoadError, NotPermitted
from harmprune.inputs.config import (
    BenchmarksConfig,
    ClassifierJudge,
    HardenConfig,
    HubDataset,
    Pair,
    load_domain,
)
from harmprune.inputs.data import load_sources
from harmprune.inputs.loading import load_model, resolve
from harmprune.inputs.references import (
    ModelRef,
    Permit,
    Reference,
    operator_permit,
    references,
    schema_string_fields,
    tenants_section,
)
from harmprune.jobs.access import grant
from harmprune.jobs.submission import JobRequest
from harmprune.jobs.tenants import TenantPolicy
from harmprune.measure.benchmarks import run_benchmarks, task_dataset_references
from harmprune.settings import Settings
from pydantic import BaseModel

# The Tenants list lives in the service documentation, between two markers.
SERVICE_DOC = Path(__file__).parents[1] / "docs" / "service.md"

# Free-text string fields of the request that name nothing to load, and why.
NOT_REFERENCES = {
    "domain": "the name of an example domain shipped with the package (pattern-checked name)",
    "domain.name": "the spec's own name",
    "domain.description": "free text",
    "domain.harmful[].prompt": "prompt text",
    "domain.harmful[].response": "response text",
    "domain.harmful[].revision": "the revision of the dataset reference beside it",
    "domain.harmful[].split": "a split name inside the referenced dataset",
    "domain.harmful[].prompt_field": "a column name inside the referenced dataset",
    "domain.harmful[].response_field": "a column name inside the referenced dataset",
    "domain.eval.classifier.template": "the custom judge's prompt text",
    "domain.eval.multiple_choice[].question": "question text",
    "domain.eval.multiple_choice[].choices[]": "answer text",
    "domain.elicitation.harmful_prefix": "text forced at the start of an answer",
    "domain.tamper.target_modules[]": "module names inside the loaded model",
    "domain.eval.standard_harm.categories[]": "HarmBench category names, selecting from the "
    "behaviours shipped inside the package",
    "domain.attacks.finetune.target_modules[]": "module names inside the loaded model",
    "revision": "the revision of `model`",
    "publish.repo_id": "where the result goes: checked by the publish policy (check_publish)",
}


def _canonical(path: str) -> str:
    """Every list of Sources shares the Pair/HubDataset fields: name them once (`harmful[]`)."""
    return re.sub(
        r"^domain\.[a-z_.]*?(harmful|benign|train|eval|broad_harmful|broad_benign|in_domain_eval)\[\]\.",
        "domain.harmful[].",
        path,
    )


def test_every_string_field_that_could_name_something_is_a_reference_type() -> None:
    fields = schema_string_fields(JobRequest.model_json_schema())
    untyped = {_canonical(path) for path, kind in fields if kind is None}
    assert untyped == set(NOT_REFERENCES), (
        "a string field is neither a reference type (ModelRef, DatasetRef, TaskRef) nor listed "
        f"in NOT_REFERENCES with a reason: {sorted(untyped ^ set(NOT_REFERENCES))}"
    )
    kinds = {path: kind for path, kind in fields if kind}
    assert kinds["model"] == "model"
    assert kinds["domain.eval.classifier.base_model"] == "model"
    assert kinds["domain.eval.validation.harmful[].dataset"] == "dataset"
    assert kinds["domain.attacks.finetune.train[].dataset"] == "dataset"
    assert kinds["domain.eval.benchmarks.tasks[]"] == "task"


def test_the_service_doc_lists_every_reference_the_policy_covers() -> None:
    text = SERVICE_DOC.read_text()
    start, end = "<!-- references:start -->\n", "\n<!-- references:end -->"
    listed = text[text.index(start) + len(start) : text.index(end)]
    assert listed == tenants_section(JobRequest.model_json_schema()), (
        "docs/service.md's Tenants list is out of date: paste "
        "harmprune.inputs.references.tenants_section(JobRequest.model_json_schema())"
    )


def test_the_walk_finds_references_by_type_in_any_new_field() -> None:
    """A field nobody listed, nested in lists and optional models, is found by its type."""

    class Judge(BaseModel):
        model: ModelRef
        base_model: ModelRef | None = None

    class NewSection(BaseModel):
        judges: list[Judge]
        fallback: Judge | None = None

    found = references(
        NewSection(judges=[Judge(model="a/x"), Judge(model="a/y", base_model="/m/b")]), "new"
    )
    assert [(r.name, r.field) for r in found] == [
        ("a/x", "new.judges.0.model"),
        ("a/y", "new.judges.1.model"),
        ("/m/b", "new.judges.1.base_model"),
    ]


def test_a_preset_default_base_model_is_a_reference_of_the_request() -> None:
    judge = ClassifierJudge(preset="strongreject", model="org/judge")
    assert judge.base_model == "google/gemma-2b"
    spec = load_domain("cyber").model_dump()
    spec["eval"]["judges"] = ["nll", "classifier"]
    spec["eval"]["classifier"] = {"preset": "strongreject", "model": "org/judge"}
    config = HardenConfig(model="org/m", revision="abc", domain=spec)
    refs = {(r.kind, r.name, r.revision, r.field) for r in references(config)}
    assert ("model", "org/m", "abc", "model") in refs
    assert ("model", "google/gemma-2b", None, "domain.eval.classifier.base_model") in refs
    assert ("task", "harmprune_yesno", None, "domain.eval.benchmarks.tasks.1") in refs


def test_loaders_refuse_what_the_permit_does_not_grant(tiny_model_dir: Any, tmp_path: Path) -> None:
    """An existing model folder, a dataset and a task the policy never saw: each raises the one
    answer before anything is read."""
    empty = Permit([], policy="test")
    folder = str(tiny_model_dir("llama"))
    with pytest.raises(NotPermitted, match=r"domain\.eval\.classifier\.base_model"):
        load_model(
            folder,
            None,
            Settings(cache_dir=tmp_path),
            permit=empty,
            field="domain.eval.classifier.base_model",
        )
    with pytest.raises(NotPermitted, match=r"domain\.eval\.validation\.harmful\.1\.dataset"):
        load_sources(
            [Pair(prompt="p"), HubDataset(dataset="org/data")],
            empty,
            "domain.eval.validation.harmful",
        )
    with pytest.raises(NotPermitted, match=r"domain\.eval\.benchmarks\.tasks\.0"):
        run_benchmarks(None, None, BenchmarksConfig(tasks=["harmprune_yesno"]), empty)
    # the operator's own permit (the CLI) grants what its config names, as it resolves here
    loaded = load_model(
        folder,
        None,
        Settings(cache_dir=tmp_path),
        permit=operator_permit(HardenConfig(model=folder, domain=load_domain("cyber"))),
        device="cpu",
        dtype="float32",
        need_chat_template=False,
    )
    assert loaded.local_dir == Path(folder)


def test_a_tenants_hub_id_is_never_read_from_a_local_folder_of_that_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Any
) -> None:
    """Finding 5: a relative id resolved against the working directory. A Hub id granted to a
    tenant is fetched from the Hub (here: offline, so it fails), even when `org/name` exists."""
    shadow = tmp_path / "org" / "name"
    shadow.parent.mkdir()
    shadow.symlink_to(tiny_model_dir("llama"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    policy = TenantPolicy(name="t", read_private=True, read_gated=True)
    settings = Settings(cache_dir=tmp_path / "cache")
    granted = grant(Reference("model", "org/name", None, "model"), policy, settings)
    assert (granted.location, granted.target) == ("hub", "org/name")
    with pytest.raises(ModelLoadError, match="cannot be reached"):
        resolve(granted, settings)
    for bad in ("./org/name", "org/name/", "~/org", "/etc/passwd", "a/b/c"):
        with pytest.raises(NotPermitted):
            grant(Reference("model", bad, None, "model"), policy, settings)


TASK = """output_type: multiple_choice
test_split: test
doc_to_text: "{{q}}"
doc_to_target: 0
doc_to_choice: ["a", "b"]
"""


def test_an_lm_eval_task_is_a_reference_to_the_datasets_it_reads(tmp_path: Path) -> None:
    """Finding 2: a task can name a gated or private Hub dataset. The worker turns each task
    (a group: each member, inline ones too) into dataset references the policy then judges."""
    from lm_eval.tasks import TaskManager

    (tmp_path / "secret.yaml").write_text(
        "task: secret_task\ndataset_path: beta/secret-data\ndataset_kwargs: {revision: abc}\n"
        + TASK
    )
    inline = "  - task: inline_task\n    dataset_path: meta/gated-data\n" + "".join(
        f"    {line}\n" for line in TASK.splitlines()
    )
    (tmp_path / "group.yaml").write_text("group: secret_group\ntask:\n  - secret_task\n" + inline)
    manager = TaskManager(include_defaults=False, include_path=str(tmp_path))
    refs = task_dataset_references(["harmprune_yesno", "secret_group"], manager)
    assert [(r.name, r.revision, r.field) for r in refs] == [
        ("beta/secret-data", "abc", "domain.eval.benchmarks.tasks.1"),
        ("meta/gated-data", None, "domain.eval.benchmarks.tasks.1"),
    ]
