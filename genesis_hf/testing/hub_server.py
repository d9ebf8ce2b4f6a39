"""A local stand-in for the Hugging Face Hub: the part of its HTTP API that `huggingface_hub` and `from_pretrained` use.

Tests (and the playground's tests) run the real `huggingface_hub` client against it, so uploads, branches and
downloads by revision are exercised end to end without a network. Repositories live in memory: every commit is a
full snapshot `{path: blob}`, branches point at commits, and files are served by `/resolve/` with the headers the
client's download path needs (`ETag`, `X-Repo-Commit`, `Content-Length`, HEAD and `Range` support).

Failures are injected per request pattern: an HTTP error (500 by default), a dropped connection (the socket is closed
without a response), or a stall (the request waits, then proceeds, also at once on `FailureRule.release()`); `skip`
makes it hit the Nth matching request.

```python
>>> server = HubServer().start()
>>> api = HfApi(endpoint=server.endpoint, token=server.write_token)
>>> server.add_failure(r"POST /api/models/.*/commit/", action="drop", times=2)
>>> ...
>>> server.stop()
```

Covered endpoints (models, datasets and spaces alike): `GET /api/whoami-v2`, `POST /api/validate-yaml`,
`POST /api/repos/create`, `DELETE /api/repos/delete`, `GET /api/{type}s/{repo}[/revision/{rev}]`,
`POST|DELETE /api/{type}s/{repo}/branch/{branch}` (`startingPoint`: a branch, tag or commit id),
`GET /api/{type}s/{repo}/refs`, `POST /api/{type}s/{repo}/preupload/{rev}`, `POST /api/{type}s/{repo}/commit/{rev}`
(NDJSON: `file`, `lfsFile`, `deletedFile`, `deletedFolder`; header `parentCommit`, 412 when the branch moved),
`GET /api/{type}s/{repo}/tree/{rev}[/{path}]`, `GET /api/{type}s/{repo}/commits/{rev}`,
`POST /api/{type}s/{repo}/paths-info/{rev}`, the LFS batch API (`POST /{repo}.git/info/lfs/objects/batch`, basic
transfer, verify), and `GET|HEAD /{repo}/resolve/{rev}/{path}`. Xet is never offered: a client with `hf_xet` installed
must run with `HF_HUB_DISABLE_XET=1` (see `client_env`) when files go through LFS.

Run it on its own with `python -m genesis_hf.testing.hub_server --port 8765`; it prints the endpoint and the tokens.
"""

import argparse
import base64
import contextlib
import dataclasses
import hashlib
import json
import re
import secrets
import socket
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

REPO_TYPES = ("model", "dataset", "space")
# URL prefix of a repo's web routes (`/resolve/`, `.git/`): models have none.
_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.gguf filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob, which is what the Hub reports as the oid (and ETag) of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclasses.dataclass(frozen=True)
class Blob:
    """File content with its ids; `lfs` files are reported and served the way the Hub serves LFS files."""

    content: bytes
    lfs: bool = False

    @property
    def size(self) -> int:
        return len(self.content)

    @property
    def git_oid(self) -> str:
        return git_blob_oid(self.content)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid


@dataclasses.dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, Blob]
    title: str
    message: str
    author: str
    date: str


@dataclasses.dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    commits: dict[str, Commit] = dataclasses.field(default_factory=dict)
    branches: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    created_at: str = ""

    def resolve(self, revision: str) -> Commit | None:
        """The commit a branch, tag or full commit id points at, or `None`."""
        oid = self.branches.get(revision) or self.tags.get(revision)
        if oid is None and revision in self.commits:
            oid = revision
        return self.commits.get(oid) if oid else None


@dataclasses.dataclass
class FailureRule:
    """Make requests whose `"METHOD /path?query"` matches `pattern` fail.

    Args:
        pattern: regular expression searched in `"METHOD /path?query"` (path still URL-quoted).
        action: `"error"` (answer `status`), `"drop"` (close the socket without answering) or `"stall"` (wait `delay`
            seconds, or until `release()`, then handle the request normally).
        status: HTTP status of `"error"`.
        times: how many matching requests fail (after the skipped ones).
        skip: let this many matching requests through first, so that `skip=2` fails the third one.
        delay: seconds a `"stall"` waits.
    """

    pattern: str
    action: str = "error"
    status: int = 500
    times: int = 1
    skip: int = 0
    delay: float = 2.0
    hits: int = 0

    def __post_init__(self) -> None:
        if self.action not in ("error", "drop", "stall"):
            raise ValueError(f"FailureRule.action={self.action!r}; use 'error', 'drop' or 'stall'.")
        self._regex = re.compile(self.pattern)
        self._released = threading.Event()

    def release(self) -> None:
        """Let the requests this rule stalls proceed now (and later ones pass without waiting)."""
        self._released.set()

    def take(self, request_line: str) -> bool:
        """Count a request against the rule; `True` when this one must fail."""
        if not self._regex.search(request_line):
            return False
        self.hits += 1
        return self.skip < self.hits <= self.skip + self.times


