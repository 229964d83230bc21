"""A loopback Hugging Face Hub: the part of the Hub's HTTP API that huggingface_hub 2.4 uses to
create repos and branches, commit files, read repo info and trees, and download files.

Honest where it matters to a client: status codes, the ``X-Error-Code`` / ``X-Error-Message``
headers the client turns into ``RepositoryNotFoundError`` / ``RevisionNotFoundError`` /
``RemoteEntryNotFoundError``, the ``X-Repo-Commit`` / ``ETag`` / ``Content-Length`` headers of
``/resolve``, git blob ids for files, commits chained by parent.

What it leaves out, on purpose: LFS and Xet. The preupload endpoint answers ``"regular"`` for
every file, so the client sends every file inline (base64) in the commit's NDJSON and never asks
for an LFS batch or a Xet token; ``/resolve`` never sends ``X-Xet-Hash``, so downloads are plain
HTTP GETs. A request that still reaches an LFS or Xet route is answered 501 and recorded in
``server.unsupported`` so a test can fail on it. Only model repos; no tags, no pull requests.

For the hostile-server tests it can misbehave on request: ``lfs=True`` serves ``*.safetensors``
the way the Hub serves LFS files (the tree lists ``lfs.oid`` = sha256, ``/resolve`` sends
``X-Linked-Etag`` / ``X-Linked-Size``), ``tamper`` serves other bytes than the ones it
advertises for a path, ``resolve_headers`` overrides headers of ``/resolve`` answers, and
``hooks`` may answer any request themselves (echo its headers, stall, ...).

Access rules follow the Hub:

- a token the server does not know → 401 ``Invalid credentials in Authorization header``, on any
  route (the client does not mistake that one for a missing repo);
- a repo that does not exist, or a private repo the caller may not read → ``RepoNotFound``,
  with 401 when the request carries no token and 404 when it does (so the two cannot be told
  apart: the Hub does not reveal that a private repo exists);
- a write (create, preupload, commit, branch) with no token → 401; with a token that may not
  write to the namespace (another user's, or a read-only token) → 403.

    server, endpoint = start_server(tokens={"hf_alice_token": "alice"})
    ...
    stop_server(server)
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

DEFAULT_TOKENS: dict[str, str | tuple[str, str]] = {
    "hf_alice_token": "alice",
    "hf_bob_token": "bob",
    "hf_alice_read_token": ("alice", "read"),
}

# What a new repo on the Hub starts with: one commit holding .gitattributes (abridged).
GITATTRIBUTES = b"""*.bin filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
"""

_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?", re.ASCII)
_SHA_RE = re.compile(r"[0-9a-f]{40}")
_BRANCH_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]*", re.ASCII)


def git_blob_oid(data: bytes) -> str:
    """The id git (and the Hub's tree API) gives a file: sha1 of ``blob <size>\\0<content>``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The git-lfs pointer file that stands for ``data`` in the git tree."""
    sha = hashlib.sha256(data).hexdigest()
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    files: dict[str, bytes]  # the whole snapshot: path in repo → content
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)  # branch → head commit sha
    commits: dict[str, Commit] = field(default_factory=dict)  # sha → commit

    def add_commit(
        self, parent: str | None, files: dict[str, bytes], title: str, message: str, author: str
    ) -> Commit:
        # A commit id is the sha1 of its content, as git's is: the tree it points at, its parent,
        # author, time and message. The time (ns) keeps two identical commits apart.
        tree = hashlib.sha1(
            "".join(f"{p}\0{git_blob_oid(files[p])}\n" for p in sorted(files)).encode()
        ).hexdigest()
        header = f"tree {tree}\nparent {parent or ''}\nauthor {author} {time.time_ns()}\n\n"
        sha = hashlib.sha1((header + title + "\n\n" + message).encode()).hexdigest()
        commit = Commit(sha, parent, dict(files), title, message, author, _now())
        self.commits[sha] = commit
        return commit


