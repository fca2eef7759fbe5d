"""The job store: the authoritative record of every job, in Redis. A finished job's record,
report, cancel flag and idempotency key expire `record_ttl_s` after it ends (default 30 days).

Keys (all under the deployment's `key_prefix`):
  {p}:job:{id}                   the JobRecord as JSON
  {p}:job:{id}:report            report.json of a finished job
  {p}:job:{id}:cancel            present once a cancel was asked for (cheap to poll per batch)
  {p}:tenant:{t}:jobs            sorted set of the tenant's job ids by creation time
  {p}:tenant:{t}:state:{s}       the same, per state (filtered listing)
  {p}:state:{s}                  every tenant's job ids per state (metrics, recovery sweep)
  {p}:idem:{t}:{sha256(key)}     Idempotency-Key -> job id + fingerprint of the request
  {p}:quota:{t}:jobs:{yyyymmdd}  jobs the tenant submitted that UTC day (expires after 2 days)

Index entries of expired records are removed when a listing meets them (and by the sweep).

A submission is one round trip: `admit` (a Lua script) checks the Idempotency-Key and the
tenant's concurrent and daily quotas and stores the record with its index entries, atomically.

Every state change is one optimistic transaction (WATCH/MULTI) that moves the record and its
index entries together, so a re-delivered task reads the record and decides: `queued` -> run;
`running` with a live owner -> duplicate delivery, drop it; `running` with a dead owner (lease
expired, or its process gone on this host) -> re-run, or fail with a reason once the attempts
are spent; a terminal state -> no-op.

No torch, no Celery: the API imports this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import redis
from harmprune.settings import Settings
from pydantic import BaseModel, ConfigDict, Field


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    rejected = "rejected"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {JobState.succeeded, JobState.rejected, JobState.failed, JobState.cancelled}
)
ACTIVE_STATES = (JobState.queued, JobState.running)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PublishTarget(_Model):
    repo_id: str
    private: bool = True


class JobError(_Model):
    code: str
    message: str
    stage: str | None = None


class ReportSummary(_Model):
    outcome: Literal["accepted", "rejected"]
    outcome_reason: str = ""
    scored_count: int
    pruned_count: int
    pruned_fraction: float


class JobResult(_Model):
    repo_id: str | None = None
    commit_sha: str | None = None
    url: str | None = None
    reused: bool = False
    files: list[str] = Field(default_factory=list)
    report: ReportSummary


class Owner(_Model):
    """The worker process holding a running job: host, pid, process start time, a random token."""

    host: str
    pid: int
    started: int | None = None  # /proc/<pid>/stat start time, so a reused pid is not mistaken
    token: str

    @classmethod
    def current(cls) -> Owner:
        pid = os.getpid()
        return cls(
            host=socket.gethostname(),
            pid=pid,
            started=_process_start(pid),
            token=uuid.uuid4().hex[:12],
        )

    def provably_dead(self) -> bool:
        """True only when the owner ran on this host and its process is gone (or a zombie)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # exists, but another user's: alive as far as we can tell
        stat = _proc_stat(self.pid)
        if stat is None:
            return False  # no /proc: trust the lease
        state, started = stat
        return state in ("Z", "X") or (self.started is not None and started != self.started)

    def label(self) -> str:
        return f"{self.host}:{self.pid}"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    try:
        raw = open(f"/proc/{pid}/stat").read()  # noqa: SIM115
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces; fields follow the last ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[0], int(fields[19])


