"""A small, in-memory Hugging Face Hub for tests, spoken to by the real `huggingface_hub` client.

What it implements (routes, headers and payloads taken from `huggingface_hub` 2.4 sources:
`hf_api.py`, `_commit_api.py`, `file_download.py`, `_snapshot_download.py`, `utils/_http.py`):

- `POST /api/repos/create`, `DELETE /api/repos/delete`, `PUT /api/{type}s/{id}/settings`
- `GET /api/{type}s/{id}` and `.../revision/{rev}` (model_info / repo_info; `siblings`, `sha`)
- `POST /api/{type}s/{id}/preupload/{rev}`: `uploadMode: "lfs"` for the paths the repo's
  `.gitattributes` sends to LFS (`*.safetensors`, ...) and for files of 10 MiB or more, else
  `"regular"`; with the current `oid` (sha256 for LFS files, git blob sha1 otherwise) so the client
  skips unchanged files like on the real Hub. Xet is never offered (clients run with
  HF_HUB_DISABLE_XET=1, and the server sends no Xet headers).
- the LFS upload (`lfs.py`, git-lfs batch API): `POST /[{type}s/]{id}.git/info/lfs/objects/batch`
  answers `transfer: basic` with, per object not yet stored, an `upload` action (a presigned
  `PUT /lfs-storage/{sha256}?signature=...`, no Authorization, as on S3) and a `verify` action
  (`POST /[{type}s/]{id}.git/info/lfs/objects/verify`, authenticated); the stored object must
  match its sha256 and size
- `POST /api/{type}s/{id}/commit/{rev}`: NDJSON body (`header`, `file` base64, `lfsFile` (a
  stored LFS object by sha256), `deletedFile`, `deletedFolder`); a `file` for a path that must go
  through LFS is refused (the real Hub refuses large binaries in git). Applied atomically:
  operations are staged on a copy and published under a lock only if everything succeeded, so a
  failed (or fault-injected) commit leaves the repo unchanged
- `GET /api/{type}s/{id}/commits/{rev}` (newest first, paginated with a `Link: rel="next"` header)
- `GET /api/{type}s/{id}/tree/{rev}[/{path}]`, `POST .../paths-info/{rev}`, `GET .../refs`
- `GET|HEAD /[{type}s/]{id}/resolve/{rev}/{path}`: `ETag` (git blob sha1; of the pointer file for
  LFS files, which also get `X-Linked-Etag` (sha256) and `X-Linked-Size` as the client reads them;
  the content is served directly, where the real Hub redirects to its CDN), `X-Repo-Commit`,
  `Content-Length`, `Accept-Ranges`/`Range`; errors carry `X-Error-Code`
  (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`, `GatedRepo`) as the client maps them to
  its exceptions
- `POST /api/validate-yaml` (README.md commits), `GET /api/whoami-v2`

Auth: the server has a set of valid tokens (`server.token` is one). Writes without a valid
`Authorization: Bearer <token>` get 401; any request carrying an unknown token gets 401
"Invalid credentials in Authorization header" (as the Hub does); tokens in `read_only_tokens` get
403 on writes; private repos are 404 `RepoNotFound` without a valid token; gated repos show their
info to anyone but serve files (403 `GatedRepo`) only to tokens granted access (`grant()`).

Serving a model: `add_repo(repo_id, {path: bytes}, private=, gated=)` creates a repo whose first
commit holds those files (LFS files stored as LFS), `push()` adds a commit; `lfs_paths()` tells
which files of a revision are LFS objects.

Pointing the client at it, in-process
-------------------------------------
`huggingface_hub` reads `HF_ENDPOINT` (and `HF_HOME`, `HF_HUB_OFFLINE`, ...) once, at import, into
module constants; setting the environment variable later changes nothing in the running process.
`hub_environment()` therefore sets the environment variables (for subprocesses and for code that
reads `os.environ`) AND patches every value copied at import time:

- `huggingface_hub.constants.ENDPOINT` and `HUGGINGFACE_CO_URL_TEMPLATE` (`hf_hub_url`, hence
  `hf_hub_download`, formats that template, not `ENDPOINT`), `HF_URL_HOSTS`;
- `constants.HF_HUB_OFFLINE` (the tests' conftest sets `HF_HUB_OFFLINE=1` before the import);
- the cache and token paths derived from `HF_HOME` (`HF_HOME`, `HF_HUB_CACHE`, `HF_ASSETS_CACHE`,
  `HF_XET_CACHE`, `HF_TOKEN_PATH`, `HF_STORED_TOKENS_PATH`), so no user cache or saved login leaks in;
  `HF_TOKEN`/`HUGGING_FACE_HUB_TOKEN` are removed from the environment for the same reason;
- `huggingface_hub.hf_api.api.endpoint`: the module-level `HfApi()` behind `huggingface_hub.model_info`,
  `list_repo_files`, ... was built at import with the old endpoint;
- `huggingface_hub.utils._http._HUB_ORIGINS` (origins trusted when following redirects);
- `transformers.utils.hub._hf_api` (a cached `HfApi` holding the endpoint of its first use), reset
  to None when transformers is already imported;
- the shared `httpx2` client is closed on entry and exit (`close_session()`), dropping pooled
  connections to servers of earlier tests.

Everything is restored on exit. `HfApi(endpoint=...)` objects built inside the block keep that
endpoint. The pytest fixture `hub_server` (tests/support/fixtures.py) wraps all of this.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import hmac
import itertools
import json
import os
import re
import secrets
import socket
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, quote, unquote, urlsplit

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA_RE = re.compile(r"^[0-9a-f]{7,40}$")
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub stores files this large in LFS whatever their name
LFS_CONTENT_TYPE = "application/vnd.git-lfs+json"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that git stores in place of an LFS object."""
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of `data` (what the Hub reports as a regular file's oid / ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    date: str
    author: str
    files: dict[str, str]  # path -> blob oid: the full tree after this commit


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    created_at: str
    commits: list[Commit] = field(default_factory=list)  # oldest first
    gated: bool = False
    granted: set[str] = field(default_factory=set)  # tokens that may read a gated repo's files

    @property
    def head(self) -> Commit:
        return self.commits[-1]


class HttpError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


@dataclass
class _Fault:
    route: str
    status: int
    remaining: int


class HubServer:
    """An in-memory Hub on 127.0.0.1:<free port>, served from a background thread.

    Use as a context manager (or `start()`/`stop()`). Inspect state with `repos()`, `commits()`,
    `files()`, `is_private()`; inject failures with `fail_next_commits()` / `fail_next()`.
    """

    def __init__(
        self,
        tokens: Iterable[str] | None = None,
        *,
        read_only_tokens: Iterable[str] = (),
        user: str = "harmprune-test",
        commits_page_size: int = 50,
    ) -> None:
        token_list = list(tokens) if tokens is not None else [f"hf_test_{secrets.token_hex(12)}"]
        if not token_list:
            raise ValueError("at least one valid token is needed")
        self.read_only_tokens: set[str] = set(read_only_tokens)
        self.token: str = token_list[0]  # a write token
        self.tokens: set[str] = set(token_list) | self.read_only_tokens  # all valid tokens
        self.user = user
        self.commits_page_size = commits_page_size
        self.request_log: list[tuple[str, str, int]] = []  # (method, path, status)
        self._repos: dict[tuple[str, str], Repo] = {}
        self._blobs: dict[str, bytes] = {}  # git oid -> content (for LFS files: of the pointer)
        self._lfs_sha: dict[str, str] = {}  # git oid of an LFS pointer -> the object's sha256
        self._lfs_store: dict[str, bytes] = {}  # sha256 -> LFS object uploaded (or committed)
        self._signing_key = secrets.token_bytes(16)
        self._faults: list[_Fault] = []
        self._lock = threading.RLock()
        self._counter = itertools.count(1)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def _handler_class(self) -> type[_HubHandler]:
        """The request handler this server binds to itself; a subclass serving other metadata
        returns its own `_HubHandler` subclass."""
        return _HubHandler

    def start(self) -> Self:
        if self._httpd is not None:
            return self
        base = self._handler_class()
        handler = type(f"_Bound{base.__name__.lstrip('_')}", (base,), {"hub": self})
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.daemon_threads = True
        httpd.block_on_close = False
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inspection ------------------------------------------------------------------------------

    def repos(self, repo_type: str = "model") -> list[str]:
        with self._lock:
            return sorted(rid for (rtype, rid) in self._repos if rtype == repo_type)

    def has_repo(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def is_private(self, repo_id: str, repo_type: str = "model") -> bool:
        return self._get(repo_id, repo_type).private

    def commits(self, repo_id: str, repo_type: str = "model") -> list[Commit]:
        """All commits of `main`, oldest first (the first is the repo's initial commit)."""
        with self._lock:
            return list(self._get(repo_id, repo_type).commits)

    def files(
        self, repo_id: str, revision: str = "main", repo_type: str = "model"
    ) -> dict[str, bytes]:
        """`{path: content}` of the repo at `revision` (branch `main` or a commit sha)."""
        with self._lock:
            commit = self._resolve(self._get(repo_id, repo_type), revision)
            return {path: self._content(oid) for path, oid in commit.files.items()}

    def lfs_paths(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> set[str]:
        """The files of `revision` that are stored as LFS objects."""
        with self._lock:
            commit = self._resolve(self._get(repo_id, repo_type), revision)
            return {path for path, oid in commit.files.items() if oid in self._lfs_sha}

    # -- serving models ----------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        private: bool = False,
        gated: bool = False,
        title: str = "Upload model",
    ) -> str:
        """A repo whose second commit (after the initial one) holds `files`; its sha."""
        repo, created = self._create_repo(repo_id, "model", private)
        if not created:
            raise ValueError(f"repo {repo_id} exists")
        repo.gated = gated
        return self.push(repo_id, files, title)

    def push(self, repo_id: str, files: dict[str, bytes], title: str) -> str:
        """Commit `files` (added or replaced) on `main` server-side; the new commit's sha."""
        with self._lock:
            repo = self._get(repo_id, "model")
            staged = dict(repo.head.files)
            for path, data in files.items():
                if self._wants_lfs(repo.head, path, len(data)):
                    sha256 = hashlib.sha256(data).hexdigest()
                    self._lfs_store[sha256] = data
                    staged[path] = self._store_lfs(sha256)
                else:
                    staged[path] = self._store(data)
            sha = self._new_sha(repo.head.sha, title)
            repo.commits.append(
                Commit(sha, repo.head.sha, title, "", _now_iso(), self.user, staged)
            )
            return sha

    def grant(self, repo_id: str, token: str) -> None:
        """Let `token` read the files of gated `repo_id` (the user accepted its conditions)."""
        with self._lock:
            self._get(repo_id, "model").granted.add(token)

    def _get(self, repo_id: str, repo_type: str) -> Repo:
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id!r}")
        return repo

    # -- fault injection -------------------------------------------------------------------------

    def fail_next_commits(self, n: int = 1, status: int = 503) -> None:
        """Make the next `n` commit calls fail with `status` (after the body was received and
        staged, so the test also checks that a failed commit leaves nothing behind)."""
        self.fail_next(n, status, route="commit")

    def fail_next(self, n: int = 1, status: int = 503, *, route: str = "commit") -> None:
        """Make the next `n` calls of `route` fail with `status`. Routes: "commit", "preupload",
        "create", "commits" (list), "info", "tree", "resolve", or "*" (any request)."""
        with self._lock:
            self._faults.append(_Fault(route=route, status=status, remaining=n))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, route: str) -> int | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.route in (route, "*"):
                    fault.remaining -= 1
                    return fault.status
        return None

    # -- state changes (called by the handler, under the lock) -----------------------------------

    def _new_sha(self, *parts: str) -> str:
        h = hashlib.sha1()
        h.update(str(next(self._counter)).encode())
        for part in parts:
            h.update(b"\0" + part.encode())
        return h.hexdigest()

    def _store(self, data: bytes) -> str:
        oid = git_blob_oid(data)
        self._blobs.setdefault(oid, data)
        return oid

    def _store_lfs(self, sha256: str) -> str:
        """Record a stored LFS object as a git file (its pointer); the pointer's git oid."""
        oid = self._store(lfs_pointer(sha256, len(self._lfs_store[sha256])))
        self._lfs_sha[oid] = sha256
        return oid

    def _content(self, oid: str) -> bytes:
        """A file's content: the LFS object for a pointer, else the git blob."""
        sha256 = self._lfs_sha.get(oid)
        return self._lfs_store[sha256] if sha256 is not None else self._blobs[oid]

    def _wants_lfs(self, head: Commit, path: str, size: int) -> bool:
        """LFS for the repo's `.gitattributes` LFS patterns, and for any large file. Never for an
        empty file: the client sends those inline whatever preupload says (S3 refuses them)."""
        if size == 0:
            return False
        if size >= LFS_MIN_SIZE:
            return True
        attributes = head.files.get(".gitattributes")
        text = self._blobs[attributes].decode() if attributes else ""
        name = path.rsplit("/", 1)[-1]
        for line in text.splitlines():
            pattern, *attrs = line.split()
            if "filter=lfs" in attrs and fnmatch.fnmatch(path if "/" in pattern else name, pattern):
                return True
        return False

    def _signature(self, sha256: str, size: int) -> str:
        return hmac.new(self._signing_key, f"{sha256}:{size}".encode(), "sha256").hexdigest()

    def _create_repo(self, repo_id: str, repo_type: str, private: bool) -> tuple[Repo, bool]:
        with self._lock:
            key = (repo_type, repo_id)
            if key in self._repos:
                return self._repos[key], False
            repo = Repo(
                repo_id=repo_id, repo_type=repo_type, private=private, created_at=_now_iso()
            )
            files = {".gitattributes": self._store(GITATTRIBUTES)}
            sha = self._new_sha(repo_type, repo_id, "initial commit")
            repo.commits.append(
                Commit(sha, None, "initial commit", "", _now_iso(), self.user, files)
            )
            self._repos[key] = repo
            return repo, True

    @staticmethod
    def _resolve(repo: Repo, revision: str) -> Commit:
        if revision == "main":
            return repo.head
        if _SHA_RE.match(revision):
            matches = [c for c in repo.commits if c.sha.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        raise HttpError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")


def _tree_entries(commit: Commit, hub: HubServer) -> list[dict[str, Any]]:
    """Files and directories of a commit, as `/tree` entries, sorted by path."""
    entries: dict[str, dict[str, Any]] = {}
    for path, oid in commit.files.items():
        size = len(hub._content(oid))
        entries[path] = {"type": "file", "oid": oid, "size": size, "path": path}
        if oid in hub._lfs_sha:
            pointer_size = len(hub._blobs[oid])
            entries[path]["lfs"] = {
                "oid": hub._lfs_sha[oid],
                "size": size,
                "pointerSize": pointer_size,
            }
        parts = path.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            folder_oid = hashlib.sha1(f"{commit.sha}:{folder}".encode()).hexdigest()
            entries.setdefault(folder, {"type": "directory", "oid": folder_oid, "path": folder})
    return [entries[p] for p in sorted(entries)]


def _validate_path(path: Any) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
        raise HttpError(400, f"Invalid path: {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise HttpError(400, f"Invalid path: {path!r}")
    return path


class _HubHandler(BaseHTTPRequestHandler):
    hub: HubServer  # set on the subclass bound to a server
    protocol_version = "HTTP/1.1"
    server_version = "HarmpruneTestHub/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr access log
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- plumbing --------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        request_id = self.headers.get("X-Amzn-Trace-Id") or self.headers.get("X-Request-Id")
        if request_id:
            self.send_header("X-Request-Id", request_id)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self.hub.request_log.append((self.command, self.path, status))

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers=headers)

    def _error(self, err: HttpError) -> None:
        headers = dict(err.headers)
        headers["X-Error-Message"] = err.message
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json(err.status, {"error": err.message}, headers=headers)

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query, keep_blank_values=True)
        self.segments = [s for s in split.path.split("/") if s != ""]
        body = self._read_body() if method in ("POST", "PUT", "DELETE") else b""
        try:
            self._route(method, body)
        except HttpError as err:
            self._error(err)
        except Exception as err:  # a bug in the test server: report it, keep serving
            print(f"hub_server: {method} {self.path}: {err!r}", file=sys.stderr)
            self._error(HttpError(500, f"test server error: {err!r}"))

    def _fault(self, route: str) -> None:
        status = self.hub._take_fault(route)
        if status is not None:
            raise HttpError(status, f"injected fault ({status}) on {route}")

    # -- auth ------------------------------------------------------------------------------------

    def _token(self) -> str | None:
        """The caller's valid token, or None when anonymous; 401 on an unknown token."""
        header = self.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in self.hub.tokens:
            raise HttpError(401, INVALID_CREDENTIALS)
        return token.strip()

    def _require_write(self) -> str:
        token = self._token()
        if token is None:
            raise HttpError(401, "You must be authenticated to access this resource.")
        if token in self.hub.read_only_tokens:
            raise HttpError(403, "You don't have the rights to write with this token")
        return token

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        token = self._token()
        with self.hub._lock:
            repo = self.hub._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and token is None):
            raise HttpError(404, "Repository not found", code="RepoNotFound")
        return repo

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.hub.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # -- routing ---------------------------------------------------------------------------------

    def _route(self, method: str, body: bytes) -> None:
        seg = self.segments
        if seg[:1] == ["api"]:
            self._fault("*")
            rest = seg[1:]
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo(body)
            if rest == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo(body)
            if rest == ["validate-yaml"] and method == "POST":
                return self._json(200, {"errors": [], "warnings": []})
            if rest == ["whoami-v2"] and method == "GET":
                return self._whoami()
            if len(rest) >= 3 and rest[0] in REPO_TYPES:
                repo_type = REPO_TYPES[rest[0]]
                repo_id = f"{unquote(rest[1])}/{unquote(rest[2])}"
                return self._repo_api(method, repo_type, repo_id, rest[3:], body)
            raise HttpError(404, f"unknown route {method} {self.path}")
        if seg[:1] == ["lfs-storage"] and len(seg) == 2 and method == "PUT":
            return self._lfs_store_object(unquote(seg[1]), body)
        # file routes: /[{type}s/]{ns}/{name}/resolve/{rev}/{path...}
        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces"):
            repo_type = REPO_TYPES[seg[0]]
            seg = seg[1:]
        # git-lfs: /[{type}s/]{ns}/{name}.git/info/lfs/objects/{batch|verify}
        if len(seg) == 6 and seg[1].endswith(".git") and seg[2:5] == ["info", "lfs", "objects"]:
            self._fault("*")
            repo_id = f"{unquote(seg[0])}/{unquote(seg[1]).removesuffix('.git')}"
            if method == "POST" and seg[5] == "batch":
                return self._lfs_batch(repo_type, repo_id, body)
            if method == "POST" and seg[5] == "verify":
                return self._lfs_verify(repo_type, repo_id, body)
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            self._fault("*")
            repo_id = f"{unquote(seg[0])}/{unquote(seg[1])}"
            return self._resolve_file(
                repo_type, repo_id, unquote(seg[3]), unquote("/".join(seg[4:]))
            )
        raise HttpError(404, f"unknown route {method} {self.path}")

    def _repo_api(
        self, method: str, repo_type: str, repo_id: str, rest: list[str], body: bytes
    ) -> None:
        action = rest[0] if rest else ""
        revision = unquote(rest[1]) if len(rest) > 1 else "main"
        if method == "GET" and action in ("", "revision"):
            self._fault("info")
            return self._info(repo_type, repo_id, revision)
        if method == "POST" and action == "preupload":
            self._fault("preupload")
            return self._preupload(repo_type, repo_id, revision, body)
        if method == "POST" and action == "commit":
            return self._commit(repo_type, repo_id, revision, body)
        if method == "GET" and action == "commits":
            self._fault("commits")
            return self._list_commits(repo_type, repo_id, revision)
        if method == "GET" and action == "tree":
            self._fault("tree")
            path = unquote("/".join(rest[2:])).strip("/")
            return self._tree(repo_type, repo_id, revision, path)
        if method == "POST" and action == "paths-info":
            return self._paths_info(repo_type, repo_id, revision, body)
        if method == "GET" and action == "refs":
            repo = self._repo(repo_type, repo_id)
            main = {"name": "main", "ref": "refs/heads/main", "targetCommit": repo.head.sha}
            return self._json(
                200, {"branches": [main], "tags": [], "converts": [], "pullRequests": []}
            )
        if method == "PUT" and action == "settings":
            self._require_write()
            repo = self._repo(repo_type, repo_id)
            payload = json.loads(body or b"{}")
            with self.hub._lock:
                if "private" in payload:
                    repo.private = bool(payload["private"])
                if "visibility" in payload:
                    repo.private = payload["visibility"] != "public"
            return self._json(200, {"private": repo.private})
        raise HttpError(404, f"unknown route {method} {self.path}")

    # -- endpoints -------------------------------------------------------------------------------

    def _whoami(self) -> None:
        token = self._token()
        if token is None:
            raise HttpError(401, INVALID_CREDENTIALS)
        role = "read" if token in self.hub.read_only_tokens else "write"
        self._json(
            200,
            {
                "type": "user",
                "name": self.hub.user,
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "test", "role": role},
                },
            },
        )

    def _create_repo(self, body: bytes) -> None:
        self._fault("create")
        self._require_write()
        payload = json.loads(body or b"{}")
        name = payload.get("name")
        namespace = payload.get("organization") or self.hub.user
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise HttpError(400, f"Invalid repo type: {repo_type}")
        if not isinstance(name, str) or not _NAME_RE.match(name) or not _NAME_RE.match(namespace):
            raise HttpError(400, f"Invalid repo name: {namespace}/{name}")
        private = payload.get("visibility", "public") != "public" or bool(payload.get("private"))
        repo, created = self.hub._create_repo(f"{namespace}/{name}", repo_type, private)
        url = self._repo_url(repo)
        if not created:
            raise_payload = {"error": f"You already created this {repo_type} repo", "url": url}
            return self._json(
                409, raise_payload, headers={"X-Error-Message": raise_payload["error"]}
            )
        self._json(200, {"url": url, "name": repo.repo_id, "id": repo.head.sha})

    def _delete_repo(self, body: bytes) -> None:
        self._require_write()
        payload = json.loads(body or b"{}")
        namespace = payload.get("organization") or self.hub.user
        key = (payload.get("type") or "model", f"{namespace}/{payload.get('name')}")
        with self.hub._lock:
            if key not in self.hub._repos:
                raise HttpError(404, "Repository not found", code="RepoNotFound")
            del self.hub._repos[key]
        self._json(200, {})

    def _info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id)
        with self.hub._lock:
            commit = self.hub._resolve(repo, revision)
            siblings = []
            for path, oid in sorted(commit.files.items()):
                size = len(self.hub._content(oid))
                sibling: dict[str, Any] = {"rfilename": path, "size": size, "blobId": oid}
                if oid in self.hub._lfs_sha:
                    pointer = len(self.hub._blobs[oid])
                    sibling["lfs"] = {
                        "sha256": self.hub._lfs_sha[oid],
                        "size": size,
                        "pointerSize": pointer,
                    }
                siblings.append(sibling)
        blobs = "blobs" in self.query
        if not blobs:
            siblings = [{"rfilename": s["rfilename"]} for s in siblings]
        namespace = repo_id.split("/")[0]
        self._json(
            200,
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": namespace,
                "sha": commit.sha,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            },
        )

    def _preupload(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> None:
        self._require_write()
        repo = self._repo(repo_type, repo_id)
        if revision != "main":
            raise HttpError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        payload = json.loads(body or b"{}")
        head = repo.head
        files = []
        with self.hub._lock:
            for item in payload.get("files", []):
                path = _validate_path(item.get("path"))
                lfs = self.hub._wants_lfs(head, path, int(item.get("size") or 0))
                oid = head.files.get(path)
                if oid is not None and lfs:
                    oid = self.hub._lfs_sha.get(oid)  # the client compares sha256 for LFS files
                mode = "lfs" if lfs else "regular"
                files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": files, "commitOid": head.sha})

    def _commit(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> None:
        self._require_write()
        repo = self._repo(repo_type, repo_id)
        if self.query.get("create_pr"):
            raise HttpError(400, "create_pr is not supported by the test hub")
        if revision != "main":
            raise HttpError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        try:
            items = [json.loads(line) for line in body.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise HttpError(400, f"Invalid NDJSON commit payload: {err}") from err
        if not items or items[0].get("key") != "header":
            raise HttpError(400, "The first line of a commit payload must be its header")
        header = items[0].get("value") or {}
        summary = header.get("summary")
        if not isinstance(summary, str) or not summary.strip():
            raise HttpError(400, "A commit needs a summary")

        with self.hub._lock:
            head = repo.head
            parent = header.get("parentCommit")
            if parent and not head.sha.startswith(parent):
                raise HttpError(412, "A commit has happened since. Please refresh and try again.")
            # Stage on a copy: nothing below touches the repo until the final append.
            staged = dict(head.files)
            new_blobs: dict[str, bytes] = {}
            lfs_files: dict[str, str] = {}  # path -> sha256 of a stored LFS object
            for item in items[1:]:
                key, value = item.get("key"), item.get("value") or {}
                path = _validate_path(value.get("path"))
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HttpError(400, f"Unsupported encoding for {path}")
                    try:
                        data = base64.b64decode(value.get("content", ""), validate=True)
                    except ValueError as err:
                        raise HttpError(400, f"Invalid base64 content for {path}") from err
                    if self.hub._wants_lfs(head, path, len(data)):
                        raise HttpError(
                            400, f"{path} must be uploaded with LFS (preupload said 'lfs')"
                        )
                    oid = git_blob_oid(data)
                    new_blobs[oid] = data
                    staged[path] = oid
                elif key == "lfsFile":
                    sha256, size = str(value.get("oid")), value.get("size")
                    stored = self.hub._lfs_store.get(sha256)
                    if value.get("algo") != "sha256" or stored is None or len(stored) != size:
                        raise HttpError(
                            422, f"LFS object {sha256} of {path} was not uploaded (or not verified)"
                        )
                    lfs_files[path] = sha256
                elif key == "deletedFile":
                    if path not in staged:
                        raise HttpError(
                            404, "A file with this name doesn't exist", code="EntryNotFound"
                        )
                    del staged[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for p in [p for p in staged if p.startswith(prefix)]:
                        del staged[p]
                else:
                    raise HttpError(400, f"Unknown commit operation {key!r}")
            # Fault injection happens after staging: a failed commit must leave no trace.
            self._fault("commit")
            for oid, data in new_blobs.items():
                self.hub._blobs.setdefault(oid, data)
            for path, sha256 in lfs_files.items():
                staged[path] = self.hub._store_lfs(sha256)
            sha = self.hub._new_sha(head.sha, summary, json.dumps(sorted(staged.items())))
            commit = Commit(
                sha=sha,
                parent=head.sha,
                title=summary,
                message=header.get("description") or "",
                date=_now_iso(),
                author=self.hub.user,
                files=staged,
            )
            repo.commits.append(commit)
        self._json(
            200,
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self._repo_url(repo)}/commit/{sha}",
                "hookOutput": "",
            },
        )

    def _list_commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id)
        with self.hub._lock:
            head = self.hub._resolve(repo, revision)
            history = repo.commits[: repo.commits.index(head) + 1][::-1]  # newest first
        page = int(self.query.get("p", ["0"])[0])
        size = self.hub.commits_page_size
        chunk = history[page * size : (page + 1) * size]
        headers = {}
        if (page + 1) * size < len(history):
            base = f"{self.hub.url}{urlsplit(self.path).path}"
            headers["Link"] = f'<{base}?p={page + 1}>; rel="next"'
        items = [
            {
                "id": c.sha,
                "title": c.title,
                "message": c.message,
                "date": c.date,
                "authors": [{"user": c.author}],
            }
            for c in chunk
        ]
        self._json(200, items, headers=headers)

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_type, repo_id)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = self.query.get("expand", ["false"])[0].lower() in ("1", "true")
        with self.hub._lock:
            commit = self.hub._resolve(repo, revision)
            entries = _tree_entries(commit, self.hub)
            history = repo.commits[: repo.commits.index(commit) + 1]
        if path:
            if not any(e["path"] == path and e["type"] == "directory" for e in entries):
                raise HttpError(
                    404,
                    f"Entry not found: {path}",
                    code="EntryNotFound",
                    headers={"X-Repo-Commit": commit.sha},
                )
            prefix = path + "/"
            entries = [e for e in entries if e["path"].startswith(prefix)]
        else:
            prefix = ""
        if not recursive:
            entries = [e for e in entries if "/" not in e["path"][len(prefix) :]]
        if expand:
            entries = [dict(e) for e in entries]
            for entry in entries:
                if entry["type"] == "file":
                    last = _last_commit_touching(history, entry["path"])
                    entry["lastCommit"] = {"id": last.sha, "title": last.title, "date": last.date}
        self._json(200, entries)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> None:
        repo = self._repo(repo_type, repo_id)
        form = parse_qs(body.decode(), keep_blank_values=True)
        wanted = {p.strip("/") for p in form.get("paths", [])}
        with self.hub._lock:
            commit = self.hub._resolve(repo, revision)
            entries = _tree_entries(commit, self.hub)
        self._json(200, [e for e in entries if e["path"] in wanted])

    # -- git-lfs -----------------------------------------------------------------------------------

    def _lfs_batch(self, repo_type: str, repo_id: str, body: bytes) -> None:
        """The git-lfs batch API, upload operation: where to PUT each object not yet stored."""
        self._require_write()
        repo = self._repo(repo_type, repo_id)
        payload = json.loads(body or b"{}")
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", []):
            raise HttpError(422, "only the basic upload transfer is supported")
        if payload.get("hash_algo", "sha256") != "sha256":
            raise HttpError(422, "only sha256 is supported")
        objects = []
        for item in payload.get("objects", []):
            sha256, size = _lfs_object_request(json.dumps(item).encode())
            entry: dict[str, Any] = {"oid": sha256, "size": size, "authenticated": True}
            with self.hub._lock:
                stored = sha256 in self.hub._lfs_store
            if not stored:  # no actions: the client skips objects the server has
                prefix = _URL_PREFIX[repo.repo_type]
                signature = self.hub._signature(sha256, size)
                entry["actions"] = {
                    "upload": {
                        "href": f"{self.hub.url}/lfs-storage/{sha256}?size={size}&signature={signature}",
                        "header": {},
                    },
                    "verify": {
                        "href": f"{self.hub.url}/{prefix}{repo.repo_id}.git/info/lfs/objects/verify",
                        "header": {},
                    },
                }
            objects.append(entry)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            content_type=LFS_CONTENT_TYPE,
        )

    def _lfs_store_object(self, sha256: str, body: bytes) -> None:
        """The presigned upload URL (S3 on the real Hub): no Authorization, a signature instead."""
        size = int(self.query.get("size", ["-1"])[0])
        signature = self.query.get("signature", [""])[0]
        if not hmac.compare_digest(signature, self.hub._signature(sha256, size)):
            raise HttpError(403, "SignatureDoesNotMatch")
        if len(body) != size or hashlib.sha256(body).hexdigest() != sha256:
            raise HttpError(400, "BadDigest: the uploaded content does not match its sha256/size")
        with self.hub._lock:
            self.hub._lfs_store.setdefault(sha256, body)
        self._send(200, b"", content_type="text/plain", headers={"ETag": f'"{sha256}"'})

    def _lfs_verify(self, repo_type: str, repo_id: str, body: bytes) -> None:
        self._require_write()
        self._repo(repo_type, repo_id)
        sha256, size = _lfs_object_request(body)
        with self.hub._lock:
            stored = self.hub._lfs_store.get(sha256)
        if stored is None or len(stored) != size:
            raise HttpError(404, f"LFS object {sha256} ({size} bytes) not found")
        self._json(200, {"oid": sha256, "size": size})

    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        self._fault("resolve")
        repo = self._repo(repo_type, repo_id)
        if repo.gated and self._token() not in repo.granted:
            raise HttpError(
                403,
                f"Access to model {repo_id} is restricted. You must have access to it and be authenticated to access it.",
                code="GatedRepo",
            )
        with self.hub._lock:
            commit = self.hub._resolve(repo, revision)
            oid = commit.files.get(path)
            data = self.hub._content(oid) if oid is not None else None
            sha256 = self.hub._lfs_sha.get(oid or "")
        if data is None:
            raise HttpError(
                404,
                "Entry not found",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit.sha},
            )
        headers = {
            "ETag": f'"{oid}"',
            "X-Repo-Commit": commit.sha,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])};",
        }
        if sha256 is not None:
            headers["X-Linked-Etag"] = f'"{sha256}"'
            headers["X-Linked-Size"] = str(len(data))
        status = 200
        range_header = self.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header or "")
        if match and (match.group(1) or match.group(2)):
            size = len(data)
            if match.group(1):
                start = int(match.group(1))
                end = int(match.group(2)) if match.group(2) else size - 1
            else:
                start, end = max(size - int(match.group(2)), 0), size - 1
            end = min(end, size - 1)
            if start >= size or start > end:
                raise HttpError(416, "Requested range not satisfiable")
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            data, status = data[start : end + 1], 206
        self._send(status, data, content_type="application/octet-stream", headers=headers)


