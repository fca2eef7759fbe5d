"""`Annotated` dependency aliases: the tenant behind the bearer key (rate-limited), its policy,
the job store, settings, and what submitting needs.

All `async def`: none of them blocks, and FastAPI would run a plain `def` dependency in the
thread pool (a thread hop per dependency per request)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from harmprune.api.auth import KeyRing
from harmprune.api.errors import ApiError
from harmprune.api.logs import bind_tenant
from harmprune.api.middleware import Metrics
from harmprune.jobs.store import JobStore
from harmprune.jobs.submission import Services
from harmprune.jobs.tenants import RateLimiter, TenantPolicies, TenantPolicy
from harmprune.settings import Settings

bearer = HTTPBearer(auto_error=False, description="An API key issued by the operator.")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> JobStore:
    return request.app.state.store


async def get_services(request: Request) -> Services:
    return request.app.state.services


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The tenant of the API key; each request takes one token of its rate limit."""
    keys: KeyRing = request.app.state.keys
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(
            401,
            "unauthorized",
            "missing API key: send Authorization: Bearer <key>",
            headers=challenge,
        )
    tenant = keys.tenant_for(credentials.credentials)
    if tenant is None:
        raise ApiError(401, "unauthorized", "invalid API key", headers=challenge)
    bind_tenant(tenant)
    policies: TenantPolicies = request.app.state.policies
    limiter: RateLimiter = request.app.state.limiter
    try:
        limiter.take(tenant, policies.get(tenant).quotas)
    except Exception:
        request.app.state.metrics.tenant_refused.labels(tenant, "rate").inc()
        raise
    return tenant


async def get_policy(request: Request, tenant: Annotated[str, Depends(get_tenant)]) -> TenantPolicy:
    policies: TenantPolicies = request.app.state.policies
    return policies.get(tenant)


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
ServicesDep = Annotated[Services, Depends(get_services)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
TenantDep = Annotated[str, Depends(get_tenant)]
PolicyDep = Annotated[TenantPolicy, Depends(get_policy)]