class _Reply(Exception):
    """An error answer: status, Hub error code and message (sent as header and JSON body)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.body = body


@dataclass
class _Fault:
    method: str
    path_contains: str
    status: int
    message: str
    code: str | None


class HubServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        tokens: dict[str, str | tuple[str, str]],
        orgs: dict[str, set[str]] | None = None,
        tree_page_size: int = 1000,
    ) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        # token → (user, role); a bare user name means a write token
        self.tokens: dict[str, tuple[str, str]] = {
            t: (u, "write") if isinstance(u, str) else (u[0], u[1]) for t, u in tokens.items()
        }
        self.orgs = {k: set(v) for k, v in (orgs or {}).items()}
        self.tree_page_size = tree_page_size
        self.repos: dict[str, Repo] = {}
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status); no headers kept
        self.unsupported: list[str] = []  # LFS / Xet / PR routes the client should never reach
        self.faults: list[_Fault] = []
        # misbehaviour, for the hostile-server tests (see the module docstring)
        self.lfs = False
        self.tamper: dict[str, bytes] = {}  # path in repo → bytes served instead
        self.resolve_headers: dict[str, str] = {}
        # (method, path fragment, fn(handler) → True when it answered the request itself)
        self.hooks: list[tuple[str, str, object]] = []
        host, port = self.server_address[:2]
        self.endpoint = f"http://{host}:{port}"

    # -- helpers for tests -------------------------------------------------------------------

    def inject(
        self, method: str, path_contains: str, status: int, message: str, code: str | None = None
    ) -> None:
        """Answer the next ``method`` request whose path contains ``path_contains`` with an error."""
        with self.lock:
            self.faults.append(_Fault(method, path_contains, status, message, code))

    def head(self, repo_id: str, branch: str = "main") -> Commit:
        with self.lock:
            repo = self.repos[repo_id]
            return repo.commits[repo.branches[branch]]

    # -- rules ------------------------------------------------------------------------------

    def members(self, namespace: str) -> set[str]:
        return {namespace} | self.orgs.get(namespace, set())

    def can_read(self, user: str | None, repo: Repo) -> bool:
        return not repo.private or (user is not None and user in self.members(repo.owner))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's pooled connections expect
    server: HubServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # requests are recorded in server.requests, without their headers

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

    # -- plumbing ---------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        self.method = method
        self.body = self._read_body()  # always drained, so a kept-alive connection stays in step
        split = urlsplit(self.path)
        self.raw_path = split.path
        self.query = parse_qs(split.query)
        self.status = 500
        try:
            self._fault()
            if self._hooked():
                return
            self._route([s for s in split.path.split("/")[1:]])
        except _Reply as reply:
            self._send_error(reply)
        except Exception as exc:  # a bug here must show as a 500, not a hung client
            self._send_error(_Reply(500, f"loopback hub error: {type(exc).__name__}: {exc}"))
        with self.server.lock:
            self.server.requests.append((method, self.raw_path, self.status))

    def _hooked(self) -> bool:
        for method, fragment, fn in list(self.server.hooks):
            if method == self.method and fragment in self.raw_path and fn(self):
                with self.server.lock:
                    self.server.requests.append((self.method, self.raw_path, self.status))
                return True
        return False

    def _fault(self) -> None:
        with self.server.lock:
            for fault in self.server.faults:
                if fault.method == self.method and fault.path_contains in self.raw_path:
                    self.server.faults.remove(fault)
                    raise _Reply(fault.status, fault.message, fault.code)

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status = status
        self.send_response(status)
        headers = {"X-Request-Id": uuid.uuid4().hex, **headers}
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.method != "HEAD":
            self.wfile.write(body)

    def _send_json(
        self, obj: object, status: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        body = json.dumps(obj).encode()
        self._send(
            status, body, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
        )

    def _send_error(self, reply: _Reply) -> None:
        headers = dict(reply.headers)
        headers["X-Error-Message"] = reply.message.encode("ascii", "replace").decode()
        if reply.code:
            headers["X-Error-Code"] = reply.code
        self._send_json(reply.body or {"error": reply.message}, reply.status, headers)

    def _json_body(self) -> dict:
        try:
            data = json.loads(self.body or b"{}")
        except ValueError as exc:
            raise _Reply(400, f"invalid JSON body: {exc}") from exc
        if not isinstance(data, dict):
            raise _Reply(400, "JSON body must be an object")
        return data

    def _flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[-1].lower() in ("1", "true")

    # -- auth -------------------------------------------------------------------------------

    def _caller(self) -> tuple[str | None, str | None]:
        """(user, role) of the bearer token, or (None, None) when there is none."""
        auth = self.headers.get("Authorization")
        if not auth:
            return None, None
        scheme, _, token = auth.partition(" ")
        found = self.server.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if found is None:
            raise _Reply(401, "Invalid credentials in Authorization header")
        return found

    def _repo_for_read(self, repo_id: str) -> tuple[Repo, str | None]:
        user, _ = self._caller()
        repo = self.server.repos.get(repo_id)
        if repo is None or not self.server.can_read(user, repo):
            raise _Reply(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo, user

    def _repo_for_write(self, repo_id: str) -> tuple[Repo, str]:
        user, role = self._caller()
        if user is None:
            raise _Reply(401, "Invalid username or password.")
        repo, _ = self._repo_for_read(repo_id)
        if role != "write" or user not in self.server.members(repo.owner):
            raise _Reply(403, f"You don't have the rights to write to {repo_id}")
        return repo, user

    @staticmethod
    def _resolve(repo: Repo, rev: str) -> Commit:
        sha = repo.branches.get(rev)
        if sha is None and _SHA_RE.fullmatch(rev) and rev in repo.commits:
            sha = rev
        if sha is None:
            raise _Reply(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[sha]

    @staticmethod
    def _branch(repo: Repo, rev: str) -> Commit:
        """Writes go to a branch, never to a bare commit."""
        if rev not in repo.branches:
            raise _Reply(404, f"Invalid rev id: {rev} is not a branch", "RevisionNotFound")
        return repo.commits[repo.branches[rev]]

    # -- routing ----------------------------------------------------------------------------

    def _route(self, segs: list[str]) -> None:
        m = self.method
        with self.server.lock:
            if segs[:1] == ["api"]:
                rest = segs[1:]
                if rest == ["whoami-v2"] and m == "GET":
                    return self._whoami()
                if rest == ["repos", "create"] and m == "POST":
                    return self._create_repo()
                if rest == ["validate-yaml"] and m == "POST":
                    return self._validate_yaml()
                if rest[:1] == ["models"] and len(rest) >= 2:
                    return self._model_api(rest[1:])
            if len(segs) >= 5 and segs[2] == "resolve" and m in ("GET", "HEAD"):
                repo_id = f"{unquote(segs[0])}/{unquote(segs[1])}"
                return self._resolve_file(repo_id, unquote(segs[3]), unquote("/".join(segs[4:])))
            if any(".git" in s for s in segs) or "lfs" in segs:
                self._unsupported("git/LFS transfer")
            raise _Reply(404, f"no route for {m} {self.raw_path}")

    def _unsupported(self, what: str) -> None:
        self.server.unsupported.append(f"{self.method} {self.raw_path}")
        raise _Reply(501, f"{what} is not implemented by the loopback hub (only regular uploads)")

    def _model_api(self, rest: list[str]) -> None:
        m = self.method
        if len(rest) < 2:
            self._caller()
            raise _Reply(404, "Repository not found", "RepoNotFound")
        repo_id = f"{unquote(rest[0])}/{unquote(rest[1])}"
        tail = rest[2:]
        if not tail and m == "GET":
            return self._repo_info(repo_id, None)
        action = tail[0] if tail else ""
        if action.startswith("xet-"):
            self._unsupported("Xet storage")
        if "create_pr" in self.query and self._flag("create_pr"):
            self._unsupported("pull requests")
        if action == "revision" and len(tail) == 2 and m == "GET":
            return self._repo_info(repo_id, unquote(tail[1]))
        if action == "tree" and len(tail) >= 2 and m == "GET":
            return self._tree(repo_id, unquote(tail[1]), unquote("/".join(tail[2:])))
        if action == "refs" and len(tail) == 1 and m == "GET":
            return self._refs(repo_id)
        if action == "commits" and len(tail) == 2 and m == "GET":
            return self._commits(repo_id, unquote(tail[1]))
        if action == "preupload" and len(tail) == 2 and m == "POST":
            return self._preupload(repo_id, unquote(tail[1]))
        if action == "commit" and len(tail) == 2 and m == "POST":
            return self._commit(repo_id, unquote(tail[1]))
        if action == "branch" and len(tail) == 2 and m == "POST":
            return self._create_branch(repo_id, unquote(tail[1]))
        if action == "lfs-files":
            self._unsupported("LFS")
        raise _Reply(404, f"no route for {m} {self.raw_path}")

    # -- endpoints --------------------------------------------------------------------------

    def _whoami(self) -> None:
        user, role = self._caller()
        if user is None:
            raise _Reply(401, "Invalid username or password.")
        orgs = sorted(org for org, members in self.server.orgs.items() if user in members)
        self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user.title(),
                "isPro": False,
                "orgs": [{"type": "org", "name": org, "fullname": org} for org in orgs],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "test", "role": role},
                },
            }
        )

    def _create_repo(self) -> None:
        user, role = self._caller()
        if user is None:
            raise _Reply(401, "Invalid username or password.")
        data = self._json_body()
        if data.get("type") not in (None, "model"):
            raise _Reply(400, "the loopback hub only hosts model repos")
        name = data.get("name")
        namespace = data.get("organization") or user
        for part in (namespace, name):
            if (
                not isinstance(part, str)
                or not _NAME_RE.fullmatch(part)
                or ".." in part
                or "--" in part
            ):
                raise _Reply(400, f"Invalid repo name: {namespace}/{name}")
        if role != "write" or user not in self.server.members(namespace):
            raise _Reply(
                403,
                f'You don\'t have the rights to create a model under the namespace "{namespace}"',
            )
        repo_id = f"{namespace}/{name}"
        url = f"{self.server.endpoint}/{repo_id}"
        if repo_id in self.server.repos:
            raise _Reply(
                409,
                "You already created this model repo",
                body={"error": "You already created this model repo", "url": url},
            )
        private = (
            data.get("visibility", "private" if data.get("private") else "public") == "private"
        )
        repo = Repo(repo_id, namespace, private, _now())
        first = repo.add_commit(None, {".gitattributes": GITATTRIBUTES}, "initial commit", "", user)
        repo.branches["main"] = first.sha
        self.server.repos[repo_id] = repo
        self._send_json(
            {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}
        )

    def _validate_yaml(self) -> None:
        self._caller()
        content = self._json_body().get("content", "")
        errors = []
        if content.startswith("---"):
            end = content.find("\n---", 3)
            if end < 0:
                errors.append({"message": "metadata block is not closed by ---"})
            else:
                try:
                    import yaml

                    meta = yaml.safe_load(content[3:end])
                    if meta is not None and not isinstance(meta, dict):
                        errors.append({"message": "metadata must be a YAML mapping"})
                except ImportError:
                    pass
                except Exception as exc:  # yaml.YAMLError
                    errors.append({"message": f"invalid YAML: {exc}"})
        status = 400 if errors else 200
        self._send_json({"errors": errors, "warnings": []}, status)

    def _repo_info(self, repo_id: str, rev: str | None) -> None:
        repo, _ = self._repo_for_read(repo_id)
        commit = self._resolve(repo, rev or "main")
        self._send_json(
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo.owner,
                "sha": commit.sha,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(commit.files)],
                "usedStorage": sum(len(b) for b in commit.files.values()),
            }
        )

    def _tree(self, repo_id: str, rev: str, path: str) -> None:
        repo, _ = self._repo_for_read(repo_id)
        commit = self._resolve(repo, rev)
        path = path.strip("/")
        dirs: dict[str, list[str]] = {}
        for p in commit.files:
            parts = p.split("/")
            for i in range(1, len(parts)):
                dirs.setdefault("/".join(parts[:i]), []).append(p)
        if path and path not in dirs:
            raise _Reply(
                404,
                f"{path} does not exist on {rev}",
                "EntryNotFound",
                {"X-Repo-Commit": commit.sha},
            )
        prefix = f"{path}/" if path else ""
        recursive = self._flag("recursive")

        def wanted(p: str) -> bool:
            return p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])

        entries = [
            {
                "type": "directory",
                "oid": hashlib.sha1(
                    "".join(sorted(git_blob_oid(commit.files[f]) for f in members)).encode()
                ).hexdigest(),
                "path": d,
            }
            for d, members in sorted(dirs.items())
            if wanted(d)
        ] + [self._file_entry(p, data) for p, data in sorted(commit.files.items()) if wanted(p)]
        entries.sort(key=lambda e: e["path"])
        # Paginated like the Hub: a Link header names the next page while there is one.
        start = int(self.query.get("cursor", ["0"])[-1])
        page = entries[start : start + self.server.tree_page_size]
        headers = {}
        if start + self.server.tree_page_size < len(entries):
            params = {k: v[-1] for k, v in self.query.items() if k != "cursor"}
            params["cursor"] = str(start + self.server.tree_page_size)
            headers["Link"] = (
                f'<{self.server.endpoint}{self.raw_path}?{urlencode(params)}>; rel="next"'
            )
        self._send_json(page, headers=headers)

    def _is_lfs(self, path: str) -> bool:
        return self.server.lfs and path.endswith(".safetensors")

    def _file_entry(self, path: str, data: bytes) -> dict:
        if not self._is_lfs(path):
            return {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path}
        sha = hashlib.sha256(data).hexdigest()
        pointer = lfs_pointer(data)
        return {
            "type": "file",
            "oid": git_blob_oid(pointer),
            "size": len(data),
            "path": path,
            "lfs": {"oid": sha, "size": len(data), "pointerSize": len(pointer)},
        }

    def _refs(self, repo_id: str) -> None:
        repo, _ = self._repo_for_read(repo_id)
        branches = [
            {"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha}
            for b, sha in sorted(repo.branches.items())
        ]
        self._send_json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _commits(self, repo_id: str, rev: str) -> None:
        repo, _ = self._repo_for_read(repo_id)
        commit: Commit | None = self._resolve(repo, rev)
        out = []
        while commit is not None:
            out.append(
                {
                    "id": commit.sha,
                    "title": commit.title,
                    "message": commit.message,
                    "authors": [{"user": commit.author}],
                    "date": commit.date,
                }
            )
            commit = repo.commits.get(commit.parent) if commit.parent else None
        self._send_json(out)

    def _preupload(self, repo_id: str, rev: str) -> None:
        repo, _ = self._repo_for_write(repo_id)
        head = self._branch(repo, rev)
        files = self._json_body().get("files")
        if not isinstance(files, list):
            raise _Reply(400, "files must be a list")
        out = []
        for f in files:
            path = f.get("path") if isinstance(f, dict) else None
            if not isinstance(path, str):
                raise _Reply(400, "each file needs a path")
            existing = head.files.get(path)
            out.append(
                {
                    "path": path,
                    # Every file goes inline in the commit: no LFS, no Xet.
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_oid(existing) if existing is not None else None,
                }
            )
        self._send_json({"files": out, "commitOid": head.sha})

    def _commit(self, repo_id: str, rev: str) -> None:
        repo, user = self._repo_for_write(repo_id)
        head = self._branch(repo, rev)
        try:
            lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        except ValueError as exc:
            raise _Reply(400, f"commit payload is not NDJSON: {exc}") from exc
        if not lines or lines[0].get("key") != "header":
            raise _Reply(400, "commit payload must start with a header line")
        header = lines[0].get("value") or {}
        title = header.get("summary") or ""
        if not title.strip():
            raise _Reply(400, "commit summary is empty")
        parent = header.get("parentCommit")
        if parent and parent != head.sha:
            raise _Reply(
                412, f"A commit has happened since {parent}. Please refresh and try again."
            )
        files = dict(head.files)
        for item in lines[1:]:
            key, value = item.get("key"), item.get("value") or {}
            path = value.get("path", "")
            if key in ("file", "deletedFile", "deletedFolder"):
                clean = path.rstrip("/") if key == "deletedFolder" else path
                if (
                    not clean
                    or clean.startswith("/")
                    or any(p in ("", ".", "..") for p in clean.split("/"))
                ):
                    raise _Reply(400, f"invalid path in repo: {path!r}")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _Reply(400, f"unsupported encoding {value.get('encoding')!r} for {path}")
                files[path] = base64.b64decode(value.get("content", ""), validate=True)
            elif key == "deletedFile":
                if path not in files:
                    raise _Reply(
                        404, f"A file with this name doesn't exist: {path}", "EntryNotFound"
                    )
                del files[path]
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                gone = [p for p in files if p.startswith(prefix)]
                if not gone:
                    raise _Reply(
                        404, f"A folder with this name doesn't exist: {path}", "EntryNotFound"
                    )
                for p in gone:
                    del files[p]
            elif key == "lfsFile":
                self._unsupported("LFS")
            else:
                raise _Reply(400, f"unknown commit operation {key!r}")
        commit = repo.add_commit(head.sha, files, title, header.get("description") or "", user)
        repo.branches[rev] = commit.sha
        self._send_json(
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{self.server.endpoint}/{repo_id}/commit/{commit.sha}",
                "hookOutput": "",
            }
        )

    def _create_branch(self, repo_id: str, branch: str) -> None:
        repo, _ = self._repo_for_write(repo_id)
        if (
            not _BRANCH_RE.fullmatch(branch)
            or _SHA_RE.fullmatch(branch)
            or ".." in branch
            or "//" in branch
            or branch.endswith(("/", ".lock", "."))
        ):
            raise _Reply(400, f"Invalid branch name: {branch}")
        if branch in repo.branches:
            raise _Reply(409, f"Reference already exists: refs/heads/{branch}")
        start = self._json_body().get("startingPoint")
        commit = self._resolve(repo, start) if start else repo.commits[repo.branches["main"]]
        repo.branches[branch] = commit.sha
        self._send_json({})

    def _resolve_file(self, repo_id: str, rev: str, path: str) -> None:
        repo, _ = self._repo_for_read(repo_id)
        commit = self._resolve(repo, rev)
        data = commit.files.get(path)
        if data is None:
            raise _Reply(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        name = path.rsplit("/", 1)[-1]
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_oid(data)}"',
            "X-Repo-Commit": commit.sha,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}",
        }
        if self._is_lfs(path):
            # the Hub: the ETag is the pointer file's, X-Linked-Etag the content's sha256
            headers["ETag"] = f'"{git_blob_oid(lfs_pointer(data))}"'
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            headers["X-Linked-Size"] = str(len(data))
        headers.update(self.server.resolve_headers)
        data = self.server.tamper.get(path, data)  # advertised as above, served as tampered
        status, body = 200, data
        rng = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if rng and (rng.group(1) or rng.group(2)):
            first, last = rng.groups()
            if first:
                lo, hi = int(first), int(last) if last else len(data) - 1
            else:
                lo, hi = max(len(data) - int(last), 0), len(data) - 1
            hi = min(hi, len(data) - 1)
            if lo > hi:
                raise _Reply(
                    416,
                    "Requested range not satisfiable",
                    headers={"Content-Range": f"bytes */{len(data)}"},
                )
            status, body = 206, data[lo : hi + 1]
            headers["Content-Range"] = f"bytes {lo}-{hi}/{len(data)}"
        headers["Content-Length"] = str(len(body))
        self._send(status, body, headers)


def start_server(
    tokens: dict[str, str | tuple[str, str]] | None = None,
    *,
    orgs: dict[str, set[str]] | None = None,
    tree_page_size: int = 1000,
) -> tuple[HubServer, str]:
    """Serve on 127.0.0.1 (a free port) in a daemon thread; returns (server, endpoint URL).

    ``tokens`` maps a token to a user name (a write token) or to ``(user, "read")``.
    ``orgs`` maps an organisation to its members, who may write under its namespace.
    """
    server = HubServer(DEFAULT_TOKENS if tokens is None else tokens, orgs, tree_page_size)
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name="loopback-hub",
        daemon=True,
    )
    thread.start()
    return server, server.endpoint


def stop_server(server: HubServer) -> None:
    server.shutdown()
    server.server_close()
