"""A job's plan before it is queued: may this tenant read its models, which queue runs it, and
what will it cost? Torch-free at import.

    access     every reference the job names, by the tenant's policy (harmprune.jobs.access);
               the model's Hub facts come with its config files here
    files      config.json and tokenizer files only (harmprune.inputs.preflight.locate_config_files)
    estimate   harmprune.inputs.preflight.estimate_job builds a meta model with torch: the API runs it
               in a small pool of child processes (`Planner`), never in its own process
    route      a gpu job whose attribution does not fit one GPU goes to gpu-multi when the
               deployment has multi-GPU workers; a job that fits no worker is refused

`plan_job` does all of it in the calling process (the CLI, tests); `Planner` is the API's.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import contextlib
import hashlib
import json
import logging
import multiprocessing
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from harmprune.errors import HarmpruneError
from harmprune.inputs.config import (
    HardenConfig,
    HubDataset,
    MultipleChoiceItem,
    Pair,
)
from harmprune.inputs.preflight import (
    CONFIG_FILES,
    ConfigFiles,
    Estimate,
    PreflightRefused,
    RepoNotVisible,
    locate_config_files,
    write_gguf_config,
)
from harmprune.inputs.references import is_hub_id, not_readable
from harmprune.jobs.access import check_repo_access
from harmprune.jobs.tenants import TenantPolicy
from harmprune.settings import Settings
from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

QUEUE_CPU, QUEUE_GPU, QUEUE_MULTI_GPU = "cpu", "gpu", "gpu-multi"
QUEUES = (QUEUE_GPU, QUEUE_MULTI_GPU, QUEUE_CPU)


class Plan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    queue: str
    devices: int  # GPUs the attribution uses: 0 on CPU, > 1 with FSDP2
    estimate: Estimate | None  # None: config files the API cannot read (the worker plans it)


class Capacity(BaseModel):
    """What the deployment's workers have (the operator's settings; no secrets)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu_memory_gb: float
    gpu_kind: str
    multi_gpu_count: int
    time_limit_s: float

    @classmethod
    def of(cls, settings: Settings) -> Capacity:
        return cls(
            gpu_memory_gb=settings.gpu_memory_gb,
            gpu_kind=settings.gpu_kind,
            multi_gpu_count=settings.multi_gpu_count,
            time_limit_s=float(settings.job_soft_time_limit_s),
        )


# ---------------------------------------------------------------- route: where it runs


def route(config: HardenConfig, directory: Path, hardware: str, capacity: Capacity) -> Plan:
    """Estimate the job from its config files and choose its queue (builds meta models: torch).

    `hardware` is what the job asked for. A GPU job whose attribution does not fit one GPU goes
    to the multi-GPU workers if the deployment has them; a job that fits no worker is refused
    with what is missing."""
    from harmprune.inputs.preflight import estimate_job, refuse_unless_fits

    queue = hardware
    if queue == QUEUE_MULTI_GPU and capacity.multi_gpu_count < 2:
        raise PreflightRefused("hardware", "this deployment has no multi-GPU workers")
    devices = {QUEUE_CPU: 0, QUEUE_GPU: 1}.get(queue, capacity.multi_gpu_count)

    def on(devices: int) -> Estimate:
        return estimate_job(
            config,
            directory,
            devices=devices,
            device_memory_gb=capacity.gpu_memory_gb,
            device_kind=capacity.gpu_kind,
        )

    est = on(devices)
    if est.chat_template and not est.fits and queue == QUEUE_GPU and capacity.multi_gpu_count > 1:
        if config.domain.pruning.selection == "global":
            raise PreflightRefused(
                "domain.pruning.selection",
                f"{est.problems[0]}; distributed attribution supports per_matrix selection only",
            )
        queue, devices = QUEUE_MULTI_GPU, capacity.multi_gpu_count
        est = on(devices)
    refuse_unless_fits(config, est)
    refusal = time_limit_refusal(est, capacity.time_limit_s)
    if refusal is not None:
        raise refusal
    return Plan(queue=queue, devices=devices, estimate=est)


def time_limit_refusal(est: Estimate, time_limit_s: float) -> PreflightRefused | None:
    """The refusal of a job estimated over the job time limit (None: within it)."""
    if est.job_seconds <= time_limit_s:
        return None
    return PreflightRefused(
        "model",
        f"the job is estimated at {est.job_seconds:.0f} s, over the job time limit of "
        f"{time_limit_s:.0f} s; use fewer pairs, search candidates, tamper steps or attack cells",
    )


