"""Service subcommands of `harmprune` (registered in service/cli.py):

harmprune serve  [--host H --port P]             the job API (uvicorn), keys from HARMPRUNE_API_KEYS
harmprune worker [--queues gpu --gpu 0]           one Celery worker process (one per GPU)
harmprune submit --model M --domain SPEC --repo-id org/name [--wait]
harmprune status JOB_ID [--wait]
harmprune cancel JOB_ID
harmprune pull   JOB_ID|REPO_ID --out DIR         download a published model

Client commands talk to HARMPRUNE_API_URL (default http://127.0.0.1:8000) with the key in
HARMPRUNE_API_KEY (an environment variable, never a flag: flags end up in shell history).
Imports are deferred so `harmprune --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from harmprune.errors import HarmpruneError
from harmprune.vocabulary import JOB_ID_PATTERN

DEFAULT_API_URL = "http://127.0.0.1:8000"
EXIT_BY_STATE = {"succeeded": 0, "rejected": 3, "failed": 1, "cancelled": 1}


class ServiceCommandError(HarmpruneError):
    stage = "client"
    code = "service_command_failed"
    user_error = True


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def register(sub: Any) -> None:
    _add_serve(sub)
    _add_worker(sub)
    _add_submit(sub)
    _add_status(sub)
    _add_cancel(sub)
    _add_pull(sub)


# ------------------------------------------------------------------ serve / worker


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="Run the job API (FastAPI + uvicorn).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from harmprune.api.auth import KeyConfigError, load_keys
    from harmprune.jobs.tenants import TenantConfigError, TenantPolicies
    from harmprune.settings import Settings

    try:  # fail here, with the reason, rather than inside uvicorn
        settings = Settings()
        load_keys(settings, TenantPolicies.from_settings(settings))
    except (KeyConfigError, TenantConfigError) as err:
        raise ServiceCommandError(str(err)) from None
    uvicorn.run(
        "harmprune.api.main:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        proxy_headers=True,
    )
    return 0


def _add_worker(sub: Any) -> None:
    p = sub.add_parser(
        "worker",
        help="Run one Celery worker (prefork, one job at a time, a fresh process per job).",
    )
    p.add_argument(
        "--queues", default="gpu", help="comma-separated: gpu, gpu-multi, cpu (default gpu)"
    )
    p.add_argument(
        "--gpu", help="pin this worker to one GPU (sets CUDA_VISIBLE_DEVICES); one worker per GPU"
    )
    p.add_argument(
        "--concurrency", type=int, default=1, help="job processes (keep 1 for a GPU queue)"
    )
    p.add_argument("--hostname", help="Celery node name (default harmprune-<queues|gpuN>@%%h)")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=cmd_worker)


def _check_signing_key() -> None:
    """A HARMPRUNE_SIGNING_KEY that cannot sign refuses to start the worker (not every job at
    its save stage); the error names the file, never its contents."""
    from harmprune.settings import Settings

    key = Settings().signing_key
    if key is not None:
        from harmprune.output.signing import signer_identity

        signer_identity(key)


def cmd_worker(args: argparse.Namespace) -> int:
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    known = {"gpu", "gpu-multi", "cpu"}
    if not queues or set(queues) - known:
        raise ServiceCommandError(f"--queues: expected a comma-separated subset of {sorted(known)}")
    if args.concurrency < 1:
        raise ServiceCommandError("--concurrency must be at least 1")
    if {"gpu", "gpu-multi"} & set(queues) and args.concurrency != 1:
        raise ServiceCommandError(
            "a gpu worker runs one job at a time: start one `harmprune worker --gpu N` per GPU"
        )
    if "gpu-multi" in queues and args.gpu is not None:
        raise ServiceCommandError("--gpu pins one GPU; a gpu-multi worker owns the node's GPUs")
    if args.gpu is not None:
        # Before Celery (and long before any child imports torch): the children inherit it.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
    _check_signing_key()
    name = args.hostname or (
        f"harmprune-gpu{args.gpu}@%h"
        if args.gpu is not None
        else f"harmprune-{'-'.join(queues)}@%h"
    )
    from harmprune.workers.app import app

    app.worker_main(
        [
            "worker",
            "--queues",
            ",".join(queues),
            "--concurrency",
            str(args.concurrency),
            "--pool",
            "prefork",
            "--hostname",
            name,
            "--loglevel",
            args.loglevel,
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return 0


# ------------------------------------------------------------------ client


class ApiClient:
    def __init__(self, url: str | None = None, key: str | None = None) -> None:
        import httpx

        self.url = (url or os.environ.get("HARMPRUNE_API_URL") or DEFAULT_API_URL).rstrip("/")
        key = key or os.environ.get("HARMPRUNE_API_KEY")
        if not key:
            raise ServiceCommandError("set HARMPRUNE_API_KEY to your API key")
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

    def request(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        try:
            response = self.http.request(method, path, **kw)
        except httpx.HTTPError as err:
            raise ServiceCommandError(f"cannot reach the API at {self.url}: {err}") from None
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                message = error["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise ServiceCommandError(f"API answered {response.status_code}: {message}")
        return response

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}").json()

    def wait(self, job_id: str, show: bool = True) -> dict[str, Any]:
        last = None
        while True:
            response = self.request("GET", f"/v1/jobs/{job_id}")
            job = response.json()
            line = _progress_line(job)
            if show and line != last:
                sys.stderr.write(line + "\n")
                last = line
            if job["state"] in EXIT_BY_STATE:
                return job
            time.sleep(float(response.headers.get("Retry-After", "2")))


def _progress_line(job: dict[str, Any]) -> str:
    stage = f" {job['stage']}" if job.get("stage") else ""
    return f"{job['id']}: {job['state']}{stage} {job['progress']:.0%}"


def _print_job(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _out(json.dumps(job, indent=2))
        return
    _out(_progress_line(job))
    if job.get("error"):
        _out(f"  error [{job['error']['code']}]: {job['error']['message']}")
    result = job.get("result")
    if result:
        report = result["report"]
        _out(f"  outcome: {report['outcome']} {report.get('outcome_reason') or ''}".rstrip())
        _out(f"  pruned: {report['pruned_count']:,} of {report['scored_count']:,} weights")
        if result.get("repo_id"):
            _out(f"  published: {result['repo_id']}@{result['commit_sha']}  {result['url']}")


def _add_client_options(p: Any) -> None:
    p.add_argument("--api", help=f"API URL (default $HARMPRUNE_API_URL or {DEFAULT_API_URL})")
    p.add_argument("--json", action="store_true", help="print the job as JSON")


def _add_submit(sub: Any) -> None:
    p = sub.add_parser("submit", help="Submit a hardening job to the API.")
    _add_client_options(p)
    p.add_argument("--model", required=True, help="Hub repo id or smollm2-135m-instruct")
    p.add_argument("--revision")
    p.add_argument("--domain", required=True, help="domain spec file (YAML/JSON) or example name")
    p.add_argument("--repo-id", required=True, help="where to publish: namespace/name")
    p.add_argument("--public", action="store_true", help="publish as a public repo")
    p.add_argument("--hardware", choices=["gpu", "gpu-multi", "cpu"])
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--idempotency-key", help="resubmitting with the same key returns the same job")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    p.set_defaults(func=cmd_submit)


def cmd_submit(args: argparse.Namespace) -> int:
    from harmprune.jobs.submission import request_from_cli

    # The API's own request model: the spec read by load_domain, validated before sending.
    request = request_from_cli(
        args.model,
        args.domain,
        args.repo_id,
        private=not args.public,
        **{f: getattr(args, f) for f in ("revision", "hardware", "seed", "batch_size", "dtype")},
    )
    body = request.model_dump(mode="json", exclude_defaults=True)
    body["publish"] = request.publish.model_dump(mode="json")
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    client = ApiClient(args.api)
    job = client.request("POST", "/v1/jobs", json=body, headers=headers).json()
    if not args.wait:
        _print_job(job, args.json)
        return 0
    job = client.wait(job["id"], show=not args.json)
    _print_job(job, args.json)
    return EXIT_BY_STATE[job["state"]]


def _add_status(sub: Any) -> None:
    p = sub.add_parser("status", help="Show a job (or list recent jobs without JOB_ID).")
    _add_client_options(p)
    p.add_argument("job_id", nargs="?")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    p.add_argument("--state", help="with no JOB_ID: only jobs in this state")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    client = ApiClient(args.api)
    if args.job_id is None:
        params = {"state": args.state} if args.state else {}
        listing = client.request("GET", "/v1/jobs", params=params).json()
        if args.json:
            _out(json.dumps(listing, indent=2))
        for job in [] if args.json else listing["items"]:
            _out(_progress_line(job))
        return 0
    job = client.wait(args.job_id, show=not args.json) if args.wait else client.job(args.job_id)
    _print_job(job, args.json)
    return EXIT_BY_STATE.get(job["state"], 0)


def _add_cancel(sub: Any) -> None:
    p = sub.add_parser("cancel", help="Cancel a job (it stops at the next batch boundary).")
    _add_client_options(p)
    p.add_argument("job_id")
    p.set_defaults(func=cmd_cancel)


def cmd_cancel(args: argparse.Namespace) -> int:
    job = ApiClient(args.api).request("POST", f"/v1/jobs/{args.job_id}/cancel").json()
    _print_job(job, args.json)
    return 0


def _add_pull(sub: Any) -> None:
    p = sub.add_parser("pull", help="Download a published model (by job id or repo id).")
    p.add_argument("ref", help="a job id (asks the API where it was published) or a repo id")
    p.add_argument("--out", required=True, type=Path, help="directory to download into")
    p.add_argument("--revision", help="with a repo id: commit, branch or tag")
    p.add_argument("--api", help="API URL, when ref is a job id")
    p.set_defaults(func=cmd_pull)


def cmd_pull(args: argparse.Namespace) -> int:
    from harmprune.output.publishing import LOCAL_URL_SCHEME

    repo_id, revision, url = args.ref, args.revision, None
    if JOB_ID_PATTERN.match(args.ref):
        job = ApiClient(args.api).job(args.ref)
        result = job.get("result") or {}
        if job["state"] != "succeeded" or not result.get("repo_id"):
            raise ServiceCommandError(f"job {args.ref} is {job['state']}: nothing was published")
        repo_id, revision, url = result["repo_id"], result["commit_sha"], result["url"]
    if url and url.startswith(LOCAL_URL_SCHEME):
        # Published by a LocalPublisher: under this machine's publish_dir (the worker's path
        # is never in the URL), checked against the job's tree digest.
        _copy_local(_local_directory(repo_id), args.out, revision)
    elif url and url.startswith("file://"):
        # Records from before local:// URLs: Path.as_uri(), percent-encoded (a space is %20).
        _copy_local(Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)), args.out)
    else:
        _download(repo_id, revision, args.out)
    _out(f"{repo_id} -> {args.out}")
    return 0


def _local_directory(repo_id: str) -> Path:
    from harmprune.output.publishing import LocalPublisher
    from harmprune.settings import Settings

    return LocalPublisher(Settings().local_publish_dir()).directory(repo_id)


def _copy_local(source: Path, out: Path, commit_sha: str | None = None) -> None:
    import shutil

    from harmprune.output.publishing import JOB_MARKER, list_folder_files, tree_digest

    if not source.is_dir():
        raise ServiceCommandError(
            f"published directory {source} is not reachable from here (HARMPRUNE_PUBLISH_DIR "
            "must name the workers' publishing directory)"
        )
    if commit_sha is not None:
        files = [f for f in list_folder_files(source) if f != JOB_MARKER]
        if tree_digest(source, files) != commit_sha:
            raise ServiceCommandError(
                f"{source} no longer holds the job's files (republished since?)"
            )
    shutil.copytree(source, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(JOB_MARKER))


def _download(repo_id: str, revision: str | None, out: Path) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        snapshot_download(repo_id, revision=revision, local_dir=out)
    except RepositoryNotFoundError:
        raise ServiceCommandError(
            f"{repo_id} not found (private? set HF_TOKEN; another Hub? set HF_ENDPOINT)"
        ) from None
    except (HfHubHTTPError, OSError) as err:
        raise ServiceCommandError(f"cannot download {repo_id}: {err}") from None
