"""In-memory fake of the Hugging Face Hub HTTP API, for tests.

`LocalHub` serves, on 127.0.0.1 and a random port, the subset of the Hub HTTP API that the real
``huggingface_hub`` client (2.x) uses to create repos, commit (regular files and the legacy
Git-LFS path), list and download. It is written against the client's source, not the Hub's docs:

* ``POST /api/repos/create``                 (409 if it exists: the client turns that into ``exist_ok``)
* ``DELETE /api/repos/delete``, ``PUT /api/{type}s/{repo}/settings``
* ``GET  /api/whoami-v2``, ``POST /api/validate-yaml``, ``GET /api/agent-harnesses``
* ``GET  /api/{type}s`` (list, ``author``/``search``/``limit``)
* ``GET  /api/{type}s/{repo}[/revision/{rev}]``  (model_info/repo_info/repo_exists; ``?blobs=true``)
* ``GET  /api/{type}s/{repo}/tree/{rev}[/{path}]?recursive=true``
* ``POST /api/{type}s/{repo}/paths-info/{rev}``, ``GET /api/{type}s/{repo}/refs``,
  ``GET /api/{type}s/{repo}/commits/{rev}``, ``GET /api/{type}s/{repo}/auth-check``
* ``POST|DELETE /api/{type}s/{repo}/branch/{branch}``, ``POST /api/{type}s/{repo}/tag/{rev}``,
  ``DELETE /api/{type}s/{repo}/tag/{tag}``
* ``POST /api/{type}s/{repo}/preupload/{rev}``  (uploadMode lfs|regular, shouldIgnore, oid)
* ``POST /{prefix}{repo}.git/info/lfs/objects/batch`` and ``.../verify``  (sha256 oids)
* ``PUT  /__lfs__/{upload_id}`` (unauthenticated, signed-URL-like; sha256 and size checked),
  plus multipart parts/completion when ``multipart_chunk_size`` is set
* ``POST /api/{type}s/{repo}/commit/{rev}``  (NDJSON: header, file, lfsFile, deletedFile, deletedFolder;
  ``?create_pr=1``)
* ``HEAD|GET /{prefix}{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` and, for LFS files,
  ``X-Linked-Etag``/``X-Linked-Size`` (optionally a 302 to a "CDN" origin, see ``lfs_redirect``)

State is in memory: each repo has commits (full snapshots path -> FileEntry, 40-hex oids), branches,
tags, PR refs and its LFS objects keyed by sha256. A commit is applied atomically or not at all.

Errors are JSON ``{"error": ...}`` with ``X-Error-Code``/``X-Error-Message`` headers, like the Hub.
Note that on plain http the client maps a 401/404 to ``RepositoryNotFoundError`` only because of the
``X-Error-Code: RepoNotFound`` header (its URL-based 401 fallback only matches ``https://``).

Standard library only (``yaml`` is used opportunistically for README metadata; it ships with
huggingface_hub).
"""

from __future__ import annotations

import base64
import datetime as _dt
import fnmatch
import hashlib
import http.server
import json
import re
import secrets
import socket
import threading
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

try:  # PyYAML is a dependency of huggingface_hub; only used to validate/expose README metadata.
    import yaml as _yaml
except ImportError:  # pragma: no cover
    _yaml = None


__all__ = ["Commit", "FileEntry", "LocalHub", "PullRequest", "RequestRecord"]

_TYPE_FROM_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO_SUBROUTES = {
    "revision", "tree", "preupload", "commit", "commits", "refs", "paths-info", "branch", "tag",
    "settings", "auth-check", "resolve", "discussions", "lfs-files",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_HEX_RE = re.compile(r"^[0-9a-f]{7,40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

# The `.gitattributes` the Hub puts in the "initial commit" of a new model repo.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
        "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)


# --------------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------------


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _iso(ts: float) -> str:
    d = _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class FileEntry:
    """One file of a snapshot. Regular files carry `content`; LFS files carry `lfs_sha256`."""

    size: int
    blob_oid: str  # git blob sha1 (of the pointer file for LFS files)
    content: bytes | None = None
    lfs_sha256: str | None = None
    pointer_size: int | None = None

    @property
    def is_lfs(self) -> bool:
        return self.lfs_sha256 is not None

    @classmethod
    def regular(cls, content: bytes) -> FileEntry:
        return cls(size=len(content), blob_oid=_git_blob_oid(content), content=content)

    @classmethod
    def lfs(cls, sha256: str, size: int) -> FileEntry:
        pointer = _lfs_pointer(sha256, size)
        return cls(size=size, blob_oid=_git_blob_oid(pointer), lfs_sha256=sha256, pointer_size=len(pointer))


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    author: str
    created_at: float
    files: dict[str, FileEntry]


@dataclass
class PullRequest:
    num: int
    title: str
    author: str
    ref: str  # "refs/pr/N"
    base: str  # target branch
    status: str = "open"


@dataclass
class RequestRecord:
    method: str
    path: str  # raw path, including the query string
    status: int | None  # None when the connection was dropped without a response
    user: str | None


@dataclass
class _Token:
    user: str
    write: bool


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: float
    gated: Any = False
    sdk: str | None = None
    commits: dict[str, Commit] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # commit oids, creation order
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pr_refs: dict[str, str] = field(default_factory=dict)  # "refs/pr/N" -> oid
    prs: dict[int, PullRequest] = field(default_factory=dict)
    next_discussion: int = 1
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]


@dataclass
class _Fault:
    substring: str
    method: str | None
    times: int  # remaining; < 0 means forever
    kind: str  # "fail" | "drop"
    status: int = 500
    message: str | None = None
    error_code: str | None = None

    def matches(self, method: str, path: str) -> bool:
        return self.substring in path and (self.method is None or self.method.upper() == method)


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


def _repo_not_found(auth: _Token | None) -> _HttpError:
    # The Hub answers 401 to anonymous callers and 404 to authenticated ones, both with this code.
    return _HttpError(401 if auth is None else 404, "Repository not found", code="RepoNotFound")


def _revision_not_found(rev: str) -> _HttpError:
    return _HttpError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")


# --------------------------------------------------------------------------------------------------
# Small helpers (gitattributes/gitignore matching, YAML front matter)
# --------------------------------------------------------------------------------------------------


def _glob_match(pattern: str, path: str) -> bool:
    pattern = pattern.lstrip("/")
    if "/" in pattern.rstrip("/"):
        return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern.replace("**/", ""))
    return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)  # no "/": matches the basename


def _lfs_patterns(gitattributes: str) -> list[str]:
    patterns = []
    for line in gitattributes.splitlines():
        parts = line.split()
        if len(parts) >= 2 and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
            patterns.append(parts[0])
    return patterns


def _gitignored(gitignore: str, path: str) -> bool:
    ignored = False
    for raw in gitignore.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if negate:
            line = line[1:]
        if line.endswith("/"):
            d = line.strip("/")
            parts = path.split("/")[:-1]
            hit = any(fnmatch.fnmatchcase(p, d) for p in parts) if "/" not in d else (
                path.startswith(d + "/") or fnmatch.fnmatchcase(path, d + "/*")
            )
        elif "/" in line.rstrip("/"):
            hit = fnmatch.fnmatchcase(path, line.lstrip("/")) or path.startswith(line.lstrip("/") + "/")
        else:
            hit = any(fnmatch.fnmatchcase(p, line) for p in path.split("/"))
        if hit:
            ignored = not negate
    return ignored