@dataclasses.dataclass
class RequestRecord:
    method: str
    path: str
    status: int | None = None
    injected: str | None = None
    started: float = 0.0


class HubError(Exception):
    """An HTTP error answer, with the Hub's `X-Error-Code`/`X-Error-Message` headers."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict | None = None,
        extra: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class HubServer:
    """An in-memory Hub on `127.0.0.1`, served from a background thread.

    Args:
        users: user name -> the organisations it belongs to.
        tokens: token -> `(user, role)`, role `"write"` or `"read"` (what `whoami-v2` reports as
            `auth.accessToken.role`). By default `alice` (member of `genesis-org`) has a write token and a read token,
            exposed as `write_token` and `read_token`.
        lfs_threshold: files of at least this many bytes go through LFS (preupload answers `"lfs"`); `None` sends
            every file inline in the commit as `"regular"`, which needs no Xet setting on the client.
        port: the port, 0 for a free one.
    """

    def __init__(
        self,
        users: dict[str, list[str]] | None = None,
        tokens: dict[str, tuple[str, str]] | None = None,
        lfs_threshold: int | None = None,
        port: int = 0,
    ) -> None:
        self.users = users if users is not None else {"alice": ["genesis-org"]}
        if tokens is None:
            first_user = next(iter(self.users))
            tokens = {
                f"hf_write_{secrets.token_hex(8)}": (first_user, "write"),
                f"hf_read_{secrets.token_hex(8)}": (first_user, "read"),
            }
        self.tokens = tokens
        self.lfs_threshold = lfs_threshold
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[RequestRecord] = []
        self.failures: list[FailureRule] = []
        self._lfs_objects: dict[str, bytes] = {}
        self._lfs_secret = secrets.token_hex(8)
        self._lock = threading.RLock()
        self._commit_counter = 0
        self._port = port
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -----------------------------------------------------------------------------------------------------------------
    # Lifecycle

    def start(self) -> "HubServer":
        """Bind and serve in a daemon thread; returns `self`."""
        server = self

        class Handler(_HubRequestHandler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; stalled requests are released."""
        with self._lock:
            for rule in self.failures:
                rule.release()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("HubServer is not running; call start() first.")
        return self._httpd.server_address[1]

    @property
    def endpoint(self) -> str:
        """The URL to use as `HF_ENDPOINT` (or `HfApi(endpoint=...)`)."""
        return f"http://127.0.0.1:{self.port}"

    def token_for(self, role: str, user: str | None = None) -> str:
        for token, (token_user, token_role) in self.tokens.items():
            if token_role == role and (user is None or token_user == user):
                return token
        raise KeyError(f"No {role} token for user {user!r} in HubServer.tokens.")

    @property
    def write_token(self) -> str:
        return self.token_for("write")

    @property
    def read_token(self) -> str:
        return self.token_for("read")

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment variables that point a fresh `huggingface_hub`/`transformers` process at this server."""
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            **extra,
        }

    # -----------------------------------------------------------------------------------------------------------------
    # Failure injection and request log

    def add_failure(self, pattern: str, **kwargs) -> FailureRule:
        """Add a `FailureRule(pattern, **kwargs)`; see its arguments."""
        rule = FailureRule(pattern, **kwargs)
        with self._lock:
            self.failures.append(rule)
        return rule

    def fail_nth_request(self, n: int, action: str = "error", **kwargs) -> FailureRule:
        """Fail the `n`-th request from now on (1-based), whatever it is."""
        return self.add_failure(".", action=action, skip=n - 1, **kwargs)

    def clear_failures(self) -> None:
        """Inject no more failures; requests stalled by a rule proceed now."""
        with self._lock:
            for rule in self.failures:
                rule.release()
            self.failures.clear()

    def _injected_failure(self, request_line: str) -> FailureRule | None:
        # Every rule counts every request it matches (so `skip` means the same whatever the other rules do); the
        # first rule that fires decides.
        with self._lock:
            fired = [rule for rule in self.failures if rule.take(request_line)]
        return fired[0] if fired else None

    def requests_matching(self, pattern: str) -> list[RequestRecord]:
        regex = re.compile(pattern)
        with self._lock:
            return [record for record in self.requests if regex.search(f"{record.method} {record.path}")]

    def wait_for_request(self, pattern: str, timeout: float = 30.0) -> bool:
        """Wait until a request matching `pattern` has arrived (it may still be in progress)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.requests_matching(pattern):
                return True
            time.sleep(0.02)
        return False

    # -----------------------------------------------------------------------------------------------------------------
    # Direct access for test assertions

    def get_repo(self, repo_id: str, repo_type: str = "model") -> Repo | None:
        with self._lock:
            return self.repos.get((repo_type, repo_id))

    def branch_files(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """`{path: content}` at the head of `branch` (empty when the repo or branch does not exist)."""
        with self._lock:
            repo = self.repos.get((repo_type, repo_id))
            commit = repo.resolve(branch) if repo else None
            return {path: blob.content for path, blob in commit.files.items()} if commit else {}

    # -----------------------------------------------------------------------------------------------------------------
    # State changes (called with the lock held by the handler)

    def _new_commit(
        self, repo: Repo, parent: str | None, files: dict[str, Blob], title: str, message: str, author: str
    ):
        self._commit_counter += 1
        digest = hashlib.sha1(
            f"{repo.repo_id}|{parent}|{self._commit_counter}|{title}|".encode()
            + "|".join(f"{path}:{blob.git_oid}" for path, blob in sorted(files.items())).encode()
        ).hexdigest()
        commit = Commit(digest, parent, files, title, message, author, _now())
        repo.commits[digest] = commit
        return commit

    def _create_repo(self, repo_id: str, repo_type: str, private: bool, author: str) -> Repo:
        repo = Repo(repo_id=repo_id, repo_type=repo_type, private=private, created_at=_now())
        initial = self._new_commit(repo, None, {".gitattributes": Blob(_GITATTRIBUTES)}, "initial commit", "", author)
        repo.branches["main"] = initial.oid
        self.repos[(repo_type, repo_id)] = repo
        return repo


class _HubRequestHandler(BaseHTTPRequestHandler):
    """One request; the routes mirror the Hub's and the answers carry the fields `huggingface_hub` parses."""

    hub: HubServer
    protocol_version = "HTTP/1.1"
    server_version = "GenesisLocalHub/1.0"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature of the base class
        # Quiet by default: the request log is `HubServer.requests`.
        return

    # -----------------------------------------------------------------------------------------------------------------
    # Plumbing

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

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        record = RequestRecord(method=method, path=self.path, started=time.monotonic())
        with hub._lock:
            hub.requests.append(record)
        body = self._read_body()
        rule = hub._injected_failure(f"{method} {self.path}")
        if rule is not None:
            record.injected = rule.action
            if rule.action == "drop":
                self._drop_connection()
                return
            if rule.action == "error":
                record.status = rule.status
                self._send_json({"error": f"Injected failure ({rule.status})"}, status=rule.status)
                return
            rule._released.wait(rule.delay)
        try:
            status = self._route(method, body)
        except HubError as error:
            # Recorded before answering: the client may be gone (killed mid-request), the answer was decided anyway.
            record.status = error.status
            headers = dict(error.headers)
            if error.code:
                headers["X-Error-Code"] = error.code
            headers["X-Error-Message"] = error.message
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._send_json({"error": error.message, **error.extra}, status=error.status, headers=headers)
            return
        except (BrokenPipeError, ConnectionResetError):
            status = None
        record.status = status

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return b""

    def _drop_connection(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.connection.close()

    def _send(self, status: int, body: bytes, headers: dict | None = None, content_type: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, str(value))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return status

    def _send_json(self, payload, status: int = 200, headers: dict | None = None) -> int:
        return self._send(status, json.dumps(payload).encode(), headers)

    def _json_body(self, body: bytes):
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Invalid JSON body: {error}") from None

    # -----------------------------------------------------------------------------------------------------------------
    # Auth

    def _caller(self) -> tuple[str, str] | None:
        """`(user, role)` of the bearer token, `None` without one; an unknown token is a 401 as on the Hub."""
        header = self.headers.get("Authorization")
        if not header:
            return None
        token = header.removeprefix("Bearer ").strip()
        if token not in self.hub.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.hub.tokens[token]

    def _namespaces(self, user: str) -> set[str]:
        return {user, *self.hub.users.get(user, [])}

    def _check_write(self, namespace: str) -> str:
        caller = self._caller()
        if caller is None:
            raise HubError(401, "You must be authenticated to write to the Hub: pass a token.")
        user, role = caller
        if role != "write":
            raise HubError(403, "You have read access but not the required permissions for this operation")
        if namespace not in self._namespaces(user):
            raise HubError(403, f"You don't have the rights to create a repo under the namespace {namespace!r}")
        return user

    def _repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo:
        repo = self.hub.repos.get((repo_type, repo_id))
        if write:
            self._check_write(repo_id.split("/")[0])
        if repo is not None and repo.private and not write:
            caller = self._caller()
            if caller is None or repo_id.split("/")[0] not in self._namespaces(caller[0]):
                repo = None
        if repo is None:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return commit

    # -----------------------------------------------------------------------------------------------------------------
    # Routing

    def _route(self, method: str, body: bytes) -> int:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        parts = [unquote(part) for part in url.path.split("/")[1:]]
        with self.hub._lock:
            if parts[:1] == ["api"]:
                return self._route_api(method, parts[1:], body)
            if parts[:1] == ["lfs-upload"] and method == "PUT" and len(parts) == 3:
                return self._lfs_put(parts[1], parts[2], body)
            if parts[:1] == ["lfs-verify"] and method == "POST":
                return self._lfs_verify(body)
            return self._route_web(method, parts, body)

    def _route_api(self, method: str, parts: list[str], body: bytes) -> int:
        if parts == ["whoami-v2"] and method == "GET":
            return self._whoami()
        if parts == ["validate-yaml"] and method == "POST":
            return self._send_json({"errors": [], "warnings": []})
        if parts == ["repos", "create"] and method == "POST":
            return self._create_repo(self._json_body(body))
        if parts == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo(self._json_body(body))
        if len(parts) >= 3 and parts[0].endswith("s") and parts[0][:-1] in REPO_TYPES:
            repo_type, repo_id, rest = parts[0][:-1], f"{parts[1]}/{parts[2]}", parts[3:]
            if not rest and method == "GET":
                return self._repo_info(repo_type, repo_id, "main")
            action, args = rest[0] if rest else "", rest[1:]
            if action == "revision" and args and method == "GET":
                return self._repo_info(repo_type, repo_id, "/".join(args))
            if action == "branch" and args and method in ("POST", "DELETE"):
                return self._branch(method, repo_type, repo_id, "/".join(args), body)
            if action == "refs" and method == "GET":
                return self._refs(repo_type, repo_id)
            if action == "preupload" and args and method == "POST":
                return self._preupload(repo_type, repo_id, args[0], body)
            if action == "commit" and args and method == "POST":
                return self._create_commit(repo_type, repo_id, args[0], body)
            if action == "tree" and args and method == "GET":
                return self._tree(repo_type, repo_id, args[0], "/".join(args[1:]))
            if action == "commits" and args and method == "GET":
                return self._commits(repo_type, repo_id, args[0])
            if action == "paths-info" and args and method == "POST":
                return self._paths_info(repo_type, repo_id, args[0], body)
        raise HubError(404, f"The local Hub server does not implement {method} {self.path}")

    def _route_web(self, method: str, parts: list[str], body: bytes) -> int:
        repo_type = "model"
        if parts and parts[0] in ("datasets", "spaces"):
            repo_type, parts = parts[0][:-1], parts[1:]
        if len(parts) >= 3 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(repo_type, f"{parts[0]}/{parts[1][:-4]}", body)
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(repo_type, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        raise HubError(404, f"The local Hub server does not implement {method} {self.path}")

    # -----------------------------------------------------------------------------------------------------------------
    # Endpoints

    def _whoami(self) -> int:
        caller = self._caller()
        if caller is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        user, role = caller
        return self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user.title(),
                "email": f"{user}@example.invalid",
                "canPay": False,
                "isPro": False,
                "orgs": [{"type": "org", "name": org, "fullname": org} for org in self.hub.users.get(user, [])],
                "auth": {"type": "access_token", "accessToken": {"displayName": f"{role} token", "role": role}},
            }
        )

    def _create_repo(self, payload: dict) -> int:
        name = payload.get("name")
        repo_type = payload.get("type") or "model"
        if not name or repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo name {name!r} or type {repo_type!r}")
        caller = self._caller()
        namespace = payload.get("organization") or (caller[0] if caller else None)
        if namespace is None:
            raise HubError(401, "You must be authenticated to create a repo: pass a token.")
        user = self._check_write(namespace)
        repo_id = f"{namespace}/{name}"
        url = f"{self._base_url()}/{_URL_PREFIXES[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.hub.repos:
            raise HubError(409, "You already created this model repo", extra={"url": url})
        private = payload.get("private")
        if payload.get("visibility") is not None:
            private = payload["visibility"] != "public"
        self.hub._create_repo(repo_id, repo_type, bool(private), user)
        return self._send_json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _delete_repo(self, payload: dict) -> int:
        repo_type = payload.get("type") or "model"
        caller = self._caller()
        namespace = payload.get("organization") or (caller[0] if caller else "")
        repo_id = f"{namespace}/{payload.get('name')}"
        self._repo(repo_type, repo_id, write=True)
        del self.hub.repos[(repo_type, repo_id)]
        return self._send_json({})

    def _base_url(self) -> str:
        return f"http://{self.headers.get('Host') or f'127.0.0.1:{self.hub.port}'}"

    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> int:
        repo = self._repo(repo_type, repo_id)
        commit = self._commit(repo, revision)
        return self._send_json(
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": [
                    {"rfilename": path, "size": blob.size, "blobId": blob.git_oid}
                    | ({"lfs": {"sha256": blob.sha256, "size": blob.size, "pointerSize": 134}} if blob.lfs else {})
                    for path, blob in sorted(commit.files.items())
                ],
            }
        )

    def _branch(self, method: str, repo_type: str, repo_id: str, branch: str, body: bytes) -> int:
        repo = self._repo(repo_type, repo_id, write=True)
        if method == "DELETE":
            if branch not in repo.branches or branch == "main":
                raise HubError(404 if branch != "main" else 403, f"Cannot delete branch {branch!r}")
            del repo.branches[branch]
            return self._send_json({})
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        starting_point = self._json_body(body).get("startingPoint") or "main"
        repo.branches[branch] = self._commit(repo, starting_point).oid
        return self._send_json({})

    def _refs(self, repo_type: str, repo_id: str) -> int:
        repo = self._repo(repo_type, repo_id)

        def refs(kind: str, names: dict[str, str]) -> list[dict]:
            return [{"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid} for name, oid in names.items()]

        return self._send_json(
            {
                "branches": refs("heads", repo.branches),
                "tags": refs("tags", repo.tags),
                "converts": [],
                "pullRequests": [],
            }
        )

    def _upload_mode(self, size: int) -> str:
        threshold = self.hub.lfs_threshold
        return "lfs" if threshold is not None and size > 0 and size >= threshold else "regular"

    def _preupload(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> int:
        repo = self._repo(repo_type, repo_id, write=True)
        commit = self._commit(repo, revision)
        answers = []
        for item in self._json_body(body).get("files", []):
            mode = self._upload_mode(int(item.get("size", 0)))
            existing = commit.files.get(item["path"])
            oid = None
            if existing is not None:
                oid = existing.sha256 if mode == "lfs" else existing.git_oid
            answers.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return self._send_json({"files": answers, "commitOid": commit.oid})

    def _create_commit(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> int:
        repo = self._repo(repo_type, repo_id, write=True)
        user = self._caller()[0]
        if self.query.get("create_pr"):
            raise HubError(400, "The local Hub server does not implement pull requests")
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch)", code="RevisionNotFound")
        head = repo.commits[repo.branches[revision]]
        files = dict(head.files)
        header: dict = {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                content = (
                    base64.b64decode(value["content"])
                    if value.get("encoding") == "base64"
                    else value["content"].encode()
                )
                files[value["path"]] = Blob(content)
            elif key == "lfsFile":
                content = self.hub._lfs_objects.get(value["oid"])
                if content is None:
                    raise HubError(400, f"LFS object {value['oid']} for {value['path']!r} was never uploaded")
                files[value["path"]] = Blob(content, lfs=True)
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", code="EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for path in [path for path in files if path.startswith(prefix)]:
                    del files[path]
            else:
                raise HubError(400, f"The local Hub server does not implement commit operation {key!r}")
        parent = header.get("parentCommit")
        if parent is not None and parent != head.oid:
            raise HubError(412, f"A commit has happened since {parent}: the head of {revision} is {head.oid}")
        commit = self.hub._new_commit(
            repo, head.oid, files, header.get("summary", ""), header.get("description", ""), user
        )
        repo.branches[revision] = commit.oid
        url_prefix = _URL_PREFIXES[repo_type]
        return self._send_json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._base_url()}/{url_prefix}{repo_id}/commit/{commit.oid}",
                "pullRequestUrl": None,
            }
        )

    def _path_entry(self, commit: Commit, path: str) -> dict:
        blob = commit.files.get(path)
        if blob is None:
            return {
                "type": "directory",
                "oid": hashlib.sha1(f"{commit.oid}:{path}".encode()).hexdigest(),
                "size": 0,
                "path": path,
            }
        entry = {"type": "file", "oid": blob.git_oid, "size": blob.size, "path": path}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": 134}
        return entry

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> int:
        repo = self._repo(repo_type, repo_id)
        commit = self._commit(repo, revision)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries: dict[str, dict] = {}
        for file_path in sorted(commit.files):
            if not file_path.startswith(prefix):
                continue
            pieces = file_path[len(prefix) :].split("/")
            depth = len(pieces) if recursive else 1
            for index in range(min(depth, len(pieces))):
                sub_path = prefix + "/".join(pieces[: index + 1])
                entries.setdefault(sub_path, self._path_entry(commit, sub_path))
        if prefix and not entries:
            raise HubError(404, f"Entry not found: {path}", code="EntryNotFound")
        return self._send_json(list(entries.values()))

    def _paths_info(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> int:
        repo = self._repo(repo_type, repo_id)
        commit = self._commit(repo, revision)
        form = parse_qs(body.decode())
        answers = []
        for path in form.get("paths", []):
            if path in commit.files or any(file_path.startswith(path.rstrip("/") + "/") for file_path in commit.files):
                answers.append(self._path_entry(commit, path))
        return self._send_json(answers)

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> int:
        repo = self._repo(repo_type, repo_id)
        commit = self._commit(repo, revision)
        history = []
        while commit is not None:
            history.append(
                {
                    "id": commit.oid,
                    "title": commit.title,
                    "message": commit.message,
                    "date": commit.date,
                    "authors": [{"user": commit.author}],
                }
            )
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return self._send_json(history)

    def _lfs_batch(self, repo_type: str, repo_id: str, body: bytes) -> int:
        self._repo(repo_type, repo_id, write=True)
        payload = self._json_body(body)
        objects = []
        for item in payload.get("objects", []):
            oid, size = item["oid"], int(item["size"])
            answer = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub._lfs_objects:
                answer["actions"] = {
                    "upload": {"href": f"{self._base_url()}/lfs-upload/{self.hub._lfs_secret}/{oid}"},
                    "verify": {"href": f"{self._base_url()}/lfs-verify"},
                }
            objects.append(answer)
        return self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_put(self, secret: str, oid: str, body: bytes) -> int:
        if secret != self.hub._lfs_secret:
            raise HubError(403, "Invalid LFS upload URL")
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match its sha256 {oid}")
        self.hub._lfs_objects[oid] = body
        return self._send(200, b"", content_type="text/plain")

    def _lfs_verify(self, body: bytes) -> int:
        payload = self._json_body(body)
        content = self.hub._lfs_objects.get(payload.get("oid"))
        if content is None or len(content) != payload.get("size"):
            raise HubError(404, f"LFS object {payload.get('oid')} not found")
        return self._send_json({})

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> int:
        repo = self._repo(repo_type, repo_id)
        commit = self._commit(repo, revision)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(
                404, f"Entry not found: {path}", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid}
            )
        headers = {
            "ETag": f'"{blob.git_oid}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
        }
        if blob.lfs:
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(blob.size)
        content, status = blob.content, 200
        byte_range = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if byte_range:
            start = int(byte_range.group(1))
            end = int(byte_range.group(2)) if byte_range.group(2) else blob.size - 1
            if start >= blob.size:
                raise HubError(
                    416,
                    f"Range {self.headers['Range']} outside a {blob.size}-byte file",
                    headers={"Content-Range": f"bytes */{blob.size}"},
                )
            content, status = blob.content[start : end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{start + len(content) - 1}/{blob.size}"
        return self._send(status, content, headers, content_type="application/octet-stream")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve an in-memory Hugging Face Hub API on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--lfs-threshold", type=int, default=None, help="Bytes from which files go through LFS.")
    args = parser.parse_args(argv)
    server = HubServer(port=args.port, lfs_threshold=args.lfs_threshold).start()
    print(json.dumps({"endpoint": server.endpoint, "tokens": server.tokens}), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()


__all__ = ["Blob", "Commit", "FailureRule", "HubError", "HubServer", "Repo", "RequestRecord", "git_blob_oid"]
