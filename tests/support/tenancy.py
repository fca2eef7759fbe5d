"""A tenant policy file for tests whose jobs name Hub ids that exist nowhere and publish under
shared namespaces (`org/...`, `acme/...`): both test tenants may publish there and read private
and gated repos (so no Hub is asked), with quotas no test reaches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

SHARED_NAMESPACES = ["org", "acme", "a"]
GENEROUS = {
    "concurrent_jobs": 1000,
    "jobs_per_day": 100000,
    "requests_per_second": 1e6,
    "burst": 100000,
}


def write_tenants_file(path: Path, **tenants: dict[str, Any]) -> Path:
    """`write_tenants_file(path, alpha={...})`: the YAML policy; no arguments: the permissive one."""
    if not tenants:
        tenants = {
            name: {
                "publish_namespaces": [name, *SHARED_NAMESPACES],
                "read_private": True,
                "read_gated": True,
                "quotas": GENEROUS,
            }
            for name in ("alpha", "beta")
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"tenants": tenants}))
    return path
