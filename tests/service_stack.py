"""Helpers for the tests that use real services: the session's Redis, an isolated namespace on
it, a real Celery worker process (started through `harmprune worker`), the API as a process,
and a private redis-server that a test may stop and restart.

The session's Redis (`session_redis()`, the `redis_url` fixture of tests/conftest.py): the Redis
at $HARMPRUNE_TEST_REDIS_URL (default redis://127.0.0.1:6379) if it answers, else a private
`redis-server` on a free port, started once for the session and removed after it; if neither can
be had the tests that need Redis fail with how to install it (they are never skipped).

Isolation: every namespace gets a unique key prefix on database 15 of that Redis; the job store
and the broker (kombu's global_keyprefix) both live under it, and it is deleted after.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from harmprune.settings import Settings
from pydantic import SecretStr

ROOT = Path(__file__).resolve().parents[1]
TEST_DB = 15
# Where the tests look for a running Redis first; point it at nothing to make them start their own.
REDIS_URL_ENV = "HARMPRUNE_TEST_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"
REDIS_INSTALL_HINT = (
    "install Redis so the tests can start their own redis-server: "
    "`sudo apt-get install redis-server` (Debian/Ubuntu) or `brew install redis` (macOS)"
)
API_KEYS = {
    "alpha": "alpha-key-0123456789abcdef",
    "beta": "beta-key-0123456789abcdef",
}


def bearer(tenant: str = "alpha") -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEYS[tenant]}"}


def api_keys_value() -> SecretStr:
    return SecretStr(",".join(f"{t}={k}" for t, k in API_KEYS.items()))


@dataclass
class Namespace:
    url: str
    prefix: str
    client: redis.Redis

    def keys(self) -> list[str]:
        return sorted(self.client.scan_iter(match=f"{self.prefix}:*", count=500))


def purge(client: redis.Redis, prefix: str) -> None:
    batch = []
    for key in client.scan_iter(match=f"{prefix}:*", count=500):
        batch.append(key)
        if len(batch) >= 500:
            client.delete(*batch)
            batch.clear()
    if batch:
        client.delete(*batch)


def _answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@dataclass
class SessionRedis:
    """The Redis of this test session: `base` is redis://host:port; `server` is ours, if any."""

    base: str
    server: RedisServer | None = None

    def url(self, db: int = TEST_DB) -> str:
        return f"{self.base}/{db}"


_session_redis: SessionRedis | None = None


def session_redis() -> SessionRedis:
    """The running Redis to use (see the module docstring); resolved once per process."""
    global _session_redis
    if _session_redis is None:
        parts = urllib.parse.urlsplit(os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL)
        base = f"{parts.scheme}://{parts.netloc}"
        if _answers(base):
            _session_redis = SessionRedis(base)
        else:
            if shutil.which("redis-server") is None:
                pytest.fail(
                    f"no Redis answers at {base} and `redis-server` is not on PATH: "
                    + REDIS_INSTALL_HINT,
                    pytrace=False,
                )
            data_dir = Path(tempfile.mkdtemp(prefix="hptest-redis-"))
            server = RedisServer(data_dir, persist=False).start()
            _session_redis = SessionRedis(f"redis://127.0.0.1:{server.port}", server)
            atexit.register(stop_session_redis)
    return _session_redis


def stop_session_redis() -> None:
    """Stop the private redis-server of the session, if one was started, and remove its files."""
    global _session_redis
    if _session_redis is not None and _session_redis.server is not None:
        _session_redis.server.stop()
        shutil.rmtree(_session_redis.server.data_dir, ignore_errors=True)
        _session_redis = None


@contextlib.contextmanager
def redis_namespace(tag: str, url: str | None = None) -> Iterator[Namespace]:
    """A unique key prefix on `url` (default: the session's Redis, database 15), purged after."""
    url = url or session_redis().url()
    client = redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=2)
    client.ping()  # the session's Redis answered when it was resolved; a failure here is real
    prefix = f"hptest-{tag}-{uuid.uuid4().hex[:10]}"
    try:
        yield Namespace(url, prefix, client)
    finally:
        with contextlib.suppress(redis.RedisError):
            purge(client, prefix)
        client.close()