def _front_matter(text: str) -> str | None:
    """Raw YAML block of a README, or None if there is none."""
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for i in range(1, len(lines)):
        if lines[i].strip() == "---":
            return "\n".join(lines[1:i])
    return None


def _card_data(text: str) -> tuple[dict | None, str | None]:
    """(metadata dict or None, error message or None)."""
    block = _front_matter(text)
    if block is None:
        return None, None
    if _yaml is None:
        return None, None
    try:
        data = _yaml.safe_load(block)
    except Exception as e:  # noqa: BLE001
        return None, f"Invalid YAML in README.md metadata: {e}"
    if data is None:
        return {}, None
    if not isinstance(data, dict):
        return None, "README.md metadata must be a YAML mapping"
    return data, None


class _NoSleepTime:
    """Stand-in for the `time` module with a no-op `sleep` (see `LocalHub.patch_client_retries`)."""

    @staticmethod
    def sleep(_seconds: float) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


# --------------------------------------------------------------------------------------------------
# HTTP layer
# --------------------------------------------------------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, hub: LocalHub):
        self.hub = hub
        self.open_connections: set[socket.socket] = set()
        self.handler_threads: list[threading.Thread] = []
        self.conn_lock = threading.Lock()
        super().__init__(address, handler)

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], OSError):  # client went away: not worth a traceback
            super().handle_error(request, client_address)

    def process_request(self, request, client_address):
        # Like ThreadingMixIn, but daemon threads that we still track (the stdlib only tracks
        # non-daemon ones), so that LocalHub.stop() can join them.
        t = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                             name="LocalHub-connection", daemon=True)
        with self.conn_lock:
            self.handler_threads = [x for x in self.handler_threads if x.is_alive()]
            self.handler_threads.append(t)
        t.start()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every response has a Content-Length
    disable_nagle_algorithm = True  # TCP_NODELAY ...
    wbufsize = -1  # ... and one buffered write per response (flushed by handle_one_request): no 40 ms stalls
    server: _Server

    # -- connection bookkeeping (so that stop() can unblock idle keep-alive connections) --
    def setup(self) -> None:
        super().setup()
        with self.server.conn_lock:
            self.server.open_connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.conn_lock:
                self.server.open_connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- verbs --
    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    # -- plumbing --
    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                line = self.rfile.readline()
                if not line:
                    break
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        hub = self.server.hub
        self.body = self._read_body()
        self.response_status: int | None = None
        self.auth_user: str | None = None
        method = self.command
        action = hub._before_request(method, self.path)
        if action is not None and action[0] == "drop":
            hub._log(RequestRecord(method, self.path, None, None))
            self.close_connection = True
            return
        try:
            self._handle(action)
        except OSError:  # client disconnected mid-response
            self.close_connection = True
            return
        hub._log(RequestRecord(method, self.path, self.response_status, self.auth_user))

    def _handle(self, action: tuple[str, Any] | None) -> None:
        try:
            if action is not None and action[0] == "fail":
                fault: _Fault = action[1]
                raise _HttpError(
                    fault.status, fault.message or f"Injected failure ({fault.status})", code=fault.error_code
                )
            self.server.hub._route(self)
        except _HttpError as e:
            self.send_error_json(e.status, e.message, code=e.code, headers=e.headers)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - a bug in the fake must surface as a 500, not hang
            self.send_error_json(500, f"LocalHub internal error: {e!r}\n{traceback.format_exc()}")

    def send_bytes(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: str = "application/json; charset=utf-8",
        headers: dict[str, str] | None = None,
        content_length: int | None = None,
    ) -> None:
        self.response_status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.send_header("X-Request-Id", "Root=1-" + secrets.token_hex(12))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(status, json.dumps(obj).encode(), headers=headers)

    def send_error_json(self, status: int, message: str, code: str | None = None, headers: dict | None = None) -> None:
        h = dict(headers or {})
        first_line = message.splitlines()[0] if message else ""
        h["X-Error-Message"] = first_line.encode("ascii", "replace").decode()[:500]
        if code:
            h["X-Error-Code"] = code
        self.send_json(status, {"error": message}, headers=h)

    def json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as e:
            raise _HttpError(400, f"Invalid JSON body: {e}") from None


# --------------------------------------------------------------------------------------------------
# The hub
# --------------------------------------------------------------------------------------------------


