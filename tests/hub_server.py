"""A local HTTP server that answers like the HF hub for what `validate` asks: the model-info API
and `resolve` downloads with HTTP ranges. It counts the bytes it serves per file, and repos under
`private-org/` need the bearer token `hf_test_token`."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TOKEN = "hf_test_token"


class Hub:
    def __init__(self, root: Path):
        self.root = root  # root/ORG/NAME/files
        self.served: dict[str, int] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                hub.requests.append(self.path)
                m = re.fullmatch(r"/api/models/([^/]+)/([^/]+)(?:/revision/([^/?]+))?(?:\?.*)?", self.path)
                if m:
                    return self.api(m.group(1), m.group(2))
                m = re.fullmatch(r"/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)", self.path)
                if m:
                    return self.resolve(m.group(1), m.group(2), m.group(4))
                self.send_error(404)

            def fail(self, status, code):
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def denied(self, org):
                if org == "private-org" and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self.fail(401, "RepoNotFound")
                    return True
                return False

            def api(self, org, name):
                repo = hub.root / org / name
                if self.denied(org):
                    return
                if self.path.endswith("/revision/no-such-branch"):
                    return self.fail(404, "RevisionNotFound")
                if not repo.is_dir():
                    return self.fail(404, "RepoNotFound")
                body = json.dumps(
                    {
                        "id": f"{org}/{name}",
                        "modelId": f"{org}/{name}",
                        "sha": hub.sha(org, name),
                        "private": org == "private-org",
                        "tags": [],
                        "downloads": 0,
                        "likes": 0,
                        "siblings": [{"rfilename": f.name} for f in sorted(repo.iterdir())],
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def resolve(self, org, name, fname):
                if self.denied(org):
                    return
                f = hub.root / org / name / fname
                if not f.is_file():
                    return self.fail(404, "EntryNotFound")
                size = f.stat().st_size
                rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                a, b = (int(rng.group(1)), min(size - 1, int(rng.group(2) or size - 1))) if rng else (0, size - 1)
                with open(f, "rb") as fh:
                    fh.seek(a)
                    data = fh.read(b - a + 1)
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {a}-{b}/{size}")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Repo-Commit", hub.sha(org, name))
                self.send_header("ETag", f'"{hashlib.sha1(fname.encode()).hexdigest()}"')
                self.end_headers()
                self.wfile.write(data)
                hub.served[f"{org}/{name}/{fname}"] = hub.served.get(f"{org}/{name}/{fname}", 0) + len(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def sha(self, org, name) -> str:
        return hashlib.sha1(f"{org}/{name}".encode()).hexdigest()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *a):
        self.server.shutdown()
        self.server.server_close()
