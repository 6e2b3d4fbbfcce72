"""A tiny HTTP endpoint standing in for our web process: records every webhook the sandbox posts."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs


class WebhookReceiver:
    """Records each POST (path, headers, form params or JSON body) and answers `default_status`,
    or the status codes queued in `answers` first (to test a provider's callback retries).
    `port` 0 takes a free one; a given port lets a test bring a receiver up where one was down."""

    def __init__(self, default_status: int = 200, port: int = 0) -> None:
        self.calls: list[dict[str, Any]] = []
        self.answers: list[int] = []
        self.lock = threading.Lock()
        self.arrived = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                content_type = self.headers.get("Content-Type") or ""
                with receiver.lock:
                    status = receiver.answers.pop(0) if receiver.answers else default_status
                    receiver.calls.append(
                        {
                            "path": self.path,
                            "headers": dict(self.headers),
                            "content_type": content_type,
                            "params": {k: v[0] for k, v in parse_qs(raw.decode()).items()},
                            "body": json.loads(raw) if content_type.startswith("application/json") else None,
                            "status": status,
                            "at": time.monotonic(),
                        }
                    )
                receiver.arrived.set()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def matching(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        with self.lock:
            return [call for call in self.calls if predicate(call)]

    def clear(self) -> None:
        with self.lock:
            self.calls.clear()
            self.answers.clear()
        self.arrived.clear()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