def _lfs_object_request(body: bytes) -> tuple[str, int]:
    try:
        payload = json.loads(body or b"{}")
        sha256, size = payload["oid"], payload["size"]
    except (ValueError, KeyError, TypeError) as err:
        raise HttpError(422, f"invalid LFS object: {err}") from None
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise HttpError(422, f"invalid LFS oid {sha256!r}")
    if not isinstance(size, int) or size < 0:
        raise HttpError(422, f"invalid LFS size {size!r}")
    return sha256, size


def _last_commit_touching(history: list[Commit], path: str) -> Commit:
    for i in range(len(history) - 1, -1, -1):
        before = history[i - 1].files.get(path) if i > 0 else None
        if history[i].files.get(path) != before:
            return history[i]
    return history[-1]


# -- pointing huggingface_hub (and transformers) at a server, in-process -------------------------


class _Patcher:
    """monkeypatch-like: set attributes / env vars, remember old values, undo in reverse order."""

    _MISSING = object()

    def __init__(self) -> None:
        self._undo: list[tuple[str, Any, str, Any]] = []

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        self._undo.append(("attr", obj, name, getattr(obj, name, self._MISSING)))
        setattr(obj, name, value)

    def setenv(self, name: str, value: str | None) -> None:
        self._undo.append(("env", None, name, os.environ.get(name, self._MISSING)))
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    def undo(self) -> None:
        for kind, obj, name, old in reversed(self._undo):
            if kind == "env":
                if old is self._MISSING:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = old
            elif old is self._MISSING:
                with contextlib.suppress(AttributeError):
                    delattr(obj, name)
            else:
                setattr(obj, name, old)
        self._undo.clear()