def check_time_limit(
    config: HardenConfig, settings: Settings, devices: int, *, hub_only: bool = False
) -> Estimate | None:
    """On the worker, before any weight is read: the job's own estimate (from its config files,
    or a GGUF file's metadata) against this worker's job time limit. The API's plan may be
    missing (preflight off, a repo the API could not see) or made under other limits: this is
    the guarantee. `devices`: 0 on the CPU; `hub_only`: the model was granted as a Hub id.
    Builds a meta model (torch)."""
    from harmprune.inputs.preflight import estimate_job, fetch_config_files

    directory = fetch_config_files(config.model, config.revision, settings, hub_only=hub_only)
    if directory is None:
        return None
    est = estimate_job(
        config,
        directory,
        devices=devices,
        device_memory_gb=settings.gpu_memory_gb,
        device_kind=settings.gpu_kind,
    )
    refusal = time_limit_refusal(est, float(settings.job_soft_time_limit_s))
    if refusal is not None:
        raise refusal
    return est


def _queue_of(hardware: str | None, settings: Settings) -> str:
    return hardware or settings.default_hardware


def plan_job(
    config: HardenConfig,
    settings: Settings,
    hardware: str | None = None,
    policy: TenantPolicy | None = None,
) -> Plan:
    """Access, files, estimate and route, all in this process (the API uses `Planner`).

    Without a policy (the operator's own CLI) every repo the operator's token reads is allowed.
    """
    queue = _queue_of(hardware, settings)
    if queue == QUEUE_MULTI_GPU and settings.multi_gpu_count < 2:
        raise PreflightRefused("hardware", "this deployment has no multi-GPU workers")
    files = _locate(config, settings, policy)
    if files is None:
        return unplanned(queue, Capacity.of(settings))
    if files.gguf is not None:
        write_gguf_config(files.gguf, files.directory)
    return route(config, files.directory, queue, Capacity.of(settings))


def unplanned(queue: str, capacity: Capacity) -> Plan:
    """A job whose config files the API cannot see (a private Hub repo and no token on the API):
    queued as asked; the worker plans it before loading (`check_time_limit`)."""
    devices = {QUEUE_CPU: 0, QUEUE_GPU: 1}.get(queue, capacity.multi_gpu_count)
    return Plan(queue=queue, devices=devices, estimate=None)


def _locate(
    config: HardenConfig, settings: Settings, policy: TenantPolicy | None
) -> ConfigFiles | None:
    """The model's config files, as this tenant may read them."""
    # A tenant's Hub id is a Hub id, even if a folder of that name exists here.
    hub_only = policy is not None and is_hub_id(config.model)
    try:
        files = locate_config_files(config.model, config.revision, settings, hub_only=hub_only)
    except RepoNotVisible:
        # An API without a Hub token cannot see private repos the workers' token may read:
        # queued unchecked if the tenant may read them (the worker checks before loading).
        may_read_any = policy is None or (policy.read_private and policy.read_gated)
        if settings.token_value() is None and may_read_any:
            return None
        if policy is None:
            raise
        raise not_readable("model") from None
    if policy is not None and files is not None and files.repo is not None:
        check_repo_access(files.repo, policy, "model")
    return files


# ---------------------------------------------------------------- the API's planner

# One pool of preflight children per API process (and per limits): apps come and go in tests.
_POOLS: dict[tuple[int, int], cf.ProcessPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


@atexit.register
def shutdown_pools() -> None:
    """End every planner pool's child processes now: the served API is stopping (its lifespan's
    end, after SIGTERM: uvicorn then re-raises the signal, so no atexit handler runs), or this
    process exits. An estimate in flight is abandoned with its request; the children (torch
    imported: hundreds of MB each) must not outlive the API."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        _end_pool(pool)


def _end_pool(pool: cf.ProcessPoolExecutor) -> None:
    """Kill a pool's children and wait for them to be gone (a stuck or bloated child does not
    answer a polite shutdown), then release the pool."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.kill()
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.join(timeout=5)
    pool.shutdown(wait=False, cancel_futures=True)


