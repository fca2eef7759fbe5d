"""Deployment settings (the operator's), from `HARMPRUNE_*` environment variables.

Distinct from the per-job config: a job cannot grant itself what the operator forbids
(`trust_remote_code`), and secrets live here as `SecretStr`, never in a job, report or log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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
    job_time_limit_grace_s: int = Field(
        600, description="The job's process is killed this long after the soft time limit."
    )
    visibility_timeout_s: int = Field(
        8 * 3600,
        description="Redis broker: an unacknowledged job is re-delivered after this; keep it "
        "above the longest job (soft limit + grace), or long jobs get delivered twice.",
    )
    broker_restore_interval_s: int = Field(
        60, description="How often a worker looks for unacknowledged messages past the timeout."
    )
    work_dir: Path | None = Field(
        None, description="Worker scratch space for checkpoints (default cache_dir/jobs)."
    )
    local_model_roots: list[Path] = Field(
        default_factory=list,
        description="Directories whose models API clients may name by absolute path "
        '(JSON list, e.g. ["/models"]); other paths are refused.',
    )
    default_hardware: Literal["gpu", "cpu"] = Field(
        "gpu", description="Queue of jobs that do not choose one (one queue per worker kind)."
    )
    preflight: bool = Field(
        True,
        description="Check each job's model from its config files before queueing (Hub: "
        "config.json and tokenizer files only) and route it by the GPUs it needs.",
    )
    gpu_memory_gb: float = Field(80.0, gt=0, description="Memory of one GPU of the GPU workers.")
    gpu_kind: str = Field(
        "nvidia-h100", description="GPU model of the GPU workers (for the time estimate)."
    )
    multi_gpu_count: int = Field(
        0,
        ge=0,
        description="GPUs per multi-GPU worker (queue gpu-multi); 0: this deployment has none, "
        "and a job whose attribution does not fit one GPU is refused.",
    )
    attribution_processes: int = Field(
        0,
        ge=0,
        description="Worker side: FSDP2 processes for gpu-multi jobs (0: one per visible GPU).",
    )
    lease_s: float = Field(
        60.0,
        gt=0,
        description="A running job's owner renews its lease every lease_s/4; a job whose lease "
        "ran out has lost its worker and is re-run or failed.",
    )
    max_attempts: int = Field(
        2, ge=1, description="Runs of a job whose worker was lost before it is marked failed."
    )
    publish_max_retries: int = Field(5, ge=0, description="Retries of transient Hub errors.")
    publish_retry_backoff_s: float = Field(
        30.0, ge=0, description="First retry delay; doubled each retry, at most 10 minutes."
    )
    requeue_queued_after_s: float = Field(
        3600.0,
        description="The recovery sweep re-sends a job still queued after this (a lost message).",
    )
    sweep_interval_s: float = Field(
        60.0, gt=0, description="How often the API runs the recovery sweep of lost jobs."
    )
    retry_after_s: int = Field(2, ge=1, description="Retry-After sent while a job is active.")
    tenants_file: Path | None = Field(
        None,
        description="Tenant policy (YAML): publish namespaces, private/gated reads, quotas. "
        "Without it, each tenant publishes only under the namespace of its own name and reads "
        "only public models.",
    )
    job_record_ttl_s: int = Field(
        30 * 24 * 3600,
        ge=1,
        description="A finished job's record, report and idempotency key expire after this.",
    )
    preflight_processes: int = Field(
        2, ge=1, le=16, description="API: child processes that run preflight estimates."
    )
    preflight_timeout_s: float = Field(
        60.0, gt=0, description="API: one estimate is refused after this long."
    )
    preflight_memory_mb: int = Field(
        3072, ge=512, description="API: address-space limit of a preflight child process."
    )
    preflight_cache_s: float = Field(
        300.0, ge=0, description="API: how long a Hub model's config files are reused."
    )
    signing_key: Path | None = Field(
        None,
        description="Worker only: an elliptic-curve PEM private key; every saved checkpoint is "
        "signed with it (model.sig, OpenSSF model-signing). Unset: checkpoints are unsigned.",
    )
    metrics_token: SecretStr | None = Field(
        None,
        description="Bearer token for /metrics; without it /metrics answers 404 (not served).",
    )

    def token_value(self) -> str | None:
        """The Hub token as a plain string, for the one call that needs it. Never log this."""
        import os

        if self.hf_token is not None:
            return self.hf_token.get_secret_value()
        return os.environ.get("HF_TOKEN") or None

    def job_work_dir(self) -> Path:
        return self.work_dir or self.cache_dir / "jobs"

    def local_publish_dir(self) -> Path:
        return self.publish_dir or self.cache_dir / "published"
