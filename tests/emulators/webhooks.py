"""A webhook receiver: a real HTTP/1.1 server (stdlib, threads of its own) that records
every POST and answers per path as told: a status, or no answer at all (hanging).

    with WebhookReceiver() as receiver:
        receiver.answer["/flaky"] = 500   # until set back
        receiver.hang.add("/slow")        # requests wait until released
        receiver.hang_after["/psa"] = 12  # 12 answered, then the same
        url = receiver.url("/flaky")
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    """What the receiver answered (0: it hung up without an answer)."""
    at: float
    """time.monotonic() when the request arrived."""

    @property
    def event_id(self) -> str:
        return self.headers.get("x-recon-event-id", "")


class WebhookReceiver:
    def __init__(self) -> None:
        self.answer: dict[str, int] = {}
        self.hang: set[str] = set()
        self.hang_after: dict[str, int] = {}
        """Answer this many requests at a path, then hang like `hang`."""
        self.received: list[Received] = []
        self.hanging = 0
        """Requests held without an answer right now."""
        self._lock = threading.Lock()
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                arrived = time.monotonic()
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                if receiver._hangs(self.path):
                    with receiver._lock:
                        receiver.hanging += 1
                    receiver._release.wait(120)
                    with receiver._lock:
                        receiver.hanging -= 1
                    receiver._record(Received(self.path, headers, body, 0, arrived))
                    self.close_connection = True
                    return
                status = receiver.answer.get(self.path, 200)
                receiver._record(Received(self.path, headers, body, status, arrived))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _hangs(self, path: str) -> bool:
        if path in self.hang:
            return True
        limit = self.hang_after.get(path)
        return limit is not None and len(self.at(path)) >= limit

    def _record(self, received: Received) -> None:
        with self._lock:
            self.received.append(received)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def at(self, path: str, *, delivered: bool = True) -> list[Received]:
        """What reached `path`, in arrival order (only 2xx answers when `delivered`)."""
        with self._lock:
            return [
                r
                for r in self.received
                if r.path == path and (not delivered or 200 <= r.status < 300)
            ]

    def release(self) -> None:
        """Stop hanging: requests waiting now hang up, later ones are answered."""
        self.hang.clear()
        self.hang_after.clear()
        self._release.set()

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()


if __name__ == "__main__":
    # A receiver of its own process (for benchmarks): prints its port, answers until
    # stdin closes; paths given as arguments hang.
    import sys

    with WebhookReceiver() as served:
        served.hang.update(sys.argv[1:])
        print(served.url("").rsplit(":", 1)[1], flush=True)
        sys.stdin.read()
