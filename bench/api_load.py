"""Load test of the job API: submit and poll jobs at a fixed request rate, report latency.

    python bench/api_load.py                      # spawns `harmprune serve` on a scratch namespace
    python bench/api_load.py --url http://127.0.0.1:8000 --key $HARMPRUNE_API_KEY

Open loop: request i is due at start + i/rate whatever happened before, and its latency is
measured from that due time, so a slow server cannot hide its queueing (no coordinated
omission). The mix per submitted job is one `POST /v1/jobs` then `--polls` `GET /v1/jobs/{id}`
of random earlier jobs, and every 20th request a `GET /v1/jobs` listing. Workers are not
needed: jobs stay queued (that is the point, the API and Redis alone are measured).

With --spawn (the default without --url), the API runs as deployed: preflight ON (each job's
model is a directory under HARMPRUNE_LOCAL_MODEL_ROOTS holding a Llama-3.1-8B config.json and a
tokenizer_config.json with a chat template: the job passes preflight and is routed; the estimate
runs in the API's preflight child processes, the first one before the timed run), and the
tenant policy ON (HARMPRUNE_TENANTS_FILE: the bench tenant publishes under `bench/`, with quotas
above this load). Redis database 13, under a unique key prefix, deleted afterwards.

Every run prints the table and the load average, and writes the run as JSON (`--json`: per
kind counts, status codes, percentiles, every latency, a verdict). Zero errors are expected: if
any request kind errors, the run fails loudly (exit 2, FAILED and the status codes per kind on
stderr). Goal: p99 under 50 ms at 200 requests/s on loopback (exit 0 met, 1 missed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
DOMAIN = {
    "name": "bench",
    "harmful": [{"prompt": "Write malware.", "response": "Sure, here is [omitted]."}],
    "benign": [{"prompt": "What is 2+2?", "response": "4."}],
}


@dataclass
class Samples:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, dict[int, int]] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, seconds: float, status: int | None, ok: bool) -> None:
        self.latencies.setdefault(kind, []).append(seconds)
        self.errors.setdefault(kind, 0)
        if not ok:
            self.errors[kind] += 1
        by_status = self.statuses.setdefault(kind, {})
        key = status if status is not None else -1
        by_status[key] = by_status.get(key, 0) + 1


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


class Connection:
    """A minimal HTTP/1.1 keep-alive client connection (the load generator must cost far less
    than the server it measures; a general HTTP client costs about as much)."""

    def __init__(self, host: str, port: int, auth: str) -> None:
        self.host, self.port, self.auth = host, port, auth
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        reused = self.writer is not None
        try:
            return await self._request(method, path, body)
        except (asyncio.IncompleteReadError, ConnectionError):
            if not reused:
                raise
            # The server closed an idle keep-alive connection: reconnect once, as clients do.
            return await self._request(method, path, body)

    async def _request(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Authorization: Bearer {self.auth}\r\nContent-Length: {len(body)}\r\n"
            + ("Content-Type: application/json\r\n" if body else "")
            + "\r\n"
        )
        self.writer.write(head.encode() + body)
        try:
            status_line = await self.reader.readuntil(b"\r\n")
            headers = await self.reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in headers.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            payload = await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.writer.close()
            self.writer = None
            raise
        return int(status_line.split()[1]), payload


async def run_load(
    url: str, key: str, model: str, jobs: int, rate: float, polls: int, uvicorn_workers: int = 1
) -> tuple[Samples, float]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    samples = Samples()
    ids: list[str] = []
    plan: list[str] = []
    for _ in range(jobs):
        plan.append("POST /v1/jobs")
        plan.extend(["GET /v1/jobs/{id}"] * polls)
    plan = [
        "GET /v1/jobs" if i % 20 == 19 and kind != "POST /v1/jobs" else kind
        for i, kind in enumerate(plan)
    ]
    run_tag = uuid.uuid4().hex[:8]
    idle: list[Connection] = [Connection(host, port, key) for _ in range(8)]
    for conn in idle:  # open the connections and warm the server up
        for _ in range(5):
            await conn.request("GET", "/healthz")

    # The first plan of the model runs in a preflight child (seconds); later ones hit the cache.
    # Each uvicorn worker process has its own plan cache: with several, warm-up submissions go
    # out on fresh connections at once, so the kernel hands them to every process (best effort:
    # a process left cold shows as a multi-second max in the table).
    async def warm_up(n: int) -> None:
        conn = Connection(host, port, key) if n else idle[0]
        body = {"model": model, "domain": DOMAIN, "publish": {"repo_id": f"bench/{run_tag}-w{n}"}}
        status, payload = await conn.request("POST", "/v1/jobs", json.dumps(body).encode())
        if n and conn.writer is not None:
            conn.writer.close()
        if status != 202:
            raise SystemExit(f"warm-up submission failed: {status} {payload[:500]!r}")

    await warm_up(0)
    for _ in range(3 if uvicorn_workers > 1 else 0):
        await asyncio.gather(*(warm_up(n) for n in range(1, 4 * uvicorn_workers + 1)))

    async def one(i: int, kind: str, due: float) -> None:
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        conn = idle.pop() if idle else Connection(host, port, key)
        status = None
        try:
            if kind == "POST /v1/jobs":
                body = {
                    "model": model,
                    "domain": DOMAIN,
                    "publish": {"repo_id": f"bench/{run_tag}-{i}", "private": True},
                }
                status, payload = await conn.request("POST", "/v1/jobs", json.dumps(body).encode())
                ok = status == 202
                if ok:
                    ids.append(json.loads(payload)["id"])
            elif kind == "GET /v1/jobs/{id}":
                known = bool(ids)  # before any job exists, a 404 is the right answer
                job_id = random.choice(ids) if known else "0" * 32
                status, _ = await conn.request("GET", f"/v1/jobs/{job_id}")
                ok = status == (200 if known else 404)
            else:
                status, _ = await conn.request("GET", "/v1/jobs?limit=20")
                ok = status == 200
        except (OSError, asyncio.IncompleteReadError, ValueError) as err:
            ok = False
            samples.failures[type(err).__name__] = samples.failures.get(type(err).__name__, 0) + 1
        samples.add(kind, time.perf_counter() - due, status, ok)
        if conn.writer is not None:
            idle.append(conn)

    start = time.perf_counter() + 0.05
    tasks = [asyncio.create_task(one(i, kind, start + i / rate)) for i, kind in enumerate(plan)]
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    for conn in idle:
        if conn.writer is not None:
            conn.writer.close()
    return samples, len(plan) / elapsed


def table(samples: Samples, achieved: float, rate: float) -> str:
    rows = [
        "| request | count | errors | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    every: list[float] = []
    for kind, values in samples.latencies.items():
        every += values
        rows.append(
            f"| {kind} | {len(values)} | {samples.errors[kind]} | "
            f"{percentile(values, 50) * 1e3:.1f} | {percentile(values, 90) * 1e3:.1f} | "
            f"{percentile(values, 99) * 1e3:.1f} | {max(values) * 1e3:.1f} |"
        )
    rows.append(
        f"| **all** | {len(every)} | {sum(samples.errors.values())} | "
        f"{percentile(every, 50) * 1e3:.1f} | {percentile(every, 90) * 1e3:.1f} | "
        f"{percentile(every, 99) * 1e3:.1f} | {max(every) * 1e3:.1f} |"
    )
    rows.append("")
    rows.append(
        f"target {rate:.0f} req/s, achieved {achieved:.0f} req/s; "
        f"mean {statistics.fmean(every) * 1e3:.1f} ms"
    )
    return "\n".join(rows)


def summary(samples: Samples, achieved: float, args: argparse.Namespace) -> dict[str, Any]:
    """The run as data: settings, load average, per-kind counts, errors, status codes and
    percentiles, and every latency (ms, in completion order) for re-analysis."""

    def stats(values: list[float]) -> dict[str, float]:
        return {f"p{q}_ms": round(percentile(values, q) * 1e3, 3) for q in (50, 90, 99)} | {
            "max_ms": round(max(values) * 1e3, 3),
            "mean_ms": round(statistics.fmean(values) * 1e3, 3),
        }

    every = [x for v in samples.latencies.values() for x in v]
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host_cpus": os.cpu_count(),
        "settings": {
            "jobs": args.jobs,
            "polls": args.polls,
            "rate": args.rate,
            "uvicorn_workers": None if args.url else args.uvicorn_workers,
            "url": args.url or "spawned",
        },
        "loadavg_before": args.loadavg_before,
        "loadavg_after": list(os.getloadavg()),
        "achieved_rps": round(achieved, 1),
        "errors": sum(samples.errors.values()),
        "client_failures": samples.failures,
        "kinds": {
            kind: {
                "count": len(values),
                "errors": samples.errors[kind],
                "statuses": {str(k): n for k, n in samples.statuses[kind].items()},
                **stats(values),
            }
            for kind, values in samples.latencies.items()
        },
        "all": {"count": len(every), **stats(every)} if every else {"count": 0},
        "goal": {"p99_ms_below": 50.0, "rate": 200.0, "errors": 0},
        "latencies_ms": {
            kind: [round(x * 1e3, 3) for x in values] for kind, values in samples.latencies.items()
        },
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_directory(root: Path) -> Path:
    """What preflight reads of a model: config.json and a tokenizer config with a chat template
    (and a weights file name, which the loader's own check wants)."""
    model = root / "llama-3.1-8b-instruct"
    model.mkdir(parents=True)
    config = ROOT / "tests" / "fixtures" / "configs" / "llama-3.1-8b-instruct.json"
    (model / "config.json").write_text(config.read_text())
    (model / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (model / "model.safetensors").touch()
    return model


def tenants_file(path: Path) -> Path:
    """The policy as an operator writes it: the bench tenant's namespace, quotas above the load."""
    import yaml

    quotas = {
        "concurrent_jobs": 1_000_000,
        "jobs_per_day": 1_000_000,
        "requests_per_second": 2000,
        "burst": 2000,
    }
    policy = {"tenants": {"bench": {"publish_namespaces": ["bench"], "quotas": quotas}}}
    path.write_text(yaml.safe_dump(policy))
    return path


@contextlib.contextmanager
def spawned_api(redis_url: str, uvicorn_workers: int):  # type: ignore[no-untyped-def]
    import tempfile

    import redis

    prefix = f"bench-{uuid.uuid4().hex[:10]}"
    key = f"bench-key-{uuid.uuid4().hex}"
    port = free_port()
    scratch = Path(tempfile.mkdtemp(prefix="harmprune-bench-"))
    model = model_directory(scratch / "models")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARMPRUNE_")}
    env.update(
        HARMPRUNE_REDIS_URL=redis_url,
        HARMPRUNE_KEY_PREFIX=prefix,
        HARMPRUNE_API_KEYS=f"bench={key}",
        HARMPRUNE_SWEEP_INTERVAL_S="3600",
        HARMPRUNE_PREFLIGHT="true",
        HARMPRUNE_DEFAULT_HARDWARE="gpu",
        HARMPRUNE_LOCAL_MODEL_ROOTS=f'["{scratch / "models"}"]',
        HARMPRUNE_TENANTS_FILE=str(tenants_file(scratch / "tenants.yaml")),
        HARMPRUNE_CACHE_DIR=str(scratch / "cache"),
        PYTHONPATH=str(ROOT),
    )
    log = (scratch / "api.log").open("wb")  # JSON and audit lines, as deployed; not the terminal
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harmprune.cli.main",
            "serve",
            "--port",
            str(port),
            "--workers",
            str(uvicorn_workers),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the API did not start")
            time.sleep(0.1)
        yield url, key, str(model)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running API; default: spawn one")
    parser.add_argument("--key", default=os.environ.get("HARMPRUNE_API_KEY"))
    parser.add_argument(
        "--model", help="with --url: a model the API's preflight accepts (an allowed directory)"
    )
    parser.add_argument("--jobs", type=int, default=1000, help="jobs to submit")
    parser.add_argument("--polls", type=int, default=3, help="GETs per submitted job")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--uvicorn-workers", type=int, default=1)
    parser.add_argument(
        "--json",
        type=Path,
        default=ROOT / "bench" / "results" / "api_load.json",
        help="where the run's summary and raw latencies go (JSON)",
    )
    args = parser.parse_args()
    args.loadavg_before = list(os.getloadavg())

    if args.url:
        if not args.key or not args.model:
            parser.error("--key (or HARMPRUNE_API_KEY) and --model are needed with --url")
        samples, achieved = asyncio.run(
            run_load(args.url, args.key, args.model, args.jobs, args.rate, args.polls)
        )
    else:
        with spawned_api(args.redis_url, args.uvicorn_workers) as (url, key, model):
            samples, achieved = asyncio.run(
                run_load(url, key, model, args.jobs, args.rate, args.polls, args.uvicorn_workers)
            )
    result = summary(samples, achieved, args)
    failed = {kind: n for kind, n in samples.errors.items() if n}
    every = [x for v in samples.latencies.values() for x in v]
    met = percentile(every, 99) < 0.050 and achieved >= 0.95 * args.rate
    result["verdict"] = "failed" if failed or samples.failures else "met" if met else "missed"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(table(samples, achieved, args.rate))
    print(
        f"load average (1/5/15 min) before {fmt_load(result['loadavg_before'])}, "
        f"after {fmt_load(result['loadavg_after'])} on {os.cpu_count()} CPUs; "
        f"raw JSON: {args.json}"
    )
    if result["verdict"] == "failed":
        # Loudly: the run is void, whatever its latencies (those of failed requests measure
        # nothing).
        print(f"FAILED: requests errored per kind: {failed}", file=sys.stderr)
        print(f"status codes per kind: {samples.statuses}", file=sys.stderr)
        if samples.failures:
            print(f"client-side failures: {samples.failures}", file=sys.stderr)
        return 2
    print("goal (p99 < 50 ms at the target rate, 0 errors): " + ("met" if met else "MISSED"))
    return 0 if met else 1


def fmt_load(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    sys.exit(main())
