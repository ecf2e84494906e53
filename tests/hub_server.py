"""A minimal in-memory Hugging Face Hub for tests: the HTTP routes that huggingface_hub's create_repo, create_branch,
upload_folder (preupload answered "regular" for every file, so no LFS or xet) and snapshot_download call.

    with HubServer(token="hf_test") as hub:
        os.environ["HF_ENDPOINT"] = hub.url

Writes, and reads of private repos, need `Authorization: Bearer <token>`; a request carrying any other token is
refused (401) like on the Hub. Every request is recorded in `hub.requests` (method, path, lower-cased headers);
a route the server does not know gets a 404 with a JSON error and is logged and kept in `hub.unknown`.
"""

import base64
import hashlib
import itertools
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


logger = logging.getLogger("tests.hub_server")
REPO = r"/(?P<namespace>[^/]+)/(?P<name>[^/]+)"
ROUTES = [  # (method, pattern over the raw path, handler name)
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", rf"/api/models{REPO}/branch/(?P<branch>[^/]+)", "create_branch"),
    ("POST", rf"/api/models{REPO}/preupload/(?P<revision>[^/]+)", "preupload"),
    ("POST", rf"/api/models{REPO}/commit/(?P<revision>[^/]+)", "commit"),
    ("GET", rf"/api/models{REPO}(?:/revision/(?P<revision>[^/]+))?", "model_info"),
    ("GET", rf"/api/models{REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("HEAD", rf"{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "resolve"),
    ("GET", rf"{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "resolve"),
]


def git_blob_oid(data):
    """The git object id of a file's bytes, what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    message: str
    description: str
    files: dict  # path -> bytes


@dataclass
class Repo:
    private: bool
    branches: dict = field(default_factory=dict)  # name -> commit sha
    commits: dict = field(default_factory=dict)  # sha -> Commit

    def resolve(self, revision):
        """Commit sha of a branch name or a commit sha; None if unknown."""
        sha = self.branches.get(revision, revision)
        return sha if sha in self.commits else None


@dataclass
class Request:
    method: str
    path: str
    headers: dict  # lower-cased names


class HubError(Exception):
    def __init__(self, status, message, code=None, headers=None, **fields):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.fields = fields  # more keys of the JSON body


class HubServer:
    """The in-memory Hub on 127.0.0.1 (a free port), served from a background thread while the context is open."""

    def __init__(self, token):
        self.token = token
        self.repos = {}
        self.requests = []
        self.unknown = []
        self._lock = threading.Lock()
        self._commit_numbers = itertools.count()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def authorizations(self):
        """Every Authorization header value the server received."""
        return [request.headers["authorization"] for request in self.requests if "authorization" in request.headers]

    # ---- helpers

    def _check_token(self, headers, required):
        """The request's token is ours (True), absent (False, refused if `required`); any other token is refused."""
        value = headers.get("authorization")
        if value is None:
            if required:
                raise HubError(401, "Invalid username or password.")
            return False
        if value != f"Bearer {self.token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        return True

    def _repo(self, match, headers, write=False):
        repo_id = f"{unquote(match['namespace'])}/{unquote(match['name'])}"
        authorized = self._check_token(headers, required=write)
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise HubError(401 if not authorized else 404, "Repository not found", "RepoNotFound")
        return repo_id, repo

    @staticmethod
    def _commit_of(repo, revision):
        sha = repo.resolve(unquote(revision or "main"))
        if sha is None:
            raise HubError(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
        return sha

    def _new_commit(self, repo, branch, message, description, files):
        seed = f"{next(self._commit_numbers)}:{branch}:{message}:{sorted(files)}".encode()
        sha = hashlib.sha1(seed).hexdigest()
        repo.commits[sha] = Commit(message, description, files)
        repo.branches[branch] = sha
        return sha

    # ---- routes: each returns (status, JSON-able body or bytes, extra headers)

    def create_repo(self, match, headers, query, body):
        self._check_token(headers, required=True)
        payload = json.loads(body)
        if payload.get("type", "model") != "model":
            raise HubError(400, "only model repos are served here")
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", url=url)  # the client reads the url
        repo = self.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        self._new_commit(repo, "main", "initial commit", "", {})
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def validate_yaml(self, match, headers, query, body):
        return 200, {"errors": [], "warnings": []}, {}

    def create_branch(self, match, headers, query, body):
        _, repo = self._repo(match, headers, write=True)
        branch = unquote(match["branch"])
        if branch in repo.branches:
            raise HubError(409, "Reference already exists")
        start = (json.loads(body) if body else {}).get("startingPoint", "main")
        repo.branches[branch] = self._commit_of(repo, start)
        return 200, {}, {}

    def preupload(self, match, headers, query, body):
        _, repo = self._repo(match, headers, write=True)
        self._commit_of(repo, match["revision"])
        files = [
            {"path": file["path"], "uploadMode": "regular", "shouldIgnore": False}
            for file in json.loads(body)["files"]
        ]
        return 200, {"files": files, "commitOid": None}, {}

    def commit(self, match, headers, query, body):
        repo_id, repo = self._repo(match, headers, write=True)
        branch = unquote(match["revision"])
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        files = dict(repo.commits[repo.branches[branch]].files)
        message, description = None, ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message, description = value["summary"], value.get("description", "")
            elif key == "file" and value.get("encoding") == "base64":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: data for path, data in files.items() if not path.startswith(prefix)}
            else:
                raise HubError(400, f"commit operation {key!r} is not supported by the test Hub")
        if not message:
            raise HubError(400, "commit header with a summary is missing")
        sha = self._new_commit(repo, branch, message, description, files)
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True,
                     "pullRequestUrl": None}, {}

    def model_info(self, match, headers, query, body):
        repo_id, repo = self._repo(match, headers)
        sha = self._commit_of(repo, match["revision"])
        files = repo.commits[sha].files
        siblings = [{"rfilename": path, "size": len(data), "blobId": git_blob_oid(data)}
                    for path, data in sorted(files.items())]
        return 200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private, "siblings": siblings,
                     "tags": [], "downloads": 0, "likes": 0}, {}

    def tree(self, match, headers, query, body):
        _, repo = self._repo(match, headers)
        sha = self._commit_of(repo, match["revision"])
        prefix = unquote(match["path"] or "").strip("/")
        prefix = prefix + "/" if prefix else ""
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for path, data in sorted(repo.commits[sha].files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(data)})
        entries += [{"type": "directory", "path": path, "oid": "0" * 40} for path in sorted(folders)]
        return 200, entries, {}

    def resolve(self, match, headers, query, body):
        _, repo = self._repo(match, headers)
        sha = self._commit_of(repo, match["revision"])
        path = unquote(match["path"])
        data = repo.commits[sha].files.get(path)
        if data is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        return 200, data, {"X-Repo-Commit": sha, "ETag": f'"{git_blob_oid(data)}"',
                           "Content-Type": "application/octet-stream"}

    def handle(self, method, raw_path, headers, body):
        """Route one request; returns (status, body, headers)."""
        split = urlsplit(raw_path)
        query = parse_qs(split.query)
        with self._lock:
            self.requests.append(Request(method, raw_path, headers))
        for route_method, pattern, name in ROUTES:
            match = re.fullmatch(pattern, split.path)
            if route_method == method and match:
                try:
                    with self._lock:
                        return getattr(self, name)(match, headers, query, body)
                except HubError as error:
                    extra = dict(error.headers)
                    if error.code:
                        extra["X-Error-Code"] = error.code
                    extra["X-Error-Message"] = error.message
                    return error.status, {"error": error.message, **error.fields}, extra
        logger.warning("test Hub: unknown route %s %s", method, split.path)
        with self._lock:
            self.unknown.append(f"{method} {split.path}")
        return 404, {"error": f"unknown route {method} {split.path}"}, {}


def _handler_for(hub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {name.lower(): value for name, value in self.headers.items()}
            status, content, extra = hub.handle(self.command, self.path, headers, body)
            data = content if isinstance(content, bytes) else json.dumps(content).encode()
            self.send_response(status)
            if not isinstance(content, bytes):
                self.send_header("Content-Type", "application/json")
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format, *args):  # the request line only, never headers
            logger.debug("test Hub: " + format, *args)

    return Handler