@contextlib.contextmanager
def hub_environment(endpoint: str, hf_home: Path) -> Iterator[None]:
    """Point `huggingface_hub` (and transformers) at `endpoint`, with a fresh `hf_home` and no
    ambient token, in this process and in subprocesses started inside the block. See the module
    docstring for what is patched and why."""
    import huggingface_hub.hf_api as hf_api_module
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    endpoint = endpoint.rstrip("/")
    hf_home = Path(hf_home)
    hub_cache = hf_home / "hub"
    hub_cache.mkdir(parents=True, exist_ok=True)
    p = _Patcher()
    try:
        for name, value in {
            "HF_ENDPOINT": endpoint,
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": None,
            "HF_HOME": str(hf_home),
            "HF_HUB_CACHE": str(hub_cache),
            "HUGGINGFACE_HUB_CACHE": None,
            "HF_TOKEN": None,
            "HUGGING_FACE_HUB_TOKEN": None,
            "HF_TOKEN_PATH": None,
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_XET": "1",
            "HUGGINGFACE_CO_STAGING": None,
        }.items():
            p.setenv(name, value)
        host = urlsplit(endpoint).hostname or ""
        constant_values: dict[str, object] = {
            "ENDPOINT": endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | {host.lower()}),
            "HF_HUB_OFFLINE": False,
            "HF_HOME": str(hf_home),
            "HF_HUB_CACHE": str(hub_cache),
            "HUGGINGFACE_HUB_CACHE": str(hub_cache),
            "HF_ASSETS_CACHE": str(hf_home / "assets"),
            "HF_XET_CACHE": str(hf_home / "xet"),
            "HF_TOKEN_PATH": str(hf_home / "token"),
            "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
            "HF_HUB_DISABLE_TELEMETRY": True,
            "HF_HUB_DISABLE_XET": True,
        }
        for name, constant in constant_values.items():
            if hasattr(constants, name):
                p.setattr(constants, name, constant)
        p.setattr(hf_api_module.api, "endpoint", endpoint)
        if hasattr(_http, "_HUB_ORIGINS"):
            p.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(endpoint)})
        tf_hub = sys.modules.get("transformers.utils.hub")
        if tf_hub is not None and hasattr(tf_hub, "_hf_api"):
            p.setattr(tf_hub, "_hf_api", None)
        _http.close_session()
        yield
    finally:
        p.undo()
        tf_hub = sys.modules.get("transformers.utils.hub")
        cached = getattr(tf_hub, "_hf_api", None)
        if cached is not None and getattr(cached, "endpoint", None) == endpoint:
            tf_hub._hf_api = None  # type: ignore[union-attr]  # built inside the block: stale now
        _http.close_session()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for 'connection refused' tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
