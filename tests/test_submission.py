"""The one request model (harmprune.jobs.submission): the API's body and `harmprune submit` are
built the same way, carry the engine's own fields and bounds, and give the same HardenConfig."""

from __future__ import annotations

from pathlib import Path

import pytest
from harmprune.errors import RequestRefused, SpecError
from harmprune.inputs.config import HardenConfig, load_domain
from harmprune.jobs.submission import JobRequest, build_config, request_from_cli
from harmprune.settings import Settings

ENGINE_FIELDS = ("seed", "batch_size", "dtype", "max_backward_tokens", "gradient_checkpointing")


def test_the_request_schema_is_the_engines_fields() -> None:
    request, engine = JobRequest.model_json_schema(), HardenConfig.model_json_schema()
    for name in ENGINE_FIELDS:
        assert request["properties"][name] == engine["properties"][name], name


def test_cli_and_api_build_the_same_config(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path)
    from_cli = request_from_cli(
        "smollm2-135m-instruct", "cyber", "alpha/x", private=True, seed=7, batch_size=None
    )
    body = from_cli.model_dump(mode="json", exclude_defaults=True)
    body["publish"] = from_cli.publish.model_dump()
    from_api = JobRequest.model_validate({**body, "domain": "cyber"})
    config = build_config(from_cli, settings)
    assert config == build_config(from_api, settings)
    assert config.seed == 7 and config.domain == load_domain("cyber")
    assert config.max_backward_tokens == 1024 and config.gradient_checkpointing == "auto"


def test_cli_requests_name_the_bad_field(tmp_path: Path) -> None:
    with pytest.raises(RequestRefused, match=r"^seed: ") as err:
        request_from_cli("m", "cyber", "alpha/x", private=True, seed=-1)
    assert err.value.field == "seed"
    with pytest.raises(SpecError, match="not found"):
        request_from_cli("m", str(tmp_path / "missing.yaml"), "alpha/x", private=True)


def test_a_request_never_reads_a_file_as_its_domain(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text((Path(__file__).parents[1] / "examples/domains/cyber.yaml").read_text())
    with pytest.raises(ValueError, match="unknown example domain"):
        JobRequest.model_validate(
            {"model": "m", "domain": str(spec), "publish": {"repo_id": "a/b"}}
        )