class LocalHub:
    """A fake Hugging Face Hub over HTTP on 127.0.0.1 (random port). See the module docstring.

    Args:
        lfs_threshold: files at least this big (bytes) are told to use LFS by `/preupload`, as are files
            matching the repo's `.gitattributes` LFS patterns and binary files (NUL byte in the sample).
        multipart_chunk_size: if set, LFS objects larger than this are uploaded with the multipart protocol.
        lfs_redirect: if True, `/resolve` answers LFS files with a 302 to a "CDN" url on another origin
            (`cdn_host`, default "localhost") that needs no auth, like the real Hub does. The client then
            takes the metadata from the 302 and downloads from the CDN without its Authorization header.
        initial_commit: if True (default, like the Hub), a new repo starts with an "initial commit" that
            holds a `.gitattributes` (LFS patterns).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        lfs_threshold: int = 10 * 1024 * 1024,
        multipart_chunk_size: int | None = None,
        lfs_redirect: bool = False,
        cdn_host: str = "localhost",
        initial_commit: bool = True,
    ) -> None:
        self.host = host
        self._port = port
        self.lfs_threshold = lfs_threshold
        self.multipart_chunk_size = multipart_chunk_size
        self.lfs_redirect = lfs_redirect
        self.cdn_host = cdn_host
        self.initial_commit = initial_commit

        self._lock = threading.RLock()
        self._tokens: dict[str, _Token] = {}
        self._orgs: dict[str, set[str]] = {}
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._uploads: dict[str, tuple[tuple[str, str], str, int]] = {}  # upload id -> (repo key, oid, size)
        self._parts: dict[tuple[str, int], bytes] = {}
        self._cdn_links: dict[str, tuple[tuple[str, str], str]] = {}
        self._faults: list[_Fault] = []
        self._down_after: tuple[int, str | None, str | None] | None = None  # (remaining, substring, method)
        self._down = False
        self._seq = 0
        self.requests: list[RequestRecord] = []

        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> LocalHub:
        if self._server is not None:
            return self
        self._server = _Server((self.host, self._port), _Handler, self)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalHub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()  # serve_forever() returns: no more accepts
        if thread is not None:
            thread.join(timeout=5)
        # Handler threads may sit on idle keep-alive connections: shut those sockets down until every
        # handler thread has exited (loop, in case one was accepted right before the shutdown).
        deadline = time.monotonic() + 5
        while True:
            with server.conn_lock:
                conns = list(server.open_connections)
            for conn in conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with server.conn_lock:
                alive = [t for t in server.handler_threads if t.is_alive()]
            if not alive or time.monotonic() > deadline:
                break
            for t in alive:
                t.join(0.05)
        server.server_close()  # closes the listening socket
        self._server = None
        self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not started")
        return f"http://{self.host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    # ---------------------------------------------------------------- users / tokens
    def add_token(self, token: str, user: str, write: bool = True) -> str:
        """Register `token` for `user` ("write" or read-only role). Returns the token."""
        with self._lock:
            self._tokens[token] = _Token(user=user, write=write)
        return token

    def add_org(self, org: str, members: Iterable[str] = ()) -> None:
        """Create an org; its members can write to `org/...` (with a write token)."""
        with self._lock:
            self._orgs.setdefault(org, set()).update(members)

    def add_org_member(self, org: str, user: str) -> None:
        self.add_org(org, [user])

    def _owners(self, namespace: str) -> set[str]:
        return {namespace} | self._orgs.get(namespace, set())

    # ---------------------------------------------------------------- fault injection
    def fail_next(
        self,
        path_substring: str,
        status: int = 500,
        *,
        times: int = 1,
        method: str | None = None,
        message: str | None = None,
        error_code: str | None = None,
    ) -> None:
        """Answer the next `times` requests whose raw path contains `path_substring` (and `method` if
        given) with `status` and a JSON error, without touching state. `times=-1`: forever.
        Note: the client retries 408/429/500/502/503/504 on some endpoints (preupload, LFS batch, LFS PUT,
        tree listing), so a single 500 there is retried; the commit POST is not retried."""
        with self._lock:
            self._faults.append(_Fault(path_substring, method, times, "fail", status, message, error_code))

    def drop_next(self, path_substring: str, *, times: int = 1, method: str | None = None) -> None:
        """Close the connection without answering the next `times` matching requests (network error)."""
        with self._lock:
            self._faults.append(_Fault(path_substring, method, times, "drop"))

    def go_down_after(self, n_requests: int = 0, path_substring: str | None = None, *, method: str | None = None) -> None:
        """Let `n_requests` more (matching) requests through, then go down: the next matching request and
        every request after it (matching or not) get their connection closed without a response, until
        `come_back()`. `go_down_after(0, "/commit/")` = die exactly when the commit is posted."""
        with self._lock:
            self._down_after = (n_requests, path_substring, method)

    def go_down(self) -> None:
        with self._lock:
            self._down = True

    def come_back(self) -> None:
        with self._lock:
            self._down = False
            self._down_after = None

    @property
    def is_down(self) -> bool:
        return self._down

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._down_after = None
            self._down = False

    def _before_request(self, method: str, path: str) -> tuple[str, Any] | None:
        with self._lock:
            if not self._down and self._down_after is not None:
                remaining, sub, m = self._down_after
                if (sub is None or sub in path) and (m is None or m.upper() == method):
                    if remaining <= 0:
                        self._down = True
                        self._down_after = None
                    else:
                        self._down_after = (remaining - 1, sub, m)
            if self._down:
                return ("drop", None)
            for fault in self._faults:
                if fault.times != 0 and fault.matches(method, path):
                    if fault.times > 0:
                        fault.times -= 1
                    self._faults = [f for f in self._faults if f.times != 0]
                    return (fault.kind, fault)
        return None

    def _log(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append(record)

    def requests_matching(self, path_substring: str, method: str | None = None) -> list[RequestRecord]:
        with self._lock:
            return [
                r for r in self.requests
                if path_substring in r.path and (method is None or r.method == method.upper())
            ]

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def reset(self) -> None:
        """Forget repos, faults and the request log (tokens and orgs are kept)."""
        with self._lock:
            self._repos.clear()
            self._uploads.clear()
            self._parts.clear()
            self._cdn_links.clear()
            self.requests.clear()
        self.clear_faults()

    # ---------------------------------------------------------------- inspection / seeding helpers
    def _repo(self, repo_id: str, repo_type: str = "model") -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise KeyError(f"No {repo_type} repo {repo_id!r} on the LocalHub")
        return repo

    def repo_ids(self, repo_type: str | None = "model") -> list[str]:
        with self._lock:
            return sorted(rid for (t, rid) in self._repos if repo_type is None or t == repo_type)

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def is_private(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return self._repo(repo_id, repo_type).private

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """Commit oid that `revision` (branch, tag, refs/pr/N or oid prefix) points to."""
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            oid = self._resolve_rev(repo, revision)
            if oid is None:
                raise KeyError(f"No revision {revision!r} in {repo_id!r}")
            return oid

    def file_entries(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, FileEntry]:
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            return dict(repo.commits[self.head(repo_id, revision, repo_type)].files)

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Snapshot at `revision` as {path: bytes} (LFS contents resolved)."""
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            return {p: self._content(repo, e) for p, e in self.file_entries(repo_id, revision, repo_type).items()}

    def lfs_paths(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> set[str]:
        """Paths stored through LFS at `revision`."""
        return {p for p, e in self.file_entries(repo_id, revision, repo_type).items() if e.is_lfs}

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[Commit]:
        """History of `revision`, OLDEST FIRST (the Hub API/list_repo_commits give newest first)."""
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            chain: list[Commit] = []
            oid: str | None = self.head(repo_id, revision, repo_type)
            while oid is not None:
                c = repo.commits[oid]
                chain.append(c)
                oid = c.parent
            return chain[::-1]

    def all_commits(self, repo_id: str, repo_type: str = "model") -> list[Commit]:
        """Every commit of the repo (all refs), in creation order."""
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            return [repo.commits[o] for o in repo.order]

    def refs(self, repo_id: str, repo_type: str = "model") -> dict[str, dict[str, str]]:
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            return {"branches": dict(repo.branches), "tags": dict(repo.tags), "pull_requests": dict(repo.pr_refs)}

    def pull_requests(self, repo_id: str, repo_type: str = "model") -> list[PullRequest]:
        with self._lock:
            return list(self._repo(repo_id, repo_type).prs.values())

    def lfs_objects(self, repo_id: str, repo_type: str = "model") -> dict[str, bytes]:
        with self._lock:
            return dict(self._repo(repo_id, repo_type).lfs)

    def create_repo(
        self, repo_id: str, *, repo_type: str = "model", private: bool = False, exist_ok: bool = False
    ) -> str:
        """Server-side repo creation (no auth). Returns the repo URL."""
        with self._lock:
            key = (repo_type, repo_id)
            if key in self._repos:
                if not exist_ok:
                    raise ValueError(f"{repo_type} repo {repo_id!r} already exists")
            else:
                self._new_repo(repo_type, repo_id, private=private)
            return self._repo_url(self._repos[key])

    def seed(
        self,
        repo_id: str,
        files: dict[str, bytes | str],
        *,
        repo_type: str = "model",
        revision: str = "main",
        message: str = "Seed files",
        author: str = "system",
        lfs: bool | None = None,
        private: bool = False,
    ) -> str:
        """Server-side commit of `files` (creating the repo if needed). `lfs=None`: same LFS rules as
        /preupload. Returns the new commit oid."""
        with self._lock:
            if (repo_type, repo_id) not in self._repos:
                self._new_repo(repo_type, repo_id, private=private)
            repo = self._repos[(repo_type, repo_id)]
            base = self._resolve_rev(repo, revision)
            if base is None:
                raise KeyError(f"No revision {revision!r}")
            snapshot = dict(repo.commits[base].files)
            for path, data in files.items():
                data = data.encode() if isinstance(data, str) else data
                use_lfs = lfs if lfs is not None else self._should_use_lfs(snapshot, path, len(data), data[:512])
                if use_lfs and data:
                    sha = hashlib.sha256(data).hexdigest()
                    repo.lfs[sha] = data
                    snapshot[path] = FileEntry.lfs(sha, len(data))
                else:
                    snapshot[path] = FileEntry.regular(data)
            commit = self._make_commit(repo, base, snapshot, message, "", author)
            self._move_ref(repo, revision, commit.oid)
            return commit.oid

    # ---------------------------------------------------------------- internal state helpers
    def _new_repo(self, repo_type: str, repo_id: str, *, private: bool, sdk: str | None = None) -> _Repo:
        repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=time.time(), sdk=sdk)
        files = {".gitattributes": FileEntry.regular(DEFAULT_GITATTRIBUTES.encode())} if self.initial_commit else {}
        commit = self._make_commit(repo, None, files, "initial commit", "", "system")
        repo.branches["main"] = commit.oid
        self._repos[(repo_type, repo_id)] = repo
        return repo

    def _make_commit(
        self, repo: _Repo, parent: str | None, files: dict[str, FileEntry], title: str, description: str, author: str
    ) -> Commit:
        self._seq += 1
        now = time.time()
        tree = self._tree_oid(files, "")
        payload = f"commit\ntree {tree}\nparent {parent}\nauthor {author}\nseq {self._seq}\ntime {now}\n\n{title}\n\n{description}"
        oid = hashlib.sha1(payload.encode()).hexdigest()
        commit = Commit(oid=oid, parent=parent, title=title, description=description, author=author,
                        created_at=now, files=dict(files))
        repo.commits[oid] = commit
        repo.order.append(oid)
        return commit

    @staticmethod
    def _tree_oid(files: dict[str, FileEntry], prefix: str) -> str:
        """Real git tree hashing of the directory `prefix` ("" = root)."""
        entries: dict[str, tuple[str, str]] = {}  # name -> (mode, oid)
        subdirs: set[str] = set()
        for path, entry in files.items():
            if prefix and not path.startswith(prefix + "/"):
                continue
            rel = path[len(prefix) + 1:] if prefix else path
            if "/" in rel:
                subdirs.add(rel.split("/", 1)[0])
            else:
                entries[rel] = ("100644", entry.blob_oid)
        for d in subdirs:
            entries[d] = ("40000", LocalHub._tree_oid(files, f"{prefix}/{d}" if prefix else d))
        body = b"".join(
            f"{mode} {name}".encode() + b"\x00" + bytes.fromhex(oid)
            for name, (mode, oid) in sorted(entries.items(), key=lambda kv: kv[0] + ("/" if kv[1][0] == "40000" else ""))
        )
        return hashlib.sha1(b"tree %d\x00" % len(body) + body).hexdigest()

    @staticmethod
    def _resolve_rev(repo: _Repo, rev: str) -> str | None:
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.tags:
            return repo.tags[rev]
        if rev in repo.pr_refs:
            return repo.pr_refs[rev]
        if rev.startswith("refs/heads/") and rev[11:] in repo.branches:
            return repo.branches[rev[11:]]
        if rev.startswith("refs/tags/") and rev[10:] in repo.tags:
            return repo.tags[rev[10:]]
        if _HEX_RE.match(rev):
            hits = [o for o in repo.commits if o.startswith(rev)]
            if len(hits) == 1:
                return hits[0]
        return None

    @staticmethod
    def _move_ref(repo: _Repo, rev: str, oid: str) -> None:
        if rev in repo.pr_refs:
            repo.pr_refs[rev] = oid
        elif rev.startswith("refs/heads/"):
            repo.branches[rev[11:]] = oid
        else:
            repo.branches[rev] = oid

    @staticmethod
    def _content(repo: _Repo, entry: FileEntry) -> bytes:
        if entry.is_lfs:
            return repo.lfs[entry.lfs_sha256]  # type: ignore[index]
        return entry.content or b""

    def _should_use_lfs(self, snapshot: dict[str, FileEntry], path: str, size: int, sample: bytes) -> bool:
        if size == 0:
            return False
        attrs = snapshot.get(".gitattributes")
        patterns = _lfs_patterns(attrs.content.decode("utf-8", "replace")) if attrs and attrs.content else []
        if any(_glob_match(p, path) for p in patterns):
            return True
        return size >= self.lfs_threshold or b"\x00" in sample

    def _repo_url(self, repo: _Repo) -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # ---------------------------------------------------------------- request helpers
    def _auth(self, h: _Handler) -> _Token | None:
        header = h.headers.get("Authorization")
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        token = value.strip()
        if scheme.lower() == "basic":
            try:
                token = base64.b64decode(token).decode().split(":", 1)[-1]
            except Exception:  # noqa: BLE001
                token = ""
        elif scheme.lower() != "bearer":
            token = ""
        info = self._tokens.get(token)
        if info is None:
            raise _HttpError(401, "Invalid credentials in Authorization header")
        h.auth_user = info.user
        return info

    def _can_read(self, repo: _Repo, auth: _Token | None) -> bool:
        return not repo.private or (auth is not None and auth.user in self._owners(repo.namespace))

    def _get_repo(self, repo_type: str, repo_id: str, auth: _Token | None) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or not self._can_read(repo, auth):
            raise _repo_not_found(auth)
        return repo

    def _require_write(self, repo: _Repo, auth: _Token | None, *, allow_pr: bool = False) -> None:
        if auth is None:
            raise _HttpError(401, "You must be authenticated to access this endpoint")
        if not auth.write:
            raise _HttpError(403, "Your token has read-only permissions: write access is required")
        if allow_pr:
            return
        if auth.user not in self._owners(repo.namespace):
            raise _HttpError(
                403, f"You don't have the rights to write to {repo.repo_id}. If you want to contribute, open a "
                "pull request (create_pr=1)."
            )

    def _rev_or_404(self, repo: _Repo, rev: str) -> str:
        oid = self._resolve_rev(repo, rev)
        if oid is None:
            raise _revision_not_found(rev)
        return oid

    # ---------------------------------------------------------------- router
    def _route(self, h: _Handler) -> None:
        split = urlsplit(h.path)
        raw_path = split.path
        query = parse_qs(split.query, keep_blank_values=True)
        segs = raw_path.strip("/").split("/") if raw_path.strip("/") else []
        method = h.command
        with self._lock:
            auth = self._auth(h)

            # --- unauthenticated storage endpoints ("signed URLs") ---
            if segs and segs[0] == "__lfs__":
                return self._lfs_storage(h, segs[1:])
            if segs and segs[0] == "__cdn__" and len(segs) == 2 and method in ("GET", "HEAD"):
                link = self._cdn_links.get(segs[1])
                if link is None:
                    raise _HttpError(403, "Invalid or expired signature")
                repo = self._repos.get(link[0])
                if repo is None or link[1] not in repo.lfs:
                    raise _HttpError(404, "Not found")
                return self._send_file_bytes(h, repo.lfs[link[1]], {"ETag": f'"{link[1]}"'})

            # --- git-lfs endpoints ---
            marker = ".git/info/lfs/objects/"
            if marker in raw_path:
                repo_part, _, action = raw_path.strip("/").partition(marker)
                repo_type, repo_id = self._split_prefixed_repo(repo_part)
                return self._lfs_endpoint(h, repo_type, repo_id, action, auth)

            if segs[:1] == ["api"]:
                return self._api(h, segs[1:], query, auth)

            # --- /{prefix}{repo}/resolve/{rev}/{path} ---
            rest = segs
            repo_type = "model"
            if rest and rest[0] in ("datasets", "spaces") and len(rest) > 1:
                repo_type = _TYPE_FROM_PLURAL[rest[0]]
                rest = rest[1:]
            if len(rest) >= 3 and rest[1] == "resolve":
                return self._resolve(h, repo_type, unquote(rest[0]), rest[2:], auth)
            if len(rest) >= 4 and rest[2] == "resolve":
                return self._resolve(h, repo_type, f"{unquote(rest[0])}/{unquote(rest[1])}", rest[3:], auth)
            raise _HttpError(404, f"Not Found: {method} {raw_path}")

    @staticmethod
    def _split_prefixed_repo(repo_part: str) -> tuple[str, str]:
        parts = [unquote(p) for p in repo_part.split("/")]
        if parts and parts[0] in ("datasets", "spaces") and len(parts) > 1:
            return _TYPE_FROM_PLURAL[parts[0]], "/".join(parts[1:])
        return "model", "/".join(parts)

    def _api(self, h: _Handler, segs: list[str], query: dict, auth: _Token | None) -> None:
        method = h.command
        if segs == ["whoami-v2"] and method == "GET":
            if auth is None:
                raise _HttpError(401, "Invalid credentials in Authorization header")
            return h.send_json(200, self._whoami(auth, h))
        if segs == ["validate-yaml"] and method == "POST":
            return self._validate_yaml(h)
        if segs == ["agent-harnesses"] and method == "GET":
            return h.send_json(200, {"standardEnvVars": [], "harnesses": {}})
        if segs == ["repos", "create"] and method == "POST":
            return self._create_repo(h, auth)
        if segs == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo(h, auth)
        if len(segs) == 1 and segs[0] in _TYPE_FROM_PLURAL and method == "GET":
            return self._list_repos(h, _TYPE_FROM_PLURAL[segs[0]], query, auth)
        if len(segs) >= 2 and segs[0] in _TYPE_FROM_PLURAL:
            repo_type = _TYPE_FROM_PLURAL[segs[0]]
            rest = segs[1:]
            if len(rest) >= 2 and rest[1] not in _REPO_SUBROUTES:
                repo_id, sub = f"{unquote(rest[0])}/{unquote(rest[1])}", rest[2:]
            else:
                repo_id, sub = unquote(rest[0]), rest[1:]
            return self._repo_api(h, repo_type, repo_id, sub, query, auth)
        raise _HttpError(404, f"Not Found: {method} /api/{'/'.join(segs)}")

    def _repo_api(
        self, h: _Handler, repo_type: str, repo_id: str, sub: list[str], query: dict, auth: _Token | None
    ) -> None:
        method = h.command
        head = sub[0] if sub else None
        if head is None and method == "GET":
            return self._repo_info(h, repo_type, repo_id, "main", query, auth)
        if head == "revision" and len(sub) >= 2 and method == "GET":
            return self._repo_info(h, repo_type, repo_id, unquote("/".join(sub[1:])), query, auth)
        if head == "tree" and len(sub) >= 2 and method == "GET":
            path = "/".join(unquote(p) for p in sub[2:])
            return self._tree(h, repo_type, repo_id, unquote(sub[1]), path, query, auth)
        if head == "preupload" and len(sub) >= 2 and method == "POST":
            return self._preupload(h, repo_type, repo_id, unquote("/".join(sub[1:])), query, auth)
        if head == "commit" and len(sub) >= 2 and method == "POST":
            return self._commit(h, repo_type, repo_id, unquote("/".join(sub[1:])), query, auth)
        if head == "commits" and len(sub) >= 2 and method == "GET":
            return self._list_commits(h, repo_type, repo_id, unquote("/".join(sub[1:])), auth)
        if head == "refs" and method == "GET":
            return self._list_refs(h, repo_type, repo_id, query, auth)
        if head == "paths-info" and len(sub) >= 2 and method == "POST":
            return self._paths_info(h, repo_type, repo_id, unquote("/".join(sub[1:])), auth)
        if head == "auth-check" and method == "GET":
            self._get_repo(repo_type, repo_id, auth)
            return h.send_json(200, {})
        if head == "branch" and len(sub) >= 2 and method in ("POST", "DELETE"):
            return self._branch(h, repo_type, repo_id, unquote("/".join(sub[1:])), auth)
        if head == "tag" and len(sub) >= 2 and method in ("POST", "DELETE"):
            return self._tag(h, repo_type, repo_id, unquote("/".join(sub[1:])), auth)
        if head == "settings" and method == "PUT":
            return self._settings(h, repo_type, repo_id, auth)
        raise _HttpError(404, f"Not Found: {method} {h.path}")

    # ---------------------------------------------------------------- simple endpoints
    def _whoami(self, auth: _Token, h: _Handler) -> dict:
        orgs = sorted(o for o, members in self._orgs.items() if auth.user in members)
        role = "write" if auth.write else "read"
        token = (h.headers.get("Authorization") or "").partition(" ")[2]
        return {
            "type": "user",
            "id": hashlib.md5(auth.user.encode()).hexdigest()[:24],
            "name": auth.user,
            "fullname": auth.user.capitalize(),
            "email": f"{auth.user}@example.com",
            "emailVerified": True,
            "canPay": False,
            "isPro": False,
            "periodEnd": None,
            "avatarUrl": "",
            "orgs": [
                {"type": "org", "id": hashlib.md5(o.encode()).hexdigest()[:24], "name": o, "fullname": o,
                 "roleInOrg": "write", "isEnterprise": False, "canPay": False}
                for o in orgs
            ],
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": token[:8] + "...", "role": role, "createdAt": _iso(0)}},
        }

    def _validate_yaml(self, h: _Handler) -> None:
        body = h.json_body()
        content = body.get("content")
        if not isinstance(content, str):
            raise _HttpError(400, "Missing 'content'")
        data, error = _card_data(content)
        if error is not None:
            return h.send_json(400, {"error": error, "errors": [{"message": error}], "warnings": []},
                               headers={"X-Error-Message": error.splitlines()[0][:200].encode("ascii", "replace").decode()})
        empty = _front_matter(content) is None or data == {}
        warnings = [{"message": "empty or missing yaml metadata in repo card", "type": "warning"}] if empty else []
        return h.send_json(200, {"errors": [], "warnings": warnings})

    def _create_repo(self, h: _Handler, auth: _Token | None) -> None:
        body = h.json_body()
        if auth is None:
            raise _HttpError(401, "You must be authenticated to create a repo")
        name = body.get("name")
        repo_type = body.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HttpError(400, f"Invalid repo type: {repo_type}")
        namespace = body.get("organization") or auth.user
        if not isinstance(name, str) or not _NAME_RE.match(name) or "--" in name or ".." in name:
            raise _HttpError(400, f"Invalid repo name: {name!r}")
        if not auth.write:
            raise _HttpError(403, "You don't have the rights to create a repo: your token is read-only")
        if auth.user not in self._owners(namespace):
            raise _HttpError(403, f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"')
        if repo_type == "space" and not body.get("sdk"):
            raise _HttpError(400, "Missing sdk for Space")
        repo_id = f"{namespace}/{name}"
        existing = self._repos.get((repo_type, repo_id))
        if existing is not None:
            url = self._repo_url(existing)
            return h.send_json(409, {"error": f"You already created this {repo_type} repo", "url": url},
                               headers={"X-Error-Message": f"You already created this {repo_type} repo"})
        visibility = body.get("visibility")
        private = visibility == "private" if visibility is not None else bool(body.get("private", False))
        repo = self._new_repo(repo_type, repo_id, private=private, sdk=body.get("sdk"))
        return h.send_json(200, {"url": self._repo_url(repo), "name": repo_id, "id": hashlib.md5(repo_id.encode()).hexdigest()[:24]})

    def _delete_repo(self, h: _Handler, auth: _Token | None) -> None:
        body = h.json_body()
        repo_type = body.get("type") or "model"
        namespace = body.get("organization") or (auth.user if auth else "")
        repo = self._get_repo(repo_type, f"{namespace}/{body.get('name')}", auth)
        self._require_write(repo, auth)
        del self._repos[(repo.repo_type, repo.repo_id)]
        return h.send_bytes(200, b"")

    def _settings(self, h: _Handler, repo_type: str, repo_id: str, auth: _Token | None) -> None:
        repo = self._get_repo(repo_type, repo_id, auth)
        self._require_write(repo, auth)
        body = h.json_body()
        if "visibility" in body:
            repo.private = body["visibility"] == "private"
        if "private" in body:
            repo.private = bool(body["private"])
        if "gated" in body:
            repo.gated = body["gated"]
        return h.send_json(200, {})

    def _list_repos(self, h: _Handler, repo_type: str, query: dict, auth: _Token | None) -> None:
        author = (query.get("author") or [None])[0]
        search = (query.get("search") or [None])[0]
        limit = int((query.get("limit") or [0])[0] or 0)
        out = []
        for (t, rid), repo in sorted(self._repos.items()):
            if t != repo_type or not self._can_read(repo, auth):
                continue
            if author and repo.namespace != author:
                continue
            if search and search.lower() not in rid.lower():
                continue
            out.append(self._info_dict(repo, repo.branches["main"], blobs=False, full=False))
        return h.send_json(200, out[:limit] if limit else out)

    # ---------------------------------------------------------------- repo info / tree
    def _info_dict(self, repo: _Repo, oid: str, *, blobs: bool, full: bool = True) -> dict:
        commit = repo.commits[oid]
        siblings = []
        for path in sorted(commit.files):
            entry = commit.files[path]
            s: dict[str, Any] = {"rfilename": path}
            if blobs:
                s["size"] = entry.size
                s["blobId"] = entry.blob_oid
                if entry.is_lfs:
                    s["lfs"] = {"size": entry.size, "sha256": entry.lfs_sha256, "pointerSize": entry.pointer_size}
            siblings.append(s)
        info: dict[str, Any] = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.namespace,
            "sha": oid,
            "lastModified": _iso(commit.created_at),
            "createdAt": _iso(repo.created_at),
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        if repo.repo_type == "space":
            info["sdk"] = repo.sdk
        if full:
            info["siblings"] = siblings
            info["usedStorage"] = sum(e.size for e in commit.files.values())
            readme = commit.files.get("README.md")
            if readme is not None and readme.content is not None:
                card, _ = _card_data(readme.content.decode("utf-8", "replace"))
                if card:
                    info["cardData"] = card
                    tags = card.get("tags") or []
                    tags = [tags] if isinstance(tags, str) else list(tags)
                    if card.get("library_name"):
                        info["library_name"] = card["library_name"]
                        tags = [card["library_name"]] + tags
                    if card.get("pipeline_tag"):
                        info["pipeline_tag"] = card["pipeline_tag"]
                    info["tags"] = [str(t) for t in tags]
        return info

    def _repo_info(self, h: _Handler, repo_type: str, repo_id: str, rev: str, query: dict, auth: _Token | None) -> None:
        repo = self._get_repo(repo_type, repo_id, auth)
        oid = self._rev_or_404(repo, rev)
        blobs = (query.get("blobs") or ["false"])[0].lower() in ("true", "1")
        return h.send_json(200, self._info_dict(repo, oid, blobs=blobs))

    @staticmethod
    def _file_json(path: str, entry: FileEntry) -> dict:
        d: dict[str, Any] = {"type": "file", "oid": entry.blob_oid, "size": entry.size, "path": path}
        if entry.is_lfs:
            d["lfs"] = {"oid": entry.lfs_sha256, "size": entry.size, "pointerSize": entry.pointer_size}
        return d

    def _dir_json(self, files: dict[str, FileEntry], path: str) -> dict:
        return {"type": "directory", "oid": self._tree_oid(files, path), "size": 0, "path": path}

    def _tree(
        self, h: _Handler, repo_type: str, repo_id: str, rev: str, path: str, query: dict, auth: _Token | None
    ) -> None:
        repo = self._get_repo(repo_type, repo_id, auth)
        oid = self._rev_or_404(repo, rev)
        files = repo.commits[oid].files
        recursive = (query.get("recursive") or ["false"])[0].lower() in ("true", "1")
        path = path.strip("/")
        prefix = path + "/" if path else ""
        under = {p: e for p, e in files.items() if p.startswith(prefix)}
        if path and not under:
            raise _HttpError(404, f"{path} does not exist on {rev}", code="EntryNotFound",
                             headers={"X-Repo-Commit": oid})
        dirs: set[str] = set()
        out = []
        for p in sorted(under):
            rel = p[len(prefix):]
            parts = rel.split("/")
            if recursive:
                for i in range(1, len(parts)):
                    dirs.add(prefix + "/".join(parts[:i]))
                out.append(self._file_json(p, under[p]))
            elif len(parts) == 1:
                out.append(self._file_json(p, under[p]))
            else:
                dirs.add(prefix + parts[0])
        out = [self._dir_json(files, d) for d in sorted(dirs)] + out
        return h.send_json(200, out)

    def _paths_info(self, h: _Handler, repo_type: str, repo_id: str, rev: str, auth: _Token | None) -> None:
        repo = self._get_repo(repo_type, repo_id, auth)
        files = repo.commits[self._rev_or_404(repo, rev)].files
        ctype = h.headers.get("Content-Type", "")
        if "json" in ctype:
            paths = h.json_body().get("paths", [])
        else:
            paths = parse_qs(h.body.decode(), keep_blank_values=True).get("paths", [])
        out = []
        for p in paths:
            p = p.strip("/")
            if p in files:
                out.append(self._file_json(p, files[p]))
            elif any(f.startswith(p + "/") for f in files):
                out.append(self._dir_json(files, p))
        return h.send_json(200, out)

    def _list_commits(self, h: _Handler, repo_type: str, repo_id: str, rev: str, auth: _Token | None) -> None:
        repo = self._get_repo(repo_type, repo_id, auth)
        oid: str | None = self._rev_or_404(repo, rev)
        out = []
        while oid is not None:
            c = repo.commits[oid]
            out.append({"id": c.oid, "title": c.title, "message": c.description,
                        "authors": [{"user": c.author}], "date": _iso(c.created_at)})
            oid = c.parent
        return h.send_json(200, out)

    def _list_refs(self, h: _Handler, repo_type: str, repo_id: str, query: dict, auth: _Token | None) -> None:
        repo = self._get_repo(repo_type, repo_id, auth)
        data: dict[str, Any] = {
            "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": o} for b, o in sorted(repo.branches.items())],
            "converts": [],
            "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": o} for t, o in sorted(repo.tags.items())],
        }
        if (query.get("include_prs") or ["0"])[0] in ("1", "true", "True"):
            data["pullRequests"] = [{"name": r, "ref": r, "targetCommit": o} for r, o in sorted(repo.pr_refs.items())]
        return h.send_json(200, data)

    def _branch(self, h: _Handler, repo_type: str, repo_id: str, branch: str, auth: _Token | None) -> None:
        repo = self._get_repo(repo_type, repo_id, auth)
        self._require_write(repo, auth)
        if h.command == "DELETE":
            if branch not in repo.branches:
                raise _revision_not_found(branch)
            if branch == "main":
                raise _HttpError(403, "Cannot delete the default branch")
            del repo.branches[branch]
            return h.send_json(200, {})
        if branch in repo.branches:
            raise _HttpError(409, f"Reference already exists: refs/heads/{branch}")
        start = (h.json_body() or {}).get("startingPoint") or "main"
        repo.branches[branch] = self._rev_or_404(repo, start)
        return h.send_json(200, {})

    def _tag(self, h: _Handler, repo_type: str, repo_id: str, rev_or_tag: str, auth: _Token | None) -> None:
        repo = self._get_repo(repo_type, repo_id, auth)
        self._require_write(repo, auth)
        if h.command == "DELETE":
            if rev_or_tag not in repo.tags:
                raise _revision_not_found(rev_or_tag)
            del repo.tags[rev_or_tag]
            return h.send_json(200, {})
        tag = h.json_body().get("tag")
        if not tag:
            raise _HttpError(400, "Missing tag")
        if tag in repo.tags:
            raise _HttpError(409, f"Tag already exists: {tag}")
        repo.tags[tag] = self._rev_or_404(repo, rev_or_tag)
        return h.send_json(200, {})

    # ---------------------------------------------------------------- upload path
    def _preupload(self, h: _Handler, repo_type: str, repo_id: str, rev: str, query: dict, auth: _Token | None) -> None:
        repo = self._get_repo(repo_type, repo_id, auth)
        create_pr = (query.get("create_pr") or ["0"])[0] in ("1", "true")
        self._require_write(repo, auth, allow_pr=create_pr)
        oid = self._rev_or_404(repo, rev)
        snapshot = repo.commits[oid].files
        body = h.json_body()
        gitignore = body.get("gitIgnore")
        if gitignore is None and ".gitignore" in snapshot:
            gitignore = self._content(repo, snapshot[".gitignore"]).decode("utf-8", "replace")
        out = []
        for f in body.get("files", []):
            path, size = f.get("path"), int(f.get("size", 0))
            try:
                sample = base64.b64decode(f.get("sample", ""))
            except Exception:  # noqa: BLE001
                raise _HttpError(400, f"Invalid sample for {path}") from None
            mode = "lfs" if self._should_use_lfs(snapshot, path, size, sample) else "regular"
            item: dict[str, Any] = {"path": path, "uploadMode": mode,
                                    "shouldIgnore": bool(gitignore) and _gitignored(gitignore, path)}
            existing = snapshot.get(path)
            if existing is not None:  # the client compares this with sha256 (lfs) or git-sha1 (regular)
                item["oid"] = existing.lfs_sha256 if existing.is_lfs else existing.blob_oid
            out.append(item)
        return h.send_json(200, {"files": out, "commitOid": oid})

    def _lfs_endpoint(self, h: _Handler, repo_type: str, repo_id: str, action: str, auth: _Token | None) -> None:
        repo = self._get_repo(repo_type, repo_id, auth)
        lfs_headers = {"Content-Type": "application/vnd.git-lfs+json"}
        if action == "batch" and h.command == "POST":
            body = h.json_body()
            operation = body.get("operation")
            if operation == "upload":
                # The Hub checks write access against `ref` when given; PR uploads send no ref.
                self._require_write(repo, auth, allow_pr="ref" not in body)
            objects = []
            for obj in body.get("objects", []):
                oid, size = obj.get("oid"), obj.get("size")
                if not isinstance(oid, str) or not _SHA256_RE.match(oid) or not isinstance(size, int):
                    objects.append({"oid": str(oid), "size": size if isinstance(size, int) else 0,
                                    "error": {"code": 422, "message": "Invalid oid or size"}})
                    continue
                if operation == "download":
                    if oid not in repo.lfs:
                        objects.append({"oid": oid, "size": size, "error": {"code": 404, "message": "Object does not exist"}})
                    else:
                        objects.append({"oid": oid, "size": size, "authenticated": True,
                                        "actions": {"download": {"href": self._cdn_url(repo, oid)}}})
                    continue
                if oid in repo.lfs and len(repo.lfs[oid]) == size:
                    objects.append({"oid": oid, "size": size})  # already there: no actions
                    continue
                objects.append({"oid": oid, "size": size, "authenticated": True,
                                "actions": self._upload_actions(repo, oid, size)})
            transfer = "multipart" if self.multipart_chunk_size and "multipart" in body.get("transfers", []) else "basic"
            return h.send_bytes(200, json.dumps({"transfer": transfer, "objects": objects, "hash_algo": "sha256"}).encode(),
                                content_type="application/vnd.git-lfs+json")
        if action == "verify" and h.command == "POST":
            body = h.json_body()
            oid, size = body.get("oid"), body.get("size")
            if oid not in repo.lfs:
                raise _HttpError(404, f"Object {oid} not found", headers=lfs_headers)
            if size is not None and len(repo.lfs[oid]) != size:
                raise _HttpError(422, f"Object {oid} has size {len(repo.lfs[oid])}, not {size}", headers=lfs_headers)
            return h.send_json(200, {"success": True}, headers=lfs_headers)
        raise _HttpError(404, f"Not Found: {h.command} {h.path}")

    def _upload_actions(self, repo: _Repo, oid: str, size: int) -> dict:
        upload_id = secrets.token_urlsafe(16)
        self._uploads[upload_id] = ((repo.repo_type, repo.repo_id), oid, size)
        base = f"{self.endpoint}/__lfs__/{upload_id}"
        verify = {"href": f"{self._repo_url(repo)}.git/info/lfs/objects/verify"}
        chunk = self.multipart_chunk_size
        if chunk and size > chunk:
            n = -(-size // chunk)
            header = {"chunk_size": str(chunk), **{str(i): f"{base}/part/{i}" for i in range(1, n + 1)}}
            return {"upload": {"href": f"{base}/complete", "header": header}, "verify": verify}
        return {"upload": {"href": base}, "verify": verify}

    def _cdn_url(self, repo: _Repo, sha: str) -> str:
        link = secrets.token_urlsafe(16)
        self._cdn_links[link] = ((repo.repo_type, repo.repo_id), sha)
        return f"http://{self.cdn_host}:{self._port}/__cdn__/{link}"

    def _lfs_storage(self, h: _Handler, segs: list[str]) -> None:
        """Unauthenticated "S3" endpoints referenced by the LFS batch answer."""
        if not segs or segs[0] not in self._uploads:
            raise _HttpError(403, "Invalid or expired upload URL")
        repo_key, oid, size = self._uploads[segs[0]]
        repo = self._repos.get(repo_key)
        if repo is None:
            raise _HttpError(404, "Repository is gone")
        if len(segs) == 1 and h.command == "PUT":
            return self._store_lfs(h, repo, oid, size, h.body)
        if len(segs) == 3 and segs[1] == "part" and h.command == "PUT":
            self._parts[(segs[0], int(segs[2]))] = h.body
            return h.send_bytes(200, b"", headers={"ETag": f'"{hashlib.md5(h.body).hexdigest()}"'})
        if len(segs) == 2 and segs[1] == "complete" and h.command == "POST":
            body = h.json_body()
            if body.get("oid") != oid:
                raise _HttpError(400, "oid mismatch in completion payload")
            data = b""
            for part in sorted(body.get("parts", []), key=lambda p: p["partNumber"]):
                chunk = self._parts.get((segs[0], part["partNumber"]))
                if chunk is None or f'"{hashlib.md5(chunk).hexdigest()}"' != part.get("etag"):
                    raise _HttpError(400, f"Missing or mismatching part {part['partNumber']}")
                data += chunk
            return self._store_lfs(h, repo, oid, size, data)
        raise _HttpError(404, "Not Found")

    def _store_lfs(self, h: _Handler, repo: _Repo, oid: str, size: int, data: bytes) -> None:
        if len(data) != size:
            raise _HttpError(400, f"Size mismatch: expected {size} bytes, got {len(data)}")
        if hashlib.sha256(data).hexdigest() != oid:
            raise _HttpError(400, "sha256 mismatch: uploaded content does not match the oid")
        repo.lfs[oid] = data
        return h.send_bytes(200, b"", headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    def _commit(self, h: _Handler, repo_type: str, repo_id: str, rev: str, query: dict, auth: _Token | None) -> None:
        repo = self._get_repo(repo_type, repo_id, auth)
        create_pr = (query.get("create_pr") or ["0"])[0] in ("1", "true")
        pushing_to_pr = rev in repo.pr_refs
        self._require_write(repo, auth, allow_pr=create_pr or pushing_to_pr)
        assert auth is not None
        if pushing_to_pr and auth.user not in self._owners(repo.namespace):
            pr = next(p for p in repo.prs.values() if p.ref == rev)
            if pr.author != auth.user:
                raise _HttpError(403, "Only the PR author or the repo owners can push to this PR")
        if rev not in repo.branches and not pushing_to_pr and not (rev.startswith("refs/heads/") and rev[11:] in repo.branches):
            if self._resolve_rev(repo, rev) is not None:
                raise _HttpError(400, f"Invalid rev id: {rev} is not a branch")
            raise _revision_not_found(rev)
        base_oid = self._resolve_rev(repo, rev)
        assert base_oid is not None

        # Parse the whole NDJSON payload first: nothing is applied unless everything is valid.
        header: dict | None = None
        ops: list[tuple[str, dict]] = []
        for n, line in enumerate(h.body.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError):
                raise _HttpError(400, f"Invalid NDJSON line {n}") from None
            if key == "header":
                header = value
            elif key in ("file", "lfsFile", "deletedFile", "deletedFolder"):
                ops.append((key, value))
            else:
                raise _HttpError(400, f"Unknown key {key!r} on line {n}")
        if header is None or not isinstance(header.get("summary"), str) or not header["summary"].strip():
            raise _HttpError(400, "Missing commit header or summary")
        parent = header.get("parentCommit")
        if parent is not None and parent != base_oid:
            raise _HttpError(412, "A commit has happened since. Please refresh and try again.")

        snapshot = dict(repo.commits[base_oid].files)
        for key, value in ops:
            path = value.get("path")
            if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/") \
                    or path.split("/")[0] == ".git":
                raise _HttpError(400, f"Invalid path: {path!r}")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    content = str(value.get("content", "")).encode()
                else:
                    try:
                        content = base64.b64decode(value.get("content", ""), validate=True)
                    except ValueError:
                        raise _HttpError(400, f"Invalid base64 content for {path}") from None
                snapshot[path] = FileEntry.regular(content)
            elif key == "lfsFile":
                oid = value.get("oid")
                if value.get("algo", "sha256") != "sha256" or oid not in repo.lfs:
                    raise _HttpError(400, f"LFS object {oid} for {path} was not uploaded: push rejected")
                size = value.get("size", len(repo.lfs[oid]))
                if size != len(repo.lfs[oid]):
                    raise _HttpError(400, f"LFS object {oid} for {path} has a different size")
                snapshot[path] = FileEntry.lfs(oid, size)
            elif key == "deletedFile":
                if path not in snapshot:
                    raise _HttpError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                del snapshot[path]
            else:  # deletedFolder
                folder = path.rstrip("/")
                doomed = [p for p in snapshot if p.startswith(folder + "/")]
                if not doomed:
                    raise _HttpError(404, f"A folder with this name doesn't exist: {folder}", code="EntryNotFound")
                for p in doomed:
                    del snapshot[p]

        # Apply atomically (we hold the hub lock for the whole request).
        summary = header["summary"]
        description = header.get("description") or ""
        commit = self._make_commit(repo, base_oid, snapshot, summary, description, auth.user)
        result: dict[str, Any] = {"success": True, "commitOid": commit.oid, "hookOutput": ""}
        if create_pr:
            num = repo.next_discussion
            repo.next_discussion += 1
            ref = f"refs/pr/{num}"
            repo.pr_refs[ref] = commit.oid
            base_branch = rev.removeprefix("refs/heads/")
            repo.prs[num] = PullRequest(num=num, title=summary, author=auth.user, ref=ref, base=base_branch)
            result["pullRequestUrl"] = f"{self._repo_url(repo)}/discussions/{num}"
        else:
            self._move_ref(repo, rev, commit.oid)
        result["commitUrl"] = f"{self._repo_url(repo)}/commit/{commit.oid}"
        return h.send_json(200, result)

    # ---------------------------------------------------------------- downloads
    def _resolve(self, h: _Handler, repo_type: str, repo_id: str, rest: list[str], auth: _Token | None) -> None:
        if h.command not in ("GET", "HEAD"):
            raise _HttpError(405, "Method not allowed")
        repo = self._get_repo(repo_type, repo_id, auth)
        rev_raw, path_parts = unquote(rest[0]), rest[1:]
        # Tolerate unquoted "refs/pr/N" / "refs/heads/x" revisions.
        if rev_raw == "refs" and len(path_parts) >= 2 and path_parts[0] in ("pr", "heads", "tags", "convert"):
            rev_raw = f"refs/{path_parts[0]}/{unquote(path_parts[1])}"
            path_parts = path_parts[2:]
        oid = self._rev_or_404(repo, rev_raw)
        path = "/".join(unquote(p) for p in path_parts)
        entry = repo.commits[oid].files.get(path)
        if entry is None:
            raise _HttpError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": oid})
        headers = {"X-Repo-Commit": oid, "ETag": f'"{entry.blob_oid}"', "Accept-Ranges": "bytes",
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}"}
        if entry.is_lfs:
            headers["X-Linked-Etag"] = f'"{entry.lfs_sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
            if self.lfs_redirect:
                headers["Location"] = self._cdn_url(repo, entry.lfs_sha256)  # type: ignore[arg-type]
                return h.send_bytes(302, b"", headers=headers, content_type="text/plain; charset=utf-8")
        return self._send_file_bytes(h, self._content(repo, entry), headers)

    @staticmethod
    def _send_file_bytes(h: _Handler, data: bytes, headers: dict[str, str]) -> None:
        rng = h.headers.get("Range")
        if h.command == "GET" and rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if m and (m.group(1) or m.group(2)):
                total = len(data)
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), total - 1) if m.group(2) else total - 1
                else:
                    start, end = max(total - int(m.group(2)), 0), total - 1
                if start >= total or start > end:
                    return h.send_bytes(416, b"", headers={**headers, "Content-Range": f"bytes */{total}"})
                return h.send_bytes(206, data[start:end + 1], content_type="application/octet-stream",
                                    headers={**headers, "Content-Range": f"bytes {start}-{end}/{total}"})
        return h.send_bytes(200, data, content_type="application/octet-stream", headers=headers,
                            content_length=len(data))

    # ---------------------------------------------------------------- client-side helper
    @staticmethod
    def patch_client_retries(monkeypatch: Any) -> None:
        """Make huggingface_hub's retry back-off (1s, 2s, 4s, 8s, 8s) and download-resume sleeps instant."""
        import huggingface_hub.file_download as _fd
        from huggingface_hub.utils import _http

        monkeypatch.setattr(_http, "time", _NoSleepTime())
        monkeypatch.setattr(_fd, "time", _NoSleepTime())


if __name__ == "__main__":  # pragma: no cover - manual use: python tests/hub_server.py
    import sys

    with LocalHub(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0) as hub:
        hub.add_token("hf_write_alice", "alice")
        hub.add_token("hf_read_alice", "alice", write=False)
        hub.add_token("hf_write_bob", "bob")
        print(f"LocalHub on {hub.endpoint} (tokens: hf_write_alice, hf_read_alice, hf_write_bob)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
