"""Publish a hardened checkpoint folder: to the Hugging Face Hub, or to a local directory.

Both publishers are idempotent per job id, so a retried job never publishes twice:

- `HubPublisher` pushes the whole folder as ONE commit titled `harmprune job <job_id>`; before
  committing it looks for a commit with that title in the repo's history and, if found, returns it
  (`reused=True`). The same commit deletes every file an earlier publish left that this checkpoint
  does not have (an old `model.safetensors` beside new shards would win at load time). The repo's
  visibility is set to what the job asked for, and checked (refused if it cannot be). A
  `should_cancel` callback is asked right before the commit: a cancel that arrives while files
  are prepared publishes nothing. Retries are not done here (the Celery task retries);
  `publish_with_retries` is the loop for the CLI.
- `LocalPublisher` copies the folder to `<root>/<repo_id>` through a temporary sibling and a rename,
  with a `.harmprune-job` marker holding the job id.

Errors are `PublishError`s with `transient=True` for what a retry may fix (HTTP 5xx, 408, 429,
connection errors) and `transient=False` otherwise (401/403/404, bad input). Their messages never
contain the token: it is scrubbed from every message and the original exception is not chained.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from harmprune.errors import JobCancelled, PublishError
from pydantic import BaseModel

COMMIT_TITLE = "harmprune job {job_id}"
_TITLE_RE = re.compile(r"harmprune job (\S+)")
JOB_MARKER = ".harmprune-job"
# Never published: git internals and huggingface_hub's local-dir metadata.
_IGNORED_DIRS = (".git", ".cache")
_TRANSIENT_STATUS = frozenset({408, 429})
_REPO_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
T = TypeVar("T")


class PublishResult(BaseModel):
    repo_id: str
    commit_sha: str
    url: str
    files: list[str]
    reused: bool  # an earlier publish of the same job id was found; nothing new was written


@dataclass(frozen=True)
class Publication:
    """One checked publish request: `files` (relative paths under `folder`) go to `repo_id`,
    once per `job_id`."""

    folder: Path
    files: list[str]
    repo_id: str
    private: bool
    job_id: str
    should_cancel: Callable[[], bool] | None

    def check_cancel(self, before: str) -> None:
        """JobCancelled when `should_cancel()` says so."""
        if self.should_cancel is not None and self.should_cancel():
            raise JobCancelled(f"the job was cancelled before {before}")


class Publisher(abc.ABC):
    """Where a checkpoint is published (the Hub, a local directory); the request is checked once
    here, each subclass writes it in `_publish`."""

    def publish(
        self,
        folder: Path,
        repo_id: str,
        *,
        private: bool,
        job_id: str,
        should_cancel: Callable[[], bool] | None = None,
    ) -> PublishResult:
        """Publish every file under `folder` as `repo_id`, once per `job_id`; nothing when
        `should_cancel()` says so before the commit (JobCancelled)."""
        _check_job_id(job_id)
        folder = Path(folder)
        files = list_folder_files(folder)
        return self._publish(Publication(folder, files, repo_id, private, job_id, should_cancel))

    @abc.abstractmethod
    def _publish(self, publication: Publication) -> PublishResult: ...


def commit_title(job_id: str) -> str:
    return COMMIT_TITLE.format(job_id=job_id)


def _check_job_id(job_id: str) -> str:
    if not job_id or any(c.isspace() for c in job_id):
        raise PublishError(f"invalid job id {job_id!r}: must be non-empty, without whitespace")
    return job_id


def list_folder_files(folder: Path) -> list[str]:
    """Relative POSIX paths of every file under `folder` (recursively), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"nothing to publish: {folder} is not a directory")
    files = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if rel.parts[0] in _IGNORED_DIRS or not path.is_file():
            continue
        files.append(rel.as_posix())
    files.sort()
    if not files:
        raise PublishError(f"nothing to publish: {folder} is empty")
    return files


# -- Hub ----------------------------------------------------------------------------------------


