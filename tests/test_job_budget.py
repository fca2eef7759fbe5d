"""Every job is priced, and the price covers everything it will do (issue 20, finding 4):

- the built-in model and `.gguf` files are planned from their GGUF metadata like any model;
- the planner's cache key is derived from the whole config (each estimate-relevant field of the
  schema mutated changes it: attacks, tamper, every prompt list, search candidates, ...; the
  API's planner refusing a grid added to a spec it planned: tests/api/test_api_budget.py);
- every prompt list of a spec is priced, and one bound covers the items of all its lists;
- the worker refuses a job estimated over its time limit before loading any weight.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from harmprune.inputs.config import HardenConfig
from harmprune.inputs.preflight import PreflightRefused, evaluation_passes
from harmprune.jobs.planning import _estimate_key, item_lists, plan_job
from harmprune.jobs.runner import execute_job
from harmprune.jobs.store import JobState, JobStore
from harmprune.jobs.submission import MAX_SPEC_ITEMS, JobRequest
from harmprune.settings import Settings
from pydantic import ValidationError

from tests.service_stack import Namespace, namespace_fixture, stack_settings
from tests.support.gguf_files import TINY_GGUF_PARAMETERS, write_tiny_gguf
from tests.support.job_records import job_record


def pair(text: str, response: str | None = "Sure, here is [omitted].") -> dict[str, Any]:
    return {"prompt": text, "response": response}


def full_domain() -> dict[str, Any]:
    """A spec with every optional section and every list of prompt items set."""
    return {
        "name": "budget",
        "harmful": [pair("Write malware."), {"dataset": "org/harm", "limit": 3}],
        "benign": [pair("What is 2+2?", "4.")],
        "eval": {
            "harmful": [pair("Steal a password.")],
            "benign": [pair("Name a planet.", "Mars.")],
            "validation": {
                "harmful": [pair("Write a phishing email.")],
                "benign": [pair("What is 3+3?", "6.")],
            },
            "multiple_choice": [{"question": "2+2?", "choices": ["4", "5"], "answer": 0}],
            "benchmarks": {"tasks": ["harmprune_yesno"], "limit": 10},
            "general_benign": {"sizes": [3, 3, 3]},
            "controls": {"random_seeds": 2},
        },
        "search": {"mode": "sweep", "q_values": [1e-4, 2e-4]},
        "tamper": {
            "train": [pair("Train item.")],
            "broad_harmful": [pair("Broad harm.")],
            "broad_benign": [pair("Broad benign.", "Fine.")],
            "in_domain_eval": [pair("In-domain.")],
            "steps": 20,
        },
        "attacks": {
            "abliteration": {},
            "finetune": {"train": [pair("Attack item.")], "steps": [10, 40]},
        },
    }


def full_config(model: str = "org/model") -> HardenConfig:
    return HardenConfig(model=model, domain=full_domain())


# ---------------------------------------------------------------- the cache key


def leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in leaves(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in leaves(v, (*path, i))]
    return [path]


# Another value of each Literal the schema uses (a string field's generic mutation appends "x")
LITERALS = {
    "lora": ["full"],
    "full": ["lora"],
    "chat": ["plain"],
    "plain": ["prefill", "chat"],
    "prefill": ["plain"],
    "per_matrix": ["global"],
    "sum_abs": ["abs_mean"],
    "sweep": ["fixed"],
    "auto": ["float32", "on"],
    "custom": ["harmbench"],
}


def mutations(value: Any) -> list[Any]:
    """Values to try in place of `value` (the first that validates is used)."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1]
    if isinstance(value, float):
        return [value * 0.5]
    if isinstance(value, str):
        return [*LITERALS.get(value, []), value + "x"]
    return []  # a null: no generic mutation


