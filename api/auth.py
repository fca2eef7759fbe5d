"""API keys: each key is a tenant. Configured by the operator, never by a request.

- `HARMPRUNE_API_KEYS`: comma-separated `tenant=key` pairs (a tenant may have several keys,
  for rotation).
- `HARMPRUNE_API_KEYS_FILE`: lines `tenant:sha256hex(key)` (comments with #), so that the
  keys themselves never sit on the API's disk.
- `HARMPRUNE_TENANTS_FILE`: the tenant policy (harmprune.jobs.tenants) may list `key_sha256`.

Only sha256 digests are kept in memory; a presented key is hashed and looked up.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from harmprune.jobs.tenants import TenantPolicies
from harmprune.settings import Settings

TENANT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
MIN_KEY_LENGTH = 16


class KeyConfigError(ValueError):
    """The operator's key configuration is unusable (the API refuses to start)."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRing:
    tenants_by_hash: dict[str, str]

    def tenant_for(self, key: str) -> str | None:
        return self.tenants_by_hash.get(hash_key(key))


def _add(ring: dict[str, str], tenant: str, digest: str, where: str) -> None:
    if not TENANT.match(tenant):
        raise KeyConfigError(f"{where}: invalid tenant name {tenant!r} (letters, digits, _ . -)")
    if ring.get(digest, tenant) != tenant:
        raise KeyConfigError(f"{where}: one key is given to two tenants")
    ring[digest] = tenant


def load_keys(settings: Settings, policies: TenantPolicies | None = None) -> KeyRing:
    """Keys from HARMPRUNE_API_KEYS, HARMPRUNE_API_KEYS_FILE and the tenant policy file."""
    ring: dict[str, str] = {}
    for digest, tenant in (policies.key_digests() if policies else {}).items():
        _add(ring, tenant, digest, "HARMPRUNE_TENANTS_FILE")
    if settings.api_keys is not None:
        for n, item in enumerate(settings.api_keys.get_secret_value().split(","), 1):
            item = item.strip()
            if not item:
                continue
            tenant, sep, key = item.partition("=")
            where = f"HARMPRUNE_API_KEYS entry {n}"
            if not sep or not key.strip():
                raise KeyConfigError(f"{where}: expected tenant=key")
            if len(key.strip()) < MIN_KEY_LENGTH:
                raise KeyConfigError(f"{where}: keys must be at least {MIN_KEY_LENGTH} characters")
            _add(ring, tenant.strip(), hash_key(key.strip()), where)
    if settings.api_keys_file is not None:
        try:
            lines = settings.api_keys_file.read_text().splitlines()
        except OSError as err:
            raise KeyConfigError(f"cannot read HARMPRUNE_API_KEYS_FILE: {err.strerror}") from None
        for n, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            tenant, sep, digest = line.partition(":")
            where = f"{settings.api_keys_file.name} line {n}"
            if not sep or not SHA256_HEX.match(digest.strip().lower()):
                raise KeyConfigError(f"{where}: expected tenant:sha256hex")
            _add(ring, tenant.strip(), digest.strip().lower(), where)
    if not ring:
        raise KeyConfigError(
            "no API keys configured: set HARMPRUNE_API_KEYS (tenant=key,...) or "
            "HARMPRUNE_API_KEYS_FILE (tenant:sha256 lines)"
        )
    return KeyRing(ring)
