"""A small Hugging Face Hub stand-in for tests: the endpoints `huggingface_hub` calls to create a repo, change its
visibility, create a branch, upload files in a commit and list them.

It runs `http.server` in a thread on an ephemeral 127.0.0.1 port; point `HF_ENDPOINT` at `FakeHub.url`.
Every file is answered with the "regular" upload mode, so contents arrive base64-encoded inside the commit
and no LFS storage is needed. Like the Hub, it answers 401 to an unknown token, 403 to a write outside the
token owner's namespaces, 404 (with X-Error-Code) to a missing repo or revision, and 409 to a repo that exists.

Tests inspect what arrived with `files()`, `repos`, and `requests` (every request's method, path, body and the
token it carried).
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

MAX_BODY = 64 << 20  # bytes; a request larger than this is refused rather than read
REPO_NAME = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_hash(data: bytes) -> str:
    """The git blob id of `data`, which `huggingface_hub` compares with its own to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Account:
    name: str
    orgs: list[str] = field(default_factory=list)
    role: str = "write"  # "read" or "write", as in the Hub's token settings


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]
    parent: str | None


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str]  # branch name -> commit oid
    commits: dict[str, Commit]

    def head(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


@dataclass
class Request:
    method: str
    path: str
    body: bytes
    token: str | None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class FakeHub:
    """The server and its state. `tokens` maps each accepted token to its account."""

    def __init__(self, tokens: dict[str, Account]):
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.fail_next_commit = False  # answer the next commit with a 500, as a Hub outage would
        self.tree_page_size = 1000
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # seconds a connection may sit idle; no test waits on a stuck client

            def do_GET(self):
                hub.handle(self, "GET")

            def do_POST(self):
                hub.handle(self, "POST")

            def do_PUT(self):
                hub.handle(self, "PUT")

            def log_message(self, *args):  # keep test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=5)
            self.server = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------ helpers for tests

    def add_repo(self, repo_id: str, private: bool, files: dict[str, bytes] | None = None) -> Repo:
        """An existing repo, as if created earlier on the Hub."""
        with self.lock:
            return self._create(repo_id, private, files)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].head(revision)
        return dict(commit.files) if commit else {}

    def uploaded_bytes(self) -> list[bytes]:
        """Every file content and commit message the server holds, in every repo and commit."""
        out = []
        for repo in self.repos.values():
            for commit in repo.commits.values():
                out.append(commit.message.encode())
                out.extend(commit.files.values())
        return out

    # ------------------------------------------------------------ request handling

    ROUTES = [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("GET", r"/api/models/(?P<ns>[^/]+)/(?P<name>[^/]+)", "repo_info"),
        ("GET", r"/api/models/(?P<ns>[^/]+)/(?P<name>[^/]+)/revision/(?P<rev>[^/]+)", "repo_info"),
        ("PUT", r"/api/models/(?P<ns>[^/]+)/(?P<name>[^/]+)/settings", "settings"),
        ("POST", r"/api/models/(?P<ns>[^/]+)/(?P<name>[^/]+)/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", r"/api/models/(?P<ns>[^/]+)/(?P<name>[^/]+)/commit/(?P<rev>[^/]+)", "commit"),
        ("GET", r"/api/models/(?P<ns>[^/]+)/(?P<name>[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<sub>.+))?", "tree"),
        ("POST", r"/api/models/(?P<ns>[^/]+)/(?P<name>[^/]+)/branch/(?P<branch>[^/]+)", "create_branch"),
        ("GET", r"/api/models/(?P<ns>[^/]+)/(?P<name>[^/]+)/refs", "refs"),
    ]

    def handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        split = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self.reply(handler, 413, {"error": "request too large for the test server"})
        body = handler.rfile.read(length) if length else b""
        auth = handler.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        with self.lock:
            self.requests.append(Request(method, split.path, body, token))
        try:
            if token is not None and token not in self.tokens:
                raise HubError(401, "Invalid credentials in Authorization header")
            account = self.tokens.get(token) if token else None
            for route_method, pattern, action in self.ROUTES:
                match = re.fullmatch(pattern, split.path)
                if match and route_method == method:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    with self.lock:
                        status, payload, headers = getattr(self, action)(
                            account=account, body=body, query=parse_qs(split.query), path=split.path, **args)
                    return self.reply(handler, status, payload, headers)
            raise HubError(404, f"not served by the test server: {method} {split.path}")
        except HubError as error:
            headers = {"X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            self.reply(handler, error.status, {"error": error.message}, headers)

    @staticmethod
    def reply(handler, status: int, payload, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(data)

    # ------------------------------------------------------------ permissions

    @staticmethod
    def can_read(account: Account | None, repo: Repo) -> bool:
        namespace = repo.repo_id.split("/")[0]
        return not repo.private or (account is not None and namespace in (account.name, *account.orgs))

    @staticmethod
    def require_write(account: Account | None, namespace: str, what: str) -> None:
        if account is None:
            raise HubError(401, "You must be authenticated to do this")
        if account.role != "write" or namespace not in (account.name, *account.orgs):
            raise HubError(403, f"You don't have the rights to {what} under the namespace \"{namespace}\"")

    def find_repo(self, account: Account | None, ns: str, name: str) -> Repo:
        repo = self.repos.get(f"{ns}/{name}")
        if repo is None or not self.can_read(account, repo):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def find_commit(repo: Repo, revision: str) -> Commit:
        commit = repo.head(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # ------------------------------------------------------------ endpoints

    def whoami(self, account, **_):
        if account is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return 200, {
            "type": "user", "name": account.name, "fullname": account.name,
            "orgs": [{"name": org, "roleInOrg": "write"} for org in account.orgs],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": account.role}},
        }, None

    def validate_yaml(self, body, **_):
        content = json.loads(body).get("content", "")
        if content.startswith("---"):
            try:
                metadata = yaml.safe_load(content.split("---", 2)[1])
            except yaml.YAMLError as error:
                return 400, {"errors": [{"message": f"invalid YAML: {error}"}]}, None
            if metadata is not None and not isinstance(metadata, dict):
                return 400, {"errors": [{"message": "metadata must be a mapping"}]}, None
        return 200, {"errors": [], "warnings": []}, None

    def create_repo(self, account, body, **_):
        payload = json.loads(body)
        if account is None:
            raise HubError(401, "You must be authenticated to create a repo")
        namespace = payload.get("organization") or account.name
        name = payload.get("name") or ""
        if not REPO_NAME.match(name):
            raise HubError(400, f"Invalid repo name: {name!r}")
        self.require_write(account, namespace, "create a model")
        repo_id = f"{namespace}/{name}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, None
        visibility = payload.get("visibility") or ("private" if payload.get("private") else "public")
        self._create(repo_id, visibility == "private")
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}, None

    def _create(self, repo_id: str, private: bool, files: dict[str, bytes] | None = None) -> Repo:
        first = Commit(uuid.uuid4().hex + "00000000", "initial commit",
                       {".gitattributes": GITATTRIBUTES, **(files or {})}, None)
        repo = Repo(repo_id, private, {"main": first.oid}, {first.oid: first})
        self.repos[repo_id] = repo
        return repo

    def repo_info(self, account, ns, name, rev="main", **_):
        repo = self.find_repo(account, ns, name)
        commit = self.find_commit(repo, rev)
        return 200, {
            "id": repo.repo_id, "modelId": repo.repo_id, "private": repo.private, "sha": commit.oid,
            "siblings": [{"rfilename": path} for path in sorted(commit.files)], "tags": [],
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        }, None

    def settings(self, account, body, ns, name, **_):
        repo = self.find_repo(account, ns, name)
        self.require_write(account, ns, "change the settings of a model")
        payload = json.loads(body)
        if "visibility" in payload:
            if payload["visibility"] not in ("public", "private"):
                raise HubError(400, f"Invalid visibility: {payload['visibility']!r}")
            repo.private = payload["visibility"] == "private"
        elif "private" in payload:
            repo.private = bool(payload["private"])
        return 200, {}, None

    def preupload(self, account, body, ns, name, rev, **_):
        repo = self.find_repo(account, ns, name)
        self.require_write(account, ns, "upload to a model")
        commit = self.find_commit(repo, rev)
        files = json.loads(body)["files"]
        return 200, {"files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_hash(commit.files[f["path"]]) if f["path"] in commit.files else None}
            for f in files
        ], "commitOid": commit.oid}, None

    def commit(self, account, body, ns, name, rev, **_):
        repo = self.find_repo(account, ns, name)
        self.require_write(account, ns, "upload to a model")
        parent = self.find_commit(repo, rev)
        if rev not in repo.branches:
            raise HubError(400, f"Can only commit to a branch, not {rev}")
        if self.fail_next_commit:
            self.fail_next_commit = False
            raise HubError(500, "Internal Error - simulated outage")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit must start with a header line")
        files = dict(parent.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:
                raise HubError(400, f"the test server does not accept {key!r} operations (only regular files)")
        new = Commit(uuid.uuid4().hex + "00000000", lines[0]["value"]["summary"], files, parent.oid)
        repo.commits[new.oid] = new
        repo.branches[rev] = new.oid
        return 200, {"commitUrl": f"{self.url}/{repo.repo_id}/commit/{new.oid}", "commitOid": new.oid,
                     "success": True, "pullRequestUrl": None}, None

    def tree(self, account, ns, name, rev, query, path, sub="", **_):
        repo = self.find_repo(account, ns, name)
        commit = self.find_commit(repo, rev)
        prefix = f"{sub.rstrip('/')}/" if sub else ""
        entries = [{"type": "file", "path": p, "size": len(data), "oid": git_hash(data)}
                   for p, data in sorted(commit.files.items()) if p.startswith(prefix)]
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start:start + self.tree_page_size]
        headers = None
        if start + self.tree_page_size < len(entries):
            headers = {"Link": f'<{self.url}{path}?recursive=true&cursor={start + self.tree_page_size}>; rel="next"'}
        return 200, page, headers

    def create_branch(self, account, body, ns, name, branch, **_):
        repo = self.find_repo(account, ns, name)
        self.require_write(account, ns, "create a branch of a model")
        if branch in repo.branches:
            raise HubError(409, "Reference already exists")
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        repo.branches[branch] = self.find_commit(repo, start).oid
        return 200, {}, None

    def refs(self, account, ns, name, **_):
        repo = self.find_repo(account, ns, name)
        return 200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid}
                                  for b, oid in repo.branches.items()], "converts": [], "tags": []}, None
