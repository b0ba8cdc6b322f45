"""A local stand-in for the few Hugging Face Hub HTTP endpoints that `push_results` (crma.ablation.output.publish)
reaches.

It serves only 127.0.0.1 on a free port, in a daemon thread, and implements exactly what the real
`huggingface_hub` 2.4 client sends for `whoami`, `create_repo` (and the `repo_info` it falls back to
on 401/403 with `exist_ok=True`) and `create_commit`:

- `GET  /api/whoami-v2`
- `POST /api/repos/create`                        -> 200 `{"url"}`, 409 when the repo exists
- `GET  /api/models/{repo_id}`                    -> 200 / 404 `X-Error-Code: RepoNotFound`
- `POST /api/validate-yaml`                       (README.md metadata check, done before hashing)
- `POST /api/models/{repo_id}/preupload/{rev}`    -> per file `uploadMode` "lfs" or "regular"
- `POST /{repo_id}.git/info/lfs/objects/batch`    -> basic-transfer upload + verify actions
- `PUT  /_lfs_storage/{oid}?X-Amz-Signature=...`  (the "S3" PUT: presigned, no Authorization header)
- `POST /{repo_id}.git/info/lfs/objects/verify`
- `POST /api/models/{repo_id}/commit/{rev}`       (NDJSON: header, `file` base64, `lfsFile` by sha256 oid)

and, for downloads (`hf_hub_download`, `snapshot_download`), the read routes:

- `GET  /api/models/{repo_id}[/revision/{rev}]`   -> `{"id", "private", "sha"}` (also read by `create_repo`)
- `GET  /api/models/{repo_id}/tree/{rev}[/{path}]` -> the files (`?recursive=true` for the whole tree)
- `GET  /api/models/{repo_id}/auth-check`         -> 200 when the request may read the repo's files
- `HEAD|GET /{repo_id}/resolve/{rev}/{path}`      -> the file with `ETag` and `X-Repo-Commit`; 404
  `X-Error-Code: EntryNotFound` for a missing file

Reads of a private repo need a token of its namespace (its user, or a member of its org); anonymous requests
read public repos, and a repo they may not read answers 401 `RepoNotFound`, as on the Hub. A gated repo's files
(and its auth-check) answer 401/403 `GatedRepo` to users who have not accepted its conditions. `add_repo()` puts a repo
with files in place.

Xet: with `hf_xet` installed the client uploads "lfs" files through the Xet protocol (a CAS service
this stand-in does not implement). Tests make the client take the plain LFS path with the supported
switch `HF_HUB_DISABLE_XET` — read into `huggingface_hub.constants.HF_HUB_DISABLE_XET` at import, so a
test sets that attribute (`monkeypatch.setattr`). Alternatively `HubStandIn(lfs=False)` answers
`uploadMode: "regular"` for every file, which never reaches the LFS/Xet code at all.

Every request is recorded (method, path, Authorization header). Repos, commits and file bytes live in
memory for assertions. Unknown tokens get 401 (with the Hub's "Invalid credentials in Authorization
header" error message); writes outside the token's namespaces get 403.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# The Hub stores as LFS what its default .gitattributes tracks, what looks binary, and anything over 10 MB.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".png", ".jpg", ".gguf", ".pkl")
LFS_SIZE = 10 * 1024 * 1024
WRITE_ROLES = ("admin", "write", "contributor")


@dataclass
class TokenInfo:
    """Who a token belongs to and what it may write.

    Args:
        user (`str`): the user name (their own namespace).
        orgs (`dict[str, str]`): organization name -> role in it (`admin`, `write`, `contributor`, `read`).
        role (`str`): `write`, `read` or `fineGrained` (as `whoami-v2` reports it).
        writable (`set[str] | None`): namespaces a `fineGrained` token may write; `None` means the user's own
            namespace plus the orgs where the role allows writing.
    """

    user: str
    orgs: dict[str, str] = field(default_factory=dict)
    role: str = "write"
    writable: set[str] | None = None

    def can_read(self, namespace: str) -> bool:
        return namespace == self.user or namespace in self.orgs

    def can_write(self, namespace: str) -> bool:
        if self.role == "read":
            return False
        if self.writable is not None:
            return namespace in self.writable
        return namespace == self.user or self.orgs.get(namespace) in WRITE_ROLES


@dataclass
class Recorded:
    """One request as the stand-in saw it."""

    method: str
    path: str
    authorization: str | None
    status: int = 0


@dataclass
class Repo:
    """A repo held in memory: its files after the last commit, and every commit's header.

    `gated` is None for an ungated repo, else the users who accepted its conditions: its metadata is public, its
    files are served to them only (403 `GatedRepo` to everyone else).
    """

    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)
    gated: set[str] | None = None


class _Reply(Exception):
    """Raised inside a handler to send an error answer (status, message, extra headers)."""

    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers or {}, extra or {}


class HubStandIn:
    """The fake Hub. Use as a context manager, or call `start()` / `stop()`.

    Args:
        tokens (`dict[str, TokenInfo]`): the tokens it accepts; anything else is answered 401.
        lfs (`bool`): answer `uploadMode: "lfs"` for binary/large files (as the Hub does); `False` -> all regular.
        fail (`dict[str, int] | None`): inject failures: a request whose path contains the key gets that status.
    """

    def __init__(self, tokens: dict[str, TokenInfo], *, lfs: bool = True, fail: dict[str, int] | None = None):
        self.tokens = dict(tokens)
        self.lfs = lfs
        self.fail = dict(fail or {})
        self.requests: list[Recorded] = []
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.validated_yaml: list[str] = []
        self._signatures: dict[str, str] = {}  # oid -> presigned-URL signature
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the stand-in is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubStandIn:
        standin = self

        class Handler(_Handler):
            hub = standin

        # 127.0.0.1 only, port 0: the OS picks a free port; nothing outside this machine can reach it.
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-standin", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def add_repo(
        self, repo_id: str, files: dict[str, bytes], *, private: bool = False, gated: set[str] | None = None
    ) -> Repo:
        """Put a repo holding `files` (path -> bytes) in place, as if it had been pushed (`gated`: see `Repo`)."""
        repo = Repo(repo_id, private=private, files=dict(files), gated=None if gated is None else set(gated))
        with self._lock:
            self.repos[repo_id] = repo
        return repo

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- request handling (called from the handler threads) -------------------------------------------------

    def _token(self, authorization: str | None) -> TokenInfo:
        token = authorization[len("Bearer ") :] if authorization and authorization.startswith("Bearer ") else None
        info = self.tokens.get(token) if token else None
        if info is None:
            # The real Hub's answer to a bad token; the client keys its 401 handling on this exact message.
            msg = "Invalid credentials in Authorization header"
            raise _Reply(401, msg, {"X-Error-Message": msg})
        return info

    def _writable_repo(self, who: TokenInfo, repo_id: str) -> Repo:
        namespace = repo_id.split("/")[0]
        if not who.can_write(namespace):
            raise _Reply(
                403,
                f'You don\'t have the rights to write to "{repo_id}"',
                {"X-Error-Message": "You don't have the rights to write to this repo"},
            )
        repo = self.repos.get(repo_id)
        if repo is None:
            raise _Reply(404, "Repository not found", {"X-Error-Code": "RepoNotFound"})
        return repo

    def handle(self, method: str, target: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(target)
        path, query = unquote(parts.path), parse_qs(parts.query)
        auth = headers.get("Authorization")
        record = Recorded(method, path, auth)
        with self._lock:
            self.requests.append(record)
        try:
            status, payload, content_type, *extra = self._route(method, path, query, auth, body)
            out_headers = {"Content-Type": content_type, **(extra[0] if extra else {})}
        except _Reply as reply:
            status, payload = reply.status, {"error": reply.message, **reply.extra}
            out_headers = {"Content-Type": "application/json", **reply.headers}
        record.status = status
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return status, out_headers, data

    def _route(self, method: str, path: str, query: dict, auth: str | None, body: bytes):
        base = self.url
        for fragment, status in self.fail.items():
            if fragment in path:
                raise _Reply(status, f"injected failure for {fragment}")
        if method == "PUT" and (m := re.fullmatch(r"/_lfs_storage/([0-9a-f]{64})", path)):
            # A presigned storage URL: authorised by its signature, not by a token (like S3).
            oid = m.group(1)
            if query.get("X-Amz-Signature", [None])[0] != self._signatures.get(oid):
                raise _Reply(403, "bad signature")
            if hashlib.sha256(body).hexdigest() != oid:
                raise _Reply(400, "content does not match its sha256 oid")
            with self._lock:
                self.lfs_store[oid] = body
            return 200, b"", "text/plain"

        if method in ("GET", "HEAD") and (m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)):
            return self._resolve(m.group(1), m.group(3), auth)
        if method == "GET" and (m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/auth-check", path)):
            self._readable(m.group(1), auth, files=True)
            return 200, {}, "application/json"
        if method == "GET" and (m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.+))?", path)):
            repo = self._readable(m.group(1), auth)
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            return 200, self._tree(repo, m.group(3) or "", recursive), "application/json"
        if method == "GET" and (m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)):
            repo = self._readable(m.group(1), auth)
            return 200, {"id": repo.repo_id, "private": repo.private, "sha": self._sha(repo)}, "application/json"

        who = self._token(auth)
        if method == "GET" and path == "/api/whoami-v2":
            return (
                200,
                {
                    "type": "user",
                    "name": who.user,
                    "fullname": who.user.title(),
                    "orgs": [{"type": "org", "name": org, "roleInOrg": role} for org, role in who.orgs.items()],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": who.role}},
                },
                "application/json",
            )

        if method == "POST" and path == "/api/repos/create":
            req = json.loads(body)
            namespace = req.get("organization") or who.user
            repo_id = f"{namespace}/{req['name']}"
            if not who.can_write(namespace):
                msg = f'You don\'t have the rights to create a model under the namespace "{namespace}"'
                raise _Reply(403, msg, {"X-Error-Message": msg})
            with self._lock:
                if repo_id in self.repos:
                    # The Hub's 409 carries the URL; create_repo(exist_ok=True) returns it.
                    raise _Reply(409, "You already created this model repo", extra={"url": f"{base}/{repo_id}"})
                self.repos[repo_id] = Repo(repo_id, private=req.get("visibility") == "private")
            return 200, {"url": f"{base}/{repo_id}", "name": repo_id}, "application/json"

        if method == "POST" and path == "/api/validate-yaml":
            with self._lock:
                self.validated_yaml.append(json.loads(body)["content"])
            return 200, {"errors": [], "warnings": []}, "application/json"

        if method == "POST" and (m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path)):
            self._writable_repo(who, m.group(1))
            files = json.loads(body)["files"]
            return (
                200,
                {
                    "files": [
                        {"path": f["path"], "uploadMode": self._upload_mode(f), "shouldIgnore": False, "oid": None}
                        for f in files
                    ]
                },
                "application/json",
            )

        if method == "POST" and (m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)):
            repo = self._writable_repo(who, m.group(1))
            objects = []
            for obj in json.loads(body)["objects"]:
                oid, size = obj["oid"], obj["size"]
                if oid in self.lfs_store:  # already stored: the client skips the upload
                    objects.append({"oid": oid, "size": size})
                    continue
                sig = self._signatures.setdefault(oid, secrets.token_hex(8))
                objects.append(
                    {
                        "oid": oid,
                        "size": size,
                        "authenticated": True,
                        "actions": {
                            "upload": {"href": f"{base}/_lfs_storage/{oid}?X-Amz-Signature={sig}"},
                            "verify": {"href": f"{base}/{repo.repo_id}.git/info/lfs/objects/verify"},
                        },
                    }
                )
            return 200, {"transfer": "basic", "objects": objects}, "application/vnd.git-lfs+json"

        if method == "POST" and (m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/verify", path)):
            self._writable_repo(who, m.group(1))
            req = json.loads(body)
            stored = self.lfs_store.get(req["oid"])
            if stored is None or len(stored) != req["size"]:
                raise _Reply(404, "object not found")
            return 200, {"success": True}, "application/json"

        if method == "POST" and (m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path)):
            repo = self._writable_repo(who, m.group(1))
            return 200, self._commit(repo, body), "application/json"

        raise _Reply(404, f"the stand-in does not implement {method} {path}")

    def _readable(self, repo_id: str, auth: str | None, *, files: bool = False) -> Repo:
        # Anonymous requests read public repos; a repo the request may not read answers as missing. A gated repo's
        # files (`files=True`) need a user who accepted its conditions.
        who = self._token(auth) if auth else None
        repo = self.repos.get(repo_id)
        namespace = repo_id.split("/")[0]
        if repo is None or (
            repo.private and (who is None or not (who.can_read(namespace) or who.can_write(namespace)))
        ):
            raise _Reply(401 if who is None else 404, "Repository not found", {"X-Error-Code": "RepoNotFound"})
        if files and repo.gated is not None and (who is None or who.user not in repo.gated):
            msg = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
            raise _Reply(401 if who is None else 403, msg, {"X-Error-Code": "GatedRepo", "X-Error-Message": msg})
        return repo

    @staticmethod
    def _sha(repo: Repo) -> str:
        return hashlib.sha1(f"{repo.repo_id}@{len(repo.commits)}".encode()).hexdigest()

    @staticmethod
    def _tree(repo: Repo, folder: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = f"{folder.rstrip('/')}/" if folder else ""
        entries: dict[str, dict[str, Any]] = {}
        for name, data in sorted(repo.files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if not recursive and "/" in rest:
                sub = prefix + rest.split("/")[0]
                entries.setdefault(
                    sub, {"type": "directory", "path": sub, "oid": hashlib.sha1(sub.encode()).hexdigest()}
                )
                continue
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id
            entries[name] = {"type": "file", "path": name, "size": len(data), "oid": blob}
        return list(entries.values())

    def _resolve(self, repo_id: str, filename: str, auth: str | None):
        repo = self._readable(repo_id, auth, files=True)
        data = repo.files.get(filename)
        if data is None:
            raise _Reply(404, "Entry not found", {"X-Error-Code": "EntryNotFound"})
        headers = {"ETag": f'"{hashlib.sha1(data).hexdigest()}"', "X-Repo-Commit": self._sha(repo)}
        return 200, data, "application/octet-stream", headers

    def _upload_mode(self, f: dict[str, Any]) -> str:
        if not self.lfs:
            return "regular"
        sample = base64.b64decode(f["sample"])
        binary = b"\x00" in sample
        return "lfs" if binary or f["size"] >= LFS_SIZE or f["path"].endswith(LFS_SUFFIXES) else "regular"

    def _commit(self, repo: Repo, body: bytes) -> dict[str, Any]:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Reply(400, "the commit payload must start with a header line")
        new_files = dict(repo.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                new_files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                data = self.lfs_store.get(value["oid"])
                if data is None:
                    raise _Reply(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                new_files[value["path"]] = data
            elif key == "deletedFile":
                new_files.pop(value["path"], None)
            else:
                raise _Reply(400, f"unsupported commit operation {key!r}")
        oid = hashlib.sha1(body).hexdigest()
        with self._lock:  # the commit is atomic: all files or none
            repo.files = new_files
            repo.commits.append({"oid": oid, **lines[0]["value"]})
        return {
            "commitUrl": f"{self.url}/{repo.repo_id}/commit/{oid}",
            "commitOid": oid,
            "success": True,
            "pullRequestUrl": None,
        }


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn
    # HTTP/1.0: one request per connection, so no pooled connection outlives the server.
    protocol_version = "HTTP/1.0"

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        # Read the whole body first, even for errors: replying early makes the client see a broken pipe.
        body = self._body()
        status, headers, data = self.hub.handle(self.command, self.path, self.headers, body)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = _serve

    def do_HEAD(self) -> None:
        status, headers, data = self.hub.handle(self.command, self.path, self.headers, b"")
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))  # the size of what GET would send, and no body
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # quiet: the recorded requests are the log