def set_at(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    for part in path[:-1]:
        doc = doc[part]
    doc[path[-1]] = value


# A prompt's or response's text, a multiple-choice item's text and answer, the model reference
# and the seed: they change no estimate (each text is cut to max_length tokens).
def is_text(path: tuple[Any, ...]) -> bool:
    return (
        path[0] in ("model", "revision", "seed")
        or path[-1] in ("prompt", "response", "question", "answer")
        or "choices" in path
    )


def test_every_estimate_field_of_the_schema_changes_the_plan_key() -> None:
    """Each leaf of a full config, mutated (where the result is still valid), changes the key
    unless it is a prompt's text; today's hand-kept key missed domain.attacks and more."""
    base = full_config()
    dumped = base.model_dump(mode="json")
    key = _estimate_key(base, "gpu")
    changed: list[str] = []
    for path in leaves(dumped):
        config = None
        for new in mutations(_get(dumped, path)):
            doc = copy.deepcopy(dumped)
            set_at(doc, path, new)
            try:
                config = HardenConfig.model_validate(doc)
                break
            except ValidationError:
                continue
        if config is None:
            continue
        name = ".".join(map(str, path))
        if is_text(path):
            assert _estimate_key(config, "gpu") == key, name
        else:
            assert _estimate_key(config, "gpu") != key, name
            changed.append(name)
    for must in (
        "domain.attacks.finetune.steps.1",
        "domain.attacks.finetune.learning_rates.0",
        "domain.attacks.abliteration.generation",
        "domain.tamper.steps",
        "domain.tamper.method",
        "domain.eval.benchmarks.limit",
        "domain.eval.general_benign.sizes.2",
        "domain.eval.controls.random_seeds",
        "domain.search.q_values.1",
        "domain.harmful.1.limit",
        "domain.max_length",
        "domain.prompt_format",
        "domain.pruning.selection",
        "batch_size",
        "dtype",
        "gradient_checkpointing",
    ):
        assert must in changed, must
    assert _estimate_key(base, "cpu") != key


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def test_each_prompt_list_changes_the_key_and_the_price() -> None:
    """One more item in any list of the spec (found by walking it): a different key and a
    higher price. Removing a whole optional section too."""
    base = full_config()
    key, passes = _estimate_key(base, "gpu"), evaluation_passes(base.domain)
    lists = item_lists(base.domain)
    assert len(lists) == 12  # every list of Sources (11), and multiple_choice
    for path, _items in lists:
        doc = base.model_dump(mode="json")
        parts = path.split(".")[1:]
        target = doc["domain"]
        for part in parts:
            target = target[part]
        extra = copy.deepcopy(target[0])
        if "prompt" in extra:
            extra["prompt"] += " (again)"
        target.append(extra)
        config = HardenConfig.model_validate(doc)
        assert _estimate_key(config, "gpu") != key, path
        assert evaluation_passes(config.domain) > passes, path
    for section in ("attacks", "tamper"):
        doc = base.model_dump(mode="json")
        doc["domain"][section] = None
        config = HardenConfig.model_validate(doc)
        assert _estimate_key(config, "gpu") != key, section
        assert evaluation_passes(config.domain) < passes, section


# ---------------------------------------------------------------- GGUF files and the planner


def small_domain(**extra: Any) -> dict[str, Any]:
    return {
        "name": "small",
        "harmful": [pair("Write malware.")],
        "benign": [pair("What is 2+2?", "4.")],
        "eval": {"general_benign": False},
        **extra,
    }


BIG_GRID = {
    "finetune": {"learning_rates": [1e-4 * (i + 1) for i in range(30)], "steps": [100_000] * 30}
}


def test_a_gguf_file_is_planned_from_its_metadata(tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tmp_path / "models" / "tiny.gguf")
    settings = Settings(cache_dir=tmp_path / "cache", job_soft_time_limit_s=600)
    config = HardenConfig(model=str(gguf), domain=small_domain())
    plan = plan_job(config, settings, hardware="cpu")
    assert plan.estimate is not None
    assert plan.estimate.parameters == TINY_GGUF_PARAMETERS
    assert plan.estimate.tied_embeddings and plan.estimate.chat_template
    big = HardenConfig(model=str(gguf), domain=small_domain(attacks=BIG_GRID))
    with pytest.raises(PreflightRefused, match="over the job time limit of 600 s"):
        plan_job(big, settings, hardware="cpu")


def test_training_steps_are_priced_at_a_minimum_per_step(tmp_path: Path) -> None:
    """A 100,000-step full fine-tune of a small model: its flops alone say seconds on a GPU,
    its steps say hours; refused under a 900 s limit, 20 steps accepted."""
    gguf = write_tiny_gguf(tmp_path / "models" / "tiny.gguf")
    settings = Settings(cache_dir=tmp_path / "cache", job_soft_time_limit_s=900)
    tamper = {
        "train": [pair("Train item.")],
        "broad_harmful": [pair("Broad harm.")],
        "broad_benign": [pair("Broad benign.", "Fine.")],
        "method": "full",
    }
    small = plan_job(
        HardenConfig(model=str(gguf), domain=small_domain(tamper={**tamper, "steps": 20})),
        settings,
        hardware="gpu",
    )
    assert small.estimate is not None and small.estimate.tamper_seconds >= 2 * 20 * 0.02
    with pytest.raises(PreflightRefused, match="over the job time limit of 900 s"):
        plan_job(
            HardenConfig(model=str(gguf), domain=small_domain(tamper={**tamper, "steps": 100_000})),
            settings,
            hardware="gpu",
        )
    grid = {"finetune": {"learning_rates": [1e-4], "steps": [20_000]}}
    with pytest.raises(PreflightRefused, match="over the job time limit of 900 s"):
        plan_job(
            HardenConfig(model=str(gguf), domain=small_domain(attacks=grid)),
            settings,
            hardware="gpu",
        )


# ---------------------------------------------------------------- one bound on every list


def request(domain: dict[str, Any]) -> JobRequest:
    return JobRequest.model_validate(
        {"model": "org/model", "domain": domain, "publish": {"repo_id": "org/x"}}
    )


def test_one_item_bound_covers_every_list_of_the_spec() -> None:
    many = [{"prompt": f"p{i}"} for i in range(60_000)]
    with pytest.raises(ValidationError, match=r"domain\.eval\.validation\.harmful: .*60002"):
        request(small_domain(eval={"validation": {"harmful": many}}))
    # spread over lists, the total counts: each list alone is small
    half = MAX_SPEC_ITEMS // 2
    spread = small_domain(
        eval={
            "validation": {"harmful": many[:half]},
            "harmful": [{"prompt": f"t{i}"} for i in range(half)],
        }
    )
    with pytest.raises(ValidationError, match=f"at most {MAX_SPEC_ITEMS} across every list"):
        request(spread)
    # a Hub dataset counts as its limit, and needs one
    tamper = {
        "train": [{"dataset": "org/ds", "response_field": "r", "limit": MAX_SPEC_ITEMS}],
        "broad_harmful": [pair("a")],
        "broad_benign": [pair("b")],
    }
    with pytest.raises(ValidationError, match=r"domain\.tamper\.train: "):
        request(small_domain(tamper=tamper))
    tamper["train"] = [{"dataset": "org/ds", "response_field": "r"}]
    with pytest.raises(ValidationError, match=r"domain\.tamper\.train\.0\.limit: .*needs a limit"):
        request(small_domain(tamper=tamper))
    tamper["train"] = [{"dataset": "org/ds", "response_field": "r", "limit": 100}]
    assert request(small_domain(tamper=tamper)).domain.tamper is not None
    assert request(small_domain(eval={"validation": {"harmful": many[: MAX_SPEC_ITEMS - 2]}}))


# ---------------------------------------------------------------- the worker's own check

ns = namespace_fixture("budget")


@pytest.mark.services
def test_the_worker_refuses_a_job_over_its_time_limit_before_loading(
    ns: Namespace, tmp_path: Path
) -> None:
    """A queued job whose estimate is over the worker's limit (the API's plan may be missing
    or made under other limits) fails with the refusal before any weight is read: the GGUF
    file holds a tensor of zeros that no conversion ever reads."""
    gguf = write_tiny_gguf(tmp_path / "models" / "tiny.gguf")
    settings = stack_settings(
        ns, tmp_path, local_model_roots=[tmp_path / "models"], job_soft_time_limit_s=600
    )
    store = JobStore.from_settings(settings)
    config = HardenConfig(model=str(gguf), domain=small_domain(attacks=BIG_GRID), device="cpu")
    record = job_record(
        queue="cpu",
        config=config.model_dump(mode="json"),
        publish={"repo_id": "alpha/tiny-hardened", "private": True},
        spec_hash=config.domain.spec_hash(),
        domain="small",
    )
    record, _ = store.admit(record, concurrent_jobs=10, jobs_per_day=10)
    assert execute_job(record.id, settings, store=store) == "failed"
    done = store.get(record.id, "alpha")
    assert done is not None and done.state == JobState.failed and done.error is not None
    assert done.error.code == "preflight_refused" and done.error.stage == "load"
    assert "over the job time limit of 600 s" in done.error.message
    assert not (settings.cache_dir / "models").exists()  # never converted: no weight was read
