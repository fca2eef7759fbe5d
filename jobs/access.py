"""The tenant's access policy over every reference a job names: one function, `permit_job`,
that the API runs before queueing (fast 4xx answers) and the worker runs again before any byte
is fetched (the guarantee; the policy file or a repo's visibility may have changed since).

References are found by type (harmprune.inputs.references), never by a list of field names. What a
tenant may name:

    model    the built-in alias; an absolute path under the operator's model roots
             (`HARMPRUNE_LOCAL_MODEL_ROOTS`); a Hub repo id that is public, or private/gated when
             the policy grants it (`read_private`, `read_gated`)
    dataset  a Hub dataset id, same visibility rules (a local path is never data)
    task     an lm-eval task name (no paths); on the worker, a built-in task also names the Hub
             datasets it reads, and each of those must be readable like a dataset reference

Every refusal is the same `NotPermitted(field, NOT_READABLE)`: private, gated, missing, outside
the roots and malformed references cannot be told apart. Torch-free.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from harmprune.errors import ModelLoadError, ServiceUnavailable
from harmprune.inputs.config import HardenConfig
from harmprune.inputs.preflight import HubUnreachable, RepoFacts, RepoNotVisible, hub_repo_facts
from harmprune.inputs.references import (
    TASK_NAME,
    Grant,
    Permit,
    Reference,
    is_hub_id,
    not_readable,
    references,
    under_roots,
)
from harmprune.jobs.tenants import TenantPolicy
from harmprune.settings import Settings
from harmprune.vocabulary import SMOLLM2_ALIAS

log = logging.getLogger(__name__)


def check_repo_access(facts: RepoFacts, policy: TenantPolicy, field: str) -> None:
    """The policy's verdict on a Hub repo's visibility."""
    if (facts.private and not policy.read_private) or (facts.gated and not policy.read_gated):
        raise not_readable(field)


def check_hub_access(
    ref: Reference, policy: TenantPolicy, settings: Settings, facts: RepoFacts | None = None
) -> None:
    """Refuse a Hub repo the tenant may not read, or that does not exist (the same answer)."""
    if policy.read_private and policy.read_gated:
        return  # nothing the Hub could say would refuse it; the worker's token decides
    if facts is None:
        try:
            facts = hub_repo_facts(ref.name, ref.revision, settings, repo_type=ref.kind)
        except (RepoNotVisible, ModelLoadError) as err:  # e.g. no such revision: same answer
            log.info("access check of %s: %s", ref.field, type(err).__name__)
            raise not_readable(ref.field) from None
        except HubUnreachable as err:
            raise ServiceUnavailable(str(err), code="hub_unreachable", retry_after_s=30) from None
    check_repo_access(facts, policy, ref.field)


def grant(
    ref: Reference,
    policy: TenantPolicy,
    settings: Settings,
    *,
    check_hub: bool = True,
    facts: RepoFacts | None = None,
) -> Grant:
    """The tenant's grant for one reference, or the one 'may not read' answer."""
    if ref.kind == "task":
        if not TASK_NAME.match(ref.name):
            raise not_readable(ref.field)
        return Grant(ref, "task", ref.name)
    if ref.kind == "model" and ref.name == SMOLLM2_ALIAS:
        return Grant(ref, "alias", ref.name)
    if ref.kind == "model" and ref.name.startswith("/"):
        path = Path(os.path.normpath(ref.name))
        exists = path.is_dir() or (path.suffix == ".gguf" and path.is_file())
        if not under_roots(ref.name, settings.local_model_roots) or not exists:
            raise not_readable(ref.field)  # a missing path reads like one outside the roots
        return Grant(ref, "local", str(path))
    if not is_hub_id(ref.name) or ref.name.endswith(".gguf"):
        raise not_readable(ref.field)  # relative paths (`x.gguf` too), `~`, `..`, ...
    if check_hub:
        check_hub_access(ref, policy, settings, facts)
    return Grant(ref, "hub", ref.name)


def permit_job(
    config: HardenConfig,
    policy: TenantPolicy,
    settings: Settings,
    *,
    extra: Iterable[Reference] = (),
    hub_checked: frozenset[str] = frozenset(),
) -> Permit:
    """Every reference of the job (and `extra`: the datasets of its lm-eval tasks, on the
    worker) granted by the tenant's policy, or NotPermitted for the first that is not.
    `hub_checked`: fields whose Hub visibility the caller has just decided (the API's planner
    reads the model's facts with its config files)."""
    grants = [
        grant(ref, policy, settings, check_hub=ref.field not in hub_checked)
        for ref in [*references(config), *extra]
    ]
    return Permit(grants, policy=f"tenant:{policy.name}")