def _child_init(memory_mb: int) -> None:
    """In each preflight child: an address-space limit, then the heavy imports once."""
    import resource

    limit = memory_mb * 1024 * 1024
    # the soft limit only: reading a GGUF file's metadata maps the whole file (read-only, no
    # memory used), and `_mapping_room` raises the limit by the file's size for that read alone
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    import torch  # noqa: F401
    import transformers  # noqa: F401


@contextlib.contextmanager
def _mapping_room(nbytes: int) -> Any:
    """Address space for mapping a file of `nbytes` (read-only), on top of the child's limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or nbytes <= 0:
        yield
        return
    raised = soft + nbytes if hard == resource.RLIM_INFINITY else min(hard, soft + nbytes)
    resource.setrlimit(resource.RLIMIT_AS, (raised, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _route_in_child(
    config_json: dict[str, Any],
    directory: str,
    hardware: str,
    capacity_json: dict[str, Any],
    gguf: str | None = None,
) -> dict[str, Any]:
    """`route` in a child process; errors come back as data (exception pickling loses fields).
    `gguf`: the GGUF file whose metadata gives the config files (written into `directory`)."""
    try:
        if gguf is not None:
            with _mapping_room(Path(gguf).stat().st_size):
                write_gguf_config(Path(gguf), Path(directory))
        config = HardenConfig.model_validate(config_json)
        plan = route(config, Path(directory), hardware, Capacity.model_validate(capacity_json))
        return {"plan": plan.model_dump(mode="json")}
    except PreflightRefused as err:
        return {"refused": {"field": err.field, "message": err.message}}
    except HarmpruneError as err:
        return {"refused": {"field": "model", "message": str(err)}}
    except MemoryError:
        return {
            "refused": {"field": "model", "message": "its config needs too much memory to plan"}
        }


def _fingerprint(directory: Path) -> str:
    h = hashlib.sha256()
    for name in CONFIG_FILES:
        path = directory / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


# HardenConfig fields that never change a plan; the key has the model and revision apart.
_NOT_ESTIMATED = {"model": True, "revision": True, "seed": True}
PROMPT_ITEMS = (Pair, HubDataset, MultipleChoiceItem)


def item_lists(model: BaseModel, path: str = "domain") -> list[tuple[str, list[Any]]]:
    """(field path, items) of every list of prompt items anywhere in a validated spec (pairs,
    Hub datasets, multiple-choice items), found by walking it: a list added later is found
    without anyone naming it. (The plan key and the request's item bound use it.)"""
    found: list[tuple[str, list[Any]]] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        here = f"{path}.{name}"
        if isinstance(value, BaseModel):
            found += item_lists(value, here)
        elif isinstance(value, list) and any(isinstance(x, PROMPT_ITEMS) for x in value):
            found.append((here, value))
    return found


def _list_size(items: list[Any]) -> tuple[Any, ...]:
    """What of a prompt list changes a plan: how many pairs, every Hub dataset reference (its
    limit), how many choices; not the texts (each is cut to max_length tokens)."""
    pairs = sum(1 for x in items if isinstance(x, Pair))
    datasets = [x.model_dump(mode="json") for x in items if isinstance(x, HubDataset)]
    choices = [len(x.choices) for x in items if isinstance(x, MultipleChoiceItem)]
    return pairs, datasets, choices


def _estimate_key(config: HardenConfig, hardware: str) -> str:
    """Every request field that may change a plan, derived from the whole config (not a hand
    list a new field could slip past): the config's JSON without the model reference, the seed
    and its prompt lists, plus each prompt list's size (`_list_size`), hashed."""
    lists = item_lists(config.domain)
    domain_exclude: dict[str, Any] = {}
    for path, _items in lists:
        node = domain_exclude
        *parents, leaf = path.split(".")[1:]
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = True
    dumped = config.model_dump_json(exclude={**_NOT_ESTIMATED, "domain": domain_exclude})
    sizes = json.dumps([hardware, [(path, _list_size(items)) for path, items in lists]])
    return hashlib.sha256((sizes + dumped).encode()).hexdigest()


class Planner:
    """Plans jobs for the API: Hub reads in the calling thread, estimates in a bounded pool of
    spawned child processes (so the API never imports torch) with a per-call timeout and a
    memory limit, and a cache of plans so a repeated model answers at once.

    Cache key: (model, revision, resolved commit or the config files' sha256, the fields that
    change the estimate, the deployment's capacity)."""

    MAX_PLANS = 4096

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.capacity = Capacity.of(settings)
        self._lock = threading.Lock()
        self._plans: OrderedDict[tuple[Any, ...], Plan] = OrderedDict()
        self._files: dict[tuple[str, str | None], tuple[float, tuple[ConfigFiles, str] | None]] = {}

    # ------------------------------------------------------------ the pool

    def _executor(self) -> cf.ProcessPoolExecutor:
        """The process's pool for these limits (one per API process, shared by its apps)."""
        key = (self.settings.preflight_processes, self.settings.preflight_memory_mb)
        with _POOLS_LOCK:
            pool = _POOLS.get(key)
            if pool is None:
                pool = _POOLS[key] = cf.ProcessPoolExecutor(
                    max_workers=key[0],
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_child_init,
                    initargs=(key[1],),
                )
            return pool

    def _reset_pool(self) -> None:
        """Kill the children (one is stuck or died); the next call starts a fresh pool."""
        key = (self.settings.preflight_processes, self.settings.preflight_memory_mb)
        with _POOLS_LOCK:
            pool = _POOLS.pop(key, None)
        if pool is not None:
            _end_pool(pool)

    def warm_up(self) -> None:
        """Start the children (and their torch import) before the first request needs them."""
        pool = self._executor()
        for _ in range(self.settings.preflight_processes):
            pool.submit(int)

    # ------------------------------------------------------------ planning

    def _files_for(
        self, config: HardenConfig, policy: TenantPolicy
    ) -> tuple[ConfigFiles, str] | None:
        """`_locate` and the files' version (the Hub commit, or a local directory's sha256 of
        its config files), remembered for `preflight_cache_s`: a new push or an edited local
        config is seen after that long at most. The tenant's access is decided every time."""
        key = (config.model, config.revision)
        now = time.monotonic()
        cached = self._files.get(key)
        if cached is not None and now - cached[0] < self.settings.preflight_cache_s:
            found = cached[1]
            if found is None:
                _locate(config, self.settings, policy)  # unchecked: decide again for this tenant
            elif found[0].repo is not None:
                check_repo_access(found[0].repo, policy, "model")
            return found
        files = _locate(config, self.settings, policy)
        found = None
        if files is not None:
            if files.repo is not None:
                version = files.repo.sha
            elif files.gguf is not None:  # the directory is named by the file's path, size, mtime
                version = files.directory.name
            else:
                version = _fingerprint(files.directory)
            found = (files, version)
        if len(self._files) > self.MAX_PLANS:
            self._files.clear()
        self._files[key] = (now, found)
        return found

    def plan(self, config: HardenConfig, hardware: str | None, policy: TenantPolicy) -> Plan:
        queue = _queue_of(hardware, self.settings)
        if queue == QUEUE_MULTI_GPU and self.capacity.multi_gpu_count < 2:
            raise PreflightRefused("hardware", "this deployment has no multi-GPU workers")
        found = self._files_for(config, policy)
        if found is None:
            return unplanned(queue, self.capacity)
        files, version = found
        key = (config.model, config.revision, version, _estimate_key(config, queue))
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        plan = self._estimate(config, files, queue)
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > self.MAX_PLANS:
                self._plans.popitem(last=False)
        return plan

    def _estimate(self, config: HardenConfig, files: ConfigFiles, queue: str) -> Plan:
        timeout = self.settings.preflight_timeout_s
        future = self._executor().submit(
            _route_in_child,
            config.model_dump(mode="json"),
            str(files.directory),
            queue,
            self.capacity.model_dump(mode="json"),
            None if files.gguf is None else str(files.gguf),
        )
        try:
            answer = future.result(timeout=timeout)
        except cf.TimeoutError:
            self._reset_pool()
            raise PreflightRefused(
                "model", f"its config could not be planned within {timeout:.0f} s"
            ) from None
        except cf.process.BrokenProcessPool:
            self._reset_pool()
            raise PreflightRefused(
                "model", "planning its config exhausted the preflight's memory limit"
            ) from None
        if "refused" in answer:
            raise PreflightRefused(answer["refused"]["field"], answer["refused"]["message"])
        return Plan.model_validate(answer["plan"])