def namespace_fixture(tag: str) -> Any:
    """A pytest fixture `ns`, to assign at module level: each test gets its own
    `redis_namespace(tag)` on the session's Redis (the `redis_url` fixture), purged after."""

    @pytest.fixture(name="ns")
    def ns_fixture(redis_url: str) -> Iterator[Namespace]:
        with redis_namespace(tag, redis_url) as namespace:
            yield namespace

    return ns_fixture


def stack_settings(ns: Namespace, tmp: Path, **overrides: Any) -> Settings:
    """Settings for one test stack (API in-process + worker subprocess) in `tmp`."""
    values: dict[str, Any] = dict(
        redis_url=ns.url,
        key_prefix=ns.prefix,
        api_keys=api_keys_value(),
        cache_dir=tmp / "cache",
        work_dir=tmp / "work",
        publish_dir=tmp / "published",
        local_model_roots=[],
        default_hardware="cpu",
        lease_s=3.0,
        max_attempts=2,
        visibility_timeout_s=30,
        broker_restore_interval_s=1,
        sweep_interval_s=2.0,
        requeue_queued_after_s=3600.0,
        publish_max_retries=2,
        publish_retry_backoff_s=0.5,
        job_soft_time_limit_s=300,
        job_time_limit_grace_s=30,
        # Off by default: most API tests name Hub ids that exist nowhere (no network here);
        # the preflight tests and the worker stacks (local model directories) turn it on.
        preflight=False,
    )
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The same settings as HARMPRUNE_* environment variables, for a worker subprocess."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, list):
            value = json.dumps([str(v) for v in value])
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[f"HARMPRUNE_{name.upper()}"] = str(value)
    return env


def start_cli(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`harmprune <args>` from the checkout (ROOT first on PYTHONPATH) in its own process group,
    its stdout and stderr appended to `log_path`."""
    env = {**env, "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")}
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "harmprune.cli.main", *args],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


class WorkerProcess:
    """`harmprune worker` as a subprocess in its own process group, logging to a file."""

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        extra_env: dict[str, str] | None = None,
        queues: str = "gpu,cpu",
    ):
        self.settings, self.log_path, self.queues = settings, log_path, queues
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.name = f"test-{uuid.uuid4().hex[:8]}@%h"

    def start(self, timeout: float = 60) -> WorkerProcess:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("HARMPRUNE_") and k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
        }
        env.update(settings_env(self.settings))
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = start_cli(
            ["worker", "--queues", self.queues, "--loglevel", "INFO", "--hostname", self.name],
            env,
            self.log_path,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            if " ready." in self.log_text():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"worker not ready after {timeout}s:\n{self.log_tail()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill_all(self) -> None:
        """SIGKILL the whole worker (parent and job process), like a machine that dies."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
        # Job processes left behind by a warm shutdown belong to the group too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server on a free port, with its files in `data_dir`. `persist`: an
    append-only file synced on every write, so that a test may kill and restart it."""

    def __init__(self, data_dir: Path, persist: bool = True) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail(f"`redis-server` is not on PATH: {REDIS_INSTALL_HINT}", pytrace=False)
        self.data_dir, self.port, self.persist = data_dir, free_port(), persist
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else []
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.data_dir),
                *(aof or ["--appendonly", "no"]),
                "--save",
                "",
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    client.close()
                    return self
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        """SIGKILL: no shutdown save; only what the append-only file already holds survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def wait_for(predicate: Any, timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class ApiProcess:
    """`harmprune serve` as a subprocess on a free loopback port."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings, self.log_path = settings, log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> ApiProcess:
        import httpx

        env = {k: v for k, v in os.environ.items() if not k.startswith("HARMPRUNE_")}
        env.pop("HF_TOKEN", None)  # the API never needs the Hub token
        env.update(settings_env(self.settings))
        self.proc = start_cli(["serve", "--port", str(self.port)], env, self.log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"API exited: {self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"API not up after {timeout}s: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