def _process_start(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


class JobRecord(_Model):
    id: str
    tenant: str
    state: JobState = JobState.queued
    stage: str | None = None
    stage_done: int = 0
    stage_total: int = 0
    progress: float = 0.0
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    enqueued_at: float | None = None
    queue: str = "gpu"
    config: dict[str, Any] = Field(description="HardenConfig as JSON: the worker reads it here.")
    preflight: dict[str, Any] | None = Field(
        None, description="harmprune.inputs.preflight.Estimate as JSON: expected memory and time."
    )
    publish: PublishTarget
    spec_hash: str
    domain: str
    idempotency_key: str | None = Field(None, description="sha256 of the key, never the key.")
    fingerprint: str | None = None
    attempts: int = 0
    publish_attempts: int = 0
    owner: Owner | None = None
    lease_expires_at: float | None = None
    cancel_requested: bool = False
    error: JobError | None = None
    result: JobResult | None = None
    checkpoint_dir: str | None = Field(None, description="Worker-local; never shown to clients.")
    notes: list[str] = Field(default_factory=list)

    @property
    def model(self) -> str:
        return str(self.config.get("model", ""))

    @property
    def revision(self) -> str | None:
        return self.config.get("revision")

    def owner_lost(self, now: float) -> bool:
        """A running job whose owner is gone: the lease ran out, or the process is provably dead."""
        if self.state != JobState.running or self.owner is None:
            return False
        expired = self.lease_expires_at is None or self.lease_expires_at < now
        return expired or self.owner.provably_dead()

    def note(self, text: str) -> None:
        self.notes = [*self.notes, text][-20:]


def new_job_id() -> str:
    return uuid.uuid4().hex


def fingerprint(payload: Any) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


class QuotaRefusal(Exception):
    """`JobStore.admit` refused a job: `kind` is the quota (`concurrent` with the tenant's
    active jobs, or `daily`)."""

    def __init__(self, kind: Literal["concurrent", "daily"], active: int = 0) -> None:
        super().__init__(kind)
        self.kind = kind
        self.active = active


# One round trip for a submission (JobStore.admit): the idempotency key, the concurrent and
# daily quotas and the new record with its index entries, atomically.
#   KEYS: job, tenant index, tenant queued, tenant running, state queued, daily counter, idem
#   ARGV: record JSON, job id, score, concurrent limit, daily limit, daily TTL, idem entry JSON
#         ("" without an Idempotency-Key), job key prefix (`{p}:job:`)
_ADMIT = """
if ARGV[7] ~= '' then
  local seen = redis.call('GET', KEYS[7])
  if seen then
    local earlier = redis.call('GET', ARGV[8] .. cjson.decode(seen)['job_id'])
    if earlier then return {'seen', seen, earlier} end
  end
end
local active = redis.call('ZCARD', KEYS[3]) + redis.call('ZCARD', KEYS[4])
if active >= tonumber(ARGV[4]) then return {'concurrent', tostring(active)} end
local count = redis.call('INCR', KEYS[6])
redis.call('EXPIRE', KEYS[6], ARGV[6])
if count > tonumber(ARGV[5]) then
  redis.call('DECR', KEYS[6])
  return {'daily'}
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[5], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
if ARGV[7] ~= '' then redis.call('SET', KEYS[7], ARGV[7]) end
return {'created'}
"""


class NotCancellable(Exception):
    def __init__(self, state: JobState) -> None:
        super().__init__(state)
        self.state = state


ClaimKind = Literal[
    "run", "resume", "rerun", "duplicate", "done", "cancelled", "failed", "missing", "requeued"
]


@dataclass(frozen=True)
class Claim:
    """What a task that received job `id` must do; `record` is the record after the decision."""

    kind: ClaimKind
    record: JobRecord | None
    reason: str = ""

    @property
    def should_run(self) -> bool:
        return self.kind in ("run", "resume", "rerun")


_Mutation = Callable[[JobRecord], JobRecord | None]


class JobStore:
    """Job records in Redis. Thread-safe (redis-py's pool); one per process."""

    def __init__(self, client: redis.Redis, prefix: str, record_ttl_s: int | None = None) -> None:
        self.r = client
        self.p = prefix
        self.record_ttl_s = record_ttl_s
        self._admit = client.register_script(_ADMIT)

    @classmethod
    def from_settings(cls, settings: Settings) -> JobStore:
        client = redis.Redis.from_url(
            settings.redis_url,
            decode_responses=True,
            socket_connect_timeout=5,
            socket_timeout=10,
            health_check_interval=30,
        )
        return cls(client, settings.key_prefix, settings.job_record_ttl_s)

    # ------------------------------------------------------------ keys

    def _job(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}"

    def _report(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}:report"

    def _cancel(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}:cancel"

    def _tenant_index(self, tenant: str) -> str:
        return f"{self.p}:tenant:{tenant}:jobs"

    def _tenant_state(self, tenant: str, state: JobState) -> str:
        return f"{self.p}:tenant:{tenant}:state:{state.value}"

    def _state(self, state: JobState) -> str:
        return f"{self.p}:state:{state.value}"

    def _idem(self, tenant: str, key_hash: str) -> str:
        return f"{self.p}:idem:{tenant}:{key_hash}"

    @staticmethod
    def hash_key(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    # ------------------------------------------------------------ reads

    def ping(self) -> bool:
        return bool(self.r.ping())

    def _load(self, raw: Any) -> JobRecord | None:
        return JobRecord.model_validate_json(raw) if raw else None

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        """The record, or None; with `tenant`, another tenant's job is None too."""
        record = self._load(self.r.get(self._job(job_id)))
        if record is None or (tenant is not None and record.tenant != tenant):
            return None
        return record

    def list_jobs(
        self, tenant: str, state: JobState | None = None, offset: int = 0, limit: int = 20
    ) -> tuple[list[JobRecord], int]:
        """Newest first; returns one page and the total count."""
        key = self._tenant_index(tenant) if state is None else self._tenant_state(tenant, state)
        with self.r.pipeline(transaction=False) as pipe:
            pipe.zcard(key)
            pipe.zrevrange(key, offset, offset + limit - 1)
            total, ids = pipe.execute()
        if not ids:
            return [], total
        raws = self.r.mget([self._job(i) for i in ids])
        expired = [i for i, raw in zip(ids, raws, strict=True) if not raw]
        if expired:  # their records ran out of time: drop the index entries too
            self._drop_index_entries(tenant, expired)
            total -= len(expired)
        return [rec for raw in raws if (rec := self._load(raw)) is not None], total

    def _drop_index_entries(self, tenant: str, ids: list[str]) -> None:
        with self.r.pipeline(transaction=False) as pipe:
            pipe.zrem(self._tenant_index(tenant), *ids)
            for state in JobState:
                pipe.zrem(self._tenant_state(tenant, state), *ids)
                pipe.zrem(self._state(state), *ids)
            pipe.execute()

    def prune_expired(self, batch: int = 500) -> int:
        """Remove the global state-index entries of expired records (tenant indexes are pruned
        when listed). Returns how many were removed."""
        removed = 0
        for state in TERMINAL_STATES:
            ids: list[Any] = list(self.r.zrange(self._state(state), 0, batch - 1))
            if not ids:
                continue
            with self.r.pipeline(transaction=False) as pipe:
                for i in ids:
                    pipe.exists(self._job(str(i)))
                exists = pipe.execute()
            gone = [str(i) for i, e in zip(ids, exists, strict=True) if not e]
            if gone:
                removed += int(self.r.zrem(self._state(state), *gone))
        return removed

    def find_idempotent(self, tenant: str, idempotency_key: str) -> JobRecord | None:
        """The job an Idempotency-Key was first used for (a replay needs no new plan)."""
        raw = self.r.get(self._idem(tenant, self.hash_key(idempotency_key)))
        if not raw:
            return None
        return self.get(json.loads(raw)["job_id"], tenant)

    def active_count(self, tenant: str) -> int:
        """The tenant's jobs queued or running."""
        with self.r.pipeline(transaction=False) as pipe:
            for state in ACTIVE_STATES:
                pipe.zcard(self._tenant_state(tenant, state))
            return sum(pipe.execute())

    def _daily(self, tenant: str) -> str:
        return f"{self.p}:quota:{tenant}:jobs:{time.strftime('%Y%m%d', time.gmtime())}"

    def take_daily_job(self, tenant: str, limit: int) -> bool:
        """Count one job against the tenant's jobs of this UTC day; False (and not counted)
        once `limit` is reached."""
        key = self._daily(tenant)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, 2 * 86400)
            count, _ = pipe.execute()
        if count > limit:
            self.r.decr(key)
            return False
        return True

    def get_report(self, job_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        if self.get(job_id, tenant) is None:
            return None
        raw = self.r.get(self._report(job_id))
        return json.loads(raw) if raw else None

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.r.exists(self._cancel(job_id)))

    def counts(self) -> dict[JobState, int]:
        with self.r.pipeline(transaction=False) as pipe:
            for s in JobState:
                pipe.zcard(self._state(s))
            values = pipe.execute()
        return dict(zip(JobState, values, strict=True))

    def active(self) -> Iterator[JobRecord]:
        """Every queued or running job (for the recovery sweep)."""
        for state in ACTIVE_STATES:
            ids = self.r.zrange(self._state(state), 0, -1)
            for i in range(0, len(ids), 200):
                for raw in self.r.mget([self._job(str(j)) for j in ids[i : i + 200]]):
                    if (rec := self._load(raw)) is not None:
                        yield rec

    # ------------------------------------------------------------ writes

    def _index_ops(self, pipe: Any, old: JobRecord | None, new: JobRecord | None) -> None:
        """Move index entries from `old` to `new` (either may be None: creation, deletion)."""
        rec = new or old
        assert rec is not None
        score = rec.created_at
        if old is not None and (new is None or old.state != new.state):
            pipe.zrem(self._tenant_state(old.tenant, old.state), old.id)
            pipe.zrem(self._state(old.state), old.id)
        if new is not None and (old is None or old.state != new.state):
            pipe.zadd(self._tenant_state(new.tenant, new.state), {new.id: score})
            pipe.zadd(self._state(new.state), {new.id: score})
        if old is None and new is not None:
            pipe.zadd(self._tenant_index(new.tenant), {new.id: score})
        if new is None and old is not None:
            pipe.zrem(self._tenant_index(old.tenant), old.id)

    def create(
        self, record: JobRecord, idempotency_key: str | None = None
    ) -> tuple[JobRecord, bool]:
        """Store a new queued record. With an idempotency key already used for the same request,
        return the earlier job and False; for a different request raise IdempotencyConflict."""
        if idempotency_key is None:
            with self.r.pipeline(transaction=True) as pipe:
                pipe.set(self._job(record.id), record.model_dump_json())
                self._index_ops(pipe, None, record)
                pipe.execute()
            return record, True

        key_hash = self.hash_key(idempotency_key)
        record = record.model_copy(update={"idempotency_key": key_hash})
        idem = self._idem(record.tenant, key_hash)
        outcome: list[tuple[JobRecord, bool]] = []

        def txn(pipe: Any) -> None:
            outcome.clear()
            seen = pipe.get(idem)
            if seen:
                entry = json.loads(seen)
                earlier = self._load(pipe.get(self._job(entry["job_id"])))
                if earlier is not None:
                    if entry["fingerprint"] != record.fingerprint:
                        raise IdempotencyConflict(earlier.id)
                    outcome.append((earlier, False))
                    return
            pipe.multi()
            pipe.set(self._job(record.id), record.model_dump_json())
            pipe.set(idem, json.dumps({"job_id": record.id, "fingerprint": record.fingerprint}))
            self._index_ops(pipe, None, record)
            outcome.append((record, True))

        self.r.transaction(txn, idem)
        return outcome[0]

    def admit(
        self,
        record: JobRecord,
        *,
        concurrent_jobs: int,
        jobs_per_day: int,
        idempotency_key: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """`create` within the tenant's quotas, in one round trip (a Lua script, atomic).

        With an Idempotency-Key already used for the same request: the earlier job and False
        (no quota taken); for a different request IdempotencyConflict. Then QuotaRefusal when
        the tenant has `concurrent_jobs` queued or running, or has submitted `jobs_per_day`
        today (UTC; not counted then). Else the record is stored with its index entries, one
        job is counted for the day, and (record, True) returned."""
        assert record.state == JobState.queued
        idem_key, entry = "", ""
        if idempotency_key is not None:
            key_hash = self.hash_key(idempotency_key)
            record = record.model_copy(update={"idempotency_key": key_hash})
            idem_key = self._idem(record.tenant, key_hash)
            entry = json.dumps({"job_id": record.id, "fingerprint": record.fingerprint})
        keys = [
            self._job(record.id),
            self._tenant_index(record.tenant),
            self._tenant_state(record.tenant, JobState.queued),
            self._tenant_state(record.tenant, JobState.running),
            self._state(JobState.queued),
            self._daily(record.tenant),
            idem_key or self._idem(record.tenant, "-"),  # declared, unused without a key
        ]
        args: list[str | int] = [
            record.model_dump_json(),
            record.id,
            repr(record.created_at),
            concurrent_jobs,
            jobs_per_day,
            2 * 86400,
            entry,
            f"{self.p}:job:",
        ]
        answer = self._admit(keys=keys, args=args)
        kind = answer[0]
        if kind == "created":
            return record, True
        if kind == "seen":
            seen, earlier = json.loads(answer[1]), JobRecord.model_validate_json(answer[2])
            if seen["fingerprint"] != record.fingerprint:
                raise IdempotencyConflict(earlier.id)
            return earlier, False
        if kind == "concurrent":
            raise QuotaRefusal("concurrent", int(answer[1]))
        raise QuotaRefusal("daily")

    def _update(self, job_id: str, mutate: _Mutation, extra: Callable[[Any], None] | None = None):
        """Read-modify-write one record atomically. `mutate` returns the new record or None
        (no change). Returns (old, new); new is None when nothing changed."""
        key = self._job(job_id)
        result: list[tuple[JobRecord | None, JobRecord | None]] = []

        def txn(pipe: Any) -> None:
            result.clear()
            old = self._load(pipe.get(key))
            if old is None:
                result.append((None, None))
                return
            new = mutate(old.model_copy(deep=True))
            if new is None:
                result.append((old, None))
                return
            new.updated_at = time.time()
            pipe.multi()
            pipe.set(key, new.model_dump_json())
            self._index_ops(pipe, old, new)
            if extra is not None:
                extra(pipe)
            if new.state.terminal and self.record_ttl_s is not None:
                self._expire_job(pipe, new)
            result.append((old, new))

        self.r.transaction(txn, key)
        return result[0]

    def _expire_job(self, pipe: Any, rec: JobRecord) -> None:
        """A finished job's keys live `record_ttl_s` more (its idempotency key with them)."""
        ttl = self.record_ttl_s
        for key in (self._job(rec.id), self._report(rec.id), self._cancel(rec.id)):
            pipe.expire(key, ttl)
        if rec.idempotency_key:
            pipe.expire(self._idem(rec.tenant, rec.idempotency_key), ttl)

    def mark_enqueued(self, job_id: str) -> None:
        def mutate(rec: JobRecord) -> JobRecord | None:
            rec.enqueued_at = time.time()
            return rec

        self._update(job_id, mutate)

    def claim(self, job_id: str, owner: Owner, lease_s: float, max_attempts: int) -> Claim:
        """Decide what a delivered task does, and take the job if it is to run."""
        decision: list[tuple[ClaimKind, str]] = []

        def take(rec: JobRecord, now: float) -> None:
            rec.state = JobState.running
            rec.owner = owner
            rec.lease_expires_at = now + lease_s
            rec.started_at = rec.started_at or now

        def mutate(rec: JobRecord) -> JobRecord | None:
            decision.clear()
            now = time.time()
            if rec.state.terminal:
                decision.append(("done", f"job already {rec.state.value}"))
                return None
            if rec.state == JobState.queued:
                if rec.cancel_requested:
                    _finish(rec, JobState.cancelled, now)
                    decision.append(("cancelled", "cancelled before it started"))
                    return rec
                take(rec, now)
                rec.attempts += 1
                decision.append(("run", ""))
                return rec
            # running
            if rec.owner is None:  # released on purpose (a publish retry): resume it
                take(rec, now)
                decision.append(("resume", ""))
                return rec
            if not rec.owner_lost(now):
                decision.append(("duplicate", f"running on {rec.owner.label()}"))
                return None
            kind, lost = _settle_lost(rec, now, max_attempts)
            if kind != "requeued":
                decision.append((kind, lost))
                return rec
            take(rec, now)
            rec.attempts += 1
            decision.append(("rerun", lost))
            return rec

        old, new = self._update(job_id, mutate)
        if old is None:
            return Claim("missing", None, "no such job (deleted?)")
        kind, reason = decision[0]
        return Claim(kind, new or old, reason)

    def _owned(self, owner: Owner, mutate: _Mutation) -> _Mutation:
        def guarded(rec: JobRecord) -> JobRecord | None:
            if rec.state != JobState.running or rec.owner != owner:
                return None
            return mutate(rec)

        return guarded

    def heartbeat(
        self,
        job_id: str,
        owner: Owner,
        lease_s: float,
        *,
        stage: str | None = None,
        done: int = 0,
        total: int = 0,
        progress: float | None = None,
    ) -> bool:
        """Extend the lease (and record progress); False once this owner no longer holds it."""

        def mutate(rec: JobRecord) -> JobRecord:
            rec.lease_expires_at = time.time() + lease_s
            if stage is not None:
                rec.stage, rec.stage_done, rec.stage_total = stage, done, total
            if progress is not None:
                rec.progress = max(rec.progress, min(progress, 1.0))
            return rec

        _, new = self._update(job_id, self._owned(owner, mutate))
        return new is not None

    def set_checkpoint(self, job_id: str, owner: Owner, path: str | None) -> bool:
        def mutate(rec: JobRecord) -> JobRecord:
            rec.checkpoint_dir = path
            return rec

        return self._update(job_id, self._owned(owner, mutate))[1] is not None

    def release(self, job_id: str, owner: Owner, note: str) -> bool:
        """Give a running job back (still running, no owner) so a retried task resumes it."""

        def mutate(rec: JobRecord) -> JobRecord:
            rec.owner, rec.lease_expires_at = None, None
            rec.publish_attempts += 1
            rec.note(note)
            return rec

        return self._update(job_id, self._owned(owner, mutate))[1] is not None

    def requeue_for_shutdown(self, job_id: str, owner: Owner, note: str) -> JobRecord | None:
        """A running job whose worker is shutting down goes back to `queued` without spending
        its attempt (a rollout is not the job's fault). None if this owner no longer holds it."""

        def mutate(rec: JobRecord) -> JobRecord:
            rec.state = JobState.queued
            rec.attempts = max(0, rec.attempts - 1)
            rec.owner, rec.lease_expires_at, rec.checkpoint_dir = None, None, None
            rec.stage, rec.stage_done, rec.stage_total, rec.progress = None, 0, 0, 0.0
            rec.enqueued_at = time.time()
            rec.note(note)
            return rec

        return self._update(job_id, self._owned(owner, mutate))[1]

    def finish(
        self,
        job_id: str,
        owner: Owner | None,
        state: JobState,
        *,
        error: JobError | None = None,
        result: JobResult | None = None,
        report: dict[str, Any] | None = None,
    ) -> bool:
        """Move a running job (held by `owner`; None = whoever holds it) to a terminal state."""
        assert state.terminal

        def mutate(rec: JobRecord) -> JobRecord | None:
            if rec.state.terminal or (owner is not None and rec.owner != owner):
                return None
            rec.error, rec.result = error, result
            if state == JobState.succeeded:
                rec.progress = 1.0
            _finish(rec, state, time.time())
            return rec

        def store_report(pipe: Any) -> None:
            if report is not None:
                pipe.set(self._report(job_id), json.dumps(report))

        return self._update(job_id, mutate, store_report)[1] is not None

    def request_cancel(self, job_id: str, tenant: str) -> JobRecord | None:
        """Cancel a queued job at once; flag a running one (it stops at the next batch boundary).
        None when the job does not exist for this tenant; NotCancellable when already finished."""

        def mutate(rec: JobRecord) -> JobRecord | None:
            if rec.tenant != tenant:
                return None
            if rec.state.terminal:
                raise NotCancellable(rec.state)
            if rec.state == JobState.queued:
                _finish(rec, JobState.cancelled, time.time())
            rec.cancel_requested = True
            return rec

        old, new = self._update(job_id, mutate, lambda pipe: pipe.set(self._cancel(job_id), "1"))
        if old is None or old.tenant != tenant:
            return None
        return new or old

    def delete(self, job_id: str, tenant: str) -> JobRecord | None:
        """Delete a finished job and everything keyed by it. NotCancellable while it is active."""
        key = self._job(job_id)
        out: list[JobRecord | None] = [None]

        def txn(pipe: Any) -> None:
            rec = self._load(pipe.get(key))
            if rec is None or rec.tenant != tenant:
                out[0] = None
                return
            if not rec.state.terminal:
                raise NotCancellable(rec.state)
            pipe.multi()
            pipe.delete(key, self._report(job_id), self._cancel(job_id))
            if rec.idempotency_key:
                pipe.delete(self._idem(rec.tenant, rec.idempotency_key))
            self._index_ops(pipe, rec, None)
            out[0] = rec

        self.r.transaction(txn, key)
        return out[0]

    # ------------------------------------------------------------ recovery

    def needs_requeue(self, now: float, queued_after_s: float) -> list[JobRecord]:
        """Jobs that may have lost their broker message: running with a lost owner, or queued
        and not (re-)enqueued for `queued_after_s`. Re-sending is safe: the claim dedupes."""
        out = []
        for rec in self.active():
            if rec.state == JobState.running and rec.owner_lost(now):
                out.append(rec)
            elif rec.state == JobState.queued or rec.owner is None:  # queued, or released
                since = max(rec.enqueued_at or rec.created_at, rec.updated_at)
                if now - since > queued_after_s:
                    out.append(rec)
        return out

    def requeue_lost(self, job_id: str, max_attempts: int) -> JobRecord | None:
        """A running job whose owner is gone goes back to `queued` (to be re-sent), or ends
        failed (attempts spent) or cancelled (cancel asked for). None if it was not lost."""

        def mutate(rec: JobRecord) -> JobRecord | None:
            now = time.time()
            if rec.state != JobState.running or not rec.owner_lost(now):
                return None
            _settle_lost(rec, now, max_attempts)
            return rec

        return self._update(job_id, mutate)[1]

    def try_lock(self, name: str, ttl_s: float) -> bool:
        return bool(self.r.set(f"{self.p}:lock:{name}", "1", nx=True, px=int(ttl_s * 1000)))


def _settle_lost(rec: JobRecord, now: float, max_attempts: int) -> tuple[ClaimKind, str]:
    """A running job lost its owner: cancelled if asked, failed once the attempts are spent,
    else back to queued (its next run starts from scratch)."""
    assert rec.owner is not None
    lost = (
        f"attempt {rec.attempts}: the worker {rec.owner.label()} was lost"
        f" (killed or out of memory) during stage {rec.stage or 'start'}"
    )
    rec.note(lost)
    if rec.cancel_requested:
        _finish(rec, JobState.cancelled, now)
        return "cancelled", lost
    if rec.attempts >= max_attempts:
        rec.error = JobError(
            code="worker_lost",
            message=f"{lost}; gave up after {rec.attempts} attempt(s), nothing was published",
            stage=rec.stage,
        )
        _finish(rec, JobState.failed, now)
        return "failed", lost
    rec.state = JobState.queued
    rec.owner, rec.lease_expires_at, rec.checkpoint_dir = None, None, None
    rec.stage, rec.stage_done, rec.stage_total, rec.progress = None, 0, 0, 0.0
    return "requeued", lost


def _finish(rec: JobRecord, state: JobState, now: float) -> None:
    rec.state = state
    rec.finished_at = now
    rec.owner, rec.lease_expires_at = None, None
    rec.checkpoint_dir = None
