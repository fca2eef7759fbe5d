"""Who may do what: the operator's tenant policy (`HARMPRUNE_TENANTS_FILE`, YAML).

    tenants:
      acme:
        key_sha256: [<sha256 hex of an API key>, ...]   # optional; keys may also come from
                                                        # HARMPRUNE_API_KEYS(_FILE)
        publish_namespaces: [acme, acme-research]       # default: [<tenant name>]
        read_private: false   # may name private Hub repos the operator's token can read
        read_gated: false     # may name gated Hub repos (the operator accepted their licence)
        quotas: {concurrent_jobs: 2, jobs_per_day: 50, requests_per_second: 10, burst: 40}

A tenant with a key but no entry gets the defaults: it publishes only under the namespace of its
own name and reads only public models. A refused model answers exactly like a missing one.
Torch-free: the API imports this.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Annotated

import yaml
from harmprune.errors import NotPermitted, QuotaExceeded
from harmprune.settings import Settings
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

TENANT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class TenantConfigError(ValueError):
    """The tenant policy file is unusable (the API and workers refuse to start)."""


class Quotas(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    concurrent_jobs: Annotated[int, Field(ge=0)] = Field(
        4, description="Jobs queued or running at once."
    )
    jobs_per_day: Annotated[int, Field(ge=0)] = Field(200, description="Jobs accepted per UTC day.")
    requests_per_second: Annotated[float, Field(gt=0)] = Field(
        20.0, description="Sustained API requests per second (per API process)."
    )
    burst: Annotated[int, Field(ge=1)] = Field(100, description="Requests allowed at once.")


class TenantPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    key_sha256: list[str] = Field(default_factory=list)
    publish_namespaces: list[str] = Field(default_factory=list)
    read_private: bool = False
    read_gated: bool = False
    quotas: Quotas = Field(default_factory=Quotas)

    @field_validator("publish_namespaces")
    @classmethod
    def _namespaces(cls, v: list[str]) -> list[str]:
        for ns in v:
            if not NAMESPACE.match(ns):
                raise ValueError(f"invalid namespace {ns!r}")
        return v

    @field_validator("key_sha256")
    @classmethod
    def _digests(cls, v: list[str]) -> list[str]:
        out = [d.strip().lower() for d in v]
        for d in out:
            if not re.fullmatch(r"[0-9a-f]{64}", d):
                raise ValueError("key_sha256 entries are sha256 hex digests")
        return out

    def may_publish(self, repo_id: str) -> bool:
        namespace = repo_id.split("/", 1)[0] if "/" in repo_id else None
        return namespace is not None and namespace in self.publish_namespaces

    def check_publish(self, repo_id: str) -> None:
        if not self.may_publish(repo_id):
            allowed = ", ".join(self.publish_namespaces) or "none"
            raise NotPermitted(
                "publish.repo_id",
                f"this API key may publish only under its namespaces ({allowed})",
            )


def default_policy(tenant: str) -> TenantPolicy:
    return TenantPolicy(name=tenant, publish_namespaces=[tenant])


class TenantPolicies:
    """Every tenant's policy; a tenant without an entry gets `default_policy`."""

    def __init__(self, entries: dict[str, TenantPolicy]) -> None:
        self.entries = entries

    def get(self, tenant: str) -> TenantPolicy:
        return self.entries.get(tenant) or default_policy(tenant)

    def key_digests(self) -> dict[str, str]:
        """sha256(key) -> tenant, for the keys the policy file declares."""
        return {d: p.name for p in self.entries.values() for d in p.key_sha256}

    @classmethod
    def from_settings(cls, settings: Settings) -> TenantPolicies:
        if settings.tenants_file is None:
            return cls({})
        return cls.from_file(settings.tenants_file)

    @classmethod
    def from_file(cls, path: Path) -> TenantPolicies:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise TenantConfigError(f"cannot read HARMPRUNE_TENANTS_FILE: {err}") from None
        tenants = data.get("tenants") if isinstance(data, dict) else None
        if not isinstance(tenants, dict):
            raise TenantConfigError(f"{path.name}: expected a mapping `tenants: {{name: ...}}`")
        entries = {}
        for name, entry in tenants.items():
            if not isinstance(name, str) or not TENANT_NAME.match(name):
                raise TenantConfigError(f"{path.name}: invalid tenant name {name!r}")
            body = dict(entry or {})
            body.setdefault("publish_namespaces", [name])
            try:
                entries[name] = TenantPolicy(name=name, **body)
            except (ValidationError, TypeError) as err:
                raise TenantConfigError(f"{path.name}: tenant {name}: {err}") from None
        return cls(entries)


class RateLimiter:
    """A token bucket per tenant (per API process): `burst` at once, then `requests_per_second`.
    No I/O: it costs a dictionary lookup and a lock."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, tenant: str, quotas: Quotas) -> None:
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(tenant, (float(quotas.burst), now))
            tokens = min(float(quotas.burst), tokens + (now - at) * quotas.requests_per_second)
            if tokens < 1.0:
                self._buckets[tenant] = (tokens, now)
                wait = (1.0 - tokens) / quotas.requests_per_second
                raise QuotaExceeded(
                    "(rate)",
                    f"over {quotas.requests_per_second:g} requests per second for this API key",
                    retry_after_s=max(1, int(wait + 0.999)),
                )
            self._buckets[tenant] = (tokens - 1.0, now)
