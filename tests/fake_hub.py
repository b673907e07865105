"""A tiny Hugging Face Hub on loopback, for tests that must not reach the network.

It answers just what ``huggingface_hub``'s ``model_info`` and
``snapshot_download`` (version 2.4) ask, and records every request:

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: the
  repository's commit (``sha``), its files (``siblings``) and whether it is gated;
- ``GET /api/models/{repo}/tree/{rev}``: the file list, one page, no ``Link``;
- ``HEAD`` and ``GET /{repo}/resolve/{rev}/{file}``: the file, with the
  ``ETag``, ``X-Repo-Commit`` and ``Content-Length`` headers the client
  requires. No ``X-Xet-*`` headers, so the client downloads over plain HTTP.

An unknown repository gets the hub's 404 ``RepoNotFound``. A gated repository
shows its metadata to anyone (as the hub does) but answers its files only to
``Authorization: Bearer <token>``, else 401 ``GatedRepo``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

REPO = Path(__file__).resolve().parents[1]


def run_with_hub(
    code: str, args: list[str], home: Path, endpoint: str, timeout_s: float, **env: str
) -> Any:
    """Run ``code`` in a fresh interpreter whose huggingface_hub sees only
    ``home`` as ``HF_HOME`` and ``endpoint`` as the hub (it reads its
    variables when imported, and the test session sets ``HF_HUB_OFFLINE``),
    plus ``env``; the JSON its last line of output prints."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGING_FACE_")) and k != "TRANSFORMERS_OFFLINE"
    }
    clean |= {"HF_HOME": str(home), "HF_ENDPOINT": endpoint, "PYTHONPATH": str(REPO), **env}
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=clean,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    gated_token: str | None = None
    """When set, files are served only to this bearer token."""
    sha: str = ""

    def __post_init__(self) -> None:
        if not self.sha:
            digest = hashlib.sha1()
            for name in sorted(self.files):
                digest.update(name.encode() + b"\0" + self.files[name])
            self.sha = digest.hexdigest()


@dataclass
class FakeHub:
    """A loopback hub serving ``repos``; use as a context manager."""

    repos: dict[str, FakeRepo]
    requests: list[tuple[str, str]] = field(default_factory=list)
    """``(method, path)`` of every request received."""

    def __post_init__(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fetched(self) -> list[str]:
        """Paths of the files whose bytes were sent (GET on ``resolve``)."""
        return [
            p.split("/resolve/", 1)[1].split("/", 1)[1]
            for m, p in self.requests
            if m == "GET" and "/resolve/" in p
        ]

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def _answer(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path))
            if path.startswith("/api/models/"):
                self._api(path.removeprefix("/api/models/"), body)
            elif "/resolve/" in path:
                repo_id, rest = path.lstrip("/").split("/resolve/", 1)
                self._file(repo_id, rest.split("/", 1)[1], body)
            else:
                self._send(404, b"", body)

        def _api(self, rest: str, body: bool) -> None:
            parts = rest.split("/")
            repo_id, tail = "/".join(parts[:2]), parts[2:]
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._send(404, b'{"error": "Repository not found"}', body, RepoNotFound=True)
                return
            if tail[:1] == ["tree"]:
                payload: object = [
                    {"type": "file", "path": name, "size": len(data), "oid": _oid(data)}
                    for name, data in sorted(repo.files.items())
                ]
            else:
                payload = {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": repo.sha,
                    "private": False,
                    "gated": "manual" if repo.gated_token else False,
                    "siblings": [{"rfilename": name} for name in sorted(repo.files)],
                }
            self._send(200, json.dumps(payload).encode(), body, content_type="application/json")

        def _file(self, repo_id: str, filename: str, body: bool) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._send(404, b"", body, RepoNotFound=True)
                return
            if (
                repo.gated_token
                and self.headers.get("Authorization") != f"Bearer {repo.gated_token}"
            ):
                self._send(401, b"", body, GatedRepo=True)
                return
            data = repo.files.get(filename)
            if data is None:
                self._send(404, b"", body, EntryNotFound=True, commit=repo.sha)
                return
            self._send(200, data, body, etag=_oid(data), commit=repo.sha)

        def _send(
            self,
            status: int,
            data: bytes,
            body: bool,
            *,
            content_type: str = "application/octet-stream",
            etag: str | None = None,
            commit: str | None = None,
            **error: bool,
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            if etag:
                self.send_header("ETag", f'"{etag}"')
            if commit:
                self.send_header("X-Repo-Commit", commit)
            for code in error:
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", f"{code} (fake hub)")
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler


def _oid(data: bytes) -> str:
    """The git blob id, as the hub gives for files outside LFS."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
