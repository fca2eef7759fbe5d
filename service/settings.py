"""Deployment settings (the operator's), from `HARMPRUNE_*` environment variables.

Distinct from the per-job config: a job cannot grant itself what the operator forbids
(`trust_remote_code`), and secrets live here as `SecretStr`, never in a job, report or log.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "harmprune"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HARMPRUNE_", extra="ignore")

    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Converted models (GGUF -> safetensors) are cached here.",
    )
    allow_remote_code: bool = Field(
        False, description="Operator switch: jobs may set trust_remote_code only when this is true."
    )
    hf_token: SecretStr | None = Field(
        None, description="Hub token for private models and publishing. Falls back to HF_TOKEN."
    )
    max_shard_size: str = Field("5GB", description="Checkpoint shard size (Hub warns over 20GB).")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Job store and Celery broker.")
    key_prefix: str = Field("harmprune", description="Prefix of every Redis key of the job store.")
    api_keys: SecretStr | None = Field(
        None, description="Comma-separated tenant=key pairs accepted by the API."
    )
    api_keys_file: Path | None = Field(
        None, description="File of 'tenant:sha256(key)' lines; for production instead of api_keys."
    )
    publish_dir: Path | None = Field(
        None,
        description="LocalPublisher target when no Hub is configured (default cache_dir/published).",
    )
    hub_enabled: bool = Field(
        False, description="Publish to the Hugging Face Hub (HF_ENDPOINT selects the server)."
    )
    max_request_bytes: int = Field(2_000_000, description="Largest accepted API request body.")
    job_soft_time_limit_s: int = Field(6 * 3600, description="A job is stopped cleanly after this.")

    def token_value(self) -> str | None:
        """The Hub token as a plain string, for the one call that needs it. Never log this."""
        import os

        if self.hf_token is not None:
            return self.hf_token.get_secret_value()
        return os.environ.get("HF_TOKEN") or None
