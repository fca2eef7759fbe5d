"""The app factory: `create_app(settings)`. `uvicorn --factory harmprune.api.main:app_from_env` (or
`harmprune serve`) builds it from HARMPRUNE_* environment variables."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

from celery import Celery
from fastapi import FastAPI
from harmprune.api import errors
from harmprune.api.auth import load_keys
from harmprune.api.logs import RequestContext
from harmprune.api.middleware import BodyLimit, Metrics, MetricsMiddleware
from harmprune.api.routes import audits, health, jobs
from harmprune.jobs.planning import Planner, shutdown_pools
from harmprune.jobs.store import JobStore
from harmprune.jobs.submission import MAX_SPEC_ITEMS, Services
from harmprune.jobs.tenants import RateLimiter, TenantPolicies
from harmprune.settings import Settings
from harmprune.workers.client import enqueue, make_celery, recover_lost_jobs
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from starlette.concurrency import run_in_threadpool

log = logging.getLogger("api")


class JobStateCollector:
    """`harmprune_jobs{state}`: jobs per state, read from the store at scrape time."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Any:
        family = GaugeMetricFamily(
            "harmprune_jobs", "Jobs in the store by state.", labels=["state"]
        )
        try:
            for state, count in self.store.counts().items():
                family.add_metric([state.value], count)
        except Exception:
            log.warning("metrics: job store unavailable")
        yield family


async def _sweep_forever(app: FastAPI) -> None:
    """Re-send jobs whose worker or message was lost; one API replica at a time (a lock)."""
    settings: Settings = app.state.settings
    store: JobStore = app.state.store
    while True:
        await asyncio.sleep(settings.sweep_interval_s)
        try:
            if await run_in_threadpool(store.try_lock, "sweep", settings.sweep_interval_s * 0.9):
                await run_in_threadpool(recover_lost_jobs, app.state.celery, store, settings)
                await run_in_threadpool(store.prune_expired)
        except Exception:
            log.warning("recovery sweep failed", exc_info=True)


def create_app(
    settings: Settings | None = None,
    *,
    store: JobStore | None = None,
    celery: Celery | None = None,
    sweep: bool = True,
) -> FastAPI:
    settings = settings or Settings()
    policies = TenantPolicies.from_settings(settings)  # refuses to start on a bad policy file
    keys = load_keys(settings, policies)  # refuses to start without keys
    store = store or JobStore.from_settings(settings)
    celery = celery or make_celery(settings)
    # Preflight estimates run in spawned child processes: this process never imports torch.
    planner = Planner(settings) if settings.preflight else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if planner is not None:
            planner.warm_up()
        task = asyncio.create_task(_sweep_forever(app)) if sweep else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if getattr(app.state, "owns_planner_pools", False):
                shutdown_pools()  # the served app: its planner children end with it

    app = FastAPI(
        title="harmprune",
        version="1",
        summary="Harden open-weight LLMs by pruning the weights that generate harmful content.",
        lifespan=lifespan,
    )
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    registry.register(JobStateCollector(store))
    app.state.settings, app.state.store, app.state.celery = settings, store, celery
    app.state.keys, app.state.metrics, app.state.registry = keys, metrics, registry
    app.state.policies, app.state.limiter = policies, RateLimiter()
    app.state.services = Services(
        settings=settings,
        store=store,
        planner=planner,
        enqueue=lambda record: enqueue(celery, record),
    )

    _state_the_body_limit(app, settings.max_request_bytes)
    errors.install(app)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(audits.router)
    # Outermost last: metrics see every request, including ones the body limit refuses.
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestContext)
    return app


def _state_the_body_limit(app: FastAPI, max_bytes: int) -> None:
    """The OpenAPI schema states the request size bound the BodyLimit middleware enforces."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        body = schema["paths"]["/v1/jobs"]["post"].get("requestBody", {})
        body["x-max-bytes"] = max_bytes
        body["description"] = (
            f"At most {max_bytes} bytes (413 above); a domain spec holds at most "
            f"{MAX_SPEC_ITEMS} prompt items across its lists."
        )
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def app_from_env() -> FastAPI:
    from harmprune.api.logs import configure_json_logging

    configure_json_logging()
    app = create_app(Settings())
    # The served process's only app: the planner's pools end with it (SIGTERM included). Tests
    # build many apps in one process, which share the pools until the process exits.
    app.state.owns_planner_pools = True
    freeze_startup_objects()
    return app


def freeze_startup_objects() -> None:
    """Move everything alive after start-up (modules, the app, its schemas: about 80,000
    objects that live as long as the process) out of the garbage collector's reach. A full
    collection otherwise walks them all: about 60 ms for every request in flight, measured on
    a busy machine (bench/README-api.md); frozen, it walks only what requests allocated, about
    7 ms. Only for the served app: tests build many apps in one process and must free them."""
    gc.collect()
    gc.freeze()
