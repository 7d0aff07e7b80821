"""A local stand-in for the Hugging Face Hub HTTP API (the `fake_hub` fixture in conftest.py serves it), for push and
download journeys with no network."""

import base64
import hashlib
import json
import os
import re
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class FakeHubHandler(BaseHTTPRequestHandler):
    """Just enough of the Hub HTTP API for `create_repo` + `upload_folder` and diffusers' `download()`: repos are
    dicts of file contents in `server.repos`, every file is a regular (non-LFS) upload, one branch per repo."""

    def log_message(self, *args):
        pass

    def send_body(self, body: bytes, status=200, content_type="application/json", headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, payload, status=200):
        self.send_body(json.dumps(payload).encode(), status)

    def not_found(self):
        self.send_body(b'{"error": "not found"}', 404, headers={"X-Error-Code": "EntryNotFound"})

    def repo(self, repo_id):
        return self.server.repos.get(repo_id)

    def do_POST(self):
        path = unquote(urlsplit(self.path).path)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}"
            self.server.repos.setdefault(repo_id, {"sha": "0" * 40, "files": {}})
            return self.send_json({"url": f"{self.server.url}/{repo_id}", "name": repo_id, "id": repo_id})
        if path == "/api/validate-yaml":
            return self.send_json({"errors": [], "warnings": []})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/[^/]+", path)
        if not match or self.repo(match[1]) is None:
            return self.not_found()
        repo = self.repo(match[1])
        if match[2] == "preupload":
            files = json.loads(body)["files"]
            return self.send_json(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        repo["sha"] = hashlib.sha1(repr(sorted(repo["files"].items())).encode()).hexdigest()
        commit_url = f"{self.server.url}/{match[1]}/commit/{repo['sha']}"
        self.send_json({"commitUrl": commit_url, "commitOid": repo["sha"], "pullRequestUrl": None})

    def do_GET(self):
        path = unquote(urlsplit(self.path).path)
        info = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
        tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/[^/]+", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path)
        match = info or tree or resolve
        repo = self.repo(match[1]) if match else None
        if repo is None:
            return self.not_found()
        if info:
            siblings = [{"rfilename": name} for name in sorted(repo["files"])]
            return self.send_json({"id": match[1], "sha": repo["sha"], "siblings": siblings, "private": False})
        if tree:
            return self.send_json(
                [
                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in sorted(repo["files"].items())
                ]
            )
        data = repo["files"].get(resolve[2])
        if data is None:
            return self.not_found()
        etag = f'"{hashlib.sha1(data).hexdigest()}"'
        headers = {"X-Repo-Commit": repo["sha"], "ETag": etag}
        self.send_body(data, content_type="application/octet-stream", headers=headers)

    do_HEAD = do_GET


@contextmanager
def serve_fake_hub():
    """A `ThreadingHTTPServer` on 127.0.0.1 with `.url` and `.repos` ({repo id: {"sha", "files"}})."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHubHandler)
    server.url = f"http://127.0.0.1:{server.server_port}"
    server.repos = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def hub_env(fake_hub, tmp_path) -> dict:
    """Environment of a fresh process that talks to the fake Hub with an empty cache."""
    return {
        **os.environ,
        "HF_ENDPOINT": fake_hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_TOKEN": "hf_fake",
        "OMP_NUM_THREADS": "1",  # tiny models: extra intra-op threads only contend for the 2 cores
    }