def _redact(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    return text


def _status_code(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP library's transport errors (httpx2 for huggingface_hub 2.x, httpx for 1.x)."""
    import importlib

    import huggingface_hub.utils as hub_utils

    hub_httpx = getattr(hub_utils, "httpx", None) or importlib.import_module("httpx")
    return (hub_httpx.TransportError, ConnectionError, TimeoutError)


def _to_publish_error(err: Exception, action: str, repo_id: str, token: str | None) -> PublishError:
    """A token-free PublishError for `err`, classified transient or not."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    status = _status_code(err)
    if isinstance(err, HfHubHTTPError) and status is not None:
        transient = status >= 500 or status in _TRANSIENT_STATUS
        server = " ".join((err.server_message or "").split())
        detail = f"HTTP {status}: {server}" if server else f"HTTP {status}"
        if status in (401, 403):
            detail += " (check that the token is valid and can write to this namespace)"
        elif status == 404:
            detail += " (repository not found, or not visible with this token)"
        message = f"{action} {repo_id} failed: {detail}"
    elif isinstance(err, OfflineModeIsEnabled):
        transient = False
        message = f"{action} {repo_id} failed: the Hub client is in offline mode (HF_HUB_OFFLINE)"
    elif isinstance(err, _transport_errors()):
        transient = True
        message = f"{action} {repo_id} failed: cannot reach the Hub ({type(err).__name__}: {err})"
    else:
        transient = False
        message = f"{action} {repo_id} failed: {type(err).__name__}: {err}"
    publish_error = PublishError(_redact(message, token), transient=transient)
    publish_error.status_code = status  # type: ignore[attr-defined]
    return publish_error


class HubPublisher(Publisher):
    """Publishes to the Hugging Face Hub (or any Hub-compatible server at `endpoint`)."""

    def __init__(self, token: str | None = None, endpoint: str | None = None) -> None:
        from huggingface_hub import HfApi, constants, get_token

        # None: the usual huggingface_hub resolution (HF_TOKEN, then the saved login).
        self._token = token if token is not None else get_token()
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip(
            "/"
        )
        # token=False when there is none: never let the client pick up another one later.
        self._api = HfApi(endpoint=self.endpoint, token=self._token or False)

    def __repr__(self) -> str:
        return f"HubPublisher(endpoint={self.endpoint!r}, token={'***' if self._token else None})"

    def _call(self, action: str, repo_id: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except PublishError:
            raise
        except Exception as err:
            raise _to_publish_error(err, action, repo_id, self._token) from None

    def find_job_commit(self, repo_id: str, job_id: str) -> str | None:
        """The sha of the commit of `main` that published `job_id`, if any."""
        commits = self._call(
            "listing commits of",
            repo_id,
            lambda: self._api.list_repo_commits(repo_id, repo_type="model"),
        )
        for commit in commits:
            match = _TITLE_RE.search(commit.title or "")
            if match and match.group(1) == job_id:
                return str(commit.commit_id)
        return None

    def _set_visibility(self, repo_id: str, private: bool) -> None:
        """The visibility the job asked for, on a new or an existing repo; refused if the Hub
        does not end up saying so."""
        self._call(
            "setting the visibility of",
            repo_id,
            lambda: self._api.update_repo_settings(repo_id, private=private, repo_type="model"),
        )
        info = self._call(
            "reading", repo_id, lambda: self._api.model_info(repo_id, files_metadata=False)
        )
        if bool(info.private) != private:
            wanted = "private" if private else "public"
            raise PublishError(f"publishing {repo_id} refused: the repo could not be made {wanted}")

    def _publish(self, publication: Publication) -> PublishResult:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        folder, files, repo_id = publication.folder, publication.files, publication.repo_id
        private, job_id = publication.private, publication.job_id
        repo_url = self._call(
            "creating repo",
            repo_id,
            lambda: self._api.create_repo(
                repo_id, private=private, exist_ok=True, repo_type="model"
            ),
        )
        url = str(repo_url)
        existing = self.find_job_commit(repo_id, job_id)
        if existing is not None:
            return PublishResult(
                repo_id=repo_id, commit_sha=existing, url=url, files=files, reused=True
            )
        self._set_visibility(repo_id, private)
        present = self._call(
            "listing files of",
            repo_id,
            lambda: self._api.list_repo_files(repo_id, repo_type="model"),
        )
        stale = sorted(set(present) - set(files) - {".gitattributes"})
        operations: list[CommitOperationAdd | CommitOperationDelete] = [
            CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel)) for rel in files
        ]
        operations += [CommitOperationDelete(path_in_repo=rel) for rel in stale]
        publication.check_cancel("its publish commit")
        info = self._call(
            "committing to",
            repo_id,
            lambda: self._api.create_commit(
                repo_id,
                operations,
                commit_message=commit_title(job_id),
                commit_description=f"Published by harmprune for job {job_id}.",
                repo_type="model",
            ),
        )
        return PublishResult(
            repo_id=repo_id,
            commit_sha=str(info.oid),
            url=url,
            files=files,
            reused=False,
        )


def publish_with_retries(
    publisher: Publisher,
    folder: Path,
    repo_id: str,
    *,
    private: bool,
    job_id: str,
    attempts: int = 3,
    backoff_s: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> PublishResult:
    """`publisher.publish`, retried on transient errors with exponential backoff
    (`backoff_s`, 2x`backoff_s`, ...). Safe because publishing is idempotent per job id."""
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    for attempt in range(attempts):
        try:
            return publisher.publish(folder, repo_id, private=private, job_id=job_id)
        except PublishError as err:
            if not err.transient or attempt == attempts - 1:
                raise
            sleep(backoff_s * (2**attempt))
    raise AssertionError("unreachable")  # pragma: no cover


# -- local directory ----------------------------------------------------------------------------


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(folder: Path, files: list[str]) -> str:
    """sha256 over the sorted (relative path, file sha256) list: the local "commit sha"."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{_file_sha256(folder / rel)}\n".encode())
    return h.hexdigest()


LOCAL_URL_SCHEME = "local://"


def local_url(repo_id: str, commit_sha: str) -> str:
    """A locally published model's URL: its repo id and tree digest, never the worker's path
    (the API shows it to tenants); `harmprune pull` finds the directory under its own
    `publish_dir` (`LocalPublisher.directory`)."""
    return f"{LOCAL_URL_SCHEME}{repo_id}@{commit_sha}"


class LocalPublisher(Publisher):
    """Publishes to `<root>/<repo_id>` on the local filesystem; `private` is not enforced."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def directory(self, repo_id: str) -> Path:
        """Where `repo_id` is published (PublishError for a malformed id)."""
        return self._target(repo_id)

    def _target(self, repo_id: str) -> Path:
        parts = repo_id.split("/")
        if not 1 <= len(parts) <= 2 or not all(_REPO_PART_RE.match(p) for p in parts):
            raise PublishError(f"invalid repo id {repo_id!r}: expected 'namespace/name'")
        return self.root.joinpath(*parts)

    @staticmethod
    def _published_files(target: Path) -> list[str]:
        return [f for f in list_folder_files(target) if f != JOB_MARKER]

    def _result(self, repo_id: str, target: Path, reused: bool) -> PublishResult:
        files = self._published_files(target)
        commit_sha = tree_digest(target, files)
        return PublishResult(
            repo_id=repo_id,
            commit_sha=commit_sha,
            url=local_url(repo_id, commit_sha),
            files=files,
            reused=reused,
        )

    def _publish(self, publication: Publication) -> PublishResult:
        """A local directory has no visibility: access is the operator's filesystem's. The new
        tree replaces the old one whole, so no stale file survives a re-publish."""
        folder, files, repo_id = publication.folder, publication.files, publication.repo_id
        job_id = publication.job_id
        target = self._target(repo_id)
        if JOB_MARKER in files:
            raise PublishError(f"{folder} already contains a {JOB_MARKER} file")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with _locked(target.parent / f".{target.name}.lock"):
                marker = target / JOB_MARKER
                if marker.is_file() and marker.read_text().strip() == job_id:
                    return self._result(repo_id, target, reused=True)
                publication.check_cancel("it was published")
                tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
                old = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
                try:
                    tmp.mkdir()
                    for rel in files:
                        dest = tmp / rel
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(folder / rel, dest)
                    (tmp / JOB_MARKER).write_text(job_id + "\n")
                    _fsync_tree(tmp)
                    if target.exists():
                        # rename(2) cannot replace a non-empty directory: move the old one aside,
                        # put the new one in place, and put the old one back if that fails.
                        os.replace(target, old)
                        try:
                            os.replace(tmp, target)
                        except OSError:
                            os.replace(old, target)
                            raise
                        shutil.rmtree(old, ignore_errors=True)
                    else:
                        os.replace(tmp, target)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                return self._result(repo_id, target, reused=False)
        except (PublishError, JobCancelled):
            raise
        except OSError as err:
            raise PublishError(f"publishing {repo_id} to {self.root} failed: {err}") from err


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())


@contextlib.contextmanager
def _locked(lock_path: Path):  # type: ignore[no-untyped-def]
    """An exclusive advisory lock (POSIX flock); a no-op where fcntl is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with lock_path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
