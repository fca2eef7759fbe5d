"""Helpers for the tests that use real services: an isolated namespace on the real Redis, a real
Celery worker process (started through `harmprune worker`), and a private redis-server that a
test may stop and restart.

Isolation: every namespace gets a unique key prefix on database 15 of 127.0.0.1:6379; the job
store and the broker (kombu's global_keyprefix) both live under it, and it is deleted after.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
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
REDIS_HOST, REDIS_PORT, TEST_DB = "127.0.0.1", 6379, 15
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


@contextlib.contextmanager
def redis_namespace(tag: str, port: int = REDIS_PORT, db: int = TEST_DB) -> Iterator[Namespace]:
    url = f"redis://{REDIS_HOST}:{port}/{db}"
    client = redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis on {REDIS_HOST}:{port}")
    prefix = f"hptest-{tag}-{uuid.uuid4().hex[:10]}"
    try:
        yield Namespace(url, prefix, client)
    finally:
        with contextlib.suppress(redis.RedisError):
            purge(client, prefix)
        client.close()


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
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "harmprune.cli.main",
                "worker",
                "--queues",
                self.queues,
                "--loglevel",
                "INFO",
                "--hostname",
                self.name,
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
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
    """A private redis-server with an append-only file in `data_dir`, which a test may restart."""

    def __init__(self, data_dir: Path) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        self.data_dir, self.port = data_dir, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.data_dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
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
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "harmprune.cli.main", "serve", "--port", str(self.port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
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
